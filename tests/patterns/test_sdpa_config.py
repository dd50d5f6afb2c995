"""config="sdpa": torch's SDPA kernels for the dot-product sites whose math they compute exactly.

The op runs them on any device; the rules offer them first on CUDA, so these tests read the
config list a site would get there, from sites found on CPU."""
import copy
import importlib
from types import SimpleNamespace

import pytest
import torch

import fusion_backend
from fusion_backend.ops.attention import SDPA_CONFIG, attention, attention_reference

from .checks import qkv
from .models import SDPA, DotAttention, L2Attention


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("causal", [False, True])
def test_op_with_sdpa_config_equals_the_reference(causal):
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, T=9, S=11 if not causal else 9, D=16, Hkv=2))
    out = attention(q, k, v, causal=causal, scale=0.3, enable_gqa=True, config=SDPA_CONFIG)
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ins64, causal=causal, scale=0.3, enable_gqa=True)
    assert rel(out, ref) < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, ins64, g.double())):
        assert rel(a, b) < 1e-5


@pytest.mark.parametrize("scale", ["per-head", "scalar", "number"])
@pytest.mark.parametrize("causal", [False, True])
def test_cosine_on_sdpa_equals_the_reference(causal, scale):
    """Cosine as SDPA on the normalized rows (q's times the scale, by the truthfuse::normalize_rows
    op), with GQA: output and the gradients of q, k, v against float64. The scale is a constant
    (config='sdpa' refuses one that needs a gradient)."""
    q, k, v = qkv(2, 4, T=9, S=11 if not causal else 9, D=16, Hkv=2)
    q = q * torch.linspace(0.5, 3.0, 9)[:, None]  # rows of other lengths than sqrt(D)
    sc = {"per-head": torch.tensor([2.0, 5.0, 0.5, 10.0]), "scalar": torch.tensor(7.0), "number": 4.0}[scale]
    ins = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*ins, metric="cosine", scale=sc, causal=causal, enable_gqa=True, config=SDPA_CONFIG)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    sc64 = sc.double() if isinstance(sc, torch.Tensor) else sc
    ref = attention_reference(*ins64, metric="cosine", scale=sc64, causal=causal, enable_gqa=True)
    assert rel(out, ref) < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins64, g.double())):
        assert a.shape == b.shape and rel(a, b) < 1e-4


def test_normalize_rows_op_opcheck_and_zero_rows():
    x = torch.randn(2, 3, 5, 8)
    x[0, 1, 2] = 0.0  # a zero row: clamped norm, as F.normalize
    x.requires_grad_()
    sc = torch.rand(3, requires_grad=True)
    torch.library.opcheck(torch.ops.truthfuse.normalize_rows.default, (x, sc))
    torch.library.opcheck(torch.ops.truthfuse.normalize_rows.default, (x, None))
    y = torch.ops.truthfuse.normalize_rows(x, sc)
    ref = torch.nn.functional.normalize(x.double(), dim=-1, eps=1e-12) * sc.double().view(-1, 1, 1)
    assert torch.isfinite(y).all() and rel(y, ref) < 1e-6
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, sc), g), torch.autograd.grad(ref, (x, sc), g.double())):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-5


def test_cosine_defaults_to_sdpa_only_on_a_gpu_without_mask_or_dropout(monkeypatch):
    A = importlib.import_module("fusion_backend.ops.attention")  # the module (ops re-exports the function)
    gpu = SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.setattr(A, "interpreting", lambda: False)
    learnable = torch.tensor(10.0, requires_grad=True)
    for fixed in (10.0, torch.tensor(10.0)):
        assert A._cosine_default_on_sdpa(gpu, "cosine", None, 0.0, fixed)
    with torch.no_grad():  # inference: no scale gradient
        assert A._cosine_default_on_sdpa(gpu, "cosine", None, 0.0, learnable)
    assert not A._cosine_default_on_sdpa(gpu, "cosine", None, 0.0, learnable)  # an accurate scale gradient
    assert not A._cosine_default_on_sdpa(gpu, "cosine", torch.ones(2, 2, dtype=torch.bool), 0.0, 10.0)
    assert not A._cosine_default_on_sdpa(gpu, "cosine", None, 0.1, 10.0)  # keeps its own dropout stream
    assert not A._cosine_default_on_sdpa(gpu, "dot", None, 0.0, 10.0)
    assert not A._cosine_default_on_sdpa(SimpleNamespace(device=torch.device("cpu")), "cosine", None, 0.0, 10.0)
    monkeypatch.setattr(A, "interpreting", lambda: True)
    assert not A._cosine_default_on_sdpa(gpu, "cosine", None, 0.0, 10.0)


