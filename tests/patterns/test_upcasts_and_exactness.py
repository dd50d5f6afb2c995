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
