"""Feed-forward blocks and attention with fp32 weights under torch.autocast to bf16, the usual
mixed-precision training setup: correctness against float64, then speed and memory beside eager
and Inductor under the same autocast, in one process.

    TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 python bench/autocast_gpu.py [--skip-speed] [--skip-checks] [--small]

(1) Correctness: each form, fp32 weights and inputs in train mode, forward under autocast and
    backward after it. Feed-forward: GPT-2's Conv1D MLP with the written-out tanh GELU, Llama's
    SwiGLU, a chunked GEGLU, nn.Linear GELU with the fp32 residual added, the squared ReLU without
    one. Attention (head dim 128, causal): q and k multiplied by fp32 tables after the bf16
    projections (rotary embeddings: q, k fp32 and v bf16), written out with K/V heads repeated and
    as one SDPA call, and fp32 q, k, v. Eager under autocast and truthfuse ("aggressive", inner
    compiler eager and Inductor) under autocast are compared to the model in float64: output and
    every gradient, max |x - ref| / max |ref|. A form passes when truthfuse's result has eager's
    dtype, its site fused, nothing is NaN, and every tensor is within 3x eager's error plus 1e-3.
    On a GPU, also the dtypes of operations beside a fused site that canonicalization rewrites and
    CUDA autocast tells apart by spelling (`x * x`, softmax's dtype=, baddbmm with an fp32 input;
    a written-out tanh GELU).
(2) Speed: the training step (forward under autocast, backward), median ms
    (triton.testing.do_bench) and peak extra memory, for eager, Inductor and truthfuse ("moderate",
    the default, whose tuner may keep the site, and "aggressive"): issue 5's feed-forward shapes,
    and the attention forms at B=4, N=4096, 4 heads of 128.
Writes $OUT/autocast_gpu.json; exits 1 if a correctness check fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusion_backend  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
OUT = os.environ.get("OUT", ".")


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Conv1DMLP(nn.Module):
    """GPT-2's MLP: Conv1D (addmm on the flattened input) and gelu_new, plus the residual."""

    def __init__(self, d, h):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(d, h) * d ** -0.5), nn.Parameter(torch.randn(h) * 0.1)
        self.w2, self.b2 = nn.Parameter(torch.randn(h, d) * h ** -0.5), nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        z = torch.addmm(self.b1, x.view(-1, x.size(-1)), self.w1).view(*x.shape[:-1], -1)
        y = torch.addmm(self.b2, gelu_new(z).view(-1, z.size(-1)), self.w2).view(x.shape)
        return x + y


class LinearMLP(nn.Module):
    def __init__(self, d, h, act="gelu", residual=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.act, self.residual = act, residual

    def forward(self, x):
        z = self.fc1(x)
        hid = F.gelu(z) if self.act == "gelu" else torch.relu(z) ** 2
        y = self.fc2(hid)
        return x + y if self.residual else y


class GatedMLP(nn.Module):
    def __init__(self, d, h, chunked=False):
        super().__init__()
        self.chunked = chunked
        if chunked:
            self.proj = nn.Linear(d, 2 * h)
        else:
            self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=not chunked)

    def forward(self, x):
        if self.chunked:
            a, b = self.proj(x).chunk(2, dim=-1)
            hid = F.gelu(a) * b
        else:
            hid = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return x + self.down_proj(hid)


class RotatedAttention(nn.Module):
    """Attention whose q and k are multiplied by fp32 tables after bf16 projections (rotary
    embeddings under autocast: q and k fp32, v bf16), K/V heads repeated or through SDPA; or, with
    `plain`, fp32 q, k, v straight from fp32 inputs (no projections: the site under autocast)."""

    def __init__(self, d, form, heads=4, kv_heads=2):
        super().__init__()
        self.form, self.heads, self.kv_heads, self.hd = form, heads, kv_heads, d // heads
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * kv_heads * self.hd), nn.Linear(d, d)

    def forward(self, x):
        B, N, _ = x.shape
        table = torch.cos(torch.arange(N, device=x.device, dtype=torch.float32)[:, None] / 7.0) + 1.5
        causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        if self.form == "fp32 q, k, v":
            q, k, v = (x.view(B, N, self.heads, self.hd).transpose(1, 2) * (i + 1) for i in range(3))
            scores = (q @ k.transpose(-2, -1)) * self.hd ** -0.5
            return (torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v).sum(1)
        q = self.q(x).view(B, N, self.heads, self.hd).transpose(1, 2) * table
        k, v = self.kv(x).view(B, N, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        k = k * table
        if self.form == "rotated q, k; sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            n = self.heads // self.kv_heads
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
            scores = (q @ k.transpose(-2, -1)) * self.hd ** -0.5
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1, dtype=torch.float32)
            out = probs.to(q.dtype) @ v
        return self.o(out.transpose(1, 2).reshape(B, N, -1))


