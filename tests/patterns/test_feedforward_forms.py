"""The feed-forward rules (patterns/feedforward.py) on the forms issue 5 lists, compiled with
truthfuse under "aggressive": outputs and gradients (input and every parameter) match eager in
fp32, and explain() reports a fused "feedforward" site. Training and eval; dropout with p > 0 is
checked against `feedforward_reference` under the same seed (the op draws its masks from its own
Philox stream), and by its statistics. Near-misses say why. Kernels run in Triton's interpreter
(tests/conftest.py), so shapes are small.
"""
import copy
import math
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion_backend
from fusion_backend.ops.fallback import FusionFallbackWarning, reset_fallback_warnings
from fusion_backend.ops.feedforward import feedforward_reference, feedforward_supports
from truthfuse_patterns import feedforward as ff_rules

from .ffn_models import (
    GATED_VARIANTS,
    VARIANTS,
    BertFeedForward,
    BroadcastResidual,
    EscapingHidden,
    GatedMLP,
    MismatchedGate,
    MLP,
    tiny_gpt2_mlp,
    tiny_hf_model,
    tiny_llama_mlp,
)

OPTS = {"strategy": "aggressive", "inner": "eager", "cache": False}
TOL = dict(atol=2e-5, rtol=1e-4)


def assert_grad_close(g, r, **kwargs):
    """A gradient against eager's, with the absolute tolerance scaled to the gradient's largest
    entry: a parameter gradient sums many fp32 terms, so eager's own rounding error grows with their
    size, and a near-zero entry of a large gradient differs by about eps times that size."""
    scale = max(1.0, r.abs().max().item())
    torch.testing.assert_close(g, r, atol=TOL["atol"] * scale, rtol=TOL["rtol"], **kwargs)


@pytest.fixture(autouse=True)
def _kernels_only():
    """A fused site must run the Triton kernels, never the op's PyTorch fallback: the fallback's
    warning is an error here."""
    reset_fallback_warnings()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "truthfuse: feedforward fell back", FusionFallbackWarning)
        yield


def _backend(**extra):
    return fusion_backend.backend(**{**OPTS, **extra})


def _forward_backward(fn, model, x, cotangent, seed=None):
    """Output and gradients (x first, then every parameter) of fn(x)."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(cotangent)
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    return out.detach(), [g.clone() if g is not None else None for g in grads]


def assert_matches_eager(model, x, backend=None, dynamic=False, compiled=None):
    """Compiled and eager agree on the output and every gradient; returns the backend."""
    backend = backend or _backend()
    if compiled is None:
        compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    probe = model(x)
    cot = torch.randn_like(probe[0] if isinstance(probe, tuple) else probe)
    ref_out, ref_grads = _forward_backward(model, model, x, cot)
    out, grads = _forward_backward(compiled, model, x, cot)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert (g is None) == (r is None), f"gradient {i} present in only one of compiled/eager"
        if r is not None:
            assert_grad_close(g, r, msg=lambda m: f"gradient {i}: {m}")
    return backend


def feedforward_sites(report_or_backend, decision=None):
    sites = (report_or_backend.sites if hasattr(report_or_backend, "sites")
             else [s for r in report_or_backend.records for s in r.sites])
    return [s for s in sites if s.kind == "feedforward" and (decision is None or s.decision == decision)]


def assert_fused(model, x, variant=None, count=1):
    """explain() under "aggressive" reports `count` fused feed-forward sites (of `variant`)."""
    report = fusion_backend.explain(model, x, options=OPTS)
    fused = feedforward_sites(report, "fused")
    assert len(fused) == count, str(report)
    if variant is not None:
        assert {s.variant for s in fused} == {variant}, str(report)
    return report


def check_form(model, x, training, variant=None, count=1):
    """The numerics run fused the block(s) too, and explain() says so."""
    model.train(training)
    backend = assert_matches_eager(model, x)
    assert len(feedforward_sites(backend, "fused")) == count
    assert_fused(model, x, variant, count)


def _x(*shape):
    return torch.randn(*shape) if shape else torch.randn(2, 5, 8)


# ------------------------------------------------------------------------------------------------
# Plain MLPs: every activation, every spelling of Linear, bias or not, dropout, residual
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "gelu_new", "gelu_fast", "gelu_megatron", "gelu_erf", "relu",
                                 "silu", "silu_written", "silu_method", "quick_gelu", "relu2", "relu_pow"])
def test_plain_activations(act, training):
    p = 0.0 if training else 0.1  # numerics need the dropouts off: p = 0, or eval mode
    check_form(MLP(act=act, p_hidden=p, p_out=p), _x(), training, VARIANTS[act])


@pytest.mark.parametrize("linear,bias,shape", [
    ("functional", True, (2, 5, 8)),
    ("module", False, (2, 5, 8)),
    ("matmul", True, (2, 5, 8)),
    ("matmul", False, (7, 8)),
    ("mm", True, (10, 8)),
    ("addmm", True, (2, 5, 8)),
    ("matmul_T", False, (2, 5, 8)),
    ("matmul_T", True, (7, 8)),
])
def test_linear_spellings(linear, bias, shape):
    check_form(MLP(act="gelu", bias=bias, linear=linear), _x(*shape), True, "gelu")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_and_dropout_positions(training):
    p = 0.0 if training else 0.2  # eval: the dropouts are in the module but do nothing
    model = MLP(act="relu", p_hidden=p, p_out=p, residual=True)
    check_form(model, _x(), training, "relu")
    site = feedforward_sites(fusion_backend.explain(model, _x(), options=OPTS), "fused")[0]
    assert site.rule == "feedforward.plain.relu"


def test_output_wider_than_input():
    """d_out != d (8 -> 24 -> 12): the op's w_out is (d_out, h), not (d, h)."""
    check_form(MLP(d=8, h=16, d_out=12, act="silu"), _x(), True, "silu")


