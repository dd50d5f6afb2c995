"""Feed-forward kernels and the `feedforward` op against float64 references, in Triton's
interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1).

Inputs are fresh random numbers for every test (never zeros); kernel outputs are poisoned with NaN
before the kernels write them; weird shapes (T = 6, 42, 123; d = 24, 40; h = 72). bf16 is left to
the GPU run (bench/feedforward_gpu.py): the interpreter's bf16 arithmetic is not the GPU's.
"""
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from fusion_backend.kernels import feedforward as K
from fusion_backend.kernels.philox import dropout_scale, philox_keep_mask
from fusion_backend.ops.seed import reference_seed
from fusion_backend.ops.fallback import FusionFallbackWarning, reset_fallback_warnings
from fusion_backend.ops.feedforward import (
    default_feedforward_config,
    feedforward,
    feedforward_config_space,
    feedforward_reference,
    feedforward_supports,
)

# A kernel that falls back to the PyTorch reference would pass these checks while broken.
pytestmark = pytest.mark.filterwarnings("error::fusion_backend.ops.fallback.FusionFallbackWarning")

# The module, not the `feedforward` function that fusion_backend.ops re-exports under its name.
FF = importlib.import_module("fusion_backend.ops.feedforward")
K = importlib.import_module("fusion_backend.kernels.feedforward")
IMPLS = ("triton", "cublas")
GEMM_CFG = default_feedforward_config("triton", interpret=True)
EW_CFG = default_feedforward_config("cublas", interpret=True)
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def rel(a, b):
    """||a - b|| / ||b||; NaN or inf never passes."""
    a = a.detach().double()
    b = b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values (unwritten or poisoned output)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def nan_like(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty / empty_like returns NaN-filled memory, so an unwritten element shows."""
    real_empty, real_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*a, **k):
        t = real_like(*a, **k)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def make_inputs(T, d, h, *, dtype=torch.float32, bias=True, gated=False, residual=False, lead=None, d_out=None):
    d_out = d_out or d
    lead = lead or (T,)
    t = dict(
        x=torch.randn(*lead, d),
        w_in=torch.randn(h, d) * d**-0.5,
        b_in=torch.randn(h) * 0.5 if bias else None,
        w_out=torch.randn(d_out, h) * h**-0.5,
        b_out=torch.randn(d_out) * 0.5 if bias else None,
        w_gate=torch.randn(h, d) * d**-0.5 if gated else None,
        b_gate=torch.randn(h) * 0.5 if (gated and bias) else None,
        residual=torch.randn(*lead, d_out) if residual else None,
    )
    return {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in t.items()}


def call(fn, t, seed=1234, **kw):
    torch.manual_seed(seed)
    return fn(t["x"], t["w_in"], t["b_in"], t["w_out"], t["b_out"], w_gate=t["w_gate"], b_gate=t["b_gate"],
              residual=t["residual"], **kw)


def as64(t):
    return {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in t.items()}


def check_against_float64(t, tol, **kw):
    """Output and every input's gradient of `feedforward` vs float64 autograd of the reference
    (the inputs that require one)."""
    names = [k for k, v in t.items() if v is not None and v.requires_grad]
    y = call(feedforward, t, **kw)
    gout = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t[n] for n in names], gout)
    ref_kw = {k: v for k, v in kw.items() if k not in ("impl", "config")}
    t64 = as64(t)
    y64 = call(feedforward_reference, t64, **ref_kw)
    g64 = torch.autograd.grad(y64, [t64[n] for n in names], gout.double())
    assert y.shape == y64.shape and y.dtype == t["x"].dtype
    assert rel(y, y64) < tol, ("out", rel(y, y64))
    for n, a, b in zip(names, grads, g64):
        assert rel(a, b) < tol, (n, rel(a, b))


# ----------------------------------------------------------------------------------------------
# The op against float64
# ----------------------------------------------------------------------------------------------

CASES = [
    # T, d, h, activation, gated, bias, residual, p_hidden, p_out
    (6, 24, 72, "gelu", False, True, False, 0.0, 0.0),
    (42, 40, 72, "gelu_tanh", False, True, True, 0.0, 0.0),
    (123, 24, 72, "relu", False, False, True, 0.2, 0.0),
    (42, 40, 72, "silu", False, True, False, 0.0, 0.3),
    (123, 40, 72, "gelu", False, True, True, 0.1, 0.1),
    (42, 24, 72, "silu", True, False, False, 0.0, 0.0),  # SwiGLU, Llama-style (no biases)
    (6, 40, 72, "gelu", True, True, True, 0.2, 0.1),  # GEGLU
    (123, 24, 72, "gelu_tanh", True, True, False, 0.1, 0.0),
    (42, 64, 128, "relu", True, True, True, 0.1, 0.1),  # K a multiple of BLOCK_K: unmasked loop
    (42, 40, 72, "relu", False, True, True, 0.0, 0.1),  # cublas: ReLU from the product's epilogue
    (6, 24, 72, "relu", False, False, False, 0.0, 0.0),  # ... with a zero bias
    (42, 40, 72, "quick_gelu", False, True, True, 0.1, 0.1),  # CLIP's activation
    (42, 40, 72, "relu2", False, True, True, 0.1, 0.1),  # Nemotron's squared ReLU
    (6, 24, 72, "relu2", True, False, False, 0.0, 0.0),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}d{c[1]}h{c[2]}-{c[3]}-{'gated' if c[4] else 'plain'}"
                         f"-{'b' if c[5] else 'nob'}-{'res' if c[6] else 'nores'}-p{c[7]}-{c[8]}")
def test_matches_float64(case, impl, poisoned_empty):
    T, d, h, act, gated, bias, residual, p_h, p_o = case
    t = make_inputs(T, d, h, bias=bias, gated=gated, residual=residual)
    check_against_float64(t, TOL[torch.float32], activation=act, hidden_dropout_p=p_h, output_dropout_p=p_o, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_float16(impl):
    t = make_inputs(42, 40, 72, dtype=torch.float16, gated=True, residual=True)
    check_against_float64(t, TOL[torch.float16], activation="silu", hidden_dropout_p=0.1, output_dropout_p=0.1, impl=impl)


@pytest.mark.parametrize("path", ["triton", "cublas", "reference"])
def test_computes_in_its_inputs_dtype_under_autocast(path, monkeypatch):
    """fp32 inputs under CPU autocast to bf16 (a compiled graph's op runs under the caller's
    autocast): the op computes in fp32, as its inputs ask. Without turning autocast off inside it,
    the cuBLAS products and the reference's F.linear ran in bf16 (cuBLAS's forward returned bf16)."""
    if path == "reference":
        monkeypatch.setattr(FF, "_use_kernels", lambda *args: False)
    t = make_inputs(42, 40, 72, gated=True, residual=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_against_float64(t, TOL[torch.float32], activation="silu", impl="cublas" if path == "reference" else path)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_and_output_width(impl):
    """x (..., d) with several leading dims; w_out may map to a width other than d."""
    t = make_inputs(0, 24, 72, lead=(2, 3, 7), d_out=40, residual=True)
    check_against_float64(t, 1e-5, activation="gelu", hidden_dropout_p=0.1, output_dropout_p=0.1, impl=impl)
    assert call(feedforward, t, impl=impl).shape == (2, 3, 7, 40)


@pytest.mark.parametrize("impl", IMPLS)
def test_conv1d_transposed_weights(impl):
    """HF Conv1D keeps weights as (in, out); the rule passes `.t()` views: any strides work."""
    t = make_inputs(42, 40, 72, residual=True)
    conv_in = t["w_in"].detach().t().contiguous()  # (d, h), as Conv1D stores it
    conv_out = t["w_out"].detach().t().contiguous()
    t["w_in"] = conv_in.t().requires_grad_()
    t["w_out"] = conv_out.t().requires_grad_()
    assert not t["w_in"].is_contiguous()
    check_against_float64(t, 1e-5, activation="gelu_tanh", hidden_dropout_p=0.1, impl=impl)


@pytest.mark.parametrize("save", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("impl", IMPLS)
def test_blocked_backward(impl, gated, save, monkeypatch):
    """Backward walks rows in blocks on large shapes; force it on a small one (5 blocks, ragged:
    the last block is shorter, and its bias partial sums and buffer slice are too). Without a
    saved pre-activation each block recomputes its own."""
    monkeypatch.setattr(FF, "_backward_rows", 10)
    monkeypatch.setattr(FF, "SAVE_PRE_ACTIVATION", save)
    t = make_inputs(42, 40, 72, gated=gated, residual=True)
    check_against_float64(t, 1e-5, activation="gelu", hidden_dropout_p=0.2, output_dropout_p=0.1, impl=impl)


@pytest.mark.parametrize("case", ["wider output", "x without grad"])
def test_blocked_backward_output_dropout_per_block(case, monkeypatch):
    """dL/dy of the output dropout is made once into dx's memory when the two have one shape;
    otherwise (d_out != d, or no dx wanted) it is made block by block in its own buffer."""
    monkeypatch.setattr(FF, "_backward_rows", 10)
    t = make_inputs(42, 40, 72, d_out=56 if case == "wider output" else None)
    if case == "x without grad":
        t["x"] = t["x"].detach()
    check_against_float64(t, 1e-5, activation="gelu", hidden_dropout_p=0.2, output_dropout_p=0.1, impl="cublas")


def test_pre_activation_saved_by_size(monkeypatch):
    """By default the pre-activation is recomputed where the step is host-bound (small GEMMs) and
    saved where the GPU work dominates; SAVE_PRE_ACTIVATION forces either."""
    monkeypatch.setattr(FF, "SAVE_PRE_ACTIVATION", None)
    assert not FF._saves_pre_activation(8192, 1024, 4096)
    assert FF._saves_pre_activation(16384, 4096, 16384)
    assert FF._saves_pre_activation(2 * 8192, 1024, 4096)  # the threshold itself saves
    monkeypatch.setattr(FF, "SAVE_PRE_ACTIVATION", True)
    assert FF._saves_pre_activation(8, 8, 8)
    monkeypatch.setattr(FF, "SAVE_PRE_ACTIVATION", False)
    assert not FF._saves_pre_activation(16384, 4096, 16384)


def test_cuda_graph_replays_save_the_pre_activation_at_every_size(monkeypatch):
    """Replayed as CUDA graphs no step is host-bound: the pre-activation is kept, the scheme that
    is fastest on the GPU; leaving the context restores the size rule."""
    monkeypatch.setattr(FF, "SAVE_PRE_ACTIVATION", None)
    with FF.replayed_as_cuda_graphs():
        assert FF._saves_pre_activation(8192, 1024, 4096)
        with FF.replayed_as_cuda_graphs():
            assert FF._saves_pre_activation(8, 8, 8)
        assert FF._saves_pre_activation(8, 8, 8)
    assert not FF._saves_pre_activation(8192, 1024, 4096)


@pytest.mark.parametrize("impl", IMPLS)
def test_eager_path_equals_custom_op(impl, monkeypatch):
    """Plain eager calls skip torch.library's dispatch (`_EagerFeedforward`); the custom op that
    torch.compile sees must give the same bits: same implementations, same seed draw."""
    t = make_inputs(42, 40, 72, gated=True, residual=True)
    names = [k for k, v in t.items() if v is not None]
    g = torch.randn(42, 40)

    def run():
        y = call(feedforward, t, impl=impl, activation="gelu", hidden_dropout_p=0.2, output_dropout_p=0.1)
        return [y.detach()] + list(torch.autograd.grad(y, [t[n] for n in names], g))

    seen = []
    monkeypatch.setattr(FF._EagerFeedforward, "apply", _recording(FF._EagerFeedforward.apply, seen))
    eager = run()
    assert seen, "a plain eager call should take the autograd.Function path"
    monkeypatch.setattr(FF, "plain_eager_call", lambda tensors: False)
    op = run()
    for a, b in zip(eager, op):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_eager_call_under_create_graph_refuses_the_second_backward(impl):
    """A plain eager call's gradients under create_graph=True are the first-order ones, and a
    second backward through them (a gradient penalty) raises, never treats them as constants."""
    x = torch.randn(6, 8, requires_grad=True)
    w_in, b_in = (torch.randn(16, 8) * 0.3).requires_grad_(), torch.randn(16) * 0.1
    w_out, b_out = torch.randn(8, 16) * 0.3, torch.randn(8) * 0.1
    (gw,) = torch.autograd.grad(feedforward(x, w_in, b_in, w_out, b_out, impl=impl).pow(2).sum(), [w_in],
                                create_graph=True)
    (want,) = torch.autograd.grad(feedforward_reference(x, w_in, b_in, w_out, b_out).pow(2).sum(), [w_in])
    assert torch.allclose(gw, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="double backward through the fused feedforward op"):
        torch.autograd.grad(gw.pow(2).sum(), [x])


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_mode_ad_carries_the_tangent(impl):
    """Forward-mode AD (torch.autograd.forward_ad) through a plain call: the Triton kernels read
    the primal only and dropped the tangent. Such a call takes the reference."""
    import torch.autograd.forward_ad as fwAD

    x, tx = torch.randn(6, 8), torch.randn(6, 8)
    w_in, b_in, w_out, b_out = torch.randn(16, 8) * 0.3, torch.randn(16) * 0.1, torch.randn(8, 16) * 0.3, torch.randn(8)
    want = torch.func.jvp(lambda x: feedforward_reference(x, w_in, b_in, w_out, b_out, activation="silu"), (x,), (tx,))
    with fwAD.dual_level(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = feedforward(fwAD.make_dual(x, tx), w_in, b_in, w_out, b_out, activation="silu", impl=impl)
        primal, tangent = fwAD.unpack_dual(out)
    assert tangent is not None
    assert rel(primal, want[0]) < 1e-5 and rel(tangent, want[1]) < 1e-5
    assert any(issubclass(w.category, FusionFallbackWarning) and "forward-mode AD" in str(w.message) for w in seen)


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_func_grad_over_a_direct_call(impl):
    """torch.func.grad over the op takes its reference (the kernels cannot read a transform's
    wrapped tensors); it raised torch's 'must override the setup_context staticmethod' from the
    eager path's autograd.Function."""
    x = torch.randn(6, 8)
    w_in, b_in, w_out, b_out = torch.randn(16, 8) * 0.3, torch.randn(16) * 0.1, torch.randn(8, 16) * 0.3, torch.randn(8)

    def grads(f):
        return torch.func.grad(lambda x, w: f(x, w, b_in, w_out, b_out, w_gate=w).pow(2).sum(), argnums=(0, 1))(x, w_in)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FusionFallbackWarning)
        got = grads(lambda *a, **kw: feedforward(*a, **kw, activation="silu", impl=impl))
    want = grads(lambda *a, **kw: feedforward_reference(*a, **kw, activation="silu"))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_forward_equals_training_forward(impl, gated):
    """Without autograd the forward skips the autograd.Function and writes the hidden over the
    pre-activation (nothing keeps it): the output must be the same bits."""
    t = make_inputs(42, 40, 72, gated=gated, residual=True)
    kw = dict(impl=impl, activation="gelu_tanh", hidden_dropout_p=0.1, output_dropout_p=0.1)
    y = call(feedforward, t, **kw)
    with torch.no_grad():
        y_ng = call(feedforward, t, **kw)
    assert torch.isfinite(y_ng).all() and torch.equal(y.detach(), y_ng)


