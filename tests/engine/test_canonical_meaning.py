"""Canonical rewrites keep the meaning of the code around a fused site: once a site fuses, the
whole canonical graph runs, so a rewrite that changes a dtype, drops an argument or moves a
rounding changes the user's results outside any site (cases a session-18 fuzz found). Each
function has one fusable attention beside the code in question; compiled, it equals eager: the
same dtypes and the same values (divisions and floors included)."""
import copy
import math
import operator
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion_backend
from tests.patterns.checks import OPTIONS


def _fused_kinds(fn, *inputs, options=OPTIONS):
    """The kinds of the sites explain() reports fused: the whole canonical graph runs only then."""
    report = fusion_backend.explain(fn, *inputs, options=options)
    torch._dynamo.reset()
    return [s.kind for s in report.sites if s.decision == "fused"]


def _site(q, k, v):
    return (q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v


def _where_promotes(q, k, v, ids):
    return _site(q, k, v), torch.where(ids > 2, ids, 0.5), torch.where(ids > 2, 0.5, ids)


def _where_fill_out_of_fp16_range(q, k, v, x):
    return _site(q, k, v), torch.where(x > 0, x.half(), 1e6)


def _bool_squared(q, k, v):
    m = q > 0
    return _site(q, k, v), m * m


def _scalar_products(q, k, v, ids):
    h = q.half()[0, 0, 0, :3]
    return _site(q, k, v), ids * 2 * 0.5, (h * 1000) * 100 * 0.0001


def _fp32_scalar_products_overflow(q, k, v, x):
    return _site(q, k, v), x * 1e30 * 1e-30  # x * 1e30 overflows to inf in fp32; x * 1.0 would not


def _folded_scalar_products(q, k, v, x):
    return _site(q, k, v), (x * 0.1 * 3).floor(), x * 0.1 * 3, x.double() * 0.1 * 3, x * 0.1 * 10


def _numbers_times_16_bit_tensors(q, k, v, h, b):
    return _site(q, k, v), 0.7978845608028654 * h, 0.7978845608028654 * b, 0.1 * b * 3


def _divisions_by_respelled_tensors(q, k, v, x, t):
    return (_site(q, k, v), x / (t / 3), x / (t * 0.1 * 3), x / (t * t),
            x / torch.softmax(t, -1, dtype=torch.float32))


def _einsum_products(q, k, v, x, y):
    return _site(q, k, v), torch.einsum("ij,kj->ik", x, y), torch.einsum("ij,kj->ik", x, x)


def _bias_added_after_a_product(q, k, v, x, w, b):
    return _site(q, k, v), x @ w + b, b + torch.matmul(x, w)


def _where_on_a_transpose(q, k, v, x):
    w = torch.where(x.T > 0, x.T, 7.0)
    return _site(q, k, v), w.sum(), torch.where(x.T > 0, 7.0, x.T).sum()


def _division_floors(q, k, v, n):
    return _site(q, k, v), (n / n).floor(), (n / 41).floor()


def _cdist_without_mm(q, k, v, a, b):
    return _site(q, k, v), torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


class _AddWithAlpha(nn.Module):
    """A feed-forward block whose bias is added with alpha: the fused site must keep alpha."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return torch.add(F.linear(F.gelu(self.fc1(x)), self.fc2.weight), self.fc2.bias, alpha=3.0)


def _qkv():
    return [torch.randn(1, 1, 4, 16) for _ in range(3)]


CASES = {
    "where promotes": (_where_promotes, lambda: _qkv() + [torch.arange(6)]),
    "where fill out of fp16 range": (_where_fill_out_of_fp16_range, lambda: _qkv() + [torch.randn(8)]),
    "bool squared": (_bool_squared, _qkv),
    "scalar products": (_scalar_products, lambda: [t * 8 for t in _qkv()] + [torch.arange(4)]),
    "fp32 scalar products overflow": (_fp32_scalar_products_overflow, lambda: _qkv() + [torch.randn(4) * 1e9]),
    # x * 0.1 * 3 folded into x * 0.3 rounds otherwise (-170 * 0.3 floors to -52, eager's to
    # -51), and x * 0.1 * 10 folded into x itself (a thirteenth fuzz round)
    "folded scalar products": (_folded_scalar_products, lambda: _qkv() + [-torch.arange(1, 2000.)]),
    # the divisor's node replaced after the division was read (by a scalar fold, or put back as
    # written itself): the division was put back with the erased node and compiling raised
    # (a thirteenth fuzz round)
    "divisions by respelled tensors": (_divisions_by_respelled_tensors,
                                       lambda: _qkv() + [torch.randn(4, 6), torch.rand(4, 6) + 0.5]),
    # a two-operand einsum read as matmul, or linear(x, W^T) plus a bias read as linear with that
    # bias (addmm): other kernels, which differed from eager in the last bit (a thirteenth fuzz round)
    "einsum products": (_einsum_products, lambda: _qkv() + [torch.randn(4, 4) * 3, torch.randn(4, 4)]),
    "bias added after a product": (_bias_added_after_a_product,
                                   lambda: _qkv() + [torch.randn(2, 5, 40) * 3, torch.randn(40, 40), torch.randn(40) * 30]),
    # torch.where read as masked_fill: where's result has its operand's strides (x.T's), masked_fill's
    # is contiguous, so a sum over it added in another order (last bit; a thirteenth fuzz round)
    "where on a transpose": (_where_on_a_transpose, lambda: _qkv() + [torch.randn(64, 64) * 3]),
    # `c * x` read as torch.mul(c, x), which rounds c to x's dtype first (eager's x.mul(c) does not):
    # one step off eager in fp16 and bf16, HF gelu_new's sqrt(2 / pi) * ... among them (a fourteenth
    # fuzz round)
    "numbers times 16-bit tensors": (_numbers_times_16_bit_tensors,
                                     lambda: _qkv() + [(torch.randn(64) * 3).half(), (torch.randn(64) * 3).bfloat16()]),
    "division floors": (_division_floors, lambda: _qkv() + [torch.arange(1, 2000, dtype=torch.float32)]),
    "cdist without mm": (_cdist_without_mm, lambda: _qkv() + [torch.randn(1, 40, 3) * 100 + 1000] * 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_code_beside_a_fused_site_keeps_its_meaning(case):
    fn, make = CASES[case]
    torch.manual_seed(0)
    inputs = make()
    if case == "cdist without mm":
        inputs[-1] = inputs[-2] + 1e-3 * torch.randn_like(inputs[-2])
    assert _fused_kinds(fn, *inputs) == ["attention"]
    want = fn(*inputs)
    got = torch.compile(fn, backend="truthfuse", options=OPTIONS)(*inputs)
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=2e-5)  # the fused attention
    for a, b in zip(got[1:], want[1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    torch._dynamo.reset()


def _spellings_autocast_tells_apart(q, k, v, x):
    return _site(q, k, v), x * x, torch.softmax(x, -1, dtype=x.dtype)


def test_spellings_cuda_autocast_tells_apart_are_put_back(inner_graphs):
    """`x * x` and `softmax(x, dtype=x.dtype)` beside a fused site reach the inner compiler as
    written, not as their canonical `x ** 2` and dtype-less softmax: CUDA autocast computes pow and
    a softmax without dtype= in fp32, so a bf16 x gave fp32 results where eager's are bf16 (found on
    fake CUDA tensors; CPU autocast does not tell them apart, so the graph is checked here)."""
    inputs = _qkv() + [torch.randn(3, 5)]
    got = torch.compile(_spellings_autocast_tells_apart, backend="truthfuse", options=OPTIONS)(*inputs)
    torch._dynamo.reset()
    nodes = [n for gm in inner_graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("truthfuse" in str(n.target) for n in nodes)  # the site fused: the canonical graph ran
    assert not any(n.target is torch.pow for n in nodes)
    assert any(n.target in (torch.mul, operator.mul) and n.args[0] is n.args[1] for n in nodes)
    softmaxes = [n for n in nodes if n.target is torch.softmax]
    assert [n.kwargs.get("dtype") for n in softmaxes] == [torch.float32]
    for a, b in zip(got[1:], _spellings_autocast_tells_apart(*inputs)[1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _baddbmm_16_bit_beta_0(q, k, v, m, a, b):
    return _site(q, k, v), torch.baddbmm(m, a, b, beta=0, alpha=0.3)


def _baddbmm_16_bit(q, k, v, m, a, b):
    return _site(q, k, v), torch.baddbmm(m, a, b, beta=0.7, alpha=0.3), torch.baddbmm(m, a, b)


@pytest.mark.parametrize("fn", [_baddbmm_16_bit, _baddbmm_16_bit_beta_0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "autocast"])
def test_a_baddbmm_no_site_took_rounds_once(dtype, fn):
    """baddbmm beside a fused site computes as baddbmm: its canonical matmul + add rounds the
    product to 16 bits before the sum, which was up to one bf16 step (1.0 near 100) off eager's
    single rounding, in fp16 and bf16 and under CPU autocast; with beta=0, matmul * alpha likewise
    (a thirteenth fuzz round)."""
    _as_eager_beside_a_site(fn, dtype, [(2, 3, 3), (2, 3, 40), (2, 40, 3)])


def _as_eager_beside_a_site(fn, dtype, shapes):
    """fn(q, k, v, *xs) (xs drawn at `shapes`, in dtype, or fp32 under CPU autocast to bf16 for
    "autocast") fuses its attention site only, and its other results equal eager's bit for bit,
    in eager's dtypes."""
    import contextlib
    torch.manual_seed(0)
    cast = torch.float32 if dtype == "autocast" else dtype
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "autocast" else contextlib.nullcontext
    inputs = _qkv() + [(torch.randn(*s) * 3).to(cast) for s in shapes]
    with ctx():
        assert _fused_kinds(fn, *inputs) == ["attention"]
        want = fn(*inputs)
        got = torch.compile(fn, backend="truthfuse", options=OPTIONS)(*inputs)
    torch._dynamo.reset()
    for a, b in zip(got[1:], want[1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_bias_added_with_alpha_keeps_alpha():
    torch.manual_seed(0)
    model, x = _AddWithAlpha(), torch.randn(2, 4, 8)
    options = dict(OPTIONS, disable=[])
    assert _fused_kinds(model, x, options=options) == ["feedforward"]
    torch.testing.assert_close(torch.compile(model, backend="truthfuse", options=options)(x), model(x),
                               atol=2e-6, rtol=2e-5)
    torch._dynamo.reset()


# Parts computed without gradients (`with torch.no_grad()`): no rewrite and no fused site may move
# them to where gradients are recorded
def _no_grad_scores(q, k, v, x, w, b):
    with torch.no_grad():
        s = q @ k.transpose(-2, -1) * 0.25
    return s.softmax(-1) @ v


def _no_grad_feedforward_hidden(q, k, v, x, w, b):
    with torch.no_grad():
        h = F.gelu(F.linear(x, w, b))
    return F.linear(h, w.t(), None)


def _no_grad_scalar_product(q, k, v, x, w, b):
    with torch.no_grad():
        a = x * 2.0
    return _site(q, k, v), a * 3.0 + x


def _no_grad_product_then_bias(q, k, v, x, w, b):
    with torch.no_grad():
        a = x @ w.t()
    return _site(q, k, v), a + b


def _no_grad_write(q, k, v, x, w, b):
    y = x.clone()
    with torch.no_grad():
        y.mul_(2.0)
    return _site(q, k, v), y * 1.0


def _no_grad_cube_of_a_written_out_gelu(q, k, v, x, w, b):
    # the GELU's x ** 3 without gradients: read as F.gelu(h), all of it sent h gradients (up to 0.36
    # off eager's, fused in the feed-forward block or put back as written; a fourteenth fuzz round)
    h = F.linear(x, w, b)
    with torch.no_grad():
        cube = torch.pow(h, 3.0)
    g = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * cube)))
    return _site(q, k, v), F.linear(g, w.t(), None)