# ------------------------------------------------------------------------------------------------
# Gated MLPs: two projections, one chunked projection (either half the gate)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["silu", "silu_written", "silu_method", "gelu", "gelu_new", "gelu_fast", "gelu_erf",
                                 "relu", "quick_gelu", "relu2"])
def test_gated_two_projections(act, training):
    check_form(GatedMLP(act=act, bias=act != "silu", residual=act == "relu"), _x(), training,
               GATED_VARIANTS[act])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act,gate_first", [("gelu", True), ("gelu", False), ("silu", False)])
def test_gated_chunked_projection(act, gate_first, training):
    model = GatedMLP(act=act, bias=True, layout="chunk", gate_first=gate_first)
    check_form(model, _x(), training, GATED_VARIANTS[act])


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("layout", ["split", "split_sections"])
def test_gated_projection_split_in_halves_by_size(layout, dynamic):
    """z.split(h, -1) and torch.split(z, [h, h], -1) of a 2h-wide projection are its chunk(2, -1)."""
    model = GatedMLP(act="silu", bias=True, layout=layout, gate_first=False).eval()
    x = _x()
    backend = assert_matches_eager(model, x, dynamic=dynamic)
    assert len(feedforward_sites(backend, "fused")) == 1
    assert_fused(model, x, "swiglu")


def test_projection_split_in_three_is_not_a_gated_block():
    """split(h) of a 3h-wide projection gives three pieces, the first two not its halves: nothing
    fuses, results are eager's."""
    class Thirds(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.down_proj = nn.Linear(8, 24), nn.Linear(8, 8)

        def forward(self, x):
            a, b, _ = self.proj(x).split(8, dim=-1)
            return self.down_proj(F.silu(a) * b)

    model, x = Thirds(), _x()
    report = fusion_backend.explain(model, x, options=OPTS)
    assert not feedforward_sites(report, "fused"), str(report)
    torch.testing.assert_close(torch.compile(model, backend=_backend())(x), model(x), **TOL)


# ------------------------------------------------------------------------------------------------
# The two Linears in different modules
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hf_gpt2_mlp_conv1d_gelu_new(training):
    check_form(tiny_gpt2_mlp(p=0.0 if training else 0.1), _x(), training, "gelu_tanh")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hf_llama_mlp_swiglu(training):
    check_form(tiny_llama_mlp(), _x(), training, "swiglu")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_hf_bert_intermediate_and_output(training):
    """BertOutput ends in LayerNorm(dropout(dense(h)) + input): the site ends at the residual add,
    the LayerNorm stays outside."""
    model = BertFeedForward(p=0.0 if training else 0.1)
    check_form(model, _x(), training, "gelu")
    site = feedforward_sites(fusion_backend.explain(model, _x(), options=OPTS), "fused")[0]
    assert site.rule == "feedforward.plain.gelu"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation,norm_first", [("relu", False), ("gelu", True)])
def test_transformer_encoder_layer(activation, norm_first, training):
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first)
    check_form(model, _x(), training, activation)


@pytest.mark.parametrize("name,variant", [("gpt2", "gelu_tanh"), ("llama", "swiglu"), ("bert", "gelu"),
                                          ("clip", "quick_gelu"), ("nemotron", "relu2")])