def _recording(fn, seen):
    def wrapped(*args):
        seen.append(True)
        return fn(*args)
    return wrapped


def test_traced_calls_take_the_custom_op():
    """Fake tensors (what torch.compile traces with) are not plain eager calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fusion_backend.ops.eager import plain_eager_call
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(4, 8))
        assert not plain_eager_call([x])
    assert plain_eager_call([torch.randn(4, 8), None])


def test_pre_activation_not_saved_is_recomputed():
    """If forward ran with save=False, backward recomputes z from x and still gives the right grads."""
    t = make_inputs(42, 24, 72, gated=True)
    seed = torch.tensor(77)
    args = (t["x"], t["w_in"], t["b_in"], t["w_out"], t["b_out"], t["w_gate"], t["b_gate"], None, seed, "silu", 0.1, 0.0)
    for impl in IMPLS:
        out, z, zu = torch.ops.truthfuse.feedforward(*args, impl, "", False)
        assert z.numel() == 0 and zu.numel() == 0
        out_s, z_s, zu_s = torch.ops.truthfuse.feedforward(*args, impl, "", True)
        assert torch.equal(out, out_s)
        g = torch.randn_like(out)
        common = (t["w_in"], t["b_in"], t["w_out"], t["w_gate"], t["b_gate"], seed, "silu", 0.1, 0.0, impl, "", [True] * 7)
        a = torch.ops.truthfuse.feedforward_backward(g, t["x"], z, zu, *common)
        b = torch.ops.truthfuse.feedforward_backward(g, t["x"], z_s, zu_s, *common)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v)


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------


def test_philox_reference_is_the_kernels_stream():
    """philox_keep_mask draws exactly the kernels' mask; the keep rate is about 1 - p."""
    M, N, p, seed = 123, 300, 0.3, 987654
    ones = torch.ones(M, N)
    out = K.output_epilogue(ones, out=nan_like((M, N)), seed=seed, p=p, config=EW_CFG)
    mask = philox_keep_mask(seed, M, N, p)
    assert torch.equal(out != 0, mask)
    torch.testing.assert_close(out[mask], torch.full_like(out[mask], dropout_scale(p)))
    assert abs(mask.float().mean().item() - (1 - p)) < 0.01
    # A block of rows with row0 draws the same counters as the whole matrix.
    part = K.output_epilogue(ones[40:90], out=nan_like((50, N)), seed=seed, p=p, row0=40, config=EW_CFG)
    assert torch.equal(part, out[40:90])
    assert torch.equal(philox_keep_mask(seed, 50, N, p, row0=40), mask[40:90])
    # Widths that are not a multiple of 4, and the GEMM epilogue, draw the same stream.
    for n in (1, 7, 42):
        o = K.output_epilogue(torch.ones(9, n), out=nan_like((9, n)), seed=seed, p=p, config=EW_CFG)
        assert torch.equal(o != 0, philox_keep_mask(seed, 9, n, p))
    a, w = torch.randn(M, 24), torch.randn(N, 24)
    o = K.gemm(a, w.t(), epi=K.EPI_OUT, seed=seed, p=p, out=nan_like((M, N)), config=GEMM_CFG)
    torch.testing.assert_close(o, (a @ w.t()) * mask * dropout_scale(p))


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_determinism_and_rate(impl):
    t = make_inputs(123, 24, 72)
    kw = dict(activation="relu", hidden_dropout_p=0.5, output_dropout_p=0.25, impl=impl)
    y1 = call(feedforward, t, seed=5, **kw)
    g1 = torch.autograd.grad(y1.sum(), [t["x"], t["w_in"]])
    y2 = call(feedforward, t, seed=5, **kw)
    g2 = torch.autograd.grad(y2.sum(), [t["x"], t["w_in"]])
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    y3 = call(feedforward, t, seed=6, **kw)
    assert not torch.equal(y1, y3)
    # Output dropout with no bias/residual: zeros appear at about the rate p.
    t2 = make_inputs(123, 24, 72, bias=False)
    y = call(feedforward, t2, seed=7, activation="silu", output_dropout_p=0.25, impl=impl)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.05
    # Backward regenerates forward's mask: dL/db_out of sum(out) counts kept elements / (1 - p).
    t3 = make_inputs(123, 24, 72)
    y = call(feedforward, t3, seed=8, activation="gelu", output_dropout_p=0.25, impl=impl)
    (gb,) = torch.autograd.grad(y.sum(), [t3["b_out"]])
    keep = philox_keep_mask(FF_seed(8) + 1, 123, 24, 0.25)
    torch.testing.assert_close(gb, keep.float().sum(0) / 0.75)