@pytest.mark.parametrize("fn", [_no_grad_scores, _no_grad_feedforward_hidden, _no_grad_scalar_product,
                                _no_grad_product_then_bias, _no_grad_write, _no_grad_cube_of_a_written_out_gelu],
                         ids=lambda f: f.__name__)
def test_parts_computed_without_gradients_stay_without_them(fn):
    torch.manual_seed(0)
    base = [torch.randn(1, 1, 4, 8) for _ in range(3)] + [torch.randn(4, 8), torch.randn(8, 8), torch.randn(8)]
    grads = []
    for f in (fn, torch.compile(fn, backend="truthfuse", options=dict(OPTIONS, disable=[]))):
        leaves = [t.clone().requires_grad_() for t in base]
        out = f(*leaves)
        outs = list(out) if isinstance(out, tuple) else [out]
        sum(o.sum() for o in outs if o.requires_grad).backward()
        grads.append([t.grad for t in leaves])
    for want, got in zip(*grads):
        assert (want is None) == (got is None)
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def _written_out_gelu_under_no_grad(q, k, v, x):
    with torch.no_grad():
        g = torch.mul(torch.mul(x, 0.5), torch.add(torch.erf(torch.mul(x, 0.7071067811865476)), 1))
    return _site(q, k, v), g * x


