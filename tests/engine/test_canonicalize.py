"""Canonicalization: equivalent spellings become one canonical graph, and the canonical graph
computes exactly what the original did."""
import copy
import math
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusion_backend
from fusion_backend.canonicalize import canonical_copy
from fusion_backend.canonicalize.passes import WRITTEN_IN_PLACE

AGGRESSIVE_EAGER = {"strategy": "aggressive", "inner": "eager", "cache": False}


def _dynamo_graph(fn, *args, with_inputs=False):
    """The FX graph Dynamo hands a backend for fn(*args) (and the inputs in its order)."""
    captured = []

    def grab(gm, example_inputs):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(fn, backend=grab, fullgraph=True)(*args)
    return captured[0] if with_inputs else captured[0][0]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _augmented_assignment(q, k, v):
    s = q @ k.transpose(-1, -2)
    s /= 4.0  # Falcon's eager attention scales its scores this way
    return torch.softmax(s, dim=-1) @ v


# Nine spellings of scaled dot-product attention scores -> probabilities -> output.
SPELLINGS = {
    "augmented_assignment": _augmented_assignment,
    "matmul_mul": lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v,
    "div_sqrt": lambda q, k, v: F.softmax(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(16), -1) @ v,
    "pow_scale": lambda q, k, v: (q @ k.permute(0, 1, 3, 2) * q.size(-1) ** -0.5).softmax(-1).matmul(v),
    "einsum": lambda q, k, v: torch.einsum("bhqk,bhkd->bhqd",
                                           torch.einsum("bhqd,bhkd->bhqk", q, k).mul(0.25).softmax(-1), v),
    "inplace": lambda q, k, v: torch.softmax((q @ k.transpose(-1, -2)).mul_(0.25), -1) @ v,
    "casts": lambda q, k, v: torch.softmax((q @ k.transpose(-2, -1) * 0.25).float(), -1).to(q.dtype) @ v,
    "tensor_scale": lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) / torch.tensor(4.0), -1) @ v,
    "softmax_dtype": lambda q, k, v: F.softmax(q @ k.transpose(-2, -1) * 0.25, dim=3, dtype=torch.float32) @ v,
    # Falcon views its scores and probabilities to the shapes they already have
    "identity_views": lambda q, k, v: torch.softmax((q @ k.transpose(-1, -2)).view(2, 3, 8, 8) * 0.25,
                                                    -1).reshape(2, 3, 8, 8) @ v,
}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spellings_share_one_canonical_form(name):
    fn = SPELLINGS[name]
    q, k, v = (torch.randn(2, 3, 8, 16) for _ in range(3))
    gm, inputs = _dynamo_graph(fn, q, k, v, with_inputs=True)
    canon = canonical_copy(gm)
    targets = _targets(canon)
    assert targets.count(torch.matmul) == 2 and targets.count(torch.softmax) == 1
    for textual in (operator.matmul, torch.einsum, operator.truediv, operator.itruediv, "permute", "mul_", "softmax",
                    "float", "view", "reshape"):
        assert textual not in targets, (name, textual)
    # The canonical graph still computes the same function ...
    torch.testing.assert_close(canon(*inputs)[0], gm(*inputs)[0], atol=1e-6, rtol=1e-5)
    # ... and the one dot-attention rule covers every spelling.
    report = fusion_backend.explain(fn, q, k, v, options=AGGRESSIVE_EAGER)
    assert [(s.kind, s.variant, s.decision) for s in report.sites] == [("attention", "dot", "fused")]
    compiled = torch.compile(fn, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v), atol=1e-5, rtol=1e-4)


def test_views_to_another_shape_or_dtype_are_kept():
    def fn(x):
        y = x.view(4, 6) * 2  # another shape
        # another dtype; the same shape (dropped); the same shape but returned (kept)
        return y.view(torch.int32), y.reshape(4, 6) + 1, y.view(4, 6)

    x = torch.randn(24)
    gm, inputs = _dynamo_graph(fn, x, with_inputs=True)
    canon = canonical_copy(gm)
    targets = _targets(canon)
    assert targets.count("view") == 3 and "reshape" not in targets
    for a, b in zip(canon(*inputs), gm(*inputs)):
        assert torch.equal(a, b)