def test_hf_models_every_layer(name, variant):
    """Whole tiny HF models (2 layers, training mode, dropout off): each layer's MLP is fused with
    its residual add, and the last hidden state and every parameter's gradient match eager.
    Attention rules are disabled so that only the feed-forward fusion is under test."""
    model = tiny_hf_model(name).train()
    ids = torch.randint(0, 50, (2, 6))
    options = {**OPTS, "disable": ["attention"]}
    compiled = torch.compile(model, backend=fusion_backend.backend(**options))

    def run(fn):
        model.zero_grad(set_to_none=True)
        out = fn(ids).last_hidden_state
        out.backward(cot)
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    cot = torch.randn(2, 6, 16)
    ref_out, ref_grads = run(model)
    out, grads = run(compiled)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert_grad_close(g, r)
    report = fusion_backend.explain(model, ids, options=options)
    fused = feedforward_sites(report, "fused")
    assert len(fused) == 2 and {s.variant for s in fused} == {variant}, str(report)
    assert all(s.site_id.split("@")[1].startswith("add") for s in fused), "the residual add is inside"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sequential_stack_two_blocks(training):
    """Two MLPs in a row in one nn.Sequential: the second block's input is the first's output."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 8),
                          nn.Linear(8, 12), nn.ReLU(inplace=True), nn.Linear(12, 8))
    if training:
        model[2].p = 0.0
    model.train(training)
    assert len(feedforward_sites(assert_matches_eager(model, _x()), "fused")) == 2
    report = assert_fused(model, _x(), count=2)
    assert {s.variant for s in feedforward_sites(report, "fused")} == {"gelu", "relu"}


@pytest.mark.parametrize("model_fn,variant", [
    (lambda: MLP(act="gelu", p_hidden=0.1, p_out=0.1, residual=True), "gelu"),
    (lambda: GatedMLP(act="silu", layout="chunk"), "swiglu"),
], ids=["plain", "chunked"])
def test_inference_under_no_grad(model_fn, variant):
    """Inference as served: eval mode inside torch.no_grad(), a graph without autograd."""
    model = model_fn().eval()
    x = _x()
    backend = _backend()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        torch.testing.assert_close(out, model(x), **TOL)
    assert [s.variant for s in feedforward_sites(backend, "fused")] == [variant]


def test_sites_without_dropout_are_exact():
    """A site is exact (so "conservative" may fuse it) unless it holds a dropout: the op draws
    its own random stream."""
    rule = fusion_backend.get_rule("feedforward.plain.gelu")
    for p, exact in ((None, True), (0.1, False)):
        values = {"p_hidden": p}
        match = types.SimpleNamespace(values=values, present=lambda name: values.get(name) is not None)
        assert rule.exact_for(match) is exact


def test_overlapping_blocks_compete():
    """Linear-GELU-Linear-GELU-Linear holds two blocks sharing the middle Linear: both are
    reported, the tuner fuses one and keeps the other."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 8))
    assert len(feedforward_sites(assert_matches_eager(model, _x()), "fused")) == 1
    report = fusion_backend.explain(model, _x(), options=OPTS)
    assert len(feedforward_sites(report, "fused")) == 1, str(report)
    kept = feedforward_sites(report, "kept")
    assert len(kept) == 1 and "overlaps" in kept[0].reason, str(report)


# ------------------------------------------------------------------------------------------------
# Dropout with p > 0 in training
# ------------------------------------------------------------------------------------------------

def _seeded_against_reference(model, x, reference, seed=1234):
    """The compiled block under `torch.manual_seed(seed)` equals `reference(x)` under the same
    seed (feedforward_reference draws the op's Philox masks), outputs and gradients."""
    model.train()
    compiled = torch.compile(model, backend=_backend())
    compiled(x)  # compile outside the seeded region
    cot = torch.randn(model(x).shape)
    out, grads = _forward_backward(compiled, model, x, cot, seed=seed)
    ref_out, ref_grads = _forward_backward(reference, model, x, cot, seed=seed)
    torch.testing.assert_close(out, ref_out, **TOL)
    for g, r in zip(grads, ref_grads):
        assert_grad_close(g, r)
    return out


def test_dropout_training_plain_matches_seeded_reference():
    model = MLP(d=8, h=24, act="gelu", p_hidden=0.3, p_out=0.2, residual=True)
    out = _seeded_against_reference(model, _x(), lambda x: feedforward_reference(
        x, model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias, activation="gelu",
        hidden_dropout_p=0.3, output_dropout_p=0.2, residual=x))
    assert out.shape == (2, 5, 8)
    assert len(feedforward_sites(assert_fused(model, _x(), "gelu"), "fused")) == 1


def test_dropout_training_gated_matches_seeded_reference():
    model = GatedMLP(act="silu", bias=True, layout="two", p_hidden=0.25)
    _seeded_against_reference(model, _x(), lambda x: feedforward_reference(
        x, model.up_proj.weight, model.up_proj.bias, model.down_proj.weight, model.down_proj.bias,
        activation="silu", w_gate=model.gate_proj.weight, b_gate=model.gate_proj.bias, hidden_dropout_p=0.25))


