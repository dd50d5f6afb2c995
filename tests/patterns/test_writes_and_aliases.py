"""In-place writes the analysis must see, however they are spelled and through whatever alias:
a fused op reads its inputs where its site ends, so a write that eager runs between the site's
reads keeps the site, and a write canonicalization cannot prove private stays a write. Each
module here, compiled, equals eager in its output and in the buffers it leaves behind (the cases
a session-18 fuzz found wrong: unknown views, values that may be their input, an in-place op's
result, writers named by schema, inputs sharing storage, slice copies into a new tensor)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .checks import OPTIONS, assert_fused, assert_near_miss


@torch.library.custom_op("truthfuse_tests::scale_in_place", mutates_args=("cache",))
def _scale_in_place(cache: torch.Tensor, factor: float) -> None:
    cache.mul_(factor)


def _attend(q, k, v):
    return (q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v


class _Cache(nn.Module):
    """Keys and values kept as buffers; `forward` reads the keys through a spelling and writes
    them between the two products (the site must be kept) or before the first (fused)."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("kc", torch.randn(2, 2, 8, 16))
        self.register_buffer("vc", torch.randn(2, 2, 8, 16))

    def forward(self, q, r):
        s, kc = self.spelling, self.kc
        if s == "write through moveaxis, before":  # a view the analysis did not know
            torch.moveaxis(kc, 1, 1).mul_(2.0)
            return _attend(q, kc, self.vc)
        if s == "fresh value cast, then written":  # .float() of an fp32 value is that value
            x = q * 2.0
            y = x.float()
            x.mul_(3.0)
            return _attend(y, kc, self.vc)
        if s == "out= result written":  # torch.mul(..., out=kc) returns kc
            y = torch.mul(kc, r, out=kc)
            y.add_(1.0)
            return _attend(q, kc, self.vc)
        if s == "foreach write, before":
            torch._foreach_mul_([kc], [r])
            return _attend(q, kc, self.vc)
        keys = {"moveaxis": lambda: torch.moveaxis(kc, 1, 1), "positive": lambda: torch.positive(kc),
                "one-operand einsum": lambda: torch.einsum("bhnd->bhnd", kc),
                "in-place result": lambda: kc.index_copy_(2, torch.tensor([1, 2, 5]), r[:, :, :3])}
        if s in keys:
            scores = q @ keys[s]().transpose(-2, -1) * 0.25
            kc.mul_(2.0)
        else:
            scores = q @ kc.transpose(-2, -1) * 0.25
            if s == "aten overload":
                torch.ops.aten.mul_.Scalar(kc, 2.0)
            elif s == "library op":
                torch.ops.truthfuse_tests.scale_in_place(kc, 2.0)
            elif s == "foreach":
                torch._foreach_add_([kc], [r])
        return scores.softmax(-1) @ self.vc


BETWEEN = ["moveaxis", "positive", "one-operand einsum", "in-place result", "aten overload", "library op", "foreach"]
BEFORE = ["write through moveaxis, before", "fresh value cast, then written", "out= result written",
          "foreach write, before"]


def _equal_to_eager(model, *inputs):
    """The model compiled and eager, from one state: the same output and the same buffers."""
    twin = copy.deepcopy(model)
    want = model(*inputs)
    got = torch.compile(twin, backend="truthfuse", options=OPTIONS)(*inputs)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    for (name, a), (_, b) in zip(twin.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    torch._dynamo.reset()


@pytest.mark.parametrize("spelling", BETWEEN + BEFORE)
def test_writes_between_the_reads_keep_the_site_and_writes_before_stay_writes(spelling):
    torch.manual_seed(0)
    model = _Cache(spelling)
    inputs = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    if spelling in BETWEEN:
        assert_near_miss(copy.deepcopy(model), *inputs, reason="written in place")
    else:
        assert_fused(copy.deepcopy(model), *inputs, variant="dot")
    _equal_to_eager(model, *inputs)


def _attend_one_of_two_views(q, kv, k, v):
    scores = q @ k.transpose(-2, -1) * 0.25
    kv.mul_(2.0)  # k and v are views of kv: eager's p @ v reads the doubled values
    return scores.softmax(-1) @ v


def test_inputs_sharing_storage_are_written_together():
    torch.manual_seed(0)
    q, kv = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 2, 8, 16)
    want_kv = kv.clone()
    want = _attend_one_of_two_views(q, want_kv, want_kv[0], want_kv[1])
    got = torch.compile(_attend_one_of_two_views, backend="truthfuse", options=OPTIONS)(q, kv, kv[0], kv[1])
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(kv, want_kv, atol=0, rtol=0)
    torch._dynamo.reset()