def test_eval_dropout_is_removed_and_training_dropout_is_normalized():
    def fn(x, training: bool):
        return F.dropout(x * 2, 0.3, training) + torch.dropout(x, 0.0, True)

    x = torch.randn(4, 4)
    eval_targets = _targets(canonical_copy(_dynamo_graph(lambda t: fn(t, False), x)))
    assert F.dropout not in eval_targets and torch.dropout not in eval_targets
    train = canonical_copy(_dynamo_graph(lambda t: fn(t, True), x))
    drops = [n for n in train.graph.nodes if n.target is F.dropout]
    assert len(drops) == 1 and drops[0].args[1:] == (0.3, True)


def test_masked_fill_and_where_become_one_form():
    mask = torch.rand(8, 8) > 0.5

    def fill(s):
        return s.masked_fill(mask, float("-inf"))

    def where(s):
        return torch.where(~mask, s, float("-inf"))

    s = torch.randn(2, 8, 8)
    for fn in (fill, where):
        gm, inputs = _dynamo_graph(fn, s, with_inputs=True)
        canon = canonical_copy(gm)
        assert torch.masked_fill in _targets(canon) and torch.where not in _targets(canon)
        torch.testing.assert_close(canon(*inputs)[0], fill(s))


def test_inplace_on_an_input_that_the_graph_reads_stays_and_is_marked():
    def fn(x):
        x.mul_(2)  # mutates the caller's tensor, which the graph then reads
        return x + 1

    x = torch.randn(3)
    gm, inputs = _dynamo_graph(fn, x.clone(), with_inputs=True)
    canon = canonical_copy(gm)
    assert "mul_" in _targets(canon)
    marked = [n.name for n in canon.graph.nodes if n.meta.get(WRITTEN_IN_PLACE)]
    assert marked, "the written input must be marked, so that no site takes it in"
    fresh = [t.clone() for t in inputs]  # capturing ran fn once on `inputs`, which it mutated
    want = fresh[0] * 2 + 1
    torch.testing.assert_close(canon(*fresh)[0], want)


def test_inplace_that_nothing_else_reads_stays_in_place():
    # BatchNorm's num_batches_tracked.add_(1): the graph reads the counter nowhere else
    def fn(x, counter):
        counter.add_(1)
        return x * 2

    x, counter = torch.randn(3), torch.zeros((), dtype=torch.long)
    gm, inputs = _dynamo_graph(fn, x, counter.clone(), with_inputs=True)
    canon = canonical_copy(gm)
    assert "add_" in _targets(canon)
    assert not any(n.meta.get(WRITTEN_IN_PLACE) for n in canon.graph.nodes)
    before = [t.clone() for t in inputs if isinstance(t, torch.Tensor) and t.dtype == torch.long]
    canon(*inputs)
    after = [t for t in inputs if isinstance(t, torch.Tensor) and t.dtype == torch.long]
    assert [int(t) for t in after] == [int(t) + 1 for t in before]


