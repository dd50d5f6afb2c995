"""Attention over tensors of 2**31 elements or more, where a 32-bit slice base (b * stride_b)
would wrap: the launches take the kernels' 64-bit WIDE code there (`kernels.attention.wide_offsets`).
Each case runs the op forward and backward once in bf16 and checks the (batch, head) slice at the
largest offset, output and q/k/v gradients, against a float64 reference of that slice alone; a
fallback to the PyTorch reference counts as a failure, since it would pass on the reference's own math.

    TRITON_INTERPRET=0 python bench/attention_wide_gpu.py [--out DIR] [--cases dot,l2,...]
    python bench/attention_wide_gpu.py --small     # CPU, Triton's interpreter: the script itself

About 40 GB of GPU memory for the largest case. --small lowers the threshold so that tiny tensors
take the WIDE code.
"""
import argparse
import json
import os
import sys
import warnings

SMALL = "--small" in sys.argv
os.environ.setdefault("TRITON_INTERPRET", "1" if SMALL else "0")
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fusion_backend.kernels import attention as tc  # noqa: E402
from fusion_backend.ops.attention import attention, attention_reference  # noqa: E402
from fusion_backend.ops.fallback import FusionFallbackWarning  # noqa: E402

# name: (B, H, Nq, Nk, D, metric, scale, mask); each q (or k, v, or the mask) spans more than 2**31
# elements. L1 stops at the forward: its backward's fp32 copies of q and k need more than 80 GB here.
CASES = {
    "dot": (130, 16, 8192, 8192, 128, "dot", None, False),
    "l2": (130, 16, 8192, 8192, 128, "l2", 0.05, False),
    "cosine": (130, 16, 8192, 8192, 128, "cosine", "learnable", False),
    "l1-forward": (1030, 16, 1024, 1024, 128, "l1", 0.02, False),
    "decode": (64, 32, 1, 8200, 128, "dot", None, False),  # the split forward over a 2**31 cache
    "mask": (33, 2, 8192, 8200, 64, "dot", None, True),    # a (B, 1, Nq, Nk) bool mask of 2.2e9
}
SMALL_CASES = {name: (2, 2, 1 if name == "decode" else 24, 40, 16, m, s, mk)
               for name, (_, _, _, _, _, m, s, mk) in CASES.items()}


def rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def run_case(name, B, H, Nq, Nk, D, metric, scale, with_mask, device):
    torch.manual_seed(0)
    dt = torch.float32 if SMALL else torch.bfloat16
    q = torch.randn(B, H, Nq, D, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(B, H, Nk, D, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(B, H, Nk, D, device=device, dtype=dt, requires_grad=True)
    if scale == "learnable":
        scale = torch.full((H,), 10.0, device=device, requires_grad=True)
    mask = None
    if with_mask:
        mask = torch.rand(B, 1, Nq, Nk, device=device) > 0.3
        mask[..., 0] = True
    backward = metric != "l1" or SMALL
    out = attention(q, k, v, metric=metric, scale=scale, attn_mask=mask)
    g = torch.randn_like(out)
    if backward:
        out.backward(g)
    b, h = B - 1, H - 1  # the slice furthest from each tensor's base
    sl = (slice(b, b + 1), slice(h, h + 1))
    ins = [t.detach()[sl].double().requires_grad_() for t in (q, k, v)]
    s64 = scale.detach()[h:h + 1].double() if isinstance(scale, torch.Tensor) else scale
    ref = attention_reference(*ins, metric=metric, scale=s64, attn_mask=None if mask is None else mask[b:b + 1])
    errors = {"out": rel(out[sl], ref)}
    finite = bool(torch.isfinite(out).all())
    if backward:
        ref.backward(g[sl].double())
        for n, t, r in zip(("dq", "dk", "dv"), (q, k, v), ins):
            errors[n] = rel(t.grad[sl], r.grad)
            finite = finite and bool(torch.isfinite(t.grad).all())
    # bf16 against float64: the bounds of attention_gpu.py's checks (TOL_OUT, TOL_GRAD)
    ok = finite and errors["out"] < 2e-2 and all(e < 6e-2 for n, e in errors.items() if n != "out")
    elements = max(t.numel() for t in (q, k, v) + ((mask,) if mask is not None else ()))
    return dict(case=name, ok=ok, finite=finite, errors=errors, elements=elements,
                wide=bool(tc.wide_offsets(q, k, v, mask)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    cases = SMALL_CASES if SMALL else CASES
    if SMALL:
        tc.WIDE_OFFSETS_FROM = 1
    warnings.simplefilter("error", FusionFallbackWarning)
    device = "cpu" if SMALL else "cuda"
    results = []
    for name in args.cases.split(","):
        try:
            r = run_case(name, *cases[name], device)
        except Exception as exc:  # noqa: BLE001 -- report and go on to the next case
            r = dict(case=name, ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        results.append(r)
        errs = " ".join(f"{n} {e:.2e}" for n, e in r.get("errors", {}).items())
        print(f"== wide {name}: {'PASS' if r['ok'] else 'FAIL'} {errs} {r.get('error', '')}"
              f"{' elements %.2f x 2**31, wide=%s' % (r['elements'] / 2**31, r['wide']) if 'elements' in r else ''}",
              flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    json.dump(results, open(os.path.join(args.out, "attention_wide_gpu.json"), "w"), indent=1)
    print(f"{sum(r['ok'] for r in results)} of {len(results)} passed")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