def test_dropout_training_hf_bert_output_matches_seeded_reference():
    model = BertFeedForward(p=0.2)
    inter, output = model.intermediate.dense, model.output

    def reference(x):
        y = feedforward_reference(x, inter.weight, inter.bias, output.dense.weight, output.dense.bias,
                                  activation="gelu", output_dropout_p=0.2, residual=x)
        return output.LayerNorm(y)
    _seeded_against_reference(model, _x(), reference)


def test_dropout_training_statistics():
    """Output dropout p=0.5 zeroes about half the outputs; the kept ones are the eval output
    scaled by 1/(1-p); a second call draws a different mask."""
    model = MLP(d=16, h=32, act="relu", p_out=0.5)
    x = torch.randn(4, 16, 16)
    model.eval()
    clean = model(x).detach()
    model.train()
    compiled = torch.compile(model, backend=_backend())
    with torch.no_grad():
        a, b = compiled(x), compiled(x)
    dropped = (a == 0)
    assert abs(dropped.float().mean().item() - 0.5) < 0.1
    torch.testing.assert_close(a[~dropped], clean[~dropped] * 2.0, **TOL)
    assert not torch.equal(a == 0, b == 0)


# ------------------------------------------------------------------------------------------------
# Near-misses: matched structurally, kept with a reason; the model still computes eager's result
# ------------------------------------------------------------------------------------------------

def _near_miss(model, x, fragment):
    report = fusion_backend.explain(model, x, options=OPTS)
    kept = [s for s in feedforward_sites(report, "kept") if fragment in (s.reason or "")]
    assert kept, str(report)
    return report


def test_near_miss_broadcasting_residual_fuses_without_the_add():
    model = BroadcastResidual(d=8, h=16, T=5)
    x = _x()
    assert len(feedforward_sites(assert_matches_eager(model, x), "fused")) == 1
    report = _near_miss(model, x, "broadcasting")
    assert len(feedforward_sites(report, "fused")) == 1, str(report)


def test_near_miss_hidden_used_outside():
    model = EscapingHidden()
    assert_matches_eager(model, _x())
    report = _near_miss(model, _x(), "also used outside")
    assert not feedforward_sites(report, "fused")
    assert not any("attention" in s.reason for s in feedforward_sites(report)), str(report)


def test_near_miss_gate_and_up_widths_differ():
    model = MismatchedGate()
    assert_matches_eager(model, _x())
    report = _near_miss(model, _x(), "gate weight")
    assert not feedforward_sites(report, "fused")


def test_near_miss_float64():
    model = MLP(act="gelu").double()
    x = _x().double()
    assert_matches_eager(model, x)
    _near_miss(model, x, "float64")


def test_near_miss_dropout_probability_one():
    model = MLP(act="relu", p_hidden=1.0).train()
    _near_miss(model, _x(), "outside [0, 1)")


def test_near_miss_is_listed_once_not_once_per_optional_tail_step():
    """A kept block with an output dropout and a residual add matches at the add, the dropout and
    the second Linear (its shorter prefixes); each was listed as a site of its own with the same
    reason, and the report counted 3 kept sites for one block. A shorter prefix that fails for the
    same reason is the same place: one row. One that fuses is still listed (the add kept, the
    block fused without it)."""
    report = _near_miss(MLP(act="relu", p_hidden=1.0, p_out=0.1, residual=True).train(), _x(), "outside [0, 1)")
    assert len(feedforward_sites(report)) == 1, str(report)
    report = _near_miss(MLP(act="gelu", residual=True).double(), _x().double(), "float64")
    assert len(feedforward_sites(report)) == 1, str(report)
    report = _near_miss(MLP(act="relu", p_hidden=0.1, p_out=1.0, residual=True).train(), _x(), "outside [0, 1)")
    assert [s.decision for s in feedforward_sites(report)] == ["kept", "fused"], str(report)


_AUTOCAST_FORMS = {
    "gelu, fp32 residual": lambda: MLP(d=16, h=32, act="gelu", residual=True),
    "gelu_new, Conv1D": lambda: MLP(d=16, h=32, act="gelu_new", linear="addmm", residual=True),
    "swiglu, chunked": lambda: GatedMLP(d=16, h=32, act="silu", layout="chunk", bias=True, residual=True),
    "relu2, no residual": lambda: MLP(d=16, h=32, act="relu2"),
}