class _InplaceThroughAlias(torch.nn.Module):
    """An MLP that the feed-forward rules fuse, next to a mutation that reaches a tensor the graph
    reads (found by fuzzing hand-written feed-forward blocks)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)
        self.act, self.drop = torch.nn.ReLU(inplace=True), torch.nn.Dropout(0.1)

    def forward(self, x):
        if self.form == "relu_inplace_on_input":
            self.act(x)  # F.relu(x, inplace=True) on the caller's tensor, before the MLP reads it
        elif self.form == "relu_inplace_on_input_after_the_mlp":
            out = self.fc2(F.gelu(self.fc1(x)))
            self.act(x)  # after the MLP read x: a fused op reading x later could see the write
            return out + x
        elif self.form == "imul_on_a_slice":
            h = self.fc1(x)
            a = h[..., :8]
            a *= 2.0  # operator.imul, its result unused
            return self.fc2(h) + self.fc2(F.gelu(self.fc1(x)))
        elif self.form == "relu_through_a_same_dtype_cast":
            h = self.fc1(x)
            h.float().relu_()  # .float() of an fp32 tensor is the tensor itself
            return self.fc2(F.gelu(h))
        elif self.form == "relu_through_eval_dropout":
            h = self.fc1(x)
            self.drop(h).relu_()  # dropout in eval returns its input
            return self.fc2(h) + self.fc2(F.gelu(self.fc1(x)))
        return self.fc2(F.gelu(self.fc1(x)))


# form -> whether the fused MLP would take in a value written at or after its first node (then
# it is a near-miss); a write before the block (the input relu'd in place) leaves it fused
FORMS = {"relu_inplace_on_input": False, "relu_inplace_on_input_after_the_mlp": True, "imul_on_a_slice": False,
         "relu_through_a_same_dtype_cast": True, "relu_through_eval_dropout": False}


@pytest.mark.parametrize("form", list(FORMS))
def test_inplace_write_through_an_alias_keeps_eager_results(form):
    torch._dynamo.reset()
    model = _InplaceThroughAlias(form).eval()
    x = torch.randn(4, 16)
    x_eager, x_compiled = x.clone(), x.clone()
    want = model(x_eager)
    got = torch.compile(model, backend="truthfuse", options=AGGRESSIVE_EAGER)(x_compiled)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x_compiled, x_eager, atol=0, rtol=0)  # the caller's tensor mutated alike
    torch._dynamo.reset()
    sites = fusion_backend.explain(model, x.clone(), options=AGGRESSIVE_EAGER).sites
    torch._dynamo.reset()
    ffn = [s for s in sites if s.kind == "feedforward"]
    if FORMS[form]:  # kept: as written in place, or (the cast) because h has a second reader
        assert ffn and all(s.decision == "kept" for s in ffn), sites
        if form == "relu_inplace_on_input_after_the_mlp":
            assert all("written in place" in s.reason for s in ffn), sites
    else:
        assert any(s.decision == "fused" for s in ffn), sites


def test_a_graph_with_an_inplace_write_and_no_site_gives_no_warning():
    # Mixtral's router normalizes its top-k weights in place (a view of topk's result)
    def router(x):
        top = x.topk(2, dim=-1)[0]
        top /= top.sum(-1, keepdim=True)
        return top * 2

    torch._dynamo.reset()
    x = torch.rand(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fusion_backend.FusionWarning)
        got = torch.compile(router, backend="truthfuse", options=AGGRESSIVE_EAGER)(x)
    torch.testing.assert_close(got, router(x), atol=0, rtol=0)
    torch._dynamo.reset()


def test_inplace_that_would_promote_becomes_functional_with_a_cast_back():
    """t.mul_(w) and t *= w keep t's dtype; out of place a bf16 t times an fp32 w is fp32. The
    functional form is followed by a cast back to t's dtype, which rounds once, as the in-place op
    does: the canonical graph computes exactly what eager does."""
    def fn(a, w):
        t = a + 1
        t.mul_(w)
        u = a * 2
        u *= w
        x = a * 3
        x *= 2.0  # a Python scalar does not promote: this one becomes torch.mul
        return t, u, x

    a, w = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(4)
    gm, inputs = _dynamo_graph(fn, a, w, with_inputs=True)
    canon = canonical_copy(gm)
    targets = _targets(canon)
    assert "mul_" not in targets and operator.imul not in targets
    for got, want in zip(canon(*inputs), fn(a, w)):
        assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def test_permute_that_is_not_a_swap_stays_a_permute():
    fn = lambda x: x.permute(0, 2, 3, 1) * 1.0  # noqa: E731
    canon = canonical_copy(_dynamo_graph(fn, torch.randn(2, 3, 4, 5)))
    assert torch.transpose not in _targets(canon)


def test_integer_negation_keeps_its_dtype():
    def fn(i, x):
        return (-i) + x.argmax(-1)

    i, x = torch.arange(6), torch.randn(6, 4)
    gm, inputs = _dynamo_graph(fn, i, x, with_inputs=True)
    out = canonical_copy(gm)(*inputs)[0]
    assert out.dtype == torch.int64
    torch.testing.assert_close(out, fn(i, x))


def test_matmul_with_out_is_left_alone():
    def fn(a, b, out):
        torch.matmul(a, b, out=out)
        return out * 2

    a, b = torch.randn(3, 4), torch.randn(4, 5)
    gm, inputs = _dynamo_graph(fn, a, b, torch.empty(3, 5), with_inputs=True)
    canon = canonical_copy(gm)
    out_buffer = [t for t in inputs if isinstance(t, torch.Tensor) and t.shape == (3, 5)][0]
    out_buffer.zero_()  # capturing the graph ran fn, which wrote it already
    torch.testing.assert_close(canon(*inputs)[0], (a @ b) * 2)
    torch.testing.assert_close(out_buffer, a @ b)


def test_a_pattern_takes_the_canonical_form_of_floating_targets():
    """Pattern graphs carry no dtypes: where a rewrite depends on the dtype (where -> masked_fill,
    x * x -> pow, folded scalar products), a pattern takes the form a floating target gets, so a
    rule written with those spellings matches such targets."""
    from fusion_backend.match.pattern import trace_pattern

    def pattern(q, k, v, m):
        d = q - k
        s = torch.where(m, (d * d) @ k.transpose(-1, -2), float("-inf"))
        return torch.softmax(s * 0.5 * 0.25, -1) @ v

    nodes = [n for n in trace_pattern(pattern).graph.nodes if n.op in ("call_function", "call_method")]
    targets = [n.target for n in nodes]
    assert torch.masked_fill in targets and torch.where not in targets and torch.pow in targets
    assert [n.args[1] for n in nodes if n.target is torch.mul] == [0.125]


def test_inplace_in_a_pattern_takes_the_functional_form():
    """Pattern graphs carry no dtypes to check: their in-place ops become functional, as a target's
    do where the dtype allows, so a rule written with `mul_` matches those targets."""
    from fusion_backend.match.pattern import trace_pattern

    def pattern(q, k, v):
        return torch.softmax((q @ k.transpose(-1, -2)).mul_(0.25), -1) @ v

    targets = [n.target for n in trace_pattern(pattern).graph.nodes if n.op in ("call_function", "call_method")]
    assert torch.mul in targets and "mul_" not in targets


class _VmapBesideAnMLP(torch.nn.Module):
    """A fused gated MLP in a graph that also runs torch.vmap (Jamba's and Zamba's Mamba scan do):
    Dynamo inlines the vmap as calls that open and close its level, whose results nothing reads."""

    def __init__(self):
        super().__init__()
        self.gate, self.up = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 32, bias=False)
        self.down = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x, a, b):
        y = torch.vmap(lambda left, right: left * right)(a, b)
        return self.down(F.silu(self.gate(x)) * self.up(x)) + y.sum()


def test_vmap_in_a_graph_with_a_fused_site_keeps_its_levels():
    model, inputs = _VmapBesideAnMLP(), (torch.randn(2, 5, 16), torch.randn(4, 3), torch.randn(4, 3))
    backend = fusion_backend.backend(**AGGRESSIVE_EAGER)
    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(*inputs)
    torch.testing.assert_close(out, model(*inputs))
    assert any(s.decision == "fused" and s.kind == "feedforward" for r in backend.records for s in r.sites)


def _canonical_equals_original(fn, *args):
    """The canonical copy of fn's Dynamo graph runs and computes what the graph does."""
    gm, inputs = _dynamo_graph(fn, *args, with_inputs=True)
    canon = canonical_copy(gm)
    want, got = gm(*inputs), canon(*inputs)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, equal_nan=True, atol=1e-6, rtol=1e-6)
    return canon