def FF_seed(manual):
    """The seed `feedforward` draws after torch.manual_seed(manual)."""
    torch.manual_seed(manual)
    return reference_seed()


def test_eval_mode_draws_no_seed():
    """p = 0 must not consume the default generator (eval mode stays in lockstep with eager)."""
    t = make_inputs(6, 24, 72)
    torch.manual_seed(3)
    feedforward(t["x"], t["w_in"], t["b_in"], t["w_out"], t["b_out"])
    a = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(a, torch.rand(4))


# ----------------------------------------------------------------------------------------------
# Kernel launchers directly, with poisoned outputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", list(K.ACTIVATIONS))
def test_gemm_epilogues(act):
    M, Kd, N = 42, 40, 72
    code = K.ACTIVATIONS[act]
    a, w, wg, b, bg = torch.randn(M, Kd), torch.randn(N, Kd), torch.randn(N, Kd), torch.randn(N), torch.randn(N)
    A, W, WG, B, BG = (v.double() for v in (a, w, wg, b, bg))
    act64 = {"gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu, "silu": F.silu,
             "quick_gelu": lambda v: v * torch.sigmoid(1.702 * v), "relu2": lambda v: F.relu(v) ** 2}[act]
    keep = philox_keep_mask(11, M, N, 0.2).double() * dropout_scale(0.2)
    # EPI_HIDDEN gated: z = a wg^T + bg, zu = a w^T + b, out = dropout(act(z) * zu)
    h, z, zu = K.gemm(a, w.t(), epi=K.EPI_HIDDEN, act=code, bias=b, b2=wg.t(), bias2=bg, seed=11, p=0.2,
                      out=nan_like((M, N)), z=nan_like((M, N)), zu=nan_like((M, N)), config=GEMM_CFG)
    assert rel(z, A @ WG.T + BG) < 1e-6 and rel(zu, A @ W.T + B) < 1e-6
    assert rel(h, act64(A @ WG.T + BG) * (A @ W.T + B) * keep) < 1e-5
    # EPI_DHIDDEN: dh = (g @ w_out) * keep; dz = dh * zu * act'(z), dzu = dh * act(z)
    g, wo = torch.randn(M, 24), torch.randn(24, N)
    Z = z.double().requires_grad_()
    ZU = zu.double().requires_grad_()
    dh = (g.double() @ wo.double()) * keep
    ref_dz, ref_dzu = torch.autograd.grad(act64(Z) * ZU, [Z, ZU], dh)
    dz, dzu, db, db2 = K.gemm(g, wo, epi=K.EPI_DHIDDEN, act=code, z=z, zu=zu, seed=11, p=0.2, bias_grad=True,
                              out=nan_like((M, N)), out2=nan_like((M, N)), config=GEMM_CFG)
    assert rel(dz, ref_dz) < 1e-5 and rel(dzu, ref_dzu) < 1e-5
    assert rel(db, ref_dz.sum(0)) < 1e-5 and rel(db2, ref_dzu.sum(0)) < 1e-5
    # EPI_OUT: dropout(a w^T + b) + residual
    r = torch.randn(M, N)
    o = K.gemm(a, w.t(), epi=K.EPI_OUT, bias=b, residual=r, seed=3, p=0.4, out=nan_like((M, N)), config=GEMM_CFG)
    assert rel(o, (A @ W.T + B) * philox_keep_mask(3, M, N, 0.4).double() * dropout_scale(0.4) + r.double()) < 1e-6
    # EPI_PLAIN with a second K segment and in-place accumulation
    a2, w2 = torch.randn(M, 24), torch.randn(24, N)
    c = torch.randn(M, N)
    c0 = c.double().clone()
    K.gemm(a, w.t(), a2=a2, b2=w2, residual=c, out=c, config=GEMM_CFG)
    assert rel(c, c0 + A @ W.T + a2.double() @ w2.double()) < 1e-6