def test_a_written_out_gelu_under_no_grad_leaves_the_graph_fused():
    """A GELU written out in the canonical spelling inside no_grad() stays as written; read as
    F.gelu, the rewrite of what no_grad() computes left the whole graph unfused ('a rewrite would
    move ..., computed without gradients'), the attention beside it included (a fourteenth fuzz
    round)."""
    torch.manual_seed(0)
    inputs = _qkv() + [torch.randn(2, 5, 16)]
    assert _fused_kinds(_written_out_gelu_under_no_grad, *inputs) == ["attention"]
    want = _written_out_gelu_under_no_grad(*inputs)
    got = torch.compile(_written_out_gelu_under_no_grad, backend="truthfuse", options=OPTIONS)(*inputs)
    torch._dynamo.reset()
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)


def _autocast_around_the_scores(q, k, v):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = q @ k.transpose(-2, -1) * 0.25
    return s.float().softmax(-1) @ v


def test_an_autocast_switch_inside_a_site_keeps_it():
    """Autocast around the scores only: eager computes them in bf16 and the rest in fp32; one
    fused op would compute all of it in one precision, so the site is kept and equals eager."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    got = torch.compile(_autocast_around_the_scores, backend="truthfuse", options=OPTIONS)(q, k, v)
    torch.testing.assert_close(got, _autocast_around_the_scores(q, k, v), atol=0, rtol=0)
    torch._dynamo.reset()


def _mask_built_under_no_grad(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    with torch.no_grad():  # between the scores and the softmax, outside the site's own computation
        mask = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).triu(1)
    return s.masked_fill(mask, float("-inf")).softmax(-1) @ v


def test_a_no_grad_block_beside_a_site_that_returns_to_its_mode_fuses():
    """A no_grad() block between a site's first and last nodes that computes nothing of the site
    leaves the site under one grad mode: it fuses and equals eager. spectral_norm on the second
    Linear runs its power iteration under no_grad() after the first Linear; the site was kept
    with 'grad mode or autocast switches inside the site'."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 8, 16) for _ in range(3))
    assert _fused_kinds(_mask_built_under_no_grad, q, k, v) == ["attention"]
    grads = []
    for f in (_mask_built_under_no_grad, torch.compile(_mask_built_under_no_grad, backend="truthfuse", options=OPTIONS)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        f(*leaves).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads[::-1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()

    block = nn.Sequential(nn.Linear(16, 32), nn.GELU(), spectral_norm(nn.Linear(32, 16)))
    x = torch.randn(2, 8, 16)
    options = dict(OPTIONS, disable=[])
    assert _fused_kinds(copy.deepcopy(block), x, options=options) == ["feedforward"]
    eager, fused = copy.deepcopy(block), copy.deepcopy(block)  # each call updates the power iteration's u and v
    compiled = torch.compile(fused, backend="truthfuse", options=options)
    for _ in range(2):
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        weight = torch.randn(2, 8, 16)
        (eager(xe) * weight).sum().backward()
        (compiled(xc) * weight).sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-4)
        for a, b in zip(fused.parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
        for a, b in zip(fused.buffers(), eager.buffers()):
            torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def _feedforward_over_two_autocast_blocks(x, w1, b1, w2, b2):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = F.linear(x, w1, b1)
    h = F.gelu(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return F.linear(h, w2, b2).float()


def test_a_site_over_two_modes_stays_kept():
    """The first Linear under one autocast block, the second under another: two modes, so kept."""
    x, w1, b1, w2, b2 = torch.randn(2, 4, 8), torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    report = fusion_backend.explain(_feedforward_over_two_autocast_blocks, x, w1, b1, w2, b2,
                                    options=dict(OPTIONS, disable=[]))
    torch._dynamo.reset()
    assert [(s.decision, s.reason) for s in report.sites] == [
        ("kept", "grad mode or autocast switches inside the site: the fused op would compute it all under one mode")]


def _enable_grad_block_in_a_no_grad_call(q, k, v, w):
    out = _site(q, k, v)
    a = w * 2.0  # the caller's no_grad(): computed without gradients
    with torch.enable_grad():
        b = a * 3.0 + w  # the gradient reaches w through "+ w" only
    return out, b


def test_a_no_grad_call_with_an_enable_grad_block_keeps_what_ran_without_gradients():
    """Called under no_grad(), a graph that records gradients inside an enable_grad() block: what
    runs outside it is not moved into it. Folding (w * 2) * 3 into w * 6 there gave db/dw = 7 where
    eager's is 1; the attention outside the block is left as written, with a note saying why."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    w = torch.randn(4, requires_grad=True)
    compiled = torch.compile(_enable_grad_block_in_a_no_grad_call, backend="truthfuse", options=OPTIONS)
    grads = []
    for f in (_enable_grad_block_in_a_no_grad_call, compiled):
        with torch.no_grad():
            out, b = f(q, k, v, w)
        grads.append(torch.autograd.grad(b.sum(), w)[0])
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)
    torch._dynamo.reset()
    with torch.no_grad():
        report = fusion_backend.explain(_enable_grad_block_in_a_no_grad_call, q, k, v, w, options=OPTIONS)
    torch._dynamo.reset()
    assert not report.fused and any("torch.enable_grad()" in note for note in report.notes), report


def _product_under_autocast_bias_after(q, k, v, x, w, b):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = x @ w
    return _site(q, k, v), y + b


def _conv1d_under_autocast_view_after(q, k, v, x, w, b):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.addmm(b, x.view(-1, 8), w)
    return _site(q, k, v), y.view(2, 3, 5)


@pytest.mark.parametrize("fn, bias_dtype", [(_product_under_autocast_bias_after, torch.bfloat16),
                                            (_conv1d_under_autocast_view_after, torch.float32)],
                         ids=["bias_add", "conv1d_view"])
def test_a_product_under_autocast_is_not_folded_with_a_step_after_the_block(fn, bias_dtype):
    """`x @ W` under autocast and `+ b` after the block (HF Conv1D's addmm and its view likewise)
    were folded into one linear placed after the block, which computed outside autocast: with a
    bf16 bias it raised 'self and mat2 must have the same dtype', and the Conv1D form returned fp32
    where eager's is bf16 (0.04 off)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    x, w, b = torch.randn(2, 3, 8), torch.randn(8, 5), torch.randn(5, dtype=bias_dtype)
    if fn is _product_under_autocast_bias_after:
        x = x.view(6, 8)
    assert _fused_kinds(fn, q, k, v, x, w, b) == ["attention"]
    want = fn(q, k, v, x, w, b)[1]
    got = torch.compile(fn, backend="truthfuse", options=OPTIONS)(q, k, v, x, w, b)[1]
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch._dynamo.reset()


def _heads_in_batch_scores_under_autocast(q, k, v, q3, k3, v3):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = torch.bmm(q3, k3.transpose(1, 2))  # BLOOM's (B*H, N, S) scores, in bf16
    p = s.view(2, 2, 4, 4).float().softmax(-1)
    return _site(q, k, v), torch.bmm(p.view(4, 4, 4), v3)


def test_heads_in_the_batch_with_scores_under_autocast_keep_their_precision():
    """BLOOM-style scores (heads in the batch) under autocast, the view to 4-d after the block:
    unfolding the heads emitted the 4-d product at that view, outside autocast, and the site then
    fused in fp32 where eager's scores are bf16 (0.009 off). The product stays where it is, so the
    site spans the autocast switch and is kept."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    q3, k3, v3 = (torch.randn(4, 4, 8) for _ in range(3))
    args = (q, k, v, q3, k3, v3)
    assert _fused_kinds(_heads_in_batch_scores_under_autocast, *args) == ["attention"]
    want = _heads_in_batch_scores_under_autocast(*args)[1]
    got = torch.compile(_heads_in_batch_scores_under_autocast, backend="truthfuse", options=OPTIONS)(*args)[1]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch._dynamo.reset()


def _heads_in_batch_attention_in_an_autocast_block(q3, k3, v3, enabled):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        s = torch.bmm(q3, k3.transpose(1, 2)) * 0.35  # BLOOM's (B*H, N, S) scores
        p = F.softmax(s.view(2, 2, 8, 8), -1, dtype=torch.float32).to(v3.dtype)
        return torch.bmm(p.view(4, 8, 8), v3)


@pytest.mark.parametrize("outside, enabled", [(True, False), (False, True)],
                         ids=["autocast_off_block_under_autocast", "autocast_block"])
def test_heads_in_the_batch_inside_an_autocast_block_compute_as_eager(outside, enabled):
    """BLOOM-style attention (heads in the batch) wholly inside a `with torch.autocast` block: the
    4-d products that unfolding the heads emits had their example values computed under the
    caller's autocast, not the block's. In an `autocast(enabled=False)` block of a graph called under
    autocast they read bf16, so the site cast q, k and v to bf16 where eager computes in fp32 (4e-3
    off float64 against 2e-7); in an autocast block of a graph called without, they read fp32, and
    the result was fp32 where eager's is bf16."""
    torch.manual_seed(0)
    q3, k3, v3 = (torch.randn(4, 8, 8) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=outside):
        assert _fused_kinds(_heads_in_batch_attention_in_an_autocast_block, q3, k3, v3, enabled) == ["attention"]
        eager = _heads_in_batch_attention_in_an_autocast_block(q3, k3, v3, enabled)
        got = torch.compile(_heads_in_batch_attention_in_an_autocast_block, backend="truthfuse",
                            options=OPTIONS)(q3, k3, v3, enabled)
    torch._dynamo.reset()
    ref = _heads_in_batch_attention_in_an_autocast_block(q3.double(), k3.double(), v3.double(), False)
    assert got.dtype == eager.dtype == (torch.bfloat16 if enabled else torch.float32)
    err_eager, err_got = ((t.double() - ref).abs().max() / ref.abs().max() for t in (eager, got))
    assert err_got <= 3 * err_eager + 1e-6, (float(err_got), float(err_eager))


def _written_out_gelus(q, k, v, x):
    y = x * 1.7
    tanh_gelu = 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3.0))))
    erf_gelu = 0.5 * y * (1.0 + torch.erf(y / math.sqrt(2.0)))
    return _site(q, k, v), tanh_gelu, erf_gelu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, "autocast"])
