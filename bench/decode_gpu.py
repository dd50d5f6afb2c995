"""Decoding-step attention on the GPU: a few query rows (Nq = 1 or a handful of speculative tokens)
against a long key/value cache, as in generation. Checks truthfuse's attention op against float64
on fresh inputs, then times it against SDPA's default dispatch and Inductor's compiled eager form.

    TRITON_INTERPRET=0 python bench/decode_gpu.py [--out DIR] [--cases all|i,j,...] [--metric dot|l1]

With --metric l1 (logits -lambda * sum_d |q_d - k_d|, lambda = 1/sqrt(D)) there is no SDPA form:
the baselines are Inductor's compiled eager forms, the broadcast one and `torch.cdist(p=1)`, and
the check bounds our error by the broadcast form's.

Times are GPU times of CUDA-graph replays (`triton.testing.do_bench_cudagraph`), since one decoding
step's attention is a few microseconds of GPU work and its launch would otherwise be what is timed.
"""
import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "0")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fusion_backend.kernels import attention as tc  # noqa: E402
from fusion_backend.ops.attention import attention  # noqa: E402

# (name, B, H, Hkv, Nq, Nk, D, mask): Llama-3-8B's heads (32 over 8, D=128), GPT-2's (12, D=64),
# GPT-OSS's (64 over 8, D=64); mask "pad" is HF's (B, 1, Nq, Nk) bool padding mask
CASES = [
    ("llama8b B=1 S=4096", 1, 32, 8, 1, 4096, 128, None),
    ("llama8b B=1 S=32768", 1, 32, 8, 1, 32768, 128, None),
    ("llama8b B=8 S=4096", 8, 32, 8, 1, 4096, 128, None),
    ("llama8b B=8 S=4096 padded", 8, 32, 8, 1, 4096, 128, "pad"),
    ("llama8b B=1 S=4096 Nq=4", 1, 32, 8, 4, 4096, 128, None),
    ("llama8b B=64 S=2048", 64, 32, 8, 1, 2048, 128, None),
    ("gpt2 B=1 S=1024", 1, 12, 12, 1, 1024, 64, None),
    ("gpt2 B=16 S=1024", 16, 12, 12, 1, 1024, 64, None),
    ("gpt-oss B=1 S=8192", 1, 64, 8, 1, 8192, 64, None),
]


def _inputs(B, H, Hkv, Nq, Nk, D, mask_kind, dtype=torch.bfloat16):
    q = torch.randn(B, H, Nq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, Nk, D, device="cuda", dtype=dtype)
    mask = None
    if mask_kind == "pad":  # left padding of 0..Nk/4 keys per sequence
        pad = torch.randint(0, Nk // 4, (B,), device="cuda")
        mask = (torch.arange(Nk, device="cuda")[None, :] >= pad[:, None]).view(B, 1, 1, Nk).expand(B, 1, Nq, Nk)
    return q, k, v, mask


def _expand_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    return k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)


def _logits(q, k, metric, form="broadcast"):
    """Unmasked logits in q's dtype: scaled dot products, or -lambda * L1 distances (the broadcast
    form, or cdist)."""
    lam = 1.0 / math.sqrt(q.shape[-1])
    if metric == "dot":
        return (q @ k.transpose(-1, -2)) * lam
    if form == "cdist":  # CUDA's cdist takes no 16-bit inputs: the user's form upcasts
        return (-lam * torch.cdist(q.float(), k.float(), p=1)).to(q.dtype)
    return -lam * (q.unsqueeze(-2) - k.unsqueeze(-3)).abs().sum(-1)


