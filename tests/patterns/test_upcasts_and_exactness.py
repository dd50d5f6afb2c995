"""Scores computed on upcast q/k fuse on the half-precision tensors themselves, and a site is
'exact' (eligible under the conservative strategy) unless it holds a dropout."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fusion_backend
from fusion_backend.match import find_sites
from fusion_backend.canonicalize import canonical_copy

OPTIONS = {"strategy": "aggressive", "inner": "eager", "cache": False, "disable": ["feedforward"]}


def l2_on_upcasts(q, k, v, lam):
    d2 = torch.cdist(q.float(), k.float()) ** 2
    return torch.softmax(-lam * d2, dim=-1).to(v.dtype) @ v


def test_upcast_cdist_fuses_on_the_half_precision_inputs():
    q, k, v = (torch.randn(2, 3, 12, 16, dtype=torch.float16) for _ in range(3))
    lam = torch.tensor(0.3)
    report = fusion_backend.explain(l2_on_upcasts, q, k, v, lam, options=OPTIONS)
    assert [(s.variant, s.decision) for s in report.sites] == [("l2", "fused")]
    compiled = torch.compile(l2_on_upcasts, backend=fusion_backend.backend(**OPTIONS))
    out = compiled(q, k, v, lam)
    ref = l2_on_upcasts(q.double(), k.double(), v.double(), lam.double())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 3e-3


def _sites(fn, *args):
    captured = []

    def grab(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    torch.compile(fn, backend=grab, fullgraph=True)(*args)
    return find_sites(canonical_copy(captured[0]).graph, fusion_backend.all_rules())


def test_dropout_makes_a_site_inexact():
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))

    def plain(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v

    def with_dropout(q, k, v):
        return F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1), 0.1, True) @ v

    exact = {s.rule.exact_for(s.match) for s in _sites(plain, q, k, v) if s.near_miss is None}
    inexact = {s.rule.exact_for(s.match) for s in _sites(with_dropout, q, k, v) if s.near_miss is None}
    assert exact == {True} and inexact == {False}


def _plain_attention(q, k, v):
    return (q @ k.transpose(-2, -1) * 0.35).softmax(-1) @ v


def test_fp32_attention_under_autocast_trains():
    """fp32 q, k, v under CPU autocast: both products return bf16, so the replacement casts q, k
    and v to bf16 as autocast does (`autocast_dtype`), and the gradients flow back through the
    casts (before, the op computed in fp32 and its result was cast to bf16; a cast by
    prims.convert_element_type, which has no autograd formula, made backward raise). The fused
    site is as close to float64 as eager is, within a bf16 step (relative 2^-8): both round to
    bf16 in their own order, and on unseeded draws a bare 1.5x of eager's error failed 2 in 10."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 8, dtype=torch.float64) for _ in range(3))
    w = torch.randn(2, 2, 8, 8, dtype=torch.float64)

    def run(fn, dtype, autocast):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(*xs)
        (out.double() * w).sum().backward()
        return [out.double()] + [x.grad.double() for x in xs], out.dtype

    ref, _ = run(_plain_attention, torch.float64, False)
    eager, eager_dtype = run(_plain_attention, torch.float32, True)
    compiled = torch.compile(_plain_attention, backend=fusion_backend.backend(**OPTIONS))
    fused, fused_dtype = run(compiled, torch.float32, True)
    torch._dynamo.reset()
    assert fused_dtype == eager_dtype == torch.bfloat16
    for f, e, r in zip(fused, eager, ref):
        scale = r.abs().max()
        assert ((f - r).abs().max() / scale) <= 1.5 * ((e - r).abs().max() / scale) + 2 ** -8


class _RotatedAttention(torch.nn.Module):
    """q and k multiplied by fp32 tables after bf16 projections (rotary embeddings under autocast:
    q and k come out fp32, v bf16), then attention written out, with K/V repeated per head or
    through SDPA."""

    def __init__(self, form, d=32, heads=4, kv_heads=2):
        super().__init__()
        self.form, self.heads, self.kv_heads, self.hd = form, heads, kv_heads, d // heads
        self.q = torch.nn.Linear(d, d)
        self.kv = torch.nn.Linear(d, 2 * kv_heads * self.hd)
        self.o = torch.nn.Linear(d, d)

    def forward(self, x, table, mask):
        B, N, _ = x.shape
        q = self.q(x).view(B, N, self.heads, self.hd).transpose(1, 2) * table
        k, v = self.kv(x).view(B, N, 2, self.kv_heads, self.hd).permute(2, 0, 3, 1, 4)
        k = k * table
        if self.form == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            n = self.heads // self.kv_heads
            k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
            scores = q @ k.transpose(-2, -1) * self.hd ** -0.5 + mask
            out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o(out.transpose(1, 2).reshape(B, N, -1))


def _training_step(fn, params, inputs, autocast):
    for p in params:
        p.grad = None
    x = inputs[0].detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(x, *inputs[1:])
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * weight).sum().backward()
    return out.dtype, [out.detach().double(), x.grad.double()] + [p.grad.double() for p in params]


@pytest.mark.parametrize("form", ["written_out", "sdpa"])
def test_rotated_fp32_q_and_k_under_autocast_fuse(form):
    """q and k in fp32, v in bf16 under autocast (rotary tables in fp32, as DeepSeek-V3's): eager's
    products cast all three to bf16, and so does the replacement. These sites were kept ("q, k, v
    dtypes differ"). Result dtype as eager's, output and every gradient within 3x eager's error
    against float64, plus a floor."""
    torch.manual_seed(0)
    model = _RotatedAttention(form)
    x, table = torch.randn(2, 10, 32), torch.rand(10, 8) + 0.5
    mask = torch.zeros(10, 10).masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    ref_model = copy.deepcopy(model).double()
    _, ref = _training_step(ref_model, list(ref_model.parameters()), (x.double(), table.double(), mask.double()),
                            autocast=False)
    params = list(model.parameters())
    eager_dtype, eager = _training_step(model, params, (x, table, mask), autocast=True)
    backend = fusion_backend.backend(**OPTIONS)
    dtype, ours = _training_step(torch.compile(model, backend=backend), params, (x, table, mask), autocast=True)
    torch._dynamo.reset()
    sites = [s for r in backend.records for s in r.sites]
    assert [s.kind for s in sites if s.decision == "fused"] == ["attention"], [str(s) for s in sites]
    assert dtype == eager_dtype
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        scale = r.abs().max()
        assert torch.isfinite(o).all()
        assert (o - r).abs().max() / scale <= 3 * (e - r).abs().max() / scale + 2e-3, f"tensor {i}"