@pytest.mark.parametrize("gated", [False, True])
def test_hidden_epilogue_forward_backward(gated):
    """The cuBLAS-pairing elementwise kernel: bias + activation (+ gate) + dropout, and backward
    with the bias gradient summed in the same pass."""
    M, N, p, seed = 123, 72, 0.3, 4242
    z, zu, b, b2, g = torch.randn(M, N), torch.randn(M, N), torch.randn(N), torch.randn(N), torch.randn(M, N)
    keep = philox_keep_mask(seed, M, N, p).double() * dropout_scale(p)
    Z = (z.double() + b.double()).requires_grad_()
    ZU = (zu.double() + b2.double()).requires_grad_()
    ref = F.gelu(Z) * (ZU if gated else 1.0) * keep
    kw = dict(act=K.ACTIVATIONS["gelu"], zu=zu if gated else None, bias=b, bias2=b2 if gated else None,
              seed=seed, p=p, config=EW_CFG)
    h = K.hidden_epilogue(z, out=nan_like((M, N)), **kw)
    assert rel(h, ref) < 1e-6
    dz, dzu, db, db2 = K.hidden_epilogue(z, grad=g, out=nan_like((M, N)), out2=nan_like((M, N)) if gated else None,
                                         bias_grad=True, **kw)
    grads = torch.autograd.grad(ref, [Z, ZU] if gated else [Z], g.double())
    assert rel(dz, grads[0]) < 1e-6 and rel(db, grads[0].sum(0)) < 1e-6
    if gated:
        assert rel(dzu, grads[1]) < 1e-6 and rel(db2, grads[1].sum(0)) < 1e-6