def test_a_written_out_gelu_no_site_took_computes_as_written(dtype):
    """GELUs written out (HF's gelu_new with tanh and pow, gelu_python with erf) are read as
    F.gelu so that feed-forward rules match them; beside a fused site with no feed-forward site
    taking them, they are put back as written: F.gelu rounds otherwise (the erf form was 7e-7 off
    eager in fp32 and off in the last bit under CPU autocast), and under CUDA autocast x ** 3
    computes in fp32 where F.gelu keeps bf16."""
    _as_eager_beside_a_site(_written_out_gelus, dtype, [(2, 5, 16)])


def _written_out_gelu_cubed_outside_an_autocast_block(q, k, v, x):
    cube = torch.pow(x, 3.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        g = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * cube)))
    return _site(q, k, v), g


def test_a_written_out_gelu_across_an_autocast_block_stays_where_written(inner_graphs):
    """A written-out GELU whose x ** 3 comes before a CUDA autocast block and the rest inside it is
    not read as F.gelu: put back at its last product, the pow moved into the block, where CUDA
    autocast computes it in fp32 (eager's, outside, keeps a bf16 x's dtype). CUDA autocast does
    nothing here, so the graph is checked (a fourteenth fuzz round)."""
    import warnings
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast("cuda") without CUDA
        torch.compile(_written_out_gelu_cubed_outside_an_autocast_block, backend="truthfuse",
                      options=OPTIONS)(*(_qkv() + [torch.randn(2, 5, 16)]))
    torch._dynamo.reset()
    nodes = [n for gm in inner_graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("truthfuse" in str(n.target) for n in nodes)  # the site fused: the canonical graph ran
    enter = [i for i, n in enumerate(nodes) if n.target is torch.amp.autocast_mode._enter_autocast]
    pows = [i for i, n in enumerate(nodes) if n.target is torch.pow]
    assert len(enter) == 1 and len(pows) == 1 and pows[0] < enter[0]


def _written_out_gelus_of_a_written_input(q, k, v, x):
    a = 0.5 * x
    tanh_gelu = a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    erf_gelu = 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    x.add_(1)
    return _site(q, k, v), tanh_gelu, erf_gelu, x


def test_a_written_out_gelu_of_a_value_written_in_place_stays_as_written():
    """A written-out GELU whose input the graph writes in place after it is not read as F.gelu:
    F.gelu would read x at the GELU's last product, across the write from where the GELU's
    other steps read it, and the whole graph went unfused ('compiling this graph unchanged'),
    the attention beside it included (a fourteenth fuzz round)."""
    torch.manual_seed(0)
    inputs = _qkv() + [torch.randn(2, 5, 16) * 3]
    fresh = lambda: [t.clone() for t in inputs]  # noqa: E731 -- each call writes its x
    assert _fused_kinds(_written_out_gelus_of_a_written_input, *fresh()) == ["attention"]
    want = _written_out_gelus_of_a_written_input(*fresh())
    got = torch.compile(_written_out_gelus_of_a_written_input, backend="truthfuse", options=OPTIONS)(*fresh())
    torch._dynamo.reset()
    for a, b in zip(got[1:], want[1:]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _scaled_twice_of_a_written_input(case):
    def fn(q, k, v, x):
        if case == "write_after":
            y = x * 0.3 * 0.7
            x.add_(1)
        elif case == "write_before":
            x.add_(1)
            y = x * 0.3 * 0.7
        else:  # between the two products: the fold would read x after the write
            t = x * 0.3
            x.add_(1)
            y = t * 0.7
        return _site(q, k, v), y, x * 1.0
    return fn


@pytest.mark.parametrize("case", ["write_after", "write_before", "write_between"])
def test_a_product_of_numbers_beside_a_write_in_place_lets_the_graph_fuse(case):
    """`y = x * 0.3 * 0.7` followed by `x.add_(1)` on a graph input left the whole graph unfused
    ('compiling this graph unchanged'), the attention beside it lost: folding the products read x
    where the outer one stands, and any write to x after x itself counted as crossed. Only a write
    between the reads the fold replaces and the fold counts; across one the products stay as
    written, and the graph still fuses (a fifteenth fuzz round)."""
    fn = _scaled_twice_of_a_written_input(case)
    torch.manual_seed(0)
    inputs = _qkv() + [torch.randn(3, 5)]
    fresh = lambda: [t.clone() for t in inputs]  # noqa: E731 -- each call writes its x
    with warnings.catch_warnings():
        warnings.simplefilter("error", fusion_backend.FusionWarning)
        assert _fused_kinds(fn, *fresh()) == ["attention"]
    want_in, got_in = fresh(), fresh()
    want = fn(*want_in)
    got = torch.compile(fn, backend="truthfuse", options=OPTIONS)(*got_in)
    torch._dynamo.reset()
    torch.testing.assert_close(got[0], want[0], atol=2e-6, rtol=2e-5)
    for a, b in zip(list(got[1:]) + got_in, list(want[1:]) + want_in):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
