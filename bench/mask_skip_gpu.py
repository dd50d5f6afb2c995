"""Block skipping from a mask's kept ranges, on the GPU: sliding windows and packed documents.

The attention kernels read a mask's per-row kept ranges and clean runs (`kernels.attention.
MaskRanges`, computed on the device every call), visit only the blocks inside the ranges, and read
the mask only where a block is not inside all its rows' clean runs. This
times, bf16, forward and forward+backward (median ms, extra MB):
1. Gemma 2-style sliding windows: B=1, 8 query heads, 4 K/V heads, N=8192, D in (128, 256), cap 50,
   the window as an additive float mask (finfo.min outside, as HF builds it), windows 4096 and
   1024: the op with skipping, the op with skipping off (the same kernels reading every block),
   FlexAttention (the window as a block mask, the cap as score_mod) and Inductor (Gemma 2's eager
   code with the same mask).
2. Packed documents: B=1, H=16, N=8192, D=128, 8 documents of 1024 tokens, causal within each,
   as a bool mask: the op with and without skipping, FlexAttention's document mask, and SDPA
   given the bool mask (its memory-efficient kernel).

3. A dense mask (padding on one batch row, B=2, H=8, N=8192, D=128): what finding the ranges costs
   where nothing can be skipped.
4. A causal mask as HF's eager attention passes it (a (1, 1, N, N) float mask, finfo.min above the
   diagonal; B=1, H=16, D=128): the op with and without skipping, the op told causal=True (no
   mask), and SDPA with is_causal=True.

Usage:  TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 python bench/mask_skip_gpu.py   (writes $OUT/mask_skip_gpu.json)
Env: PARTS=windows,documents,dense,hf_causal (any subset).
"""
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("BENCH_REP_MS", "150")
from attention_gpu import bench  # noqa: E402  (median ms and extra MB of forward or forward+backward)
from fusion_backend.kernels import attention as tc  # noqa: E402
from fusion_backend.ops.attention import attention  # noqa: E402

dev = "cuda"
OUT = os.environ.get("OUT", "/tmp")
RES = {"env": dict(torch=torch.__version__, triton=triton.__version__, card=torch.cuda.get_device_name(),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), "bench": []}
CAP = 50.0


def record(case, name, bwd, fn, skip=True):
    """Time fn (forward, or forward and backward); skip=False turns block skipping off for the
    whole measurement (the kernels read every block of the mask)."""
    saved = tc._RANGES_MIN_ENTRIES
    if not skip:
        tc._RANGES_MIN_ENTRIES = float("inf")
    try:
        ms, mb = bench(fn, bwd)
    finally:
        tc._RANGES_MIN_ENTRIES = saved
    RES["bench"].append(dict(case=case, variant=name, bwd=bwd, ms=ms, extra_mb=mb))
    print(f"{case:28s} {name:24s} {'fwd+bwd' if bwd else 'fwd    '} {ms:9.3f} ms {mb:9.1f} MB", flush=True)
    json.dump(RES, open(os.path.join(OUT, "mask_skip_gpu.json"), "w"), indent=1)


def record_ours(case, bwd, ours):
    """The op with block skipping, and the same call reading every block."""
    record(case, "ours, skipping", bwd, ours)
    record(case, "ours, every block", bwd, ours, skip=False)


def qkv(B, H, N, D, bwd):
    """Fresh bf16 q, k, v of (B, H, N, D), leaves that require grad when bwd."""
    return (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=bwd) for _ in range(3))


def time_case(case, shape, mask, others=()):
    """Forward, then forward+backward on fresh inputs of shape (B, H, N, D): the op with `mask`
    (`record_ours`) and each (name, fn(q, k, v)) of `others` on the same inputs."""
    for bwd in (False, True):
        q, k, v = qkv(*shape, bwd)
        record_ours(case, bwd, lambda: attention(q, k, v, attn_mask=mask))
        for name, fn in others:
            record(case, name, bwd, lambda: fn(q, k, v))
        del q, k, v


def gemma_eager(q, k, v, scale, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.tanh(torch.matmul(q, k.transpose(2, 3)) * scale / CAP) * CAP + mask
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def windows():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    inductor = torch.compile(gemma_eager, dynamic=False)
    B, H, Hkv, N = 1, 8, 4, 8192
    i = torch.arange(N, device=dev)
    for D in (128, 256):
        scale = D ** -0.5
        for w in (4096, 1024):
            keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
            mask = torch.zeros(N, N, device=dev, dtype=torch.bfloat16).masked_fill(~keep, torch.finfo(torch.bfloat16).min)
            block = create_block_mask(lambda b, h, qi, ki, w=w: (ki <= qi) & (ki > qi - w), None, None, N, N,
                                      device=dev)

            def capped(score, b, h, qi, ki):
                return torch.tanh(score / CAP) * CAP
            case = f"window {w}, D={D}"
            for bwd in (False, True):
                q = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, requires_grad=bwd)
                k, v = (torch.randn(B, Hkv, N, D, device=dev, dtype=torch.bfloat16, requires_grad=bwd)
                        for _ in range(2))

                record_ours(case, bwd, lambda: attention(q, k, v, scale=scale, attn_mask=mask, enable_gqa=True,
                                                         softcap=CAP))
                record(case, "flex", bwd, lambda: flex(q, k, v, score_mod=capped, block_mask=block, scale=scale,
                                                       enable_gqa=True))
                record(case, "inductor, eager form", bwd, lambda: inductor(q, k, v, scale, mask))
                del q, k, v


def documents():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    B, H, N, D, doc = 1, 16, 8192, 128, 1024
    i = torch.arange(N, device=dev)
    keep = ((i[:, None] // doc) == (i[None, :] // doc)) & (i[None, :] <= i[:, None])
    block = create_block_mask(lambda b, h, qi, ki: ((qi // doc) == (ki // doc)) & (ki <= qi), None, None, N, N,
                              device=dev)
    time_case(f"8 documents of {doc}, causal", (B, H, N, D), keep,
              [("flex", lambda q, k, v: flex(q, k, v, block_mask=block)),
               ("sdpa, bool mask", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep))])


def dense():
    """The cost where nothing can be skipped: a full (B, 1, N, N) float mask, as HF builds it with
    padding, dropping only each row's last 100 keys on one batch row."""
    B, H, N, D = 2, 8, 8192, 128
    mask = torch.zeros(B, 1, N, N, device=dev, dtype=torch.bfloat16)
    mask[0, ..., -100:] = torch.finfo(torch.bfloat16).min
    time_case("dense padding mask", (B, H, N, D), mask)


def hf_causal():
    B, H, N, D = 1, 16, 8192, 128
    i = torch.arange(N, device=dev)
    mask = torch.zeros(1, 1, N, N, device=dev, dtype=torch.bfloat16).masked_fill(i[None, :] > i[:, None],
                                                                                 torch.finfo(torch.bfloat16).min)
    time_case("HF causal float mask", (B, H, N, D), mask,
              [("ours, causal=True", lambda q, k, v: attention(q, k, v, causal=True)),
               ("sdpa, is_causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))])


if __name__ == "__main__":
    torch._dynamo.config.recompile_limit = 256
    for part in os.environ.get("PARTS", "windows,documents,dense,hf_causal").split(","):
        globals()[part]()