class _KeysAssembled(nn.Module):
    """Keys built by slice copies into a new tensor (DeepSeek-V3's), in two layers of one graph;
    `written`: the assembled keys are also written through a view the analysis must follow."""

    def __init__(self, written=False):
        super().__init__()
        self.written = written

    def forward(self, q, a, b, v):
        out = q
        for _ in range(2):
            keys = a.new_empty(*a.shape[:-1], a.shape[-1] + b.shape[-1])
            keys[..., :a.shape[-1]] = a
            keys[..., a.shape[-1]:].copy_(b)
            if self.written:
                torch.moveaxis(keys, 1, 1).mul_(0.5)
            out = _attend(out, keys, v)
        return out


@pytest.mark.parametrize("written", [False, True])
def test_keys_assembled_by_slice_copies_in_two_layers(written):
    """Both layers' assemblies become cat (the second used to fail the analysis, which left the
    graph unfused); a write through a view of the assembled keys keeps them a written tensor."""
    torch.manual_seed(0)
    inputs = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 10), torch.randn(2, 2, 8, 6), torch.randn(2, 2, 8, 16)
    assert_fused(_KeysAssembled(written), *inputs, variant="dot", count=2)
    _equal_to_eager(_KeysAssembled(written), *inputs)


# ----------------------------------------------------------------------------------------------
# Functions with a fusable attention whose graphs also write in place where a rewrite or the
# alias analysis could miss it (a second fuzz round): each, compiled, equals eager in every
# output and leaves its inputs written alike.
# ----------------------------------------------------------------------------------------------
def _fold_across_a_write(x, q, k, v):
    y = x * 2.0
    x.add_(1.0)  # (x * 2) * 3 folded to x * 6 at z would read x after this write
    return y * 3.0, _attend(q, k, v)


def _bias_fold_across_a_write(x, w, b, q, k, v):
    y = x @ w
    x.mul_(2.0)  # linear(x, w^T, b) emitted at the + b would read the doubled x
    return y + b, _attend(q, k, v)


def _heads_unfolded_across_a_write(q3, k3, v3):
    s3 = q3 @ k3.transpose(-2, -1)
    q3.mul_(2.0)  # the product re-emitted at the 4-d view would read the doubled q
    return (s3.view(1, 2, 8, 8) * 0.25).softmax(-1).view(2, 8, 8) @ v3


def _zero_dim_index_is_a_view(buf, idx, q, k, v):
    buf[idx].mul_(2.0)  # a 0-d integer tensor indexes like an int: a view, written through
    return _attend(q, k, v)


def _shape_changed_in_place(q, k, v):
    k2 = k.clone().reshape(2, 8, 16)
    kr = k2.reshape(1, 2, 8, 16)
    k2.unsqueeze_(0)  # the recorded shapes before this no longer hold after it
    return _attend(q, kr, v)


def _embedding_renormalizes(q, k, v, w, idx):
    F.embedding(idx, w, max_norm=1.0)  # writes w's rows, result unused
    return _attend(q, k, v)


def _batch_norm_running_stats(q, k, v, x, mean, var):
    torch.native_batch_norm(x, None, None, mean, var, True, 0.5, 1e-5)  # updates mean and var
    return _attend(q, k, v)


def _checkpoint_body_writes(q, k, v, w):
    checkpoint(lambda t: t.mul_(2.0).sum(), w, use_reentrant=False)
    return _attend(q, k, v)