@pytest.mark.parametrize("gated", [False, True])
def test_bias_partials_accumulate_over_row_blocks(gated):
    """Row blocks of one matrix share one partial-sum buffer: the first block writes its column
    sums, later ones (the last shorter) add to them; the buffer's sum is the bias gradient."""
    M, N, p, seed = 150, 72, 0.2, 77
    z, zu, g = torch.randn(M, N), torch.randn(M, N), torch.randn(M, N)
    kw = dict(act=K.ACTIVATIONS["silu"], seed=seed, p=p, config=EW_CFG)
    full = K.hidden_epilogue(z, zu=zu if gated else None, grad=g, out=nan_like((M, N)),
                             out2=nan_like((M, N)) if gated else None, bias_grad=True, **kw)
    R = 96  # two blocks of the interpreter tile's 64 rows, then one
    rows = K.bias_partial_rows(R, EW_CFG)
    parts = (nan_like((rows, N)), nan_like((rows, N)) if gated else None)
    for r0 in range(0, M, R):
        sl = slice(r0, min(M, r0 + R))
        n = sl.stop - r0
        out = K.hidden_epilogue(z[sl], zu=zu[sl] if gated else None, grad=g[sl], out=nan_like((n, N)),
                                out2=nan_like((n, N)) if gated else None, row0=r0, bias_partials=parts,
                                accumulate_partials=r0 > 0, **kw)
        assert out[2] is None and out[3] is None
        assert torch.equal(out[0], full[0][sl])
    assert rel(parts[0].sum(0), full[2]) < 1e-6
    if gated:
        assert rel(parts[1].sum(0), full[3]) < 1e-6


# ----------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gated", [False, True])
def test_opcheck(impl, gated):
    t = make_inputs(6, 24, 40, gated=gated, residual=True)
    args = (t["x"], t["w_in"], t["b_in"], t["w_out"], t["b_out"], t["w_gate"], t["b_gate"], t["residual"],
            torch.tensor(123), "silu" if gated else "gelu", 0.2, 0.1, impl, "", True)
    torch.library.opcheck(torch.ops.truthfuse.feedforward.default, args)


def _module_fn(x, w_in, b_in, w_out, b_out, r):
    return feedforward(x, w_in, b_in, w_out, b_out, activation="gelu_tanh", hidden_dropout_p=0.1,
                       output_dropout_p=0.1, residual=r)


