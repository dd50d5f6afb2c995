"""L1 attention backward: variants (legacy kernels, sub-tile kernels and their constexprs) checked
against float64 autograd gradients of `attention_reference` and against the default backward, then
the backward alone timed at B=4 H=8 N=8192 D=64 bf16.

    TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 python bench/l1_backward_gpu.py [--configs KEY,KEY] [--n 8192] [--quick]

Writes $OUT/l1_backward_gpu.json. The forward (default config) runs once per shape to produce the
output and the row statistics the backward reads. `--device cpu` with TRITON_INTERPRET=1 runs the
fp32 checks only (small shapes), as a dry run.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402

from fusion_backend.kernels import attention_l1 as L1  # noqa: E402
from fusion_backend.ops.attention import attention_reference  # noqa: E402

RES = {"check": [], "time": []}

_SUB = dict(BWD_IMPL="sub")
VARIANTS = {  # keys merged into the default config; bwd_sub overrides `l1_bwd_sub_tiles`
    "legacy": dict(BWD_IMPL="legacy"),
    "sub": dict(_SUB),  # the default: 64x64 tiles, 4 warps, UNROLL 8, GUNROLL 8, PTX loads and sign
    "sub-gu2": dict(_SUB, bwd_sub=dict(GUNROLL=2)),
    "sub-gu4": dict(_SUB, bwd_sub=dict(GUNROLL=4)),
    "sub-u4": dict(_SUB, bwd_sub=dict(UNROLL=4)),
    "sub-u2": dict(_SUB, bwd_sub=dict(UNROLL=2)),
    "sub-nosignasm": dict(_SUB, bwd_sub=dict(SIGN_ASM=False)),
    "sub-noasm": dict(_SUB, bwd_sub=dict(SIGN_ASM=False, GASM=0, ASM_M=0, ASM_N=0)),
    "sub-m128w8": dict(_SUB, BWD_BLOCK_M=128, BWD_BLOCK_N=128, bwd_num_warps=8),
    "sub-m32w1": dict(_SUB, BWD_BLOCK_M=32, BWD_BLOCK_N=32, bwd_num_warps=1),
    "sub-m64w2": dict(_SUB, BWD_BLOCK_M=64, BWD_BLOCK_N=64, bwd_num_warps=2),
}


def rel(a, b):
    a = a.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def cfg_of(dev, dtype, extra):
    return dict(L1.default_l1_config(64, dtype, dev), **(extra or {}))


def check(key, dev, dtype, B, H, Hkv, Nq, Nk, D, causal=False, mask=None, dropout_p=0.0, ties=False):
    """dq, dk, dv, dscale (and dmask for a float mask) of one variant against float64 autograd
    (no dropout) and against the default backward (same forward, same seed)."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    mk = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
    q, k, v = mk(B, H, Nq, D), mk(B, Hkv, Nk, D), mk(B, Hkv, Nk, D)
    if ties:  # many exactly equal q_d, k_d: sign(0) = 0
        q, k = (q * 2).round() / 2, (k * 2).round() / 2
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sc = (torch.rand(H, generator=g) * 0.2 + 0.02).to(dev)
    m = None
    if mask == "bool":
        m = (torch.rand(B, 1, Nq, Nk, generator=g) > 0.2).to(dev)
    elif mask == "float":
        m = torch.randn(1, H, Nq, Nk, generator=g).to(dev)
    full = lambda mm: None if mm is None else mm.expand(B, H, Nq, Nk)  # noqa: E731
    mask_grad = mask == "float"
    base = cfg_of(dev, dtype, None)
    out, st = L1.l1_attention_forward(q, k, v, sc, causal=causal, mask=full(m), dropout_p=dropout_p, seed=77,
                                      config=base)
    do = mk(B, H, Nq, D).to(dtype)
    kw = dict(causal=causal, mask=full(m), dropout_p=dropout_p, seed=77, mask_grad=mask_grad)
    new = L1.l1_attention_backward(do, q, k, v, sc, out, st, config=cfg_of(dev, dtype, VARIANTS[key]), **kw)
    dflt = L1.l1_attention_backward(do, q, k, v, sc, out, st, **kw)
    names = ["dq", "dk", "dv", "dscale"] + (["dmask"] if mask_grad else [])
    new = list(new[:4]) + ([new[4]] if mask_grad else [])
    dflt = list(dflt[:4]) + ([dflt[4]] if mask_grad else [])
    e_def = {n: rel(a, b) for n, a, b in zip(names, new, dflt)}
    e_ref = {}
    if dropout_p == 0:
        ins = [t.detach().double().requires_grad_() for t in (q, k, v, sc)]
        mm = None
        if m is not None:
            mm = m.double().requires_grad_() if mask_grad else m
        ref = attention_reference(*ins[:3], metric="l1", scale=ins[3], causal=causal, attn_mask=mm,
                                  enable_gqa=H != Hkv)
        grads = torch.autograd.grad(ref, ins + ([mm] if mask_grad else []), do.double())
        if mask_grad:  # the kernel's dmask has the mask's (broadcast) shape
            grads = list(grads[:4]) + [grads[4].sum_to_size(new[4].shape)]
        e_ref = {n: rel(a, b) for n, a, b in zip(names, new, grads)}
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    tol_def = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    ok = all(e <= tol for e in e_ref.values()) and all(e <= tol_def for e in e_def.values())
    RES["check"].append(dict(config=key, dtype=str(dtype), shape=[B, H, Hkv, Nq, Nk, D], causal=causal, mask=mask,
                             dropout_p=dropout_p, ties=ties, err_ref=e_ref, err_default=e_def, ok=ok))
    fmt = lambda d: " ".join(f"{n} {e:.1e}" for n, e in d.items())  # noqa: E731
    print(f"{'OK ' if ok else 'BAD'} {key:14s} {str(dtype):14s} {[B, H, Hkv, Nq, Nk, D]} causal={causal} mask={mask} "
          f"p={dropout_p} ties={ties}: vs f64 [{fmt(e_ref)}] vs default [{fmt(e_def)}]", flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="", help="comma-separated keys of VARIANTS (default: all)")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--quick", action="store_true", help="two checks a variant (fewer compiles): bf16 with ties, "
                    "fp32 causal with uneven lengths")
    args = ap.parse_args()
    dev = args.device
    keys = [k for k in args.configs.split(",") if k] or list(VARIANTS)
    out_dir = os.environ.get("OUT", "/tmp")
    if dev == "cuda":
        RES["env"] = dict(torch=torch.__version__, triton=triton.__version__, card=torch.cuda.get_device_name())
    t0 = time.time()
    dtypes = (torch.bfloat16, torch.float32) if dev == "cuda" else (torch.float32,)
    for key in keys:
        if args.quick:
            check(key, dev, dtypes[0], 2, 4, 2, 256, 512, 64, ties=True)
            check(key, dev, torch.float32, 1, 2, 2, 200, 333, 64, causal=True)
            continue
        for dtype in dtypes:
            check(key, dev, dtype, 2, 4, 2, 256, 512, 64, ties=True)
            check(key, dev, dtype, 1, 2, 2, 200, 333, 64, causal=True)
        check(key, dev, dtypes[0], 2, 2, 2, 256, 256, 64, mask="bool")
        check(key, dev, torch.float16 if dev == "cuda" else torch.float32, 1, 2, 1, 256, 256, 32, mask="float")
        check(key, dev, dtypes[0], 1, 2, 2, 256, 256, 64, causal=True, dropout_p=0.2)
        check(key, dev, dtypes[0], 1, 2, 2, 1, 77, 64)
    bad = sum(not r["ok"] for r in RES["check"])
    print(f"== checks: {len(RES['check'])}, {bad} failed ({time.time() - t0:.0f} s)", flush=True)
    json.dump(RES, open(os.path.join(out_dir, "l1_backward_gpu.json"), "w"), indent=1)
    if dev != "cuda" or args.no_time:
        return
    from triton.testing import do_bench
    B, H, N, D = 4, 8, args.n, 64
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    sc = torch.full((H,), 0.05, device=dev)
    out, st = L1.l1_attention_forward(q, k, v, sc)
    do = torch.randn_like(out)
    ms_fwd = do_bench(lambda: L1.l1_attention_forward(q, k, v, sc), warmup=3, rep=50, return_mode="median")
    print(f"{'forward (default)':22s} {ms_fwd:9.2f} ms", flush=True)
    RES["time"].append(dict(config="forward", ms=ms_fwd))
    base_ms = None
    for key in ["default"] + keys:
        cfg = None if key == "default" else cfg_of(dev, torch.bfloat16, VARIANTS[key])
        if key != "default" and not all(r["ok"] for r in RES["check"] if r["config"] == key):
            print(f"skip {key}: failed its checks", flush=True)
            continue
        fn = lambda: L1.l1_attention_backward(do, q, k, v, sc, out, st, config=cfg)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        t = time.time()
        fn()
        torch.cuda.synchronize()
        once = (time.time() - t) * 1e3
        reps = 3 if once > 150 else 10
        ms = do_bench(fn, warmup=1, rep=max(int(once * reps), 20), return_mode="median")
        if key == "legacy":
            base_ms = ms
        RES["time"].append(dict(config=key, ms=ms))
        print(f"{key:22s} {ms:9.2f} ms  ({ms / ms_fwd:.1f}x the forward)", flush=True)
        json.dump(RES, open(os.path.join(out_dir, "l1_backward_gpu.json"), "w"), indent=1)
    if base_ms:
        for r in RES["time"]:
            if r["config"] not in ("forward", "legacy"):
                print(f"  {r['config']:20s} speed-up vs legacy {base_ms / r['ms']:.2f}x")
    json.dump(RES, open(os.path.join(out_dir, "l1_backward_gpu.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