ATTENTION_FORMS = ("rotated q, k; written out", "rotated q, k; sdpa", "fp32 q, k, v")
FORMS = {
    "gpt2 conv1d gelu_new": lambda d, h: Conv1DMLP(d, h),
    "linear gelu, fp32 residual": lambda d, h: LinearMLP(d, h),
    "llama swiglu": lambda d, h: GatedMLP(d, h),
    "chunked geglu": lambda d, h: GatedMLP(d, h, chunked=True),
    "relu2, no residual": lambda d, h: LinearMLP(d, h, act="relu2", residual=False),
    "rotated q, k; written out": lambda d, h: RotatedAttention(d, "rotated q, k; written out"),
    "rotated q, k; sdpa": lambda d, h: RotatedAttention(d, "rotated q, k; sdpa"),
    "fp32 q, k, v": lambda d, h: RotatedAttention(d, "fp32 q, k, v"),
}


def _step(fn, params, x, amp=True):
    """Output (float64) and gradients of x and every parameter of a weighted sum of fn(x)."""
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    with torch.autocast(DEV, torch.bfloat16, enabled=amp):
        out = fn(x)
    w = torch.randn(out.shape, generator=torch.Generator(DEV).manual_seed(7), device=DEV, dtype=torch.float64)
    (out.double() * w).sum().backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # unused weights: 0
    return out.dtype, [out.detach().double(), x.grad.double()] + [g.double() for g in grads]