def test_compile_aot_eager_fullgraph_dynamic():
    """Same values and gradients compiled (aot_eager: eager RNG, so the same dropout) as eager,
    over two token counts with one graph."""
    cf = torch.compile(_module_fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (6, 42):
        t = make_inputs(T, 24, 72, residual=True)
        ins = [t[k] for k in ("x", "w_in", "b_in", "w_out", "b_out", "residual")]
        torch.manual_seed(9)
        y = cf(*ins)
        g = torch.autograd.grad(y.sum(), ins)
        torch.manual_seed(9)
        y0 = _module_fn(*ins)
        g0 = torch.autograd.grad(y0.sum(), ins)
        torch.testing.assert_close(y, y0)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b)


def test_compile_inductor_fullgraph_dynamic():
    """Inductor compiles around the op; no dropout here, since Inductor draws its own seed."""
    def fn(x, w_in, b_in, w_out, b_out, w_gate):
        return feedforward(x, w_in, b_in, w_out, b_out, activation="silu", w_gate=w_gate)

    cf = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=True)
    t = make_inputs(42, 24, 72, gated=True)
    ins = [t[k] for k in ("x", "w_in", "b_in", "w_out", "b_out", "w_gate")]
    y = cf(*ins)
    g = torch.autograd.grad(y.sum(), ins)
    y0 = fn(*ins)
    g0 = torch.autograd.grad(y0.sum(), ins)
    torch.testing.assert_close(y, y0)
    for a, b in zip(g, g0):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# Validation, support, configs, fallback
# ----------------------------------------------------------------------------------------------


def test_validation_errors():
    t = make_inputs(6, 24, 72)
    x, w_in, b_in, w_out, b_out = (t[k] for k in ("x", "w_in", "b_in", "w_out", "b_out"))
    with pytest.raises(ValueError, match="gelu_tanh"):
        feedforward(x, w_in, b_in, w_out, b_out, activation="swish")
    with pytest.raises(ValueError, match="impl"):
        feedforward(x, w_in, b_in, w_out, b_out, impl="cudnn")
    with pytest.raises(ValueError, match="unknown config"):
        feedforward(x, w_in, b_in, w_out, b_out, impl="triton", config="nope")
    with pytest.raises(ValueError, match="unknown config"):  # a cuBLAS key is not a Triton one
        feedforward(x, w_in, b_in, w_out, b_out, impl="triton", config=feedforward_config_space("cublas")[0]["key"])
    with pytest.raises(ValueError, match="last dim"):
        feedforward(x[:, :20], w_in, b_in, w_out, b_out)
    with pytest.raises(ValueError, match="w_out"):
        feedforward(x, w_in, b_in, w_out[:, :10], b_out)
    with pytest.raises(ValueError, match="b_in"):
        feedforward(x, w_in, b_in[:5], w_out, b_out)
    with pytest.raises(ValueError, match="b_gate"):
        feedforward(x, w_in, b_in, w_out, b_out, b_gate=b_in)
    with pytest.raises(ValueError, match="w_gate"):
        feedforward(x, w_in, b_in, w_out, b_out, w_gate=w_out)
    with pytest.raises(ValueError, match="hidden_dropout_p"):
        feedforward(x, w_in, b_in, w_out, b_out, hidden_dropout_p=1.5)
    with pytest.raises(ValueError, match="residual"):
        feedforward(x, w_in, b_in, w_out, b_out, residual=torch.randn(7, 24))
    with pytest.raises(ValueError, match="dtype"):
        feedforward(x.detach().half(), w_in, b_in, w_out, b_out)


@pytest.mark.parametrize("arg, value", [
    ("b_in", [0.0] * 72), ("b_out", 1.0), ("w_gate", [[0.0]]), ("b_gate", [0.0] * 72), ("residual", 1.0),
    ("residual", [0.0]), ("activation", ["gelu"]), ("config", {"key": "cublas:m64n128w4"}), ("config", ["a"]),
])
def test_arguments_of_the_wrong_type_are_value_errors(arg, value):
    # they raised AttributeError ('list' object has no attribute 'dim') or "unhashable type"
    t = make_inputs(6, 24, 72)
    args = [t[k] for k in ("x", "w_in", "b_in", "w_out", "b_out")]
    kw = {}
    if arg in ("b_in", "b_out"):
        args[("b_in", "b_out").index(arg) * 2 + 2] = value
    else:
        kw[arg] = value
        if arg == "b_gate":
            kw["w_gate"] = t["w_in"]
    with pytest.raises(ValueError, match=arg):
        feedforward(*args, **kw)
    ok, why = feedforward_supports(*args, **kw)
    assert not ok and arg in why


