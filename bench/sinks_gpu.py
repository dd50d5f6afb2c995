"""Attention with sinks (GPT-OSS) on the GPU: HF's eager form, eager and under Inductor, against
the same form under truthfuse and the op called directly. Forward+backward, bf16.

    TRITON_INTERPRET=0 python bench/sinks_gpu.py [--seq 2048,4096] [--heads 64,8]

GPT-OSS's layer shapes: 64 query heads over 8 K/V heads, head dim 64, layers alternating full
causal attention and a sliding window of 128. The masks are built inside the compiled function
from aranges, as HF builds them, so truthfuse can prove the causal one constant. Each variant is
first checked against float64 (output and the gradients of q, k, v and the sinks), then timed
with triton.testing.do_bench (median ms) and its peak extra memory measured. SDPA's causal
dot-product attention without sinks is timed beside them as the speed of a plain flash kernel.
Writes $OUT/sinks_gpu.json.
"""
import argparse
import json
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import fusion_backend  # noqa: E402
from fusion_backend.ops.attention import attention, attention_reference  # noqa: E402

dev = "cuda"


def hf_mask(N, window, device):
    """HF's additive mask: 0 where a query sees a key (causal, and within the window), finfo.min
    elsewhere."""
    i = torch.arange(N, device=device)
    keep = i[None, :] <= i[:, None]
    if window:
        keep = keep & (i[None, :] > i[:, None] - window)
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)[None, None]


def gpt_oss_attention(q, k, v, sinks, window=0):
    """transformers' GPT-OSS eager_attention_forward (repeat_kv, mask, sink column, softmax)."""
    B, H, N, D = q.shape
    n = H // k.shape[1]
    k = k[:, :, None].expand(B, k.shape[1], n, N, D).reshape(B, H, N, D)
    v = v[:, :, None].expand(B, v.shape[1], n, N, D).reshape(B, H, N, D)
    w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    w = w + hf_mask(N, window, q.device).to(w.dtype)
    s = sinks.reshape(1, -1, 1, 1).expand(B, -1, N, -1)
    c = torch.cat([w, s], dim=-1)
    c = c - c.max(dim=-1, keepdim=True).values
    probs = F.softmax(c, dim=-1, dtype=c.dtype)
    return torch.matmul(probs[..., :-1].to(v.dtype), v)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def measure(fn, inputs, grad):
    def step():
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return do_bench(step, warmup=10, rep=100, return_mode="median"), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", default="2048,4096")
    ap.add_argument("--heads", default="64,8")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    H, Hkv = (int(x) for x in a.heads.split(","))
    B, D = a.batch, 64
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "checks": []}
    for N in (int(x) for x in a.seq.split(",")):
        for window in (0, 128):
            # a fresh Dynamo per case: three backends compile the same function (and explain a
            # fourth), which would otherwise reach Dynamo's recompile limit and fall back to eager
            torch._dynamo.reset()
            inductor = torch.compile(gpt_oss_attention, dynamic=False)
            fused = torch.compile(gpt_oss_attention, dynamic=False,
                                  backend=fusion_backend.backend(strategy="aggressive", cache=False))
            torch.manual_seed(0)
            q = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(B, Hkv, N, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            sinks = torch.randn(H, device=dev, dtype=torch.bfloat16, requires_grad=True)
            g = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16)
            ins = [q, k, v, sinks]
            variants = {
                "eager": lambda: gpt_oss_attention(q, k, v, sinks, window),
                "inductor": lambda: inductor(q, k, v, sinks, window),
                "truthfuse": lambda: fused(q, k, v, sinks, window),
                "op": lambda: attention(q, k, v, sinks=sinks, enable_gqa=True, causal=not window,
                                        attn_mask=hf_mask(N, window, dev) if window else None),
            }
            # correctness against float64 on these inputs (the sizes every variant times)
            if N <= 2048:
                ins64 = [t.detach().double().requires_grad_() for t in ins]
                mask64 = hf_mask(N, window, dev).double()
                ref = attention_reference(*ins64[:3], sinks=ins64[3], attn_mask=mask64, enable_gqa=True)
                g64 = torch.autograd.grad(ref, ins64, g.double())
                for name in ("eager", "truthfuse", "op"):
                    out = variants[name]()
                    grads = torch.autograd.grad(out, ins, g)
                    errs = [rel(out, ref)] + [rel(x, y) for x, y in zip(grads, g64)]
                    res["checks"].append(dict(N=N, window=window, variant=name, errs=errs))
                    print(f"check N={N} window={window} {name:9s} out {errs[0]:.1e} grads "
                          f"{' '.join(f'{e:.1e}' for e in errs[1:])}", flush=True)
            report = fusion_backend.explain(gpt_oss_attention, q, k, v, sinks, window,
                                            options={"strategy": "aggressive", "cache": False})
            rules = [s.rule for s in report.sites if s.decision == "fused"]
            print(f"N={N} window={window}: truthfuse fused {rules}", flush=True)
            for name, fn in list(variants.items()) + [
                    ("sdpa causal, no sinks", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     enable_gqa=True))]:
                t0 = time.time()
                try:
                    ms, mb = measure(fn, ins, g)
                except torch.OutOfMemoryError:
                    ms, mb = float("nan"), float("nan")
                res["rows"].append(dict(N=N, window=window, variant=name, ms=ms, peak_mb=mb))
                print(f"N={N:5d} window={window:3d} {name:22s} {ms:8.3f} ms {mb:9.1f} MB  ({time.time() - t0:.0f}s)",
                      flush=True)
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "sinks_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