def _errors(got, ref):
    return [((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(got, ref)]


def check(name, inner, small):
    torch.manual_seed(0)
    d, h, T = (32, 64, 24) if small else (256, 1024, 600)
    if name in ATTENTION_FORMS and not small:
        d = 512  # head dim 128
    model = FORMS[name](d, h).to(DEV)
    x = torch.randn(2, T // 2, d, device=DEV)
    ref_model = copy.deepcopy(model).double()
    _, ref = _step(ref_model, list(ref_model.parameters()), x.double(), amp=False)
    params = list(model.parameters())
    eager_dtype, eager = _step(model, params, x)
    backend = fusion_backend.backend(strategy="aggressive", inner=inner, cache=False)
    ours_dtype, ours = _step(torch.compile(model, backend=backend), params, x)
    torch._dynamo.reset()
    fused = [s.rule for r in backend.records for s in r.sites if s.decision == "fused"]
    kept = [f"{s.rule}: {s.reason}" for r in backend.records for s in r.sites if s.decision != "fused"]
    e, o = _errors(eager, ref), _errors(ours, ref)
    finite = all(torch.isfinite(t).all().item() for t in ours)
    kind = "attention" if name in ATTENTION_FORMS else "feedforward"
    fused = [r for r in fused if r.startswith(kind)]
    ok = finite and ours_dtype == eager_dtype and len(fused) == 1 and all(a <= 3 * b + 1e-3 for a, b in zip(o, e))
    worst = max(range(len(o)), key=lambda i: o[i] / (3 * e[i] + 1e-3))
    print(f"== check {name:28s} inner={inner:8s} {'ok' if ok else 'FAIL'}  dtype {ours_dtype} (eager {eager_dtype})"
          f"  fused {fused}  nearest to failing: tensor {worst} eager {e[worst]:.2e} truthfuse {o[worst]:.2e}"
          + ("" if ok else f"\n   kept {kept}\n   eager {e}\n   ours {o}"), flush=True)
    return dict(form=name, inner=inner, ok=ok, dtype=str(ours_dtype), eager_dtype=str(eager_dtype), fused=fused,
                kept=kept, eager_err=e, ours_err=o)


def _beside_a_fused_site(q, k, v, x, bias, a, b):
    """One fusable attention, and operations whose result dtype CUDA autocast decides by how they
    are spelled (canonicalization rewrites them; outside a fused site they must stay as written)."""
    site = torch.softmax(q @ k.transpose(-2, -1) * 0.125, -1) @ v
    return site, x * x, torch.softmax(x, -1, dtype=x.dtype), torch.baddbmm(bias, a, b), 0.5 * x * (
        1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def check_dtypes_beside_a_site():
    """Each result of `_beside_a_fused_site` under autocast: the dtype eager gives, values within
    bf16 rounding of eager's (the written-out tanh GELU no site takes too, since session 24)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    x = torch.randn(8, 64, device=DEV, dtype=torch.bfloat16)
    bias, a, b = torch.randn(2, 8, 8, device=DEV), torch.randn(2, 8, 16, device=DEV), torch.randn(2, 16, 8, device=DEV)
    args = (q, k, v, x, bias, a, b)
    backend = fusion_backend.backend(strategy="aggressive", inner="inductor", cache=False)
    with torch.autocast(DEV, torch.bfloat16):
        want = _beside_a_fused_site(*args)
        got = torch.compile(_beside_a_fused_site, backend=backend)(*args)
    torch._dynamo.reset()
    fused = [s.rule for r in backend.records for s in r.sites if s.decision == "fused"]
    names = ["attention", "x * x", "softmax(dtype=x.dtype)", "baddbmm, fp32 input", "written-out tanh GELU"]
    rows = []
    for name, g, w in zip(names, got, want):
        close = torch.allclose(g.float(), w.float(), atol=2e-2, rtol=2e-2)
        rows.append(dict(name=name, dtype=str(g.dtype), eager_dtype=str(w.dtype), close=close))
        print(f"== beside a fused site: {name:24s} dtype {g.dtype} (eager {w.dtype}) values close: {close}", flush=True)
    ok = len(fused) == 1 and all(r["close"] and r["dtype"] == r["eager_dtype"] for r in rows)
    print(f"== check dtypes beside a fused site {'ok' if ok else 'FAIL'} (fused {fused})", flush=True)
    return dict(form="dtypes beside a fused site", ok=ok, rows=rows, fused=fused)


def speed(form, T, d, h):
    from triton.testing import do_bench

    torch.manual_seed(0)
    model = FORMS[form](d, h).to(DEV)
    shape = (4, T // 4, d) if form in ATTENTION_FORMS else (T, d)
    x = torch.randn(*shape, device=DEV, requires_grad=True)
    with torch.autocast(DEV, torch.bfloat16):
        gy = torch.randn_like(model(x).detach())  # the result's shape and dtype
    rows = []
    variants = [("eager", model, None), ("inductor", torch.compile(model), None)]
    for strategy in ("moderate", "aggressive"):
        backend = fusion_backend.backend(strategy=strategy, inner="inductor", cache=False)
        variants.append((f"truthfuse {strategy}", torch.compile(model, backend=backend), backend))
    for name, fn, backend in variants:
        def step():
            with torch.autocast(DEV, torch.bfloat16):
                out = fn(x)
            out.backward(gy)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        x.grad = None
        model.zero_grad(set_to_none=False)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = do_bench(step, warmup=25, rep=200, return_mode="median")
        decision = "" if backend is None else ", ".join(
            f"{s.rule} {s.decision}" + ("" if s.decision == "fused" else f" ({s.reason})")
            for r in backend.records for s in r.sites)
        print(f"{form:26s} T={T:6d} d={d:5d} h={h:6d} {name:20s} {ms:8.3f} ms {mb:9.1f} MB  {decision}", flush=True)
        rows.append(dict(form=form, T=T, d=d, h=h, variant=name, ms=ms, extra_mb=mb, decision=decision))
        torch._dynamo.reset()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a dry run on the CPU)")
    args = ap.parse_args()
    res = {"env": {"torch": torch.__version__, "card": torch.cuda.get_device_name() if DEV == "cuda" else "cpu"},
           "checks": [], "speed": []}
    for name in FORMS if not args.skip_checks else ():
        for inner in ("eager", "inductor"):
            if inner == "inductor" and name not in ("gpt2 conv1d gelu_new", "llama swiglu", "rotated q, k; sdpa"):
                continue
            res["checks"].append(check(name, inner, args.small))
    if not args.skip_checks and DEV == "cuda":  # CPU autocast computes these spellings alike
        res["checks"].append(check_dtypes_beside_a_site())
    failed = [c for c in res["checks"] if not c["ok"]]
    print(f"== {len(res['checks']) - len(failed)} of {len(res['checks'])} checks passed", flush=True)
    if not args.skip_speed and DEV == "cuda":
        for form, T, d, h in (("linear gelu, fp32 residual", 8192, 1024, 4096), ("llama swiglu", 8192, 1024, 2816),
                              ("linear gelu, fp32 residual", 16384, 4096, 16384),
                              ("rotated q, k; written out", 16384, 512, 0), ("rotated q, k; sdpa", 16384, 512, 0),
                              ("fp32 q, k, v", 16384, 512, 0)):
            res["speed"] += speed(form, T, d, h)
    with open(os.path.join(OUT, "autocast_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