def test_a_where_literal_fills_with_the_value_its_dtype_stores():
    """torch.tensor(finfo(fp32).min, dtype=fp16) is -inf: the canonical fill is -inf too (a fill
    of -3.4e38 would not convert to fp16 and raise)."""
    def fill(s, keep):
        return torch.where(keep, s, torch.tensor(torch.finfo(torch.float32).min, dtype=s.dtype))

    canon = _canonical_equals_original(fill, torch.randn(4, 4, dtype=torch.float16), torch.rand(4, 4) > 0.5)
    fills = [n.args[2] for n in canon.graph.nodes if n.target is torch.masked_fill]
    assert fills == [float("-inf")]


@pytest.mark.parametrize("form", ["fp16 terms", "bool term", "the split added to itself"])
def test_terms_through_a_split_batch_fold_only_in_the_scores_dtype(form):
    """Summed first, terms of another dtype would round or overflow differently (two fp16 finfo.min
    masks sum to -inf) and bool terms would OR: such graphs stay as written, and still run."""
    def scores(s, m):
        s5 = s.view(2, 3, 2, 4, 4)
        if form == "the split added to itself":
            s5 = s5 + s5
        else:
            s5 = s5 + m.unsqueeze(1).unsqueeze(0)
            s5 = s5 + m.unsqueeze(1).unsqueeze(0)
        return torch.softmax(s5.view(-1, 2, 4, 4), dim=-1)

    mask = {"fp16 terms": torch.full((3, 4, 4), torch.finfo(torch.float16).min, dtype=torch.float16),
            "bool term": torch.rand(3, 4, 4) > 0.5, "the split added to itself": torch.zeros(3, 4, 4)}[form]
    canon = _canonical_equals_original(scores, torch.randn(6, 2, 4, 4), mask)
    assert not any(n.target is torch.broadcast_to for n in canon.graph.nodes)