@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("impl", ["triton", "cublas"])
def test_strided_biases_train_as_eager(impl, save, monkeypatch):
    # a bias with stride 0 (b.expand(h)) or 2 (a column): the recomputing backward's Triton GEMM
    # read it with unit stride, and every gradient was off (up to 0.5 of its size)
    monkeypatch.setattr(FF, "SAVE_PRE_ACTIVATION", save)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w_in, w_gate = torch.randn(24, 16, requires_grad=True), torch.randn(24, 16, requires_grad=True)
    w_out = torch.randn(16, 24, requires_grad=True)
    b = torch.randn(1, requires_grad=True)
    cols = torch.randn(24, 2, requires_grad=True)
    leaves = (x, w_in, w_gate, w_out, b, cols)
    for gated in (False, True):
        b_in, b_gate = b.expand(24), cols[:, 1]
        kw = dict(w_gate=w_gate, b_gate=b_gate) if gated else {}
        out = feedforward(x, w_in, b_in, w_out, None, activation="gelu", impl=impl, **kw)
        up = F.linear(x, w_in, b_in)
        want = F.linear((F.gelu(F.linear(x, w_gate, b_gate)) * up) if gated else F.gelu(up), w_out)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        g = torch.randn_like(want)
        got = torch.autograd.grad(out, leaves, g, allow_unused=True)
        exp = torch.autograd.grad(want, leaves, g, allow_unused=True)
        for a, e in zip(got, exp):
            assert (a is None) == (e is None)
            if e is not None:
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["triton", "cublas"])
@pytest.mark.parametrize("d, d_out", [(0, 24), (24, 0)])
def test_inputs_or_outputs_of_width_zero_as_eager(impl, d, d_out):
    # x (..., 0): eager's Linear gives the bias; reshape(-1, 0) of x (or of the residual, d_out = 0)
    # raised "the unspecified dimension size -1 can be any value and is ambiguous"
    x = torch.randn(2, 3, d, requires_grad=True)
    w_in, b_in, w_gate = (torch.randn(*s, requires_grad=True) for s in ((16, d), (16,), (16, d)))
    w_out, b_out = torch.randn(d_out, 16, requires_grad=True), torch.randn(d_out, requires_grad=True)
    residual = torch.randn(2, 3, d_out, requires_grad=True)
    leaves = (x, w_in, b_in, w_out, b_out, w_gate, residual)
    out = feedforward(x, w_in, b_in, w_out, b_out, activation="silu", w_gate=w_gate, residual=residual, impl=impl)
    want = F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_in, b_in), w_out, b_out) + residual
    torch.testing.assert_close(out, want)
    for got, exp in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        torch.testing.assert_close(got, exp)


def test_supports_from_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w_in, w_out = torch.empty(8, 24), torch.empty(72, 24), torch.empty(24, 72)
        assert feedforward_supports(x, w_in, None, w_out, None) == (True, "ok")
        ok, why = feedforward_supports(x.double(), w_in.double(), None, w_out.double(), None)
        assert not ok and "float64" in why
        ok, why = feedforward_supports(x, w_in, None, w_out, None, activation="tanh")
        assert not ok and "activation" in why
        ok, why = feedforward_supports(x, w_in, None, torch.empty(24, 70), None)
        assert not ok and "w_out" in why


def test_config_space_keys():
    for impl in IMPLS:
        space = feedforward_config_space(impl)
        keys = [c["key"] for c in space]
        assert len(keys) == len(set(keys)) and all(isinstance(k, str) for k in keys)
        assert default_feedforward_config(impl)["key"] in keys
        assert default_feedforward_config(impl, interpret=False)["key"] in keys
    gated = feedforward_config_space("triton", gated=True)
    assert all(c["BLOCK_M"] * c["BLOCK_N"] <= 128 * 128 for c in gated)
    # Another key than the default runs and agrees.
    t = make_inputs(42, 40, 72, residual=True)
    for impl, key in (("triton", "triton:m64n128k64g8w4s4"), ("cublas", "cublas:m32n128w4")):
        check_against_float64(t, 1e-5, activation="gelu", hidden_dropout_p=0.1, impl=impl, config=key)


def test_triton_impl_past_int32_uses_cublas_products(monkeypatch):
    """Past the Triton GEMM's int32 indexing limit the op takes cuBLAS products, still right."""
    monkeypatch.setattr(FF, "_MAX_NUMEL", 1000)

    def no_gemm(*a, **k):
        raise AssertionError("Triton GEMM launched past its indexing limit")

    monkeypatch.setattr(K, "gemm", no_gemm)
    t = make_inputs(42, 24, 72, gated=True, residual=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionFallbackWarning)
        check_against_float64(t, 1e-5, activation="silu", hidden_dropout_p=0.1, output_dropout_p=0.1, impl="triton")


