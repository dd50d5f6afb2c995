"""What each attention feature costs at a real model's shapes, forward and backward kernels apart.

    TRITON_INTERPRET=0 python bench/attention_variants_gpu.py [--old DIR] [--quick]

Shapes (bf16):
  truthgpt  B=8, H=8, T=4096, D=32, L2 with a learnable per-head scale (examples/truthgpt.py)
  gpt2      B=8, H=12, T=1024, D=64, dot (GPT-2 small), beside SDPA (flash) in the same run
Variants: the mask as a registered tril buffer (bool, exact lower triangle), the same buffer with
one entry below the diagonal dropped (so the kernels must read it), causal=True; dropout 0.1 or
none. Each kernel launcher is timed alone (`attention_forward`, `attention_backward`) with
triton.testing.do_bench (median ms).

First, a correctness check of every variant through the op at T=512: outputs and q/k/v/scale
gradients against the float64 reference with the same dropout seed (NaN-poisoned allocator).

--old DIR times a second copy of the kernels package (DIR holding an `oldkernels/` package made
from an earlier commit's fusion_backend/kernels) in the same process, to measure a change.
Writes $OUT/attention_variants.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from fusion_backend.kernels import attention as new_kernels  # noqa: E402
from fusion_backend.ops.attention import attention, attention_reference  # noqa: E402
from fusion_backend.ops.seed import reference_seed  # noqa: E402

DEV = "cuda"
OUT = os.environ.get("OUT", "/tmp")
SHAPES = {"truthgpt": (8, 8, 4096, 32, "l2"), "gpt2": (8, 12, 1024, 64, "dot"),
          # issue 3's benchmark shape (run with --variants none --dropout 0)
          "dot8k": (4, 8, 8192, 64, "dot"), "l2-8k": (4, 8, 8192, 64, "l2"), "cosine8k": (4, 8, 8192, 64, "cosine")}
RESULTS = {"env": dict(torch=torch.__version__, card=torch.cuda.get_device_name(),
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), "check": [], "time": []}


def save():
    with open(os.path.join(OUT, "attention_variants.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def masks(T):
    tril = torch.ones(T, T, dtype=torch.bool, device=DEV).tril()
    holed = tril.clone()
    holed[T // 2, 0] = False  # still nothing above the diagonal, but no longer the exact triangle
    return {"tril": dict(mask=tril), "tril-read": dict(mask=holed), "causal": dict(causal=True), "none": {}}


def inputs(B, H, T, D, metric, grad=False):
    q, k, v = (torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))
    scale = (torch.full((H,), 0.05 if metric == "l2" else D ** -0.5, device=DEV)
             * (1 + 0.1 * torch.rand(H, device=DEV))).requires_grad_(grad)
    return q, k, v, scale


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(name, metric, B, H, D, T=512, variants=None, drops=(0.0, 0.1)):
    for var, kw in masks(T).items():
        if variants and var not in variants:
            continue
        for p in drops:
            torch.manual_seed(1)
            q, k, v, scale = inputs(B, H, T, D, metric, grad=True)
            torch.cuda.empty_cache()
            torch.empty(2**28, device=DEV, dtype=torch.uint8).fill_(0xFF)  # NaN-poison what gets reused
            torch.manual_seed(7)
            seed = reference_seed()  # the op draws the same after the reseed
            torch.manual_seed(7)
            out = attention(q, k, v, metric=metric, scale=scale, attn_mask=kw.get("mask"),
                            causal=kw.get("causal", False), dropout_p=p)
            g = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v, scale), g)
            ins64 = [t.detach().double().requires_grad_() for t in (q, k, v, scale)]
            ref = attention_reference(*ins64[:3], metric=metric, scale=ins64[3], attn_mask=kw.get("mask"),
                                      causal=kw.get("causal", False), dropout_p=p, dropout_seed=seed)
            refs = torch.autograd.grad(ref, ins64, g.double())
            errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, refs)]
            finite = all(torch.isfinite(t).all().item() for t in (out, *grads))
            ok = finite and errs[0] < 2e-2 and max(errs[1:]) < 5e-2
            row = dict(shape=name, variant=var, dropout=p, T=T, ok=ok, rel_out=errs[0], rel_dq=errs[1],
                       rel_dk=errs[2], rel_dv=errs[3], rel_dscale=errs[4])
            RESULTS["check"].append(row)
            print(json.dumps(row), flush=True)
    save()


def time_kernels(label, K, name, B, H, T, D, metric, rep, variants=None, drops=(0.1, 0.0)):
    torch.manual_seed(0)
    q, k, v, scale = inputs(B, H, T, D, metric)
    for var, kw in masks(T).items():
        if variants and var not in variants:
            continue
        for p in drops:
            args = dict(metric=metric, causal=kw.get("causal", False), mask=kw.get("mask"), dropout_p=p,
                        seed=torch.tensor(123, device=q.device))  # a device seed, as the op passes it
            try:
                fwd = do_bench(lambda: K.attention_forward(q, k, v, scale, stats=True, **args),
                               warmup=10, rep=rep, return_mode="median")
                out, stats = K.attention_forward(q, k, v, scale, stats=True, **args)
                do = torch.randn_like(out)
                bwd = do_bench(lambda: K.attention_backward(do, q, k, v, scale, out, stats, scale_grad=True, **args),
                               warmup=10, rep=rep, return_mode="median")
                row = dict(code=label, shape=name, variant=var, dropout=p, fwd_ms=fwd, bwd_ms=bwd, total_ms=fwd + bwd)
            except Exception as exc:  # noqa: BLE001 -- an old copy may lack a feature
                row = dict(code=label, shape=name, variant=var, dropout=p, error=f"{type(exc).__name__}: {exc}"[:300])
            RESULTS["time"].append(row)
            print(json.dumps(row), flush=True)
            save()


def time_sdpa(name, B, H, T, D, rep):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for p in (0.1, 0.0):
        fwd = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p),
                       warmup=10, rep=rep, return_mode="median")

        def fb():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
            out.backward(torch.ones_like(out))
        total = do_bench(fb, warmup=10, rep=rep, return_mode="median")
        row = dict(code="sdpa", shape=name, variant="causal", dropout=p, fwd_ms=fwd, total_ms=total)
        RESULTS["time"].append(row)
        print(json.dumps(row), flush=True)
    save()


def host_profile(steps=50):
    """Where the host time of op calls goes (cProfile), at a shape small enough for the GPU to idle:
    B=4, H=8, T=1024, D=64, L2 with a learnable per-head scale and a tril bool mask, fwd+bwd."""
    from host_timing import cprofile_text, host_and_wall_ms

    q, k, v, scale = inputs(4, 8, 1024, 64, "l2", grad=True)
    mask = torch.ones(1024, 1024, dtype=torch.bool, device=DEV).tril()

    def step():
        out = attention(q, k, v, metric="l2", scale=scale, attn_mask=mask, dropout_p=0.1)
        out.backward(torch.ones_like(out))
    issue_ms, wall_ms = host_and_wall_ms(step, steps)
    text = cprofile_text(step, steps, limit=25, orders=("tottime", "cumulative"))
    with open(os.path.join(OUT, "attention_host_profile.txt"), "w") as f:
        f.write(f"host issue {issue_ms:.3f} ms/step, wall {wall_ms:.3f} ms/step, {steps} steps\n{text}")
    print(f"host profile: issue {issue_ms:.3f} ms/step, wall {wall_ms:.3f} ms/step", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", help="a folder holding an `oldkernels` package (an earlier fusion_backend/kernels)")
    ap.add_argument("--shapes", default="truthgpt,gpt2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--host-profile", action="store_true", help="only profile the op's host time (cProfile)")
    ap.add_argument("--variants", help="comma-separated subset of tril,tril-read,causal,none (default: the first three)")
    ap.add_argument("--dropout", default="0.1,0.0", help="comma-separated dropout probabilities")
    args = ap.parse_args()
    if args.host_profile:
        host_profile()
        return
    rep = 50 if args.quick else 200
    print(RESULTS["env"], flush=True)
    codes = [("new", new_kernels)]
    if args.old:
        sys.path.insert(0, args.old)
        codes.append(("old", importlib.import_module("oldkernels.attention")))
    variants = args.variants.split(",") if args.variants else ["tril", "tril-read", "causal"]
    drops = tuple(float(p) for p in args.dropout.split(","))
    for name in args.shapes.split(","):
        B, H, T, D, metric = SHAPES[name]
        if not args.skip_check:
            check(name, metric, B, H, D, variants=variants, drops=drops)
        for label, K in codes:
            time_kernels(label, K, name, B, H, T, D, metric, rep, variants=variants, drops=drops)
        if metric == "dot" and "causal" in variants:
            time_sdpa(name, B, H, T, D, rep)
    bad = [r for r in RESULTS["check"] if not r["ok"]]
    print(f"checks: {len(RESULTS['check'])}, failed {len(bad)}")
    for r in RESULTS["time"]:
        if "error" in r:
            print(f"{r['code']:5s} {r['shape']:9s} {r['variant']:10s} p={r['dropout']:.1f}  ERROR {r['error'][:100]}")
        else:
            print(f"{r['code']:5s} {r['shape']:9s} {r['variant']:10s} p={r['dropout']:.1f}  fwd {r['fwd_ms']:7.3f}"
                  f"  bwd {r.get('bwd_ms', float('nan')):7.3f}  total {r['total_ms']:7.3f}")


if __name__ == "__main__":
    main()