def test_heads_unfold_where_the_sizes_are_computed_after_the_product():
    """Under dynamic shapes the batch size of the view to 4-d may be computed after the product:
    the unfolded attention is emitted where the view was."""
    def attend(q3, k3, v3):
        s = torch.bmm(q3, k3.transpose(1, 2))
        b = q3.shape[0] // 2
        p = torch.softmax(s.view(b, 2, s.shape[1], s.shape[2]), dim=-1)
        return torch.bmm(p.view(b * 2, s.shape[1], s.shape[2]), v3)

    q, k, v = (torch.randn(4, 5, 8) for _ in range(3))
    torch._dynamo.reset()
    captured = []
    torch.compile(attend, backend=lambda gm, ex: captured.append(gm) or gm.forward, dynamic=True)(q, k, v)
    canon = canonical_copy(captured[0])  # linted: every value defined before its use
    assert any(n.target is torch.unflatten for n in canon.graph.nodes)
    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="truthfuse", options=AGGRESSIVE_EAGER, dynamic=True)
    for n in (5, 7):
        q, k, v = (torch.randn(4, n, 8) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), attend(q, k, v))


def test_func_grad_in_a_graph_keeps_its_gradients():
    """torch.func.grad inlined by Dynamo sets state with calls whose results nothing reads
    (_set_tensor_requires_grad, _saved_tensors_hooks_disable, ...): dropping them gave zeros."""
    def fn(x):
        return torch.func.grad(lambda t: (torch.sin(t) * t).sum())(x) * 2

    _canonical_equals_original(fn, torch.randn(5))


def test_attention_inside_func_grad_is_kept_with_its_reason():
    def fn(q, k, v):
        def loss(q_):
            return (torch.softmax(q_ @ k.transpose(-2, -1) * 0.3, dim=-1) @ v).sum()
        return torch.func.grad(loss)(q)

    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    report = fusion_backend.explain(fn, q, k, v, options=AGGRESSIVE_EAGER)
    torch._dynamo.reset()
    attention = [s for s in report.sites if s.kind == "attention"]
    assert attention and all(s.decision == "kept" and "torch.func transform" in s.reason for s in attention)
    out = torch.compile(fn, backend="truthfuse", options=AGGRESSIVE_EAGER)(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))


