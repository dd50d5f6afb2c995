"""Where the attention kernels' time goes: each kernel of a forward+backward step, and what a
learnable scale costs (the forward's E_p[raw] row statistic and the scale gradient in dQ).

    TRITON_INTERPRET=0 python bench/attention_breakdown_gpu.py [--shape 4,8,8192,64]

For dot, l2 and cosine (bf16): the forward and backward launchers timed alone with and without the
scale's work (triton.testing.do_bench, median ms), then the op's forward+backward next to SDPA
(FlashAttention backend, and cosine's default SDPA path) with a torch.profiler sum of GPU time per
kernel. Writes $OUT/attention_breakdown.json.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from triton.testing import do_bench  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fusion_backend.kernels import attention as tc  # noqa: E402
from fusion_backend.ops.attention import attention  # noqa: E402

SCALES = {"dot": 0.125, "l2": 0.05, "cosine": 10.0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4,8,8192,64", help="B,H,N,D")
    B, H, N, D = (int(x) for x in ap.parse_args().shape.split(","))
    dev = "cuda"
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "card": torch.cuda.get_device_name(),
           "torch": torch.__version__, "shape": [B, H, N, D], "launchers": {}, "ops": {}}

    def timed(name, fn):
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"{name:50s} {ms:.3f} ms", flush=True)
        return ms

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    for metric, value in SCALES.items():
        scale = torch.full((H,), value, device=dev)
        cfg = tc.default_attention_config(metric, D, q.dtype, "cuda")
        row = res["launchers"][metric] = {}
        for stats in (False, True):
            row[f"forward, stats={stats}"] = timed(f"{metric} forward, stats={stats}", lambda: tc.attention_forward(
                q, k, v, scale, metric=metric, config=cfg, stats=stats))
        out, stats = tc.attention_forward(q, k, v, scale, metric=metric, config=cfg, stats=True)
        for grad in (False, True):
            row[f"backward, scale_grad={grad}"] = timed(
                f"{metric} backward, scale_grad={grad}",
                lambda: tc.attention_backward(do, q, k, v, scale, out, stats, metric=metric, scale_grad=grad, config=cfg))

    from torch.nn.attention import SDPBackend, sdpa_kernel
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def sdpa_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qg, kg, vg)

    learnable = {m: torch.tensor(s, device=dev, requires_grad=True) for m, s in SCALES.items()}
    ops = {
        "SDPA, FLASH_ATTENTION backend": sdpa_flash,
        "ours dot": lambda: attention(qg, kg, vg, metric="dot"),
        "ours l2, learnable scale": lambda: attention(qg, kg, vg, metric="l2", scale=learnable["l2"]),
        "ours l2, constant scale": lambda: attention(qg, kg, vg, metric="l2", scale=SCALES["l2"]),
        "ours cosine, learnable scale": lambda: attention(qg, kg, vg, metric="cosine", scale=learnable["cosine"]),
        "ours cosine, constant scale, Triton kernels": lambda: attention(
            qg, kg, vg, metric="cosine", scale=SCALES["cosine"], config=tc.default_attention_config("cosine", D, q.dtype, "cuda")),
        "ours cosine, constant scale (default: SDPA)": lambda: attention(qg, kg, vg, metric="cosine", scale=SCALES["cosine"]),
    }
    for name, fn in ops.items():
        def step(fn=fn):
            o = fn()
            o.backward(do)
        ms = timed(f"fwd+bwd {name}", step)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                kernels[e.name[:80]] = kernels.get(e.name[:80], 0.0) + e.device_time_total / 10 / 1e3
        top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:8])
        print("    " + "; ".join(f"{n}: {t:.3f}" for n, t in top.items()), flush=True)
        res["ops"][name] = {"fwd+bwd ms": ms, "kernel ms per step": top}
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "attention_breakdown.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