def _autocast_run(fn, params, x, autocast):
    """Output (as float64) and the gradients of x and every parameter, of a weighted sum of fn(x)."""
    x = x.detach().clone().requires_grad_()
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out.double() * weight).sum().backward()
    return out.dtype, [out.detach().double(), x.grad.double()] + [p.grad.double() for p in params]


@pytest.mark.parametrize("form", sorted(_AUTOCAST_FORMS))
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_fuses_under_autocast(form, x_dtype):
    """fp32 weights under CPU autocast to bf16: F.linear casts x, its weight and bias to bf16, and
    so does the replacement, so the op computes the block in bf16, as the model asked. A residual
    of another dtype (fp32 x) is added to the op's bf16 result outside it, as eager adds it. The
    result has eager's dtype, and the output and every gradient are as close to float64 as eager's
    (within 3x, plus a floor for entries eager happens to round well)."""
    torch.manual_seed(0)
    model = _AUTOCAST_FORMS[form]()
    x = torch.randn(2, 5, 16)
    ref_model = copy.deepcopy(model).double()
    _, ref = _autocast_run(ref_model, list(ref_model.parameters()), x.double(), autocast=False)
    params = list(model.parameters())
    eager_dtype, eager = _autocast_run(model, params, x.to(x_dtype), autocast=True)
    backend = _backend()
    compiled = torch.compile(model, backend=backend)
    dtype, ours = _autocast_run(compiled, params, x.to(x_dtype), autocast=True)
    torch._dynamo.reset()
    assert len(feedforward_sites(backend, "fused")) == 1, [str(s) for r in backend.records for s in r.sites]
    assert dtype == eager_dtype
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        scale = r.abs().max()
        assert torch.isfinite(o).all()
        assert (o - r).abs().max() / scale <= 3 * (e - r).abs().max() / scale + 2e-3, f"tensor {i}"


def test_fuses_under_autocast_inside_the_model():
    """An autocast region in the model's own code, around the whole block: the same casts, fused."""
    torch.manual_seed(0)
    model = MLP(d=16, h=32, act="gelu", residual=True)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)
    report = fusion_backend.explain(f, torch.randn(2, 5, 16), options=OPTS)
    assert len(feedforward_sites(report, "fused")) == 1, str(report)
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(f, backend=_backend())
    torch.testing.assert_close(compiled(x), f(x), atol=2e-2, rtol=2e-2)
    assert compiled(x).dtype == f(x).dtype == torch.float32



class _InPlaceResidual(nn.Module):
    """`y += x`: the in-place add keeps y's dtype, so with fp32 x under autocast it is bf16."""

    def __init__(self, method):
        super().__init__()
        self.fc1, self.fc2, self.method = nn.Linear(16, 32), nn.Linear(32, 16), method

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(x)))
        if self.method:
            return y.add_(x)
        y += x
        return y


@pytest.mark.parametrize("method", [False, True])
def test_fuses_in_place_residual_under_autocast(method):
    """An in-place residual add that promotes (bf16 block output += fp32 x) becomes the add and a
    cast back to bf16; the add had no example value, so the site matched without one and its
    replacement failed ('matched site does not produce a tensor', kept with a FusionWarning)."""
    torch.manual_seed(0)
    model = _InPlaceResidual(method)
    x = torch.randn(2, 5, 16)
    backend = _backend()
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fusion_backend.FusionWarning)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = compiled(x), model(x)
    torch._dynamo.reset()
    assert len(feedforward_sites(backend, "fused")) == 1, [str(s) for r in backend.records for s in r.sites]
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2)

class _CastBeforeTheResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).float() + x


def test_near_miss_cast_between_the_block_and_its_residual_says_so():
    """A bf16 block whose output is cast to fp32 before the bf16 residual is added: the add returns
    fp32, which the op's bf16 sum would not, so the add stays outside (the block fuses without it)
    and the reason names the cast, not only the dtypes."""
    report = _near_miss(_CastBeforeTheResidual().bfloat16(), _x().bfloat16(), "a cast between them")
    assert len(feedforward_sites(report, "fused")) == 1, str(report)