@pytest.mark.parametrize("hooked", ["scores", "output"])
def test_a_backward_hook_traced_under_compiled_autograd_is_kept(hooked):
    """With compiled autograd on, Dynamo traces t.register_hook(fn) on an intermediate as a call
    whose result nothing reads. Dead-code elimination dropped it wherever a site fused (a hook on
    the attention's output, outside the site: q's gradient 2.5 off), and attention fused through
    hooked scores. Such a site is kept, and the hook stays."""
    def fn(q, k, v, w):
        s = q @ k.transpose(-2, -1) * 0.3
        if hooked == "scores":
            s.register_hook(lambda g: g * 3)
        y = torch.softmax(s, dim=-1) @ v
        if hooked == "output":
            y.register_hook(lambda g: g.flip(-1))
        return y + F.linear(F.gelu(F.linear(y, w)), w.t())

    q, k, v, w = [torch.randn(1, 2, 6, 8) for _ in range(3)] + [torch.randn(16, 8) * 0.3]
    g = torch.randn(1, 2, 6, 8)
    want, got = ([t.clone().requires_grad_() for t in (q, k, v, w)] for _ in range(2))
    (fn(*want) * g).sum().backward()
    with torch._dynamo.config.patch(compiled_autograd=True):
        report = fusion_backend.explain(fn, *got, options=AGGRESSIVE_EAGER)
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="truthfuse", options=AGGRESSIVE_EAGER)

        def step():
            (compiled(*got) * g).sum().backward()

        torch.compile(step, backend="truthfuse", options=AGGRESSIVE_EAGER)()
    attention = [s for s in report.sites if s.kind == "attention"]
    assert any(s.kind == "feedforward" and s.decision == "fused" for s in report.sites), report.sites
    if hooked == "scores":
        assert attention and all(s.decision == "kept" and "backward hook" in s.reason for s in attention)
    else:
        assert attention and all(s.decision == "fused" for s in attention)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=2e-4)


def test_baddbmm_with_beta_zero_keeps_an_input_that_wants_a_gradient():
    """With beta=0 the input's gradient is zeros, which a trainable input must still get."""
    bias = torch.randn(2, 4, 4, requires_grad=True)

    def scores(q, k):
        return torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), beta=0.0, alpha=0.5), dim=-1)

    gm, inputs = _dynamo_graph(scores, torch.randn(2, 4, 8), torch.randn(2, 4, 8), with_inputs=True)
    assert any(n.target is torch.baddbmm or n.target == "baddbmm" for n in canonical_copy(gm).graph.nodes)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_baddbmm_under_autocast_keeps_its_dtype_beside_a_fused_site(dtype):
    """Under torch.autocast baddbmm casts its fp32 input too and returns the autocast dtype; read
    as matmul * alpha + input, the bf16 product plus the fp32 input was fp32. A fused feed-forward
    block in the same graph makes the canonical graph the one that runs, and the returned scores
    had another dtype than eager's."""
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def fn(x, a, b, bias):
        return fc2(F.gelu(fc1(x))), torch.baddbmm(bias, a, b, beta=1.0, alpha=0.5)

    args = (torch.randn(2, 3, 8), torch.randn(4, 5, 6), torch.randn(4, 6, 7), torch.randn(4, 5, 7))
    backend = fusion_backend.backend(**AGGRESSIVE_EAGER)
    with torch.autocast("cpu", dtype=dtype):
        want = fn(*args)
        got = torch.compile(fn, backend=backend)(*args)
    torch._dynamo.reset()
    assert [s.decision for r in backend.records for s in r.sites] == ["fused"]
    assert [t.dtype for t in got] == [t.dtype for t in want] == [dtype, dtype]
    torch.testing.assert_close(got[1], want[1], atol=4e-2, rtol=2e-2)

