"""The l2 forward's |k|^2 by the key parts' product (KEXT) against an FMA per score, on the GPU.

    TRITON_INTERPRET=0 python bench/l2_key_parts_gpu.py check   # both forms against float64
    TRITON_INTERPRET=0 python bench/l2_key_parts_gpu.py time    # both forms, interleaved rounds

`check`: l2 with a learnable per-head scale in bf16, fp16 and fp32 (odd sizes, GQA, causal, bool
and float masks, inputs off the origin, head dims 24-256, one query row), output and every gradient
against `attention_reference` in float64, per form. `time`: forward and forward+backward medians
at B=4, H=8 (N=8192 D=64 beside SDPA's dot and the augmented-SDPA l2, then N=4096 at D=128 and
256, and N=2048 at D=64), the two forms interleaved in each round. Results in $OUT/l2_key_parts.json.
"""
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from attention_gpu import l2_trick, rel  # noqa: E402
from fusion_backend.kernels import attention as tc  # noqa: E402
from fusion_backend.ops.attention import attention, attention_reference  # noqa: E402

dev = "cuda"
RES = {"check": [], "time": []}
FORMS = {"fma": False, "parts": True}  # the value of tc.L2_KEY_PARTS_ON
TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
CASES = [  # B, H, Hkv, Nq, Nk, D, causal, mask, mean, scale
    (2, 4, 4, 1000, 1000, 64, False, None, 0.0, 0.2), (2, 4, 4, 1000, 1000, 64, False, None, 2.0, 1.0),
    (1, 4, 2, 37, 123, 24, True, None, 0.0, 0.05), (2, 2, 2, 130, 77, 80, False, "bool", 0.5, 0.3),
    (1, 2, 1, 64, 300, 128, False, "float", 0.0, 0.1), (1, 2, 2, 200, 200, 256, True, None, 0.0, 0.02),
    (1, 2, 2, 1, 500, 64, False, None, 0.0, 0.5)]


def check(form):
    tc.L2_KEY_PARTS_ON = FORMS[form]
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for i, (B, H, Hkv, Nq, Nk, D, causal, mask, mean, lam) in enumerate(CASES):
            torch.manual_seed(i)
            q = (torch.randn(B, H, Nq, D, device=dev) + mean).to(dt).requires_grad_()
            k = (torch.randn(B, Hkv, Nk, D, device=dev) + mean).to(dt).requires_grad_()
            v = torch.randn(B, Hkv, Nk, D, device=dev).to(dt).requires_grad_()
            scale = (torch.rand(H, device=dev) * lam + lam / 2).requires_grad_()
            am = None
            if mask == "bool":
                am = torch.rand(B, 1, Nq, Nk, device=dev) > 0.3
            elif mask == "float":
                am = torch.randn(1, H, Nq, Nk, device=dev).to(dt)
            out = attention(q, k, v, metric="l2", scale=scale, causal=causal, attn_mask=am, enable_gqa=Hkv != H)
            do = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v, scale), do)
            r64 = [t.detach().double().requires_grad_() for t in (q, k, v, scale)]
            am64 = None if am is None else (am if am.dtype == torch.bool else am.double())
            ref = attention_reference(*r64[:3], metric="l2", scale=r64[3], causal=causal, attn_mask=am64,
                                      enable_gqa=Hkv != H)
            ref_grads = torch.autograd.grad(ref, r64, do.double())
            errs = [rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
            ok = all(torch.isfinite(t).all().item() for t in (out, *grads)) and max(errs) < TOL[dt]
            RES["check"].append(dict(form=form, dtype=str(dt), case=i, errs=errs, ok=ok))
            print(form, str(dt)[6:], CASES[i], " ".join(f"{e:.1e}" for e in errs), "OK" if ok else "FAIL", flush=True)


def timing(rounds, N, D, baselines):
    B, H = 4, 8
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    lam = torch.tensor(0.05, device=dev, requires_grad=True)
    rows = [("ours dot", None, lambda: attention(q, k, v, metric="dot")),
            ("sdpa default dot", None, lambda: F.scaled_dot_product_attention(q, k, v)),
            ("sdpa-trick l2 learnable", None, lambda: l2_trick(q, k, v, lam)),
            ("sdpa-trick l2 constant", None, lambda: l2_trick(q, k, v, lam.detach()))] if baselines else []
    for form in FORMS:
        rows += [(f"l2 learnable [{form}]", form, lambda: attention(q, k, v, metric="l2", scale=lam)),
                 (f"l2 constant [{form}]", form, lambda: attention(q, k, v, metric="l2", scale=0.05))]
    for r in range(rounds):
        for name, form, fn in rows:
            if form:
                tc.L2_KEY_PARTS_ON = FORMS[form]
            for bwd in (False, True):
                def run():
                    if bwd:
                        o = fn()
                        o.backward(torch.ones_like(o))
                    else:
                        with torch.no_grad():
                            fn()
                ms = do_bench(run, warmup=25, rep=100, return_mode="median")
                RES["time"].append(dict(round=r, name=name, bwd=bwd, ms=ms, N=N, D=D))
                print(f"round {r} N={N} D={D} {name:28s} {'fwd+bwd' if bwd else 'fwd    '} {ms:8.3f}", flush=True)


if __name__ == "__main__":
    RES["env"] = dict(torch=torch.__version__, card=torch.cuda.get_device_name())
    if sys.argv[1:] == ["check"]:
        for form in FORMS:
            check(form)
    elif sys.argv[1:] == ["time"]:
        timing(3, 8192, 64, True)
        for N, D in ((4096, 128), (4096, 256), (2048, 64)):
            timing(2, N, D, False)
    else:
        sys.exit("usage: l2_key_parts_gpu.py check|time")
    json.dump(RES, open(os.path.join(os.environ.get("OUT", "/tmp"), "l2_key_parts.json"), "w"), indent=1)