def _fused_adam_writes_its_state(q, p, g, avg, avg_sq, step, v):
    scores = q @ avg.transpose(-2, -1) * 0.25
    torch._fused_adam_([p], [g], [avg], [avg_sq], [], [step], lr=0.1, beta1=0.5, beta2=0.9, weight_decay=0.0,
                       eps=1e-8, amsgrad=False, maximize=False)  # writes avg between the products
    return scores.softmax(-1) @ v


def _qkv():
    return [torch.randn(1, 2, 8, 16) for _ in range(3)]


CASES = {
    "fold across a write": (_fold_across_a_write, lambda: [torch.randn(4, 4)] + _qkv()),
    "bias fold across a write": (_bias_fold_across_a_write,
                                 lambda: [torch.randn(4, 16), torch.randn(16, 16), torch.randn(16)] + _qkv()),
    "heads unfolded across a write": (_heads_unfolded_across_a_write,
                                      lambda: [torch.randn(2, 8, 16) for _ in range(3)]),
    "0-d index is a view": (_zero_dim_index_is_a_view, lambda: [torch.randn(3, 4), torch.tensor(1)] + _qkv()),
    "shape changed in place": (_shape_changed_in_place, _qkv),
    "embedding max_norm": (_embedding_renormalizes, lambda: _qkv() + [torch.randn(8, 16) * 3, torch.arange(8)]),
    "native batch norm": (_batch_norm_running_stats,
                          lambda: _qkv() + [torch.randn(4, 32) + 3, torch.randn(32), torch.rand(32) + 0.5]),
    "checkpoint body": (_checkpoint_body_writes, lambda: _qkv() + [torch.randn(4)]),
    "fused adam": (_fused_adam_writes_its_state,
                   lambda: [torch.randn(1, 2, 8, 16) for _ in range(4)] + [torch.rand(1, 2, 8, 16), torch.tensor(1.0),
                                                                            torch.randn(1, 2, 8, 16)]),
}


@pytest.mark.filterwarnings("ignore::fusion_backend.FusionWarning")  # "compiling this graph unchanged"
@pytest.mark.parametrize("case", list(CASES))
def test_writes_that_rewrites_and_the_analysis_must_see(case):
    fn, make = CASES[case]
    torch.manual_seed(0)
    inputs = make()
    want_in = [x.clone() for x in inputs]
    got_in = [x.clone() for x in inputs]
    want = fn(*want_in)
    got = torch.compile(fn, backend="truthfuse", options=OPTIONS)(*got_in)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)
    for a, b in zip(got_in, want_in):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("returned", ["output", "view", "sdpa_in_q_layout"])
def test_a_returned_attention_output_may_be_written_in_place(returned):
    """The fused op keeps its output for the backward. A caller that writes what the compiled
    function returned (eager allows it after `p @ v`) must neither fail the backward ("modified by
    an inplace operation") nor change its gradients: the graph returns a copy. SDPA on transposed
    heads returns q's layout, into which the replacement already copies the op's result, so no
    second copy is made, and the write works there too (eager's SDPA itself refuses it, so the
    reference writes out of place)."""
    def f(q, k, v):
        if returned == "sdpa_in_q_layout":  # (B, T, H, D) in memory, heads transposed in
            return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        out = _attend(q, k, v)
        return out if returned == "output" else out.transpose(1, 2)

    inputs = [torch.randn(2, 2, 8, 8) for _ in range(3)]
    assert_fused(f, *inputs, variant="dot")

    def run(fn, in_place=True):
        xs = [x.clone().requires_grad_() for x in inputs]
        out = fn(*xs)
        out = out.mul_(2.0) if in_place else out * 2.0
        (out * out).sum().backward()
        return [out.detach()] + [x.grad for x in xs]

    want = run(f, in_place=returned != "sdpa_in_q_layout")
    got = run(torch.compile(f, backend="truthfuse", options=OPTIONS))
    torch._dynamo.reset()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("residual", [False, True])