class _SinkAttention(torch.nn.Module):
    """GPT-OSS's eager attention core, with variants that are not attention sinks."""

    def __init__(self, heads=4, form="gpt_oss"):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(heads))
        self.form = form
        if form == "bf16_scores":  # the cat promotes them to the fp32 sinks' dtype
            self.sinks.data = torch.randn(heads) * 3.3

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(2, 3) * 0.25 + mask
        if self.form == "bf16_scores":
            s = s.bfloat16()
        B, H, N, _ = s.shape
        if self.form == "not_per_head":  # one sink value per (batch, query): no head structure
            col = torch.arange(N, dtype=s.dtype).reshape(1, 1, N, 1).expand(B, H, N, 1)
        else:
            col = self.sinks.reshape(1, -1, 1, 1).expand(B, -1, N, -1)
        c = torch.cat([s, col], dim=-1)
        if self.form == "scores_written_after_cat":  # through a view: the cat copied them before
            s.view(-1).mul_(2.0)
        if self.form != "unshifted":
            c = c - c.max(dim=-1, keepdim=True).values
        probs = F.softmax(c, dim=-1, dtype=c.dtype)
        if self.form == "first_column_dropped":
            return probs[..., 1:] @ v
        out = probs[..., :-1] @ v
        if self.form == "scores_written_after_cat":
            return out + s.sum()
        return (out, probs) if self.form == "probs_returned" else out


@pytest.mark.parametrize("form", ["gpt_oss", "unshifted", "bf16_scores", "not_per_head", "first_column_dropped",
                                  "probs_returned", "scores_written_after_cat"])
def test_attention_sinks_become_softmax_with_sinks_only_when_they_are_sinks(form):
    """GPT-OSS's cat of a per-head sink column, shift by the row max, softmax and drop of the last
    column is one `softmax_with_sinks` call that computes the same bits; the same steps with a
    column that is not one logit per head, another column dropped, or probabilities used
    elsewhere stay as they are."""
    from fusion_backend.canonicalize import softmax_with_sinks

    torch.manual_seed(0)
    m = _SinkAttention(form=form)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.zeros(2, 1, 6, 6)
    mask[0, ..., :2] = torch.finfo(torch.float32).min
    gm, inputs = _dynamo_graph(m, q, k, v, mask, with_inputs=True)
    canon = canonical_copy(gm)
    rewritten = softmax_with_sinks in _targets(canon)
    assert rewritten == (form in ("gpt_oss", "unshifted", "bf16_scores")), canon.graph
    want = gm(*inputs)
    got = canon(*inputs)
    for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        assert torch.equal(a, b)


def _assemble(kn, kr, form):
    """A key assembled in place from two pieces, as DeepSeek-V3 does, and variants that are not a
    concatenation (or not provably one)."""
    d = kn.shape[-1]
    k = kn.new_empty(*kn.shape[:-1], d + kr.shape[-1])
    if form == "setitem":
        k[..., :d] = kn
        k[..., d:] = kr
    elif form == "gap":  # the last column is never written
        k[..., :d].copy_(kn)
        k[..., d:-1].copy_(kr[..., :-1])
    elif form == "read_between":  # read before the second piece is written
        k[..., :d].copy_(kn)
        early = k[..., :d].sum()  # the written part only: the rest is uninitialized memory
        k[..., d:].copy_(kr)
        return k * 2 + early
    elif form == "source_written_after":  # a source changed after its copy: t keeps the old values
        a = kn * 1.0
        k[..., :d].copy_(a)
        k[..., d:].copy_(kr)
        a.mul_(3.0)
        return k * 2 + a.sum()
    elif form == "broadcast":  # a piece broadcast by the copy: not cat's shape
        k[..., :d].copy_(kn)
        k[..., d:].copy_(kr[:, :1])
    else:
        k[..., :d].copy_(kn)
        k[..., d:].copy_(kr)
        if form == "written_after":
            k.mul_(2)
    return k * 2


@pytest.mark.parametrize("form", ["copy", "setitem", "gap", "read_between", "broadcast", "written_after",
                                  "source_written_after"])