class _InputWrittenBetweenLinears(nn.Module):
    """fc1 reads x, then x is written in place, and the residual is the written x."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        x = x.clone()
        z = self.fc1(x)
        x.mul_(2.0)
        return self.fc2(torch.nn.functional.gelu(z)) + x


def test_input_written_between_the_linears():
    # canonicalization makes the write out of place; its result is a value of its own, not x's
    # (they shared one example value, and the replacement read the written x as the block's input)
    model = _InputWrittenBetweenLinears()
    x = _x()
    compiled = torch.compile(model, backend=_backend())
    with torch.no_grad():  # training it is invalid in eager too: fc1 saved the x written after
        torch.testing.assert_close(compiled(x), model(x), **TOL)
    assert_fused(model, x, "gelu")


def test_near_miss_hidden_rounded_to_half():
    # an fp32 block rounding its hidden values to fp16 (and back) would overflow there in eager
    class Rounded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)).half().float())

    report = fusion_backend.explain(Rounded(), _x(), options=OPTS)
    kept = feedforward_sites(report, "kept")
    assert kept and not feedforward_sites(report, "fused"), str(report)
    assert any("a cast from float32 to float16" in s.reason for s in kept), str(report)


class _AfterBatchNorm(nn.Module):
    """A block fed by BatchNorm1d over the transposed sequence: batch_norm's fake strides differ
    from its real output's, so a view chosen from them fails at run time."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc1, self.fc2 = nn.BatchNorm1d(8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def test_block_after_batch_norm_on_a_transposed_input():
    model = _AfterBatchNorm().eval()
    check_form(model, _x(), training=False, variant="gelu")


def test_near_miss_output_added_to_itself():
    """`y + y` is not a residual add: the block is fused without it."""
    model = MLP(act="gelu")

    def f(x):
        y = model(x)
        return y + y
    report = _near_miss(f, _x(), "not a residual")
    assert len(feedforward_sites(report, "fused")) == 1
    x = _x()
    torch.testing.assert_close(torch.compile(f, backend=_backend())(x), f(x), **TOL)


class _ResidualFirstTransposed(nn.Module):
    """`x + mlp(x)` on a (T, B, d) transpose of the input: eager's sum takes x's layout (its first
    operand's), so viewing it back as (B * T, d) works."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        x = x.transpose(0, 1)
        out = x + self.fc2(torch.relu(self.fc1(x)))
        return out.transpose(0, 1).view(-1, 8)


def test_residual_with_another_layout_fuses_in_eagers_layout():
    # eager's sum takes the transposed residual's layout, which the .view after the block needs;
    # the op returns its result contiguous, and the replacement copies it into that layout
    model = _ResidualFirstTransposed()
    backend = assert_matches_eager(model, _x())
    fused = feedforward_sites(backend, "fused")
    assert len(fused) == 1 and fused[0].rule == "feedforward.plain.relu", [(s.rule, s.reason) for s in fused]
    assert fused[0].site_id.endswith("@add"), fused[0].site_id  # the residual add is inside the site


def test_near_miss_intermediate_added_to_the_output():
    """`down(silu(gate) * up) + up` adds the block's own up projection, not its output: the reason
    names that value and does not call it `y + y`; nothing fuses (up is used outside every
    smaller site)."""
    model = GatedMLP(d=8, h=8, act="silu")

    def f(x):
        up = model.up_proj(x)
        return model.down_proj(torch.nn.functional.silu(model.gate_proj(x)) * up) + up
    report = _near_miss(f, _x(), "is computed inside the block")
    assert not any("y + y" in (s.reason or "") for s in feedforward_sites(report)), str(report)
    assert not feedforward_sites(report, "fused"), str(report)
    x = _x()
    torch.testing.assert_close(torch.compile(f, backend=_backend())(x), f(x), **TOL)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_ALPHA_GELUS = {
    # gelu_new with `1 + tanh(...)` spelled torch.add(tanh(...), 1, alpha=2): tanh(...) + 2
    "outer": lambda z: 0.5 * z * torch.add(torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z ** 3)), 1, alpha=2),
    # ... and with `z + 0.044715 z^3` spelled torch.add(z, 0.044715 z^3, alpha=3)
    "inner": lambda z: 0.5 * z * (1 + torch.tanh(_SQRT_2_OVER_PI * torch.add(z, 0.044715 * z ** 3, alpha=3))),
    # the exact GELU written out, `1 + erf(...)` spelled torch.add(erf(...), 1, alpha=2)
    "erf": lambda z: 0.5 * z * torch.add(torch.erf(z / math.sqrt(2.0)), 1, alpha=2),
}


_FACTORED_NEAR_GELUS = {
    # gelu_fast's factoring with x^2 missing: sqrt(2/pi) * x * (1 + 0.044715 x) is no GELU
    "linear": lambda z: 0.5 * z * (1.0 + torch.tanh(z * 0.7978845608 * (1.0 + 0.044715 * z))),
    # ... with a constant that is not sqrt(2/pi)
    "constant": lambda z: 0.5 * z * (1.0 + torch.tanh(z * 0.798 * (1.0 + 0.044715 * z * z))),
    # ... and with x^2 taken of another tensor than x
    "other": lambda z: 0.5 * z * (1.0 + torch.tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z.detach()))),
}


@pytest.mark.parametrize("near", sorted(_FACTORED_NEAR_GELUS))
def test_factored_tanh_gelu_near_misses_are_not_gelu(near):
    """gelu_fast's factoring, x * sqrt(2/pi) * (1 + 0.044715 x^2), is read as the tanh GELU only with
    those constants and x throughout; these compute something else and stay as written."""
    model, x = MLP(act="gelu"), _x()
    model.act = _FACTORED_NEAR_GELUS[near]
    report = fusion_backend.explain(model, x, options=OPTS)
    assert not feedforward_sites(report, "fused"), str(report)
    torch.testing.assert_close(torch.compile(model, backend=_backend())(x), model(x), **TOL)


@pytest.mark.parametrize("where", sorted(_ALPHA_GELUS))
def test_written_gelu_with_an_alpha_add_is_not_gelu(where):
    """An add with alpha= in a written-out GELU computes something else; the tanh form was folded
    into F.gelu(approximate="tanh") all the same and fused as GELU (0.44 off eager for the outer
    add, 0.02 for the inner). Such an add is no step of the GELU: nothing fuses, results are
    eager's."""
    model, x = MLP(act="gelu"), _x()
    model.act = _ALPHA_GELUS[where]
    report = fusion_backend.explain(model, x, options=OPTS)
    assert not feedforward_sites(report, "fused"), str(report)
    torch.testing.assert_close(torch.compile(model, backend=_backend())(x), model(x), **TOL)


