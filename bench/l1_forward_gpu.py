"""L1 attention forward: launch configs (tile shapes, per-thread sub-tiles) checked against float64
and the default kernel, then timed at the issue's shape against the measured FP32 ceiling.

    TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 python bench/l1_forward_gpu.py [--configs KEY,KEY] [--n 8192]

Writes $OUT/l1_forward_gpu.json. The 2-instruction floor is 2*B*H*N^2*D / (FMA/s of the ceiling):
a subtract and an add of its absolute value per (query, key, dim).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from attention_gpu import fma_ceiling  # noqa: E402
from fusion_backend.kernels import attention_l1 as L1  # noqa: E402
from fusion_backend.ops.attention import attention_reference  # noqa: E402

dev = "cuda"
OUT = os.environ.get("OUT", "/tmp")
RES = {"env": dict(torch=torch.__version__, triton=triton.__version__, card=torch.cuda.get_device_name()),
       "check": [], "time": []}


def rel(a, b):
    a = a.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(key, cfg, dtype, B, H, Hkv, Nq, Nk, D, causal=False, mask=None, dropout_p=0.0):
    """One config against float64 (no dropout) and against the default config's kernel (same
    seed): output and the row statistics backward reads."""
    q = torch.randn(B, H, Nq, D, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, D, device=dev, dtype=dtype)
    sc = torch.rand(H, device=dev) * 0.2 + 0.02
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, Nq, Nk, device=dev) > 0.2
    elif mask == "float":
        m = torch.randn(1, H, Nq, Nk, device=dev)
    full = lambda mm: None if mm is None else mm.expand(B, H, Nq, Nk)  # noqa: E731
    out = torch.full((B, H, Nq, D), float("nan"), device=dev, dtype=dtype)
    o_new, st_new = L1.l1_attention_forward(q, k, v, sc, causal=causal, mask=full(m), dropout_p=dropout_p, seed=77,
                                            config=cfg, out=out)
    o_def, st_def = L1.l1_attention_forward(q, k, v, sc, causal=causal, mask=full(m), dropout_p=dropout_p, seed=77)
    e_def = rel(o_new, o_def.double())
    e_stats = max(rel(a, b.double()) for a, b in zip(st_new, st_def) if torch.isfinite(b).all())
    if dropout_p == 0:
        ref = attention_reference(q.double(), k.double(), v.double(), metric="l1", scale=sc.double(),
                                  causal=causal, attn_mask=m, enable_gqa=H != Hkv)
        e_ref = rel(o_new, ref)
    else:
        e_ref = 0.0
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    ok = e_ref <= tol and e_def <= tol and e_stats <= 1e-5 and bool(torch.isfinite(o_new).all())
    RES["check"].append(dict(config=key, dtype=str(dtype), shape=[B, H, Hkv, Nq, Nk, D], causal=causal, mask=mask,
                             dropout_p=dropout_p, err_ref=e_ref, err_default=e_def, err_stats=e_stats, ok=ok))
    print(f"{'OK ' if ok else 'BAD'} {key:28s} {str(dtype):15s} {[B, H, Hkv, Nq, Nk, D]} causal={causal} mask={mask} "
          f"p={dropout_p}: vs f64 {e_ref:.1e}, vs default {e_def:.1e}, stats {e_stats:.1e}", flush=True)
    return ok


_BWD = dict(num_stages=1, BWD_BLOCK_M=64, BWD_BLOCK_N=64, bwd_num_warps=4, bwd_num_stages=1)
_PLAIN = dict(CONTIG_M=False, CONTIG_N=False, ASM_M=0, ASM_N=0, PREFETCH=False, UNROLL=4)  # no PTX
_VEC = dict(CONTIG_M=True, CONTIG_N=True, ASM_M=4, ASM_N=4, PREFETCH=False, UNROLL=4)  # vector loads
VARIANTS = {  # forward tile and sub-tile layout (keys override `l1_sub_tiles`); backward as the default
    "m128n128w8-s8x8": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, **_PLAIN, **_BWD),
    "m128n128w8-s8x8-v4-u8": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, **dict(_VEC, UNROLL=8), **_BWD),
    "m128n128w8-s8x8-v4-pf": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, **dict(_VEC, PREFETCH=True), **_BWD),
    "m128n128w8-s8x8-v4-u8-pf": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, **_BWD),  # the default layout
    "m256n64w8-s8x8-v4": dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, **_VEC, **_BWD),
    "m256n64w8-s8x8-v4-pf": dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, **dict(_VEC, PREFETCH=True), **_BWD),
    "m256n64w8-s8x8-v4-u8": dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, **dict(_VEC, UNROLL=8), **_BWD),
    "m256n64w8-s8x8-v4-u2-pf": dict(BLOCK_M=256, BLOCK_N=64, num_warps=8, **dict(_VEC, UNROLL=2, PREFETCH=True),
                                    **_BWD),
    "m128n64w8-s4x8-v4": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, **_VEC, **_BWD),
    "m128n64w4-s8x8": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, **_PLAIN, **_BWD),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="", help="comma-separated keys of VARIANTS (default: all)")
    ap.add_argument("--n", type=int, default=8192)
    args = ap.parse_args()
    variants = VARIANTS
    keys = [k for k in args.configs.split(",") if k] or list(variants)
    t0 = time.time()
    for key in keys:
        cfg = variants[key]
        for dtype in (torch.bfloat16, torch.float32):
            check(key, cfg, dtype, 2, 4, 2, 256, 512, 64)
            check(key, cfg, dtype, 1, 2, 2, 200, 333, 64, causal=True)
        check(key, cfg, torch.bfloat16, 2, 2, 2, 256, 256, 64, mask="bool")
        check(key, cfg, torch.float16, 1, 2, 1, 256, 256, 32, mask="float")
        check(key, cfg, torch.bfloat16, 1, 2, 2, 256, 256, 64, causal=True, dropout_p=0.2)
        check(key, cfg, torch.bfloat16, 1, 2, 2, 1, 77, 64)
    bad = sum(not r["ok"] for r in RES["check"])
    print(f"== checks: {len(RES['check'])}, {bad} failed ({time.time() - t0:.0f} s)", flush=True)
    fma = fma_ceiling()
    B, H, N, D = 4, 8, args.n, 64
    floor_ms = 2 * B * H * N * N * D / fma * 1e3
    RES["ceiling"] = dict(fma_per_s=fma, floor_ms=floor_ms)
    print(f"FP32 ceiling {fma / 1e12:.1f} TFMA/s: 2-instruction floor {floor_ms:.2f} ms at N={N}", flush=True)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    sc = torch.full((H,), 0.05, device=dev)
    for key in ["default"] + keys:
        cfg = None if key == "default" else variants[key]
        if key != "default" and not all(r["ok"] for r in RES["check"] if r["config"] == key):
            print(f"skip {key}: failed its checks", flush=True)
            continue
        ms = do_bench(lambda: L1.l1_attention_forward(q, k, v, sc, config=cfg), warmup=5, rep=100,
                      return_mode="median")
        RES["time"].append(dict(config=key, ms=ms, of_ceiling=floor_ms / ms))
        print(f"{key:28s} {ms:8.3f} ms  {floor_ms / ms * 100:5.1f}% of the FP32 ceiling", flush=True)
        json.dump(RES, open(os.path.join(OUT, "l1_forward_gpu.json"), "w"), indent=1)
    # The same forward through the op, as bench/attention_gpu.py times it (no grad: no row stats)
    from fusion_backend.ops.attention import attention
    lam = torch.tensor(0.05, device=dev)
    for name, fn in (("kernel, default, no row stats", lambda: L1.l1_attention_forward(q, k, v, sc, stats=False)),
                     ("op, no grad", lambda: attention(q, k, v, metric="l1", scale=lam))):
        with torch.no_grad():
            ms = do_bench(fn, warmup=5, rep=100, return_mode="median")
        RES["time"].append(dict(config=name, ms=ms, of_ceiling=floor_ms / ms))
        print(f"{name:28s} {ms:8.3f} ms  {floor_ms / ms * 100:5.1f}% of the FP32 ceiling", flush=True)
    json.dump(RES, open(os.path.join(OUT, "l1_forward_gpu.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