def _reference(q, k, v, mask, metric):
    k, v = _expand_kv(q.double(), k.double(), v.double())
    s = _logits(q.double(), k, metric, "cdist")
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def _eager_form(q, k, v, mask, metric="dot", form="broadcast"):
    k, v = _expand_kv(q, k, v)
    s = _logits(q, k, metric, form)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cases", default="all")
    ap.add_argument("--metric", default="dot", choices=("dot", "l1"))
    ap.add_argument("--configs", default="", help="comma-separated launch config keys to time as well")
    ap.add_argument("--split-tiles", default="", help="split-forward tiles to time as well, e.g. n128w4s3,n64w4s2")
    ap.add_argument("--split-waves", default="", help="SPLIT_WAVES values to time as well, e.g. 1,4")
    ap.add_argument("--split-min-tiles", default="", help="SPLIT_MIN_TILES values to time as well, e.g. 2,4")
    ap.add_argument("--patch", default="", help="variants of the kernels module's integer constants to time as "
                    "well: ';'-separated, each NAME=VALUE[,NAME=VALUE], e.g. SPLIT_L1_UNROLL=1;SPLIT_L1_MAX_CHUNK=16")
    args = ap.parse_args()
    picked = range(len(CASES)) if args.cases == "all" else [int(i) for i in args.cases.split(",")]
    metric = args.metric
    res = dict(env=dict(torch=torch.__version__, triton=triton.__version__, card=torch.cuda.get_device_name(),
                        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), checks=[], times=[])
    # one compiled graph per case: past Dynamo's default limit of 8 it would run eagerly instead
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(CASES))
    inductor = torch.compile(_eager_form, dynamic=False)
    inductor_cdist = torch.compile(lambda q, k, v, mask: _eager_form(q, k, v, mask, "l1", "cdist"), dynamic=False)
    ok_all = True
    for i in picked:
        name, B, H, Hkv, Nq, Nk, D, mk = CASES[i]
        torch.manual_seed(i)
        q, k, v, mask = _inputs(B, H, Hkv, Nq, Nk, D, mk)
        ref = _reference(q, k, v, mask, metric)
        lam = 1.0 / math.sqrt(D)

        def ours(config=None):
            return attention(q, k, v, metric=metric, scale=lam, attn_mask=mask, enable_gqa=True, config=config)

        # poisoned: an output row the kernels leave unwritten shows as NaN
        out = torch.full_like(q, float("nan"))
        out.copy_(ours())
        if metric == "dot":
            base_name = "SDPA"
            base = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            base_name = "Inductor broadcast form"
            base = inductor(q, k, v, mask, "l1")
        err = float((out.double() - ref).norm() / ref.norm())
        err_base = float((base.double() - ref).norm() / ref.norm())
        ok = err == err and err <= 2 * err_base + 1e-3
        ok_all &= ok
        res["checks"].append(dict(case=name, metric=metric, rel_err=err, baseline=base_name, baseline_rel_err=err_base,
                                  ok=ok))
        print(f"{'OK ' if ok else 'BAD'} {metric} {name}: rel err {err:.2e} ({base_name} {err_base:.2e})", flush=True)
        row = dict(case=name, metric=metric)
        variants = [("truthfuse", ours)]
        if metric == "dot":
            variants += [("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)),
                         ("inductor", lambda: inductor(q, k, v, mask))]
        else:
            variants += [("inductor broadcast", lambda: inductor(q, k, v, mask, "l1")),
                         ("inductor cdist", lambda: inductor_cdist(q, k, v, mask))]
        for key in args.configs.split(",") if args.configs else []:
            variants.append((f"truthfuse {key}", lambda key=key: ours(key)))
        call = variants[0][1]
        d_pad = tc._pad_dim(D)
        patches = [("one-pass kernel", dict(SPLIT_MAX_QUERIES=0))]
        for t in args.split_tiles.split(",") if args.split_tiles else []:
            bn, rest = t[1:].split("w")
            w, st = rest.split("s")
            patches.append((f"split {t}", dict(_SPLIT_TILES={**tc._SPLIT_TILES, d_pad: (int(bn), int(w), int(st))})))
        for waves in args.split_waves.split(",") if args.split_waves else []:
            patches.append((f"split waves {waves}", dict(SPLIT_WAVES=int(waves))))
        for tiles in args.split_min_tiles.split(",") if args.split_min_tiles else []:
            patches.append((f"split min tiles {tiles}", dict(SPLIT_MIN_TILES=int(tiles))))
        for group in args.patch.split(";") if args.patch else []:
            patches.append((group, {n: int(val) for n, val in (kv.split("=") for kv in group.split(","))}))
        for label, patch in patches:
            def patched(patch=patch):
                saved = {n: getattr(tc, n) for n in patch}
                for n, val in patch.items():
                    setattr(tc, n, val)
                try:
                    return call()
                finally:
                    for n, val in saved.items():
                        setattr(tc, n, val)
            variants.append((label, patched))
        for label, fn in variants:
            fn()
            torch.cuda.synchronize()
            row[label] = 1e3 * do_bench_cudagraph(fn, rep=50)
        kv_bytes = 2 * B * Hkv * Nk * D * q.element_size()
        row["kv_read_us_at_3tbs"] = kv_bytes / 3e12 * 1e6
        res["times"].append(row)
        print("    us: " + "  ".join(f"{n} {t:.1f}" for n, t in row.items() if n not in ("case", "metric")), flush=True)
    with open(os.path.join(args.out, f"decode_gpu_{metric}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("checks", "all passed" if ok_all else "FAILED")


if __name__ == "__main__":
    main()