def test_a_returned_feedforward_result_is_not_copied_and_may_be_written_in_place(residual, monkeypatch):
    """The feed-forward op saves its input and pre-activations, not its output
    (`Rule.keeps_result_for_backward=False`): the graph returns the op's result itself, with no
    copy, and a caller's in-place write to it leaves the gradients as eager's."""
    import importlib

    from .ffn_models import MLP

    backend = importlib.import_module("fusion_backend.backend")  # the module, not the function

    graphs = []
    inner = backend._inner_compile
    monkeypatch.setattr(backend, "_inner_compile", lambda gm, ex, opts: graphs.append(gm) or inner(gm, ex, opts))
    model = MLP(d=8, h=24, act="gelu", residual=residual)
    x = torch.randn(2, 5, 8)
    options = {**OPTIONS, "disable": []}

    def run(fn):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        out.mul_(2.0)
        (out * out).sum().backward()
        return [out.detach(), xi.grad] + [p.grad.clone() for p in model.parameters()]

    want = run(model)
    model.zero_grad()
    got = run(torch.compile(model, backend="truthfuse", options=options))
    torch._dynamo.reset()
    ops = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("feedforward" in str(t) for t in ops), ops  # fused
    assert torch.ops.aten.clone.default not in ops, ops
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4)


class _ConstantMaskEditedInPlace(nn.Module):
    """A mask built from constants, then edited in place before the scores: the rules read
    constant masks at compile time (a causal triangle becomes causal=True; finite fills are
    checked for rows hidden whole), and must read them with the edit. Each case fused as though
    the edit were not there: the prefix-LM mask (the first tokens seen by every row) as causal,
    and a row hidden whole by the fill and the edited bias (eager sends q and k no gradient
    through it) with the op's gradients."""

    def __init__(self, case, n=8):
        super().__init__()
        self.case, self.n = case, n

    def forward(self, q, k, v):
        n = self.n  # the masks are built before the scores, so the site may read them
        if self.case == "prefix_lm":
            mask = torch.full((n, n), float("-inf")).triu(1)
            mask[:, :3] = 0.0  # the prefix is seen by every row
            s = q @ k.transpose(-2, -1) * 0.25 + mask
        else:
            pad = torch.zeros(n, n, dtype=torch.bool)
            pad[:, 5:] = True
            bias = torch.zeros(n, n)
            bias[2, :5] = torch.finfo(torch.float32).min  # with the fill, row 2 sees no key
            s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(pad, -1e9) + bias
        return s.softmax(-1) @ v


@pytest.mark.parametrize("case", ["prefix_lm", "row_hidden_by_fill_and_edit"])
def test_a_constant_mask_edited_in_place_is_read_with_the_edit(case):
    from .checks import assert_matches_eager

    model = _ConstantMaskEditedInPlace(case)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    if case == "prefix_lm":
        assert_fused(model, q, k, v, variant="dot", rule="attention.dot")
    assert_matches_eager(model, q, k, v)


def test_a_reshape_round_trip_that_copied_and_is_written_in_place_leaves_the_input_alone():
    """x.t().reshape(-1).reshape(x.t().shape) copies, so eager's add_ on it leaves x alone. The
    round trip of views is read as its input only where no write may reach it: here the write
    stays on the copy, in a graph whose attention fuses."""
    def f(x, q, k, v):
        xt = x.t()
        y = xt.reshape(-1).reshape(xt.shape)
        y.add_(1)
        return (_attend(q, k, v),)

    x, (q, k, v) = torch.randn(4, 6), (torch.randn(2, 2, 5, 8) for _ in range(3))
    before = x.clone()
    assert_fused(f, x.clone(), q, k, v, variant="dot")
    out = torch.compile(f, backend="truthfuse", options=OPTIONS)(x, q, k, v)
    torch._dynamo.reset()
    torch.testing.assert_close(out[0], _attend(q, k, v), atol=2e-5, rtol=2e-4)
    assert torch.equal(x, before)