@pytest.mark.parametrize("p,fragment", [
    ("tensor", "is a tensor"),
    ("symbolic", "symbolic"),
    (1.0, "outside [0, 1)"),
    (0.1, None),
    ("pinned", None),
])
def test_dropout_probability_must_be_a_constant(p, fragment):
    """Dynamo breaks the graph at a tensor p and pins float attributes under dynamic=True, so
    these reach a rule rarely; the constraint itself decides: a tensor or a free symbol is a
    near-miss, a pinned symbol (expression a number) counts as its number."""
    import sympy
    from torch.fx.experimental.sym_node import SymNode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    value = {"tensor": torch.tensor(0.1), "symbolic": env.create_unbacked_symfloat(),
             "pinned": torch.SymFloat(SymNode(sympy.Float(0.1), env, float, hint=0.1))}.get(p, p)
    values = {"p_hidden": value}
    match = types.SimpleNamespace(values=values, present=lambda name: values.get(name) is not None)
    reason = ff_rules.check_dropout(match)
    assert (reason is None) if fragment is None else (fragment in reason), reason


# ------------------------------------------------------------------------------------------------
# Dynamic shapes, the tuner's choices, Inductor end to end
# ------------------------------------------------------------------------------------------------

def test_dynamic_shapes_one_graph_for_many_sizes():
    """dynamic=True from the first call: one graph with symbolic batch and sequence sizes serves
    every size (sizes 0 and 1 are specialized by Dynamo, so they are left out)."""
    model = MLP(act="silu", residual=True).train()
    backend = _backend()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for shape in [(2, 5, 8), (3, 7, 8), (4, 2, 8)]:
        assert_matches_eager(model, torch.randn(shape), compiled=compiled)
    assert len(backend.records) == 1, "a new size recompiled"
    assert len(feedforward_sites(backend, "fused")) == 1


class _RoutedMLP(nn.Module):
    """An expert of a mixture: the block runs on the tokens its router selects, a row count
    known only while the graph runs (an unbacked size under capture_dynamic_output_shape_ops)."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP(act="gelu")

    def forward(self, x, route):
        return self.mlp(x[route > 0])


def test_block_on_a_data_dependent_row_count_fuses():
    """The op decides whether training keeps the pre-activation by T * d * h; on an unbacked row
    count that comparison cannot be guarded on, and the replacement failed to build (a
    FusionWarning: 'Expected a value of type 'bool' for argument 'save' but instead found type
    'SymBool''), keeping the block. It now recomputes there, and matches eager, no rows included."""
    model = _RoutedMLP().train()
    backend = _backend()
    compiled = torch.compile(model, backend=backend)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), warnings.catch_warnings():
        warnings.simplefilter("error", fusion_backend.FusionWarning)
        for route in (torch.randn(9), torch.full((6,), -1.0), torch.randn(7)):
            x = torch.randn(route.shape[0], 8)
            ref_in, new_in = x.clone().requires_grad_(), x.clone().requires_grad_()
            ref, out = model(ref_in, route), compiled(new_in, route)
            torch.testing.assert_close(out, ref, **TOL)
            cot = torch.randn_like(ref)
            ref_grads = torch.autograd.grad((ref * cot).sum(), [ref_in, *model.parameters()])
            grads = torch.autograd.grad((out * cot).sum(), [new_in, *model.parameters()])
            for g, r in zip(grads, ref_grads):
                assert_grad_close(g, r)
    assert feedforward_sites(backend) and all(s.decision == "fused" for s in feedforward_sites(backend)), \
        [(s.decision, s.reason) for s in feedforward_sites(backend)]