def test_op_rejects_sdpa_config_where_sdpa_differs():
    q, k, v = qkv(1, 2, T=5, D=8)
    with pytest.raises(ValueError, match="dot-product and cosine attention only"):
        attention(q, k, v, metric="l2", config=SDPA_CONFIG)
    with pytest.raises(ValueError, match="no attn_mask"):
        attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool), config=SDPA_CONFIG)
    with pytest.raises(ValueError, match="number scale"):
        attention(q, k, v, scale=torch.tensor(0.3), config=SDPA_CONFIG)
    with pytest.raises(ValueError, match="needs no gradient"):
        attention(q, k, v, metric="cosine", scale=torch.tensor(3.0, requires_grad=True), config=SDPA_CONFIG)


def _sites(model, *inputs):
    captured = []

    def capture(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    torch.compile(model, backend=capture)(*inputs)
    torch._dynamo.reset()
    _, sites = fusion_backend.backend(strategy="aggressive", inner="eager")._find(captured[0], "g0")
    return [s for s in sites if s.kind == "attention" and not s.near_miss]


def _configs_on_cuda(site):
    """The site's config list as the rule builds it for CUDA tensors of the same shapes."""
    values = dict(site.match.values)
    for name in ("q", "query"):
        if name in values:
            t = values[name]
            values[name] = SimpleNamespace(device=torch.device("cuda"), shape=t.shape, dtype=t.dtype)
    match = copy.copy(site.match)
    match.values = values
    return site.rule.configs(match)


@pytest.mark.parametrize("model, offered", [
    (DotAttention(scale="mul_float"), True),
    (DotAttention(scale="pow", causal="additive", dropout="functional", p=0.1), True),  # constant causal mask
    (DotAttention(scale="mul_float", causal="tril"), False),  # a mask buffer: its values may change
    (DotAttention(scale="tensor"), False),  # a tensor scale
    (L2Attention(), False),
    (SDPA(is_causal=True), False),  # already SDPA: keeping it is the same
])
def test_rules_offer_sdpa_first_only_where_it_computes_the_site(model, offered):
    sites = _sites(model, *qkv(2, 2, T=8, D=8))
    assert sites, "no attention site found"
    configs = {site.rule.name: _configs_on_cuda(site) for site in sites}
    for c in configs.values():
        assert None in c and c.count(SDPA_CONFIG) <= 1  # the op's own kernels stay a choice
        assert SDPA_CONFIG not in c or c[0] == SDPA_CONFIG
    # the most specific rule (the one that wins the site) decides; a plain "dot" alternative of
    # the causal-mask site keeps its mask and is rightly not offered SDPA
    winner = max(sites, key=lambda s: s.rule.priority).rule.name
    assert (configs[winner][0] == SDPA_CONFIG) == offered, configs
    if not offered:
        assert all(SDPA_CONFIG not in c for c in configs.values()), configs


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_a_site_fused_with_sdpa_matches_eager(monkeypatch, inner):
    """The rules offer "sdpa" on CUDA only; here it is forced on CPU to check the replacement
    itself: the site is fused with config "sdpa", outputs and gradients equal eager's."""
    from fusion_backend.match.registry import all_rules

    rule = next(r for r in all_rules() if r.name == "attention.dot_causal")
    monkeypatch.setattr(rule, "configs", lambda m: [SDPA_CONFIG])
    model = DotAttention(scale="pow", causal="additive")
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, T=8, D=8))
    backend = fusion_backend.backend(strategy="aggressive", inner=inner, cache=False)
    out = torch.compile(model, backend=backend)(q, k, v)
    ref = model(q, k, v)
    decisions = [(s.rule, s.decision, s.config) for r in backend.records for s in r.sites]
    assert ("attention.dot_causal", "fused", SDPA_CONFIG) in decisions, decisions
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learnable", [True, False])
def test_compiled_cosine_site_sees_whether_its_scale_learns(learnable, monkeypatch):
    """Under torch.compile the replacement is traced on fake tensors: the default-path decision
    must still see a learnable scale as needing a gradient (it keeps the Triton kernels, whose
    scale gradient is the accurate one) and a constant one as not."""
    A = importlib.import_module("fusion_backend.ops.attention")
    seen = []
    decide = A._cosine_default_on_sdpa

    def spy(q, metric, attn_mask, dropout_p, scale):
        seen.append(A._needs_scale_grad(scale))
        return decide(q, metric, attn_mask, dropout_p, scale)

    monkeypatch.setattr(A, "_cosine_default_on_sdpa", spy)

    class Cosine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lam = torch.nn.Parameter(torch.tensor([5.0, 10.0]).view(2, 1, 1), requires_grad=learnable)

        def forward(self, q, k, v):
            cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-2, -1)
            return torch.softmax(self.lam * cos, dim=-1) @ v

    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    backend = fusion_backend.TruthfuseBackend(fusion_backend.parse_options({"strategy": "aggressive",
                                                                            "inner": "aot_eager"}))
    torch.compile(Cosine(), backend=backend)(q, k, v)
    assert seen and all(s == learnable for s in seen), seen