def test_fallback_warns_and_matches_reference(monkeypatch):
    reset_fallback_warnings()

    def broken(*a, **k):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setattr(K, "gemm", broken)
    t = make_inputs(42, 24, 72, residual=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        check_against_float64(t, 1e-5, activation="gelu", hidden_dropout_p=0.1, output_dropout_p=0.1, impl="triton")
    assert any(issubclass(x.category, FusionFallbackWarning) and "simulated" in str(x.message) for x in w)
    reset_fallback_warnings()


# ----------------------------------------------------------------------------------------------
# The activation from cuBLASLt's epilogue (impl "cublas", forward without a saved pre-activation)
# ----------------------------------------------------------------------------------------------


def test_gemm_epilogue_meaning_is_measured(monkeypatch):
    """torch._addmm_activation's GELU is exact on CPU but the tanh form on CUDA: the check tells
    them apart, so on CPU only ReLU may come from the product's epilogue."""
    monkeypatch.setattr(FF, "_gemm_epilogue_checked", {})
    cpu = torch.device("cpu")
    assert FF.gemm_epilogue_computes("relu", cpu)
    assert not FF.gemm_epilogue_computes("gelu_tanh", cpu)
    assert not FF.gemm_epilogue_computes("gelu", cpu) and not FF.gemm_epilogue_computes("silu", cpu)

    # A GELU that is the tanh form passes; a ReLU that is off by a little does not.
    real = torch._addmm_activation

    def tanh_gelu_or_shifted_relu(bias, a, b, use_gelu=False):
        z = torch.addmm(bias, a, b)
        return F.gelu(z, approximate="tanh") if use_gelu else F.relu(z) + 1e-3

    monkeypatch.setattr(FF, "_gemm_epilogue_checked", {})
    monkeypatch.setattr(torch, "_addmm_activation", tanh_gelu_or_shifted_relu)
    assert FF.gemm_epilogue_computes("gelu_tanh", cpu)
    assert not FF.gemm_epilogue_computes("relu", cpu)
    monkeypatch.setattr(torch, "_addmm_activation", real)
    assert not FF.gemm_epilogue_computes("relu", cpu), "the first answer is kept for the process"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cublas_forward_takes_relu_from_the_gemm_epilogue(bias, monkeypatch):
    """Without hidden dropout and a saved pre-activation, the cublas forward's first product comes
    with its activation (one call, no elementwise pass); the result matches float64, in training
    too (backward recomputes the pre-activation)."""
    assert FF.gemm_epilogue_computes("relu", torch.device("cpu"))  # measured before the spy goes in
    calls = []
    real = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(FF, "SAVE_PRE_ACTIVATION", False)
    t = make_inputs(42, 40, 72, bias=bias, residual=True)
    with torch.no_grad():
        y = call(feedforward, t, impl="cublas", activation="relu")
    y64 = call(feedforward_reference, as64(t), activation="relu")
    assert calls == [dict(use_gelu=False)] and rel(y, y64) < TOL[torch.float32]
    check_against_float64(t, TOL[torch.float32], impl="cublas", activation="relu", output_dropout_p=0.1)
    assert len(calls) == 2


@pytest.mark.parametrize("why", ["hidden dropout", "saved pre-activation", "exact gelu", "gated", "triton impl"])
def test_gemm_epilogue_not_used_where_it_cannot_serve(why, monkeypatch):
    assert FF.gemm_epilogue_computes("relu", torch.device("cpu"))  # measured before the spy goes in
    calls = []
    real = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(FF, "SAVE_PRE_ACTIVATION", why == "saved pre-activation")
    t = make_inputs(42, 40, 72, gated=why == "gated")
    kw = dict(impl="triton" if why == "triton impl" else "cublas", activation="gelu" if why == "exact gelu" else "relu",
              hidden_dropout_p=0.1 if why == "hidden dropout" else 0.0)
    check_against_float64(t, TOL[torch.float32], **kw)
    assert calls == []


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_cublas_inference_activates_in_place_without_a_triton_pass(act, monkeypatch):
    """Inference of a plain block with an activation cuBLASLt cannot apply: ATen's in-place
    activation on the first product, no epilogue kernel; float16 to see its single rounding."""
    launched = []
    real = K.hidden_epilogue
    monkeypatch.setattr(K, "hidden_epilogue", lambda *a, **k: launched.append(k) or real(*a, **k))
    t = make_inputs(42, 40, 72, residual=True)
    t16 = {n: v.detach().half() if v is not None else None for n, v in t.items()}
    with torch.no_grad():
        y = call(feedforward, t16, impl="cublas", activation=act)
        y64 = call(feedforward_reference, as64(t), activation=act)
    assert launched == [] and y.dtype == torch.float16
    assert rel(y, y64) < TOL[torch.float16], rel(y, y64)
    check_against_float64(t, TOL[torch.float32], impl="cublas", activation=act)  # training: the kernels
    assert launched, "training keeps the epilogue kernel, which also draws dropout and saves"


def test_float32_gemm_precision_follows_the_tf32_flag(monkeypatch):
    """float32 products: exact ("ieee") unless torch allows TF32, and then three TF32 products,
    not one (one left ReLU gradients up to 2.7e-2 off on the H100, against cuBLAS TF32's 4e-4)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert K._fp32_dot_precision(torch.float32) == "tf32x3"
    assert K._fp32_dot_precision(torch.bfloat16) == "tf32"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert K._fp32_dot_precision(torch.float32) == "ieee"


def test_cublas_inference_of_quick_gelu_runs_the_epilogue_kernel_in_place(monkeypatch):
    """No ATen op computes quick_gelu in one pass: inference of a plain block applies our epilogue
    kernel to the first product in place (float16, one rounding of the float32 math)."""
    launched = []
    real = K.hidden_epilogue
    monkeypatch.setattr(K, "hidden_epilogue", lambda z, **k: launched.append(k["out"] is z) or real(z, **k))
    t = make_inputs(42, 40, 72, residual=True)
    t16 = {n: v.detach().half() if v is not None else None for n, v in t.items()}
    with torch.no_grad():
        y = call(feedforward, t16, impl="cublas", activation="quick_gelu")
        y64 = call(feedforward_reference, as64(t), activation="quick_gelu")
    assert launched == [True] and y.dtype == torch.float16
    assert rel(y, y64) < TOL[torch.float16], rel(y, y64)


@pytest.mark.parametrize("bias", [True, False])
def test_inference_of_relu2_takes_relu_from_the_product_and_squares_in_place(monkeypatch, bias):
    """Squared ReLU in inference: ReLU from the first product's epilogue and ATen's square in
    place, no epilogue kernel; against float64, and bit for bit against eager's own ops."""
    launched = []
    real = K.hidden_epilogue
    monkeypatch.setattr(K, "hidden_epilogue", lambda z, **k: launched.append(k) or real(z, **k))
    t = make_inputs(42, 40, 72, residual=True, bias=bias)
    with torch.no_grad():
        y = call(feedforward, t, impl="cublas", activation="relu2")
        y64 = call(feedforward_reference, as64(t), activation="relu2")
        eager = F.linear(F.relu(F.linear(t["x"], t["w_in"], t["b_in"])).square(), t["w_out"], t["b_out"]) + t["residual"]
    assert launched == [] and torch.isfinite(y).all()
    assert rel(y, y64) < TOL[torch.float32], rel(y, y64)
    assert torch.equal(y, eager)