def test_slice_copies_into_a_fresh_tensor_become_cat_only_when_they_tile_it(form):
    kn, kr = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 2)
    gm, inputs = _dynamo_graph(lambda a, b: _assemble(a, b, form), kn, kr, with_inputs=True)
    canon = canonical_copy(gm)
    assert (torch.cat in _targets(canon)) == (form in ("copy", "setitem")), canon.graph
    want, got = gm(*inputs), canon(*inputs)
    want, got = (want[0], got[0]) if isinstance(want, tuple) else (want, got)
    if form != "gap":  # the unwritten column is uninitialized memory in both
        assert torch.equal(want, got)


def _swin_v2_keywords(q, k, v, w, b):
    # timm's Swin V2 projects with F.linear(input=x, weight=..., bias=...)
    q = F.linear(input=q, weight=w, bias=b)
    s = F.normalize(input=q, dim=-1) @ torch.transpose(input=F.normalize(k, dim=-1), dim0=-2, dim1=-1)
    return torch.softmax(input=s * 10.0, dim=-1) @ v


KEYWORD_SPELLINGS = {
    "swin_v2": (_swin_v2_keywords, "cosine"),
    "l2": (lambda q, k, v, w, b: F.softmax(input=torch.mul(input=torch.cdist(x1=q, x2=k) ** 2, other=-0.5),
                                           dim=-1) @ v, "l2"),
    "l2_broadcast": (lambda q, k, v, w, b: torch.softmax(
        torch.sum(input=torch.square(input=q.unsqueeze(-2) - k.unsqueeze(-3)), dim=-1) * -0.5, -1) @ v, "l2"),
    "dropout": (lambda q, k, v, w, b: F.dropout(input=torch.softmax(q @ k.transpose(-2, -1), -1), p=0.0) @ v, "dot"),
}


@pytest.mark.parametrize("name", sorted(KEYWORD_SPELLINGS))
def test_operands_passed_as_keywords_are_canonicalized(name):
    """Operands passed by keyword (F.linear(input=x, weight=w, bias=b)) are read as positional
    ones: the canonicalizer read them by position and failed with IndexError, and the whole graph
    was compiled unchanged with 'graph analysis failed'."""
    fn, variant = KEYWORD_SPELLINGS[name]
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    w, b = torch.randn(8, 8) * 0.3, torch.randn(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fusion_backend.FusionWarning)
        report = fusion_backend.explain(fn, q, k, v, w, b, options=AGGRESSIVE_EAGER)
        fused = [s for s in report.sites if s.decision == "fused"]
        assert [s.variant for s in fused] == [variant], [(s.rule, s.decision, s.reason) for s in report.sites]
        compiled = torch.compile(fn, backend=fusion_backend.backend(**AGGRESSIVE_EAGER))
        torch.testing.assert_close(compiled(q, k, v, w, b), fn(q, k, v, w, b), atol=1e-5, rtol=1e-4)


def test_in_graph_tells_erased_and_foreign_nodes_as_a_walk_of_the_node_list_does():
    """The passes ask `_in_graph` (constant time) where they asked `node in graph.nodes` (a walk of
    the whole graph per node: canonicalizing took time quadratic in the graph's size)."""
    from fusion_backend.canonicalize.passes import _in_graph, canonicalize

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))

    def fn(q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.25
        out = torch.matmul(torch.softmax(s, dim=-1), v)
        return out.transpose(1, 2).reshape(2, 8, 64).reshape(2, 8, 64)

    gm = _dynamo_graph(fn, q, k, v)
    graph = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph)).graph
    before = list(graph.nodes)
    canonicalize(graph)
    gone = [n for n in before if n not in graph.nodes]
    assert gone and len(gone) < len(before)  # canonicalizing erased some nodes and kept others
    for n in before + list(graph.nodes) + list(gm.graph.nodes):  # the last: another graph's
        assert _in_graph(n, graph) == (n in graph.nodes), n
