"""Scores computed on upcast q/k fuse on the half-precision tensors themselves, and a site is
'exact' (eligible under the conservative strategy) unless it holds a dropout."""
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
    """fp32 q, k, v under CPU autocast: the site's result is bf16, the op computes in fp32, and its
    result is cast to bf16 by a differentiable cast (prims.convert_element_type has no autograd
    formula: backward raised). The fused site is at least as close to float64 as eager is."""
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
        assert ((f - r).abs().max() / scale) <= 1.5 * ((e - r).abs().max() / scale) + 1e-6