def test_dynamic_tanh_gelu_constant_is_explained():
    """Under dynamic=True Dynamo passes math.pi into the graph, so gelu_new's sqrt(2/pi) is no
    constant and its block is not found (docs/troubleshooting.md): the compile warns and explain()
    says why and how to fix it, instead of reporting nothing. The fix it names fuses the block."""
    model, x = MLP(act="gelu_new").eval(), _x()
    backend = _backend()
    with pytest.warns(fusion_backend.FusionWarning, match="specialize_float"):
        torch.compile(model, backend=backend, dynamic=True)(x)
    report = fusion_backend.Report.from_records(backend.records)
    assert not feedforward_sites(report), str(report)
    assert "sqrt(2/pi) at run time" in str(report) and "specialize_float = True" in str(report), str(report)
    with torch._dynamo.config.patch(specialize_float=True):
        backend = assert_matches_eager(model, x, dynamic=True)
    assert len(feedforward_sites(backend, "fused")) == 1
    assert not any(r.notes for r in backend.records)


def _cuda_match(gated):
    x = types.SimpleNamespace(device=torch.device("cuda"))
    return types.SimpleNamespace(values={"x": x})


@pytest.mark.parametrize("gated", [False, True])
def test_tuner_configs_offer_triton_and_cublas(gated):
    """On CUDA a site offers both implementations (and some tiles of each); every choice is a
    valid op config. On CPU only the op's default (timing in the interpreter says nothing)."""
    rule = fusion_backend.get_rule("feedforward.gated.silu" if gated else "feedforward.plain.gelu")
    choices = rule.configs(_cuda_match(gated))
    impls = {ff_rules.split_config(c)[0] for c in choices}
    assert impls == {"triton", "cublas"}
    assert len(set(choices)) == len(choices) > 2
    d, h = 8, 16
    x, w_in, w_out = torch.randn(3, d), torch.randn(h, d), torch.randn(d, h)
    w_gate = torch.randn(h, d) if gated else None
    for c in choices:
        impl, key = ff_rules.split_config(c)
        ok, why = feedforward_supports(x, w_in, None, w_out, None, activation="silu", w_gate=w_gate,
                                       impl=impl, config=key)
        assert ok, (c, why)
    cpu = types.SimpleNamespace(values={"x": x})
    assert rule.configs(cpu) == [None]


@pytest.mark.parametrize("config", [None, "triton", "cublas"])
def test_replacement_runs_each_implementation(config):
    """The rule's replacement with each implementation computes the block (chunked SwiGLU)."""
    model = GatedMLP(act="silu", bias=True, layout="chunk", gate_first=False).train()
    x = _x()
    rule = fusion_backend.get_rule("feedforward.chunked.silu")
    out = rule.replacement(config=config, x=x, w_cat=model.proj.weight, b_cat=model.proj.bias,
                           gate_half=1, up_half=0, approx=None, p_hidden=None, w_out=model.down_proj.weight,
                           b_out=model.down_proj.bias, p_out=None, residual=None)
    torch.testing.assert_close(out, model(x), **TOL)


def test_inductor_end_to_end():
    """The default inner compiler: the rewritten graph (fused block plus LayerNorm and residual)
    goes through Inductor, forward and backward."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.mlp = MLP(d=8, h=16, act="gelu")

        def forward(self, x):
            return x + self.mlp(self.ln(x))

    model = Block().train()
    backend = fusion_backend.backend(strategy="aggressive", cache=False)
    assert backend.options.inner == "inductor"
    assert_matches_eager(model, _x(), backend=backend)
    assert [s.decision for s in feedforward_sites(backend)] == ["fused"]


def test_dtensor_inputs_are_a_near_miss(tmp_path):
    """A feed-forward block on DTensors (tensor parallelism) matched, and tracing the replacement
    failed ("Operator truthfuse.feedforward.default does not have a sharding strategy registered"):
    the site was kept with a FusionWarning that calls itself a truthfuse bug. The fused op takes
    plain tensors, so such a site is a near-miss naming the DTensor."""
    import torch.nn.functional as F

    from .checks import assert_dtensor_site_kept, one_rank_mesh

    def block(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    inputs = [torch.randn(2, 5, 8), torch.randn(16, 8) / 3, torch.randn(16), torch.randn(8, 16) / 4, torch.randn(8)]
    with one_rank_mesh(tmp_path) as mesh:
        assert_dtensor_site_kept(block, inputs, mesh, "feedforward")
