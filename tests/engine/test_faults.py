"""Faults: a kernel that fails at run time, or a replacement that cannot be built, falls back to
the original math with one warning; never a crash, never a wrong result."""
import warnings

import pytest
import torch

import fusion_backend
from fusion_backend import FusionWarning, Rule, register_rule, unregister_rule
from fusion_backend.ops.fallback import FusionFallbackWarning, reset_fallback_warnings

from .models import CausalSelfAttention

AGGRESSIVE_EAGER = {"strategy": "aggressive", "inner": "eager", "cache": False}


def test_kernel_failure_falls_back_with_one_warning(monkeypatch):
    import fusion_backend.kernels.attention as kernels

    def broken(*args, **kwargs):
        raise RuntimeError("simulated Triton compile error")

    monkeypatch.setattr(kernels, "attention_forward", broken)
    reset_fallback_warnings()
    model = CausalSelfAttention()
    compiled = torch.compile(model, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [compiled(torch.randn(2, 16, 32)) for _ in range(3)]
        x = torch.randn(2, 16, 32)
        torch.testing.assert_close(compiled(x), model(x), atol=2e-5, rtol=2e-4)
    fallback = [w for w in caught if issubclass(w.category, FusionFallbackWarning)]
    assert len(fallback) == 1 and "simulated Triton compile error" in str(fallback[0].message)
    assert all(torch.isfinite(o).all() for o in outs)


def test_a_fused_option_whose_kernels_fail_when_timed_is_kept_with_the_reason(monkeypatch):
    """The op falls back to its reference where its kernels cannot run (a launch config needing
    more shared memory than the GPU has, at these shapes). The tuner timed that reference as the
    fused option, and could choose it: every call then ran the slow reference, reported as fused."""
    import fusion_backend.kernels.attention as kernels

    def broken(*args, **kwargs):
        raise RuntimeError("simulated out of shared memory")

    monkeypatch.setattr(kernels, "attention_forward", broken)
    reset_fallback_warnings()
    torch._dynamo.reset()
    model, x = CausalSelfAttention(), torch.randn(2, 16, 32)
    be = fusion_backend.backend(strategy="moderate", inner="eager", cache=False)
    torch.testing.assert_close(torch.compile(model, backend=be)(x), model(x))
    (record,) = be.records
    (site,) = record.sites
    assert site.decision == "kept"
    assert "could not run their kernels when timed" in site.reason and "simulated out of shared" in site.reason
    torch._dynamo.reset()


def test_a_fallback_first_seen_while_timing_is_warned_when_it_happens_again():
    """The tuner drops its timing runs' warnings: a fallback seen only there would otherwise
    never be reported, since each op and reason warns once."""
    from fusion_backend.ops.fallback import fallbacks_recorded, warn_fallback_once

    reset_fallback_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fallbacks_recorded() as seen:
            warn_fallback_once("attention", "simulated reason")
            warn_fallback_once("attention", "simulated reason")
    assert len(seen) == 2 and "simulated reason" in seen[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_fallback_once("attention", "simulated reason")
        warn_fallback_once("attention", "simulated reason")
    assert [str(w.message) for w in caught] == [
        "truthfuse: attention fell back to the PyTorch reference: simulated reason"]


class _DistanceAttention(torch.nn.Module):
    """L2 attention with a learnable per-head temperature and an added float mask, and cosine
    attention (row normalization, whose backward also falls back)."""

    def __init__(self, metric):
        super().__init__()
        self.metric = metric
        self.lam = torch.nn.Parameter(torch.rand(2, 1, 1) + 0.5)

    def forward(self, q, k, v, bias):
        if self.metric == "l2":
            s = -self.lam * torch.cdist(q, k) ** 2 + bias
        else:
            s = self.lam * (torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).mT)
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("model", ["causal dot", "l2", "cosine"])
def test_backward_kernel_failure_falls_back_to_the_reference_gradients(monkeypatch, model):
    # the reference backward runs inside a custom op, below autograd: it must still give gradients
    import fusion_backend.kernels.attention as kernels

    def broken(*args, **kwargs):
        raise RuntimeError("simulated Triton compile error")

    for name in ("attention_backward", "normalize_rows_backward"):
        monkeypatch.setattr(kernels, name, broken)
    reset_fallback_warnings()
    if model == "causal dot":
        module, inputs = CausalSelfAttention(), [torch.randn(2, 16, 32, requires_grad=True)]
    else:
        module = _DistanceAttention(model)
        inputs = [torch.randn(2, 2, 8, 16, requires_grad=True) for _ in range(3)]
        inputs.append(torch.randn(2, 1, 8, 8, requires_grad=True))
    compiled = torch.compile(module, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(*inputs)
        grads = torch.autograd.grad(out.square().sum(), inputs + list(module.parameters()), allow_unused=True)
    fallback = [w for w in caught if issubclass(w.category, FusionFallbackWarning)]
    assert len(fallback) >= 1 and all("simulated Triton compile error" in str(w.message) for w in fallback)
    expected = torch.autograd.grad(module(*inputs).square().sum(), inputs + list(module.parameters()),
                                   allow_unused=True)
    for got, want in zip(grads, expected):
        if want is None:
            assert got is None or not got.any()
            continue
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_replacement_that_cannot_be_built_keeps_the_site():
    def pattern(x):
        return torch.sigmoid(torch.tanh(x))

    def replacement(x):
        raise RuntimeError("this kernel cannot take that shape")

    rule = Rule(name="test.broken", kind="custom", pattern=pattern, replacement=replacement, priority=1000)
    register_rule(rule)
    try:
        def fn(x):
            return torch.sigmoid(torch.tanh(x)) * 3

        with pytest.warns(FusionWarning, match="cannot take that shape"):
            report = fusion_backend.explain(fn, torch.randn(5), options=AGGRESSIVE_EAGER)
        site = [s for s in report.sites if s.rule == "test.broken"][0]
        assert site.decision == "kept" and "cannot take that shape" in site.reason
        x = torch.randn(7)
        compiled = torch.compile(fn, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(compiled(x), fn(x))
    finally:
        unregister_rule("test.broken")
