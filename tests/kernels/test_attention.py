"""truthfuse::attention against a float64 reference, in Triton's interpreter on CPU.

Fresh random inputs every test (conftest reseeds), never zeros; outputs are checked finite so an
unwritten element (torch.empty garbage / NaN poison) fails. The interpreter runs tl.dot in fp32,
so tolerances here are fp32-tight; the GPU's own numbers come from bench/attention_gpu.py.
"""
import importlib
import math
import warnings

import pytest
import torch

from fusion_backend.kernels import attention as tc
from fusion_backend.kernels.attention_l1 import l1_attention_forward
from fusion_backend.ops.attention import (
    attention, attention_config_space, attention_reference, attention_supports, config_key,
    default_attention_config,
)
from fusion_backend.ops import fallback
from fusion_backend.ops.seed import reference_seed

# A kernel that falls back to the PyTorch reference would pass these checks while broken.
pytestmark = pytest.mark.filterwarnings("error::fusion_backend.ops.fallback.FusionFallbackWarning")

METRICS = ["dot", "l2", "l1", "cosine"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(B, H, Hkv, Nq, Nk, D, Dv, dtype=torch.float32):
    return (torch.randn(B, H, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, dtype=dtype))


def run_and_compare(metric, q, k, v, *, scale=None, mask=None, causal=False, tol=1e-4, gtol=1e-3):
    """Forward and backward of the op vs float64 autograd of the reference; grads for every
    floating input that requires one (q, k, v, a tensor scale, a float mask)."""
    gqa = q.shape[1] != k.shape[1]
    ins = [q, k, v] + [t for t in (scale, mask) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    ins = [t.detach().requires_grad_() for t in ins]
    it = iter(ins[3:])
    s_in = next(it) if isinstance(scale, torch.Tensor) else scale
    m_in = next(it) if isinstance(mask, torch.Tensor) and mask.is_floating_point() else mask
    out = attention(ins[0], ins[1], ins[2], metric=metric, scale=s_in, attn_mask=m_in, causal=causal, enable_gqa=gqa)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
    assert torch.isfinite(out).all()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    it = iter(ins64[3:])
    s64 = next(it) if isinstance(scale, torch.Tensor) else scale
    m64 = next(it) if isinstance(mask, torch.Tensor) and mask.is_floating_point() else mask
    ref = attention_reference(ins64[0], ins64[1], ins64[2], metric=metric, scale=s64, attn_mask=m64, causal=causal,
                              enable_gqa=gqa)
    g64 = torch.autograd.grad(ref, ins64, g.double())
    assert rel(out, ref) <= tol, (metric, rel(out, ref))
    for i, (a, b) in enumerate(zip(grads, g64)):
        assert a.shape == b.shape
        assert torch.isfinite(a).all()
        assert rel(a, b) <= gtol, (metric, i, rel(a, b))


@pytest.mark.parametrize("metric", METRICS)
def test_odd_shapes_gqa_causal_float_mask_all_grads(metric):
    q, k, v = make(2, 4, 2, 37, 45, 24, 40)
    scale = torch.rand(4) + 0.2 if metric != "dot" else torch.rand(()) * 0.3 + 0.05
    mask = torch.randn(1, 4, 37, 45)  # learnable bias, broadcast over batch (Swin-V2 style)
    run_and_compare(metric, q, k, v, scale=scale, mask=mask, causal=True)


@pytest.mark.parametrize("metric", ["dot", "l1"])
def test_broadcast_mask_gradient_without_atomic_collisions_when_deterministic(metric):
    """A float mask broadcast over batch and heads gets its gradient from every (b, h): the kernels
    add those into one element by atomics, in no fixed order on a GPU. Under
    torch.use_deterministic_algorithms(True) each (b, h) gets its own plane, summed afterwards,
    and the gradient is still right."""
    mask = torch.randn(1, 1, 19, 23)
    assert tc.mask_grad_buffer(mask, 2, 4, 19, 23)[0].shape == (1, 1, 19, 23)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        buf, strides = tc.mask_grad_buffer(mask, 2, 4, 19, 23)
        assert buf.shape == (2, 4, 19, 23) and strides[0] > 0 and strides[1] > 0
        q, k, v = make(2, 4, 2, 19, 23, 16, 16)
        run_and_compare(metric, q, k, v, scale=0.3 if metric != "dot" else None, mask=mask)
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("metric", METRICS)
def test_decode_and_bool_mask(metric):
    q, k, v = make(1, 2, 2, 1, 123, 40, 40)
    mask = torch.rand(1, 1, 1, 123) > 0.3  # key padding
    run_and_compare(metric, q, k, v, scale=0.3 if metric != "dot" else None, mask=mask)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_negative_and_zero_scales(metric):
    """Per-head scales of both signs and zero, on whole key tiles without masks: the reference's
    output and gradients (the scale's too), and the forward's E_p[raw]."""
    q, k, v = make(2, 4, 4, 33, 128, 16, 16)
    scale = torch.tensor([0.7, -0.4, 0.0, -1.3]) * (3.0 if metric == "cosine" else 1.0)
    run_and_compare(metric, q, k, v, scale=scale)
    # E_p[raw], which the scale gradient is centred on (exact sums do not depend on it, so the
    # gradients above cannot show a wrong one)
    _, stats = tc.attention_forward(q, k, v, scale, metric=metric, stats=True)
    qd, kd = q.double(), k.double()
    if metric == "cosine":
        qd, kd = qd / qd.norm(dim=-1, keepdim=True), kd / kd.norm(dim=-1, keepdim=True)
    raw = qd @ kd.transpose(-1, -2)
    p = torch.softmax(raw * scale.double()[None, :, None, None], dim=-1)
    expected = (p * raw).sum(-1).reshape(-1, raw.shape[2])
    torch.testing.assert_close(stats[1].double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("D", [16, 80, 112])
def test_head_dims(D):
    q, k, v = make(1, 2, 2, 20, 70, D, D)
    run_and_compare("dot", q, k, v)


def _eager_logits(metric, q, k, scale):
    """The hand-written logits the op's metrics stand for, scale (H,) per head."""
    s = scale.view(1, -1, 1, 1)
    if metric == "dot":
        return q @ k.transpose(-1, -2) * s
    if metric == "l2":
        return -s * ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1)
    if metric == "l1":
        return -s * (q[..., :, None, :] - k[..., None, :, :]).abs().sum(-1)
    n = torch.nn.functional.normalize
    return s * (n(q, dim=-1) @ n(k, dim=-1).transpose(-1, -2))


@pytest.mark.parametrize("metric", METRICS)
def test_an_infinite_scale_gives_nan_rows_as_eager(metric):
    """A learnable temperature that reached 0 in a divisor makes its head's scale inf: eager's
    logits are +-inf and every row of that head is NaN, gradients too. The kernels took a row whose
    logits were all -inf (L2 and L1 always, dot for a query whose products are all negative) as
    one that sees no key, and gave it 0 with finite gradients: a NaN loss in eager trained on
    fused. The other head is eager's (a fifteenth fuzz round)."""
    q, k, v = make(1, 2, 2, 7, 9, 8, 8)
    q[0, 1, 3] = -k[0, 1].sum(0).sign() * q[0, 1, 3].abs()  # dot: a row of negative products
    temperature = torch.tensor([2.0, 0.0])
    ins = [t.clone().requires_grad_() for t in (q, k, v, temperature)]
    out = attention(*ins[:3], metric=metric, scale=1 / ins[3])
    ref_ins = [t.clone().requires_grad_() for t in (q, k, v, temperature)]
    ref = torch.softmax(_eager_logits(metric, *ref_ins[:2], 1 / ref_ins[3]), -1) @ ref_ins[2]
    assert torch.isnan(ref[0, 1]).all() and torch.isfinite(ref[0, 0]).all()
    weight = torch.randn_like(ref)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    for got, want in [(out, ref)] + [(a.grad, b.grad) for a, b in zip(ins, ref_ins)]:
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=1e-5, rtol=1e-4)
    # a number scale of inf, as attention() takes it: NaN rows everywhere, as eager
    assert torch.isnan(attention(q, k, v, metric=metric, scale=math.inf)).all()


def test_l2_large_norms_and_per_head_scale_shapes():
    q, k, v = make(1, 3, 3, 33, 50, 64, 64)
    q, k = q + 2.0, k + 2.0
    for shape in [(3,), (3, 1, 1), (1, 3, 1, 1)]:
        run_and_compare("l2", q, k, v, scale=(torch.rand(3) * 0.2 + 0.01).reshape(shape))


def test_l2_fp32_on_vectors_far_from_the_origin():
    """q and k sharing a large common part (coordinates near 40 that differ by 0.3): the kernels'
    expanded form 2 q.k - |k|^2 cancelled (2.6e-2 against float64 here) before the op centred fp32
    q and k on the key mean; eager's subtract-first form is exact there. GQA, so query heads take
    their key head's mean; a learnable per-head scale."""
    q, k, v = make(1, 4, 2, 33, 29, 32, 32)
    q, k = 40.0 + 0.3 * q, 40.0 + 0.3 * k
    run_and_compare("l2", q, k, v, scale=torch.tensor([0.5, 1.0, 0.2, 2.0]) / 0.09, tol=1e-5, gtol=2e-5)


def test_l2_fp32_key_with_an_inf_coordinate_leaves_other_rows_as_eager():
    """The centring skips a coordinate whose mean key is inf: a row whose q.k with that key is
    -inf (q's coordinate negative) keeps eager's finite result, where q - inf made every row of
    the (b, h) NaN. (A row whose q.k is +inf is NaN, documented.)"""
    q, k, v = make(1, 2, 2, 8, 8, 16, 16)
    q[0, 0, :, 5] = -q[0, 0, :, 5].abs()
    k[0, 0, 3, 5] = float("inf")
    out = attention(q, k, v, metric="l2", scale=0.3)
    eager = torch.softmax(-0.3 * ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1), -1) @ v
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)


def test_l2_fp32_keys_a_mask_hides_may_hold_anything():
    """Keys that a bool mask hides (an uninitialized cache) holding 1e18: a mean pulled there left
    q - mean nothing of q, and every row was wrong; the centring leaves such keys' (b, h) alone."""
    q, k, v = make(1, 2, 2, 8, 12, 16, 16)
    q, k = 40.0 + 0.3 * q, 40.0 + 0.3 * k
    k[:, :, 9:] = 1e18
    mask = torch.ones(1, 1, 8, 12, dtype=torch.bool)
    mask[..., 9:] = False
    out = attention(q, k, v, metric="l2", scale=0.5, attn_mask=mask)
    q64, k64, v64 = q.double(), k[:, :, :9].double(), v[:, :, :9].double()
    ref = torch.softmax(-0.5 * ((q64[..., :, None, :] - k64[..., None, :, :]) ** 2).sum(-1), -1) @ v64
    assert torch.isfinite(out).all()
    assert rel(out, ref) <= 5e-3  # uncentred, as before: the expansion's cancellation (1.3e-3), documented


def test_cosine_scale_100_and_mask_2d():
    q, k, v = make(2, 2, 2, 40, 40, 32, 32)
    run_and_compare("cosine", q, k, v, scale=torch.tensor([50.0, 100.0]), mask=torch.randn(40, 40), tol=1e-4,
                    gtol=2e-3)


@pytest.mark.parametrize("metric", ["dot", "l2", "cosine"])
def test_learnable_scale_without_float_mask(metric):
    """A learnable scale without a float mask: causal, GQA, a bool key-padding mask with a fully
    masked row, a negative scale, and large l2 norms (the scale gradient's rows are centred on
    E_p[raw])."""
    q, k, v = make(2, 4, 2, 37, 45, 24, 24)
    if metric == "l2":
        q, k = q + 3.0, k + 3.0  # |k|^2 ~ 250: an uncentred sum would lose the gradient
    scale = torch.tensor([0.2, -0.15, 0.05, 0.3]) * (1.0 if metric != "cosine" else 20.0)
    run_and_compare(metric, q, k, v, scale=scale, causal=True, gtol=1e-4)
    mask = torch.rand(2, 1, 1, 45) > 0.3
    mask[1, 0, 0, :] = False  # batch 1: every key dropped
    run_and_compare(metric, q, k, v, scale=scale, mask=mask, gtol=1e-4)


@pytest.mark.parametrize("metric", ["dot", "l2", "l1"])
@pytest.mark.parametrize("nq", [7, 1])
def test_large_logits_recompute_the_forward_probabilities(metric, nq):
    """Logits near 1e4 and past it (a large temperature, no float mask): each row is one-hot, and
    eager's dV = P^T dO is exact. The backward read the row max back from natural units, which
    rounds by up to an ulp of the max: the top key's probability recomputed as 2**(that error),
    dV 1e-2 to 3e-2 off at 1e4 and up to inf at 1e8 in the draws measured. Head dim 1, so the
    interpreter recomputes the logits bit for bit (its matmuls sum longer dot products in another
    order in the backward, an error of the same size that this test leaves out). Keys one apart, and each query within 0.3 of one of
    them, so that no two logits of a row lie close (there fp32's own rounding of them shows).
    nq=1 takes the split forward (decoding)."""
    q, k, v = make(1, 2, 2, nq, 9, 1, 3)
    k = torch.stack([torch.randperm(9) for _ in range(2)]).float().view(1, 2, 9, 1) - 4.0
    q = k[:, :, torch.randint(0, 9, (nq,))] + (torch.rand(1, 2, nq, 1) - 0.5) * 0.6
    for scale in (1e4, 1e8):
        vv = v.clone().requires_grad_()
        out = attention(q, k, vv, metric=metric, scale=scale)
        g = torch.randn_like(out)
        (dv,) = torch.autograd.grad(out, [vv], g)
        v64 = v.double().requires_grad_()
        ref = attention_reference(q.double(), k.double(), v64, metric=metric, scale=scale)
        (dv64,) = torch.autograd.grad(ref, [v64], g.double())
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dv.double(), dv64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_zero_scale_gradient(metric):
    """scale = 0: every logit is 0 (dQ and dK are 0); the scale and V gradients are still right."""
    q, k, v = make(1, 2, 2, 20, 30, 16, 16)
    scale = torch.zeros(2, requires_grad=True)
    vv = v.clone().requires_grad_()
    out = attention(q, k, vv, metric=metric, scale=scale)
    g = torch.randn_like(out)
    ds, dv = torch.autograd.grad(out, [scale, vv], g)
    s64, v64 = torch.zeros(2, dtype=torch.float64, requires_grad=True), v.double().requires_grad_()
    ref = attention_reference(q.double(), k.double(), v64, metric=metric, scale=s64)
    ds64, dv64 = torch.autograd.grad(ref, [s64, v64], g.double())
    assert torch.isfinite(ds).all() and rel(ds, ds64) < 1e-4 and rel(dv, dv64) < 1e-5


@pytest.mark.parametrize("path", ["kernels", "reference"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_computes_in_its_inputs_dtype_under_autocast(metric, path, monkeypatch):
    """fp32 inputs under CPU autocast to bf16 (a compiled graph's op runs under the caller's
    autocast): the op computes in fp32, as its inputs ask; the PyTorch reference that serves a
    call the kernels cannot take ran its products in bf16 there."""
    A = importlib.import_module("fusion_backend.ops.attention")  # the module, not the function
    if path == "reference":
        monkeypatch.setattr(A, "_use_kernels", lambda *args: False)
    q, k, v = make(1, 2, 2, 20, 24, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run_and_compare(metric, q, k, v, scale=torch.tensor([0.2, 0.3]) if metric == "l2" else 4.0)


@pytest.mark.parametrize("metric", ["l2", "l1"])
def test_eager_path_equals_custom_op(metric, monkeypatch):
    """Plain eager calls take an autograd.Function over the custom ops' implementations; the
    custom op (what torch.compile sees) must give the same bits, dropout and float-mask and
    scale gradients included."""
    import importlib

    A = importlib.import_module("fusion_backend.ops.attention")  # the module, not the function

    q, k, v = make(1, 2, 2, 20, 24, 16, 16)
    scale = torch.tensor([0.2, 0.3], requires_grad=True)
    mask = torch.randn(1, 1, 20, 24, requires_grad=True)
    ins = [t.detach().requires_grad_() for t in (q, k, v)] + [scale, mask]
    g = torch.randn(1, 2, 20, 16)

    def run():
        torch.manual_seed(5)
        out = attention(*ins[:3], metric=metric, scale=scale, attn_mask=mask, dropout_p=0.2)
        return [out.detach()] + list(torch.autograd.grad(out, ins, g))

    eager = run()
    monkeypatch.setattr(A, "plain_eager_call", lambda tensors: False)
    op = run()
    for a, b in zip(eager, op):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_eager_call_under_create_graph_refuses_the_second_backward():
    """A plain eager call's gradients under create_graph=True are the first-order ones, and a
    second backward through them (a gradient penalty) raises: they were constants to it, and
    the penalty's gradient left out every path through the attention (108 against 336)."""
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    g = torch.randn(1, 2, 8, 8)
    (gw,) = torch.autograd.grad((attention(x @ w, k, v) * g).sum(), [w], create_graph=True)
    (want,) = torch.autograd.grad((attention_reference(x @ w, k, v) * g).sum(), [w])
    assert torch.allclose(gw, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="double backward through the fused attention op"):
        torch.autograd.grad(gw.pow(2).sum(), [x])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_forward_mode_ad_carries_the_tangent(requires_grad):
    """Forward-mode AD (torch.autograd.forward_ad) through a plain call: the kernels read the
    primal only, so the tangent was dropped (the result read as having none), or, with an input
    that requires grad, the autograd.Function raised. Such a call takes the reference."""
    import torch.autograd.forward_ad as fwAD

    q, k, v = make(1, 2, 2, 8, 8, 8, 8)
    k.requires_grad_(requires_grad)
    tq, tk = torch.randn_like(q), torch.randn_like(k)
    want = torch.func.jvp(lambda q, k: attention_reference(q, k, v, metric="l2", scale=0.3), (q, k), (tq, tk))
    with fwAD.dual_level(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = attention(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), v, metric="l2", scale=0.3)
        primal, tangent = fwAD.unpack_dual(out)
    assert tangent is not None
    assert rel(primal, want[0]) < 1e-5 and rel(tangent, want[1]) < 1e-5
    assert any(issubclass(w.category, fallback.FusionFallbackWarning) and "forward-mode AD" in str(w.message) for w in seen)


def test_torch_func_transforms_over_a_direct_call():
    """torch.func.grad, vjp, jacrev and vmap over the op take its reference (the kernels cannot
    read a transform's wrapped tensors); grad, vjp and jacrev raised torch's 'must override the
    setup_context staticmethod' from the eager path's autograd.Function."""
    q, k, v = make(1, 2, 2, 6, 6, 4, 4)
    qb = torch.randn(3, 1, 2, 6, 4)

    def run(f):
        grads = torch.func.grad(lambda q, k, v: f(q, k, v).pow(2).sum(), argnums=(0, 1, 2))(q, k, v)
        jac = torch.func.jacrev(f, argnums=1)(q, k, v)
        batched = torch.func.vmap(f, in_dims=(0, None, None))(qb, k, v)
        return list(grads) + [jac, batched]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fallback.FusionFallbackWarning)
        got = run(lambda q, k, v: attention(q, k, v, metric="cosine", scale=3.0, causal=True))
    want = run(lambda q, k, v: attention_reference(q, k, v, metric="cosine", scale=3.0, causal=True))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_normalize_rows_matches_torch():
    x = torch.randn(2, 40, 3, 24).transpose(1, 2)  # a strided (B, H, N, D) view
    x[0, 1, 5] = 0.0  # a zero row: clamped norm, zero output
    xh, nrm = tc.normalize_rows(x)
    assert xh.is_contiguous() and xh.dtype == x.dtype and nrm.shape == x.shape[:3]
    ref_n = x.double().norm(dim=-1).clamp_min(tc.COSINE_EPS)
    assert rel(nrm, ref_n) < 1e-6
    assert rel(xh, x.double() / ref_n[..., None]) < 1e-6
    assert torch.all(xh[0, 1, 5] == 0)


def test_fully_masked_row_gives_zero_and_finite_grads():
    q, k, v = make(1, 1, 1, 5, 7, 16, 16)
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[2] = False
    run_and_compare("dot", q, k, v, mask=mask)
    out = attention(q, k, v, attn_mask=mask)
    assert torch.all(out[0, 0, 2] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    q, k, v = make(1, 2, 2, 33, 33, 40, 40, dtype=dtype)
    run_and_compare("l2", q, k, v, scale=torch.tensor(0.1), tol=1e-2, gtol=2e-2)


@pytest.mark.parametrize("metric", ["dot", "l1"])
def test_poisoned_output_fully_written(metric):
    q, k, v = make(2, 2, 2, 37, 29, 40, 24)
    out = torch.full((2, 2, 37, 24), float("nan"))
    sc = torch.full((2,), 0.2)
    if metric == "l1":
        l1_attention_forward(q, k, v, sc, out=out)
    else:
        tc.attention_forward(q, k, v, sc, metric=metric, out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), metric=metric, scale=0.2)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5


@pytest.mark.parametrize("tile", [(64, 64, 4, {}), (32, 64, 2, {"CONTIG_M": False, "CONTIG_N": False}),
                                  (16, 32, 1, {"CONTIG_M": False})], ids=["4x8", "8x8-strided", "4x4-rows-strided"])
def test_l1_forward_sub_tile_layouts(tile):
    """The L1 forward keeps its scores as a 4-d tile, SUB_M x SUB_N a thread; every layout (sub-tile
    size, contiguous or strided indices a thread) gives the same result on a ragged causal case
    with a bool mask, with every output written."""
    bm, bn, w, extra = tile
    q, k, v = make(1, 2, 2, 45, 70, 24, 16)
    mask = torch.rand(1, 1, 45, 70) > 0.3
    out = torch.full((1, 2, 45, 16), float("nan"))
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=1, **extra)
    sc = torch.tensor([0.3, 0.1])
    l1_attention_forward(q, k, v, sc, causal=True, mask=mask.expand(1, 2, 45, 70), config=cfg, out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), metric="l1", scale=sc.double(), causal=True,
                              attn_mask=mask)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5


def test_l1_sub_tiles_from_the_tile():
    from fusion_backend.kernels.attention_l1 import l1_sub_tiles

    gpu = l1_sub_tiles(dict(BLOCK_M=128, BLOCK_N=128, num_warps=8), interpret=False)
    assert (gpu["SUB_M"], gpu["SUB_N"], gpu["ASM_M"], gpu["PREFETCH"]) == (8, 8, 4, True)
    cpu = l1_sub_tiles(dict(BLOCK_M=64, BLOCK_N=64, num_warps=4), interpret=True)
    assert (cpu["SUB_M"], cpu["SUB_N"], cpu["ASM_M"], cpu["ASM_N"], cpu["PREFETCH"]) == (4, 8, 0, 0, False)
    assert l1_sub_tiles(dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, SUB_M=8, SUB_N=4), True)["SUB_M"] == 8
    with pytest.raises(ValueError, match="supported: 16, 32 or 64"):
        l1_sub_tiles(dict(BLOCK_M=128, BLOCK_N=128, num_warps=4), interpret=False)


@pytest.mark.parametrize("metric", ["dot", "l1"])
def test_dropout_determinism_rate_and_gradient(metric):
    N = 64
    q, k = torch.randn(1, 2, N, 16), torch.randn(1, 2, N, 16)
    v = torch.eye(N).expand(1, 2, N, N).contiguous()  # out = dropped probabilities
    sc = None if metric == "dot" else 0.05
    torch.manual_seed(5); o1 = attention(q, k, v, metric=metric, scale=sc, dropout_p=0.25)
    torch.manual_seed(5); o2 = attention(q, k, v, metric=metric, scale=sc, dropout_p=0.25)
    o3 = attention(q, k, v, metric=metric, scale=sc, dropout_p=0.25)
    assert torch.equal(o1, o2) and not torch.equal(o1, o3)
    assert abs((o1 == 0).float().mean().item() - 0.25) < 0.04
    # backward regenerates the same mask: directional derivative matches finite differences
    qq, kk, vv = (torch.randn(1, 1, 20, 16, requires_grad=True) for _ in range(3))
    torch.manual_seed(9)
    o = attention(qq, kk, vv, metric=metric, scale=sc, dropout_p=0.3)
    grads = torch.autograd.grad(o, (qq, kk, vv), torch.ones_like(o))
    d = [torch.randn_like(t) for t in (qq, kk, vv)]
    eps = 1e-2

    def f(sign):
        torch.manual_seed(9)
        with torch.no_grad():
            return attention(*(t + sign * eps * dt for t, dt in zip((qq, kk, vv), d)), metric=metric, scale=sc,
                             dropout_p=0.3).double().sum()
    fd = ((f(1) - f(-1)) / (2 * eps)).item()
    an = sum((g * dt).sum() for g, dt in zip(grads, d)).item()
    assert abs(fd - an) <= 1e-2 * max(1.0, abs(an))


@pytest.mark.parametrize("metric", ["dot", "l1"])
def test_dropout_kernels_draw_the_references_mask(metric):
    """The kernels' Philox mask is the reference's for the same seed: outputs and gradients of a
    causal, GQA, odd-shaped call with dropout equal the float64 reference given that seed (Nk = 37
    is not a multiple of the eight columns one Philox call covers)."""
    q, k, v = make(2, 4, 2, 19, 37, 16, 8)
    ins = [t.requires_grad_() for t in (q, k, v)]
    sc = None if metric == "dot" else 0.1
    torch.manual_seed(3)
    seed = reference_seed()  # what the op draws after the same reseed
    torch.manual_seed(3)
    out = attention(*ins, metric=metric, scale=sc, causal=True, enable_gqa=True, dropout_p=0.3)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    ref = attention_reference(*ins64, metric=metric, scale=sc, causal=True, enable_gqa=True, dropout_p=0.3,
                              dropout_seed=seed)
    assert (ref == 0).any() and rel(out, ref) < 1e-5
    for a, b in zip(grads, torch.autograd.grad(ref, ins64, g.double())):
        assert rel(a, b) < 1e-4


@pytest.mark.parametrize("metric", METRICS)
def test_tril_bool_mask_skips_the_upper_blocks_with_the_same_result(metric):
    """A bool mask that keeps nothing above the diagonal (a registered tril buffer) lets the
    kernels skip those blocks, as causal=True does; results equal the reference, outputs and
    gradients, for Nq != Nk and sizes that are no multiple of the 64-wide interpreter tiles."""
    Nq, Nk = 130, 150
    keep = torch.ones(Nq, Nk, dtype=torch.bool).tril()
    keep[70, :5] = False  # not exactly the triangle: still nothing kept above it
    assert tc.mask_layout_flags(keep, Nq, Nk, False, "cpu").item() == 1
    q, k, v = make(1, 2, 2, Nq, Nk, 16, 16)
    run_and_compare(metric, q, k, v, scale=0.3 if metric != "dot" else None, mask=keep)


@pytest.mark.parametrize("metric", METRICS)
def test_exact_tril_bool_mask_is_tested_as_a_triangle_with_the_same_result(metric):
    """A bool mask that is exactly the lower triangle is never read by the kernels (they test
    the triangle instead), with dropout too; a transposed (non-contiguous) view of it as well."""
    Nq, Nk = 130, 150
    keep = torch.ones(Nq, Nk, dtype=torch.bool).tril()
    assert tc.mask_layout_flags(keep, Nq, Nk, False, "cpu").item() == 3
    strided = torch.ones(Nk, Nq, dtype=torch.bool).triu().t()  # the same values, column-major
    assert torch.equal(strided, keep) and tc.mask_layout_flags(strided, Nq, Nk, False, "cpu").item() == 3
    q, k, v = make(1, 2, 2, Nq, Nk, 16, 16)
    sc = 0.3 if metric != "dot" else None
    run_and_compare(metric, q, k, v, scale=sc, mask=strided[None, None])
    ins = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    seed = reference_seed()  # what the op draws after the same reseed
    torch.manual_seed(5)
    out = attention(*ins, metric=metric, scale=sc, attn_mask=keep, dropout_p=0.2)
    g = torch.randn_like(out)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    ref = attention_reference(*ins64, metric=metric, scale=sc, attn_mask=keep, dropout_p=0.2, dropout_seed=seed)
    assert rel(out, ref) < 1e-5
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ins64, g.double())):
        assert rel(a, b) < 1e-4


def test_mask_layout_flags_read_the_mask_as_it_is():
    tril = torch.ones(5, 7, dtype=torch.bool).tril()
    assert tc.mask_layout_flags(tril[None, None], 5, 7, False, "cpu").item() == 3
    above = tril.clone()
    above[1, 4] = True
    assert tc.mask_layout_flags(above, 5, 7, False, "cpu").item() == 2  # lower full, upper not empty
    holed = tril.clone()
    holed[4, 0] = False
    assert tc.mask_layout_flags(holed, 5, 7, False, "cpu").item() == 1  # upper empty, lower not full
    holed[0, 6] = True
    assert tc.mask_layout_flags(holed, 5, 7, False, "cpu").item() == 0
    assert tc.mask_layout_flags(tril[:1], 1, 7, False, "cpu").item() == 0  # a single query row: nothing to skip
    assert tc.mask_layout_flags(torch.ones(1, 7, dtype=torch.bool), 5, 7, False, "cpu").item() == 0  # broadcast rows
    assert tc.mask_layout_flags(tril.float(), 5, 7, False, "cpu").item() == 0  # float masks: not bool
    assert tc.mask_layout_flags(tril.expand(2, 1, 5, 7), 5, 7, False, "cpu").item() == 0  # per-batch masks
    assert tc.mask_layout_flags(tril, 5, 7, True, "cpu").item() == 0  # causal: already skipped
    assert tc.mask_layout_flags(None, 5, 7, False, "cpu").item() == 0
    big = torch.ones(300, 700, dtype=torch.bool).tril()  # several tiles in both directions
    assert tc.mask_layout_flags(big, 300, 700, False, "cpu").item() == 3
    big[299, 699] = True
    assert tc.mask_layout_flags(big, 300, 700, False, "cpu").item() == 2


def _sink_reference(q, k, v, sinks, mask=None, causal=False):
    """GPT-OSS's eager form in float64: a sink column in every row's softmax, then dropped."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if causal:
        s = s.masked_fill(~torch.ones(Nq, Nk, dtype=torch.bool).tril(), float("-inf"))
    c = torch.cat([s, sinks.view(1, H, 1, 1).expand(B, H, Nq, 1)], -1)
    return torch.softmax(c - c.max(-1, keepdim=True).values, -1)[..., :-1] @ v


@pytest.mark.parametrize("case", ["gqa", "causal", "finfo_min_mask", "bool_mask_dead_row", "fp16"])
def test_sinks_match_float64(case):
    """Attention sinks (GPT-OSS): output and the gradients of q, k, v and the sinks against
    float64, with grouped K/V, causal, an HF-style finfo.min mask, a bool mask that drops a whole
    row (its output is 0: all its weight goes to the sink), and fp16."""
    dtype = torch.float16 if case == "fp16" else torch.float32
    H, Hkv = (4, 2) if case in ("gqa", "fp16") else (2, 2)
    Nq, Nk = (40, 40) if case == "causal" else (33, 57)
    q, k, v = make(2, H, Hkv, Nq, Nk, 16, 16, dtype=dtype)
    mask = None
    if case == "finfo_min_mask":
        mask = torch.zeros(2, 1, Nq, Nk)
        mask[0, ..., :5] = torch.finfo(torch.float32).min
    elif case == "bool_mask_dead_row":
        mask = torch.rand(2, 1, Nq, Nk) > 0.3
        mask[0, 0, 3] = False
    sinks = torch.randn(H) * 2
    ins = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    out = attention(*ins[:3], sinks=ins[3], attn_mask=mask, causal=case == "causal", enable_gqa=H != Hkv)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    m64 = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    ref = _sink_reference(*ins64, mask=m64, causal=case == "causal")
    g64 = torch.autograd.grad(ref, ins64, g.double())
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert torch.isfinite(out).all() and rel(out, ref) < tol
    for a, b in zip(grads, g64):
        assert torch.isfinite(a).all() and rel(a, b) < 4 * tol, rel(a, b)
    if case == "bool_mask_dead_row":
        assert torch.all(out[0, :, 3] == 0)
    via_ref = attention_reference(*[t.detach() for t in ins[:3]], sinks=sinks, attn_mask=mask,
                                  causal=case == "causal", enable_gqa=H != Hkv)
    assert rel(via_ref, ref) < tol


def test_sinks_validation():
    q, k, v = make(1, 2, 2, 8, 8, 16, 16)
    with pytest.raises(ValueError, match="one logit per query head"):
        attention(q, k, v, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="metric 'dot' only"):
        attention(q, k, v, metric="l2", sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="needs no gradient"):
        attention(q, k, v, scale=torch.ones(2, requires_grad=True), sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="softcap"):
        attention(q, k, v, scale=0.25, softcap=5.0, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="sinks"):
        attention(q, k, v, sinks=torch.zeros(2), config="sdpa")


def test_sinks_opcheck_and_eager_path_equal_custom_op(monkeypatch):
    import importlib

    A = importlib.import_module("fusion_backend.ops.attention")
    q, k, v = (t.requires_grad_() for t in make(1, 2, 2, 9, 11, 16, 16))
    sinks = torch.randn(2, requires_grad=True)
    torch.library.opcheck(torch.ops.truthfuse.attention_fwd.default,
                          (q, k, v, torch.full((2,), 0.25), None, None, "dot", True, 0.0, None, False, 0.0, sinks))
    g = torch.randn(1, 2, 9, 16)

    def run():
        out = attention(q, k, v, scale=0.25, causal=True, sinks=sinks)
        return [out.detach()] + list(torch.autograd.grad(out, [q, k, v, sinks], g))

    eager = run()
    monkeypatch.setattr(A, "plain_eager_call", lambda tensors: False)
    for a, b in zip(eager, run()):
        assert torch.isfinite(a).all() and torch.equal(a, b)


def test_opcheck():
    q, k, v = make(1, 2, 1, 9, 11, 16, 16)
    for t in (q, k, v):
        t.requires_grad_()
    scale = torch.rand(2, requires_grad=True)
    mask = torch.randn(1, 2, 9, 11, requires_grad=True)
    seed = torch.zeros((), dtype=torch.int64)
    args = (q, k, v, scale, mask, seed, "l2", True, 0.0, None, True)
    torch.library.opcheck(torch.ops.truthfuse.attention_fwd.default, args)
    seed = torch.tensor(3, dtype=torch.int64)
    torch.library.opcheck(torch.ops.truthfuse.attention_fwd.default,
                          (q, k, v, scale, None, seed, "dot", False, 0.2, None, False),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_dynamic(backend):
    q, k, v = make(2, 2, 2, 17, 17, 16, 16)
    lam = torch.tensor(0.3, requires_grad=True)

    def f(q, k, v, lam):
        return attention(q, k, v, metric="l2", scale=lam, causal=True).sum()
    cf = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
    for n in (17, 23):
        q, k, v = make(2, 2, 2, n, n, 16, 16)
        for t in (q, k, v):
            t.requires_grad_()
        got = cf(q, k, v, lam)
        gg = torch.autograd.grad(got, (q, k, v, lam))
        ref = f(q, k, v, lam)
        gr = torch.autograd.grad(ref, (q, k, v, lam))
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(gg, gr):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_validation_errors():
    q, k, v = make(1, 4, 2, 8, 8, 16, 16)
    with pytest.raises(ValueError, match="dot, l2, l1, cosine"):
        attention(q, k, v, metric="manhattan", enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        attention(q, k, v)
    q3, k3, v3 = make(1, 4, 3, 8, 8, 16, 16)
    with pytest.raises(ValueError, match="multiple"):
        attention(q3, k3, v3, enable_gqa=True)
    with pytest.raises(ValueError, match="head dims"):
        attention(q, torch.randn(1, 2, 8, 8), v, enable_gqa=True)
    with pytest.raises(ValueError, match="multiple"):  # was a ZeroDivisionError
        attention(q, k[:, :0], v[:, :0], enable_gqa=True)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, enable_gqa=True, dropout_p=1.5)
    with pytest.raises(ValueError, match="broadcast"):
        attention(q, k, v, enable_gqa=True, attn_mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="scale"):
        attention(q, k, v, enable_gqa=True, scale=torch.ones(3))
    with pytest.raises(ValueError, match="must be real"):  # was computed with its real part alone
        attention(q, k, v, enable_gqa=True, scale=torch.tensor(2 + 5j))
    with pytest.raises(ValueError, match="must fit float32"):  # was torch.full's overflow RuntimeError
        attention(q, k, v, enable_gqa=True, scale=1e39)
    empty = torch.randn(1, 2, 8, 0)
    with pytest.raises(ValueError, match="head dim 0 has no default scale"):
        attention(empty, empty, torch.randn(1, 2, 8, 4))


@pytest.mark.parametrize("flag", ["causal", "enable_gqa"])
@pytest.mark.parametrize("value", ["no", None, 1, torch.tensor(False)])
def test_causal_and_enable_gqa_must_be_bools(flag, value):
    # as SDPA's is_causal and enable_gqa; causal="no" was truthy and ran causal attention
    q, k, v = make(1, 2, 2, 4, 4, 16, 16)
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        attention(q, k, v, **{flag: value})


@pytest.mark.parametrize("keyword, hint", [("is_causal", " (did you mean causal?)"), ("metrc", " (did you mean metric?)"),
                                           ("window", "")])
def test_an_unknown_keyword_names_the_keywords(keyword, hint):
    # SDPA's is_causal (ours is causal) gave Python's bare "unexpected keyword argument"
    q, k, v = make(1, 2, 2, 4, 4, 16, 16)
    with pytest.raises(TypeError) as caught:
        attention(q, k, v, **{keyword: True})
    assert str(caught.value) == (f"attention: unknown keyword {keyword!r}{hint}; the keywords are metric, scale, "
                                 "causal, attn_mask, dropout_p, enable_gqa, softcap, sinks, config")


@pytest.mark.parametrize("config", [{"a": 1}, {"BLOCK_M": 64}, {}, 5, ["m64n64w4s1"], ""])
def test_malformed_configs_are_value_errors_before_any_launch(config, monkeypatch):
    # a dict that is no launch config went to the kernels as the key "" (or raised KeyError),
    # failed there and fell back to the reference with a warning; a number raised re's TypeError
    q, k, v = make(1, 2, 2, 4, 4, 16, 16)
    monkeypatch.setattr(tc, "attention_forward", lambda *a, **kw: pytest.fail("launched"))
    with pytest.raises(ValueError, match="config"):
        attention(q, k, v, config=config)
    monkeypatch.undo()
    cfg = attention_config_space("dot", 16, torch.float32, "cpu")[0]
    torch.testing.assert_close(attention(q, k, v, config=cfg), attention(q, k, v, config=config_key(cfg)))


@pytest.mark.parametrize("metric", METRICS)
def test_no_keys_gives_zeros_as_sdpa(metric):
    # Nk = 0: SDPA (and softmax(...) @ v written out) give zeros; the reference's row max raised
    # IndexError (amax over an empty dim)
    q, k, v = make(1, 2, 2, 3, 0, 16, 8)
    mask = torch.zeros(3, 0, requires_grad=True)
    for t in (q, k, v):
        t.requires_grad_()
    with warnings.catch_warnings():  # the kernels take no empty input: the reference computes it
        warnings.simplefilter("ignore", fallback.FusionFallbackWarning)
        out = attention(q, k, v, metric=metric, attn_mask=mask, causal=True)
        dq, dk, dv, dmask = torch.autograd.grad(out.sum(), (q, k, v, mask))
    assert out.shape == (1, 2, 3, 8) and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape
    assert dmask.shape == mask.shape


def test_supports_on_meta_and_fallback_for_big_head_dim():
    q = torch.empty(1, 2, 8, 512, device="meta")
    ok, reason = attention_supports(q, q, q, "dot")
    assert not ok and "head dim" in reason
    ok, _ = attention_supports(torch.empty(1, 2, 8, 64, device="meta"), q[..., :64], q[..., :64], "l1")
    q, k, v = make(1, 1, 1, 4, 4, 300, 300)
    with pytest.warns(UserWarning, match="fell back"):
        out = attention(q, k, v)
    ref = attention_reference(q.double(), k.double(), v.double())
    assert rel(out, ref) < 1e-5


def test_slices_past_32_bit_offsets_fall_back(monkeypatch):
    """The kernels index within one (batch, head) slice with 32-bit offsets. A call whose slice
    spans more (with the limit lowered here, so that small tensors do) takes the reference with a
    warning, and the shape check that the rules consult names the reason. The span follows the
    strides: the same q as a transposed (B, N, H, D) view spans H times more."""
    A = importlib.import_module("fusion_backend.ops.attention")  # the package's `attention` is the op
    monkeypatch.setattr(A, "_MAX_OFFSET", 40 * 16 + 15)
    q, k, v = make(1, 2, 2, 40, 24, 16, 16)
    assert attention_supports(q, k, v, "dot") == (True, "")
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    ok, reason = attention_supports(qt, k, v, "dot")
    assert not ok and "q spans 1264 elements" in reason and "32-bit" in reason
    fallback.reset_fallback_warnings()
    with pytest.warns(fallback.FusionFallbackWarning, match="32-bit"):
        out = attention(qt, k, v)
    assert rel(out, attention_reference(qt.double(), k.double(), v.double())) < 1e-5
    # a mask sliced from a wider buffer (HF's causal mask cut to the keys) spans that buffer's rows
    monkeypatch.setattr(A, "_MAX_OFFSET", 1000)
    wide_mask = torch.randn(40, 60) > 0
    wide_mask[:, 0] = True
    assert attention_supports(q, k, v, "dot", attn_mask=wide_mask[:, :24].contiguous()) == (True, "")
    ok, reason = attention_supports(q, k, v, "dot", attn_mask=wide_mask[:, :24])
    assert not ok and "attn_mask spans 2364 elements" in reason
    # the mask's Nq x Nk plane (its gradient buffer's) counts even for a mask broadcast over rows
    monkeypatch.setattr(A, "_MAX_OFFSET", 40 * 24 - 1)
    row_mask = torch.randn(1, 24)
    ok, reason = attention_supports(q, k, v, "dot", attn_mask=row_mask)
    assert not ok and "40 x 24 mask plane" in reason
    with pytest.warns(fallback.FusionFallbackWarning, match="mask plane"):
        out = attention(q, k, v, attn_mask=row_mask)
    ref = attention_reference(q.double(), k.double(), v.double(), attn_mask=row_mask.double())
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("metric", METRICS)
def test_wide_offsets_code_matches_reference(metric, monkeypatch):
    """Past 2**31 elements a tensor's slice bases need 64 bits, and the launches switch to the
    kernels' WIDE code (`wide_offsets`). No test tensor is that large, so the threshold is lowered
    until every launch takes it: forward, backward (a learnable float mask, GQA, causal, ragged
    sizes), the split forward of a decoding step with a bool mask, and cosine's normalization."""
    monkeypatch.setattr(tc, "WIDE_OFFSETS_FROM", 1)
    assert tc.wide_offsets(None, torch.ones(3)) == {"WIDE": True}
    q, k, v = make(2, 4, 2, 37, 45, 16, 24)
    scale = torch.rand(4) + 0.2 if metric != "dot" else None
    run_and_compare(metric, q, k, v, scale=scale, mask=torch.randn(1, 4, 37, 45), causal=True)
    q, k, v = make(2, 4, 2, 1, 70, 16, 16)
    assert tc.split_applies(1, 2, 0.0)
    run_and_compare(metric, q, k, v, scale=scale, mask=torch.rand(2, 1, 1, 70) > 0.3)


def test_wide_offsets_only_past_the_threshold():
    """Which launches take the WIDE code: a tensor whose last element lies 2**31 elements from its
    base, counted from its strides (a broadcast dimension adds nothing), not from its numel alone."""
    base = torch.empty(4)
    assert tc.wide_offsets(base.as_strided((2**16, 2**15), (0, 0))) == {}  # 2**31 elements, one address
    assert tc.wide_offsets(base, None) == {}
    assert tc.wide_offsets(torch.empty(2, 3, device="meta").as_strided((2, 3), (2**31 - 3, 1))) == {"WIDE": True}
    assert tc.wide_offsets(torch.empty(2, 3, device="meta").as_strided((2, 3), (2**31 - 4, 1))) == {}


def test_config_space_and_keys():
    space = attention_config_space("dot", 64, torch.bfloat16, "cuda")
    assert len(space) > 4
    for cfg in space:
        assert tc.parse_config_key(config_key(cfg)) == cfg
    cfg = default_attention_config("dot", 64, torch.bfloat16, "cuda")
    assert cfg in space
    q, k, v = make(1, 1, 1, 40, 40, 16, 16)
    key = "m32n16w4s1-bm16n32w4s1"
    out = attention(q, k, v, config=key)
    assert rel(out, attention_reference(q.double(), k.double(), v.double())) < 1e-5
    with pytest.raises(ValueError):
        attention(q, k, v, config="blocks-please")


def test_calls_that_skip_blocks_get_their_own_default_tiles():
    """A call whose mask gets kept ranges resolves config=None to the skipping tiles (GPU, half
    precision, head dims 64 and 128), in forward and backward alike; other calls keep the dense
    default. Every such default is a config the kernels can take."""
    from fusion_backend.ops.attention import _resolve_config
    for D in (64, 128):
        dense = default_attention_config("l2", D, torch.bfloat16, "cuda")
        skip = default_attention_config("l2", D, torch.bfloat16, "cuda", skips=True)
        assert skip != dense and (skip["BLOCK_M"], skip["BLOCK_N"]) == (64, 32)
        assert tc._feasible(skip, "l2", D, 2) and tc.parse_config_key(config_key(skip)) == skip
        ranges = tc.new_ranges((1, 1), 8, "cpu")
        assert _resolve_config(None, "l2", D, torch.bfloat16, "cuda", ranges) == skip
        assert _resolve_config(None, "l2", D, torch.bfloat16, "cuda", ranges[:0].flatten()) == dense
        assert _resolve_config(None, "l2", D, torch.bfloat16, "cuda", None) == dense
    for D, dtype in ((256, torch.bfloat16), (64, torch.float32)):  # not measured: the dense tiles
        assert default_attention_config("dot", D, dtype, "cuda", skips=True) == default_attention_config(
            "dot", D, dtype, "cuda")
    # the launchers decide from the mask's shape, as the fake implementation does
    big = torch.ones(1, 1, 1024, 1024, dtype=torch.bool)
    assert tc.ranges_layout(big, 1, 2, 1024, 1024) == (1, 1)
    assert tc.ranges_layout(big[..., :512, :512], 1, 2, 512, 512) is None


def test_key_padding_float_mask_grad_and_noncontiguous_inputs():
    q, k, v = make(2, 2, 2, 19, 31, 16, 16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, N, D) view of a (B, N, H, D) buffer
    run_and_compare("l1", q, k, v, scale=0.2, mask=torch.randn(2, 1, 1, 31))
    run_and_compare("dot", q, k, v, mask=torch.randn(1, 2, 1, 31))


def test_dropout_inside_torch_compile():
    q, k, v = make(1, 2, 2, 16, 16, 16, 16)

    def f(q, k, v):
        return attention(q, k, v, metric="cosine", scale=5.0, dropout_p=0.5)
    cf = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    torch.manual_seed(3); a = cf(q, k, v)
    torch.manual_seed(3); b = cf(q, k, v)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert not torch.equal(a, attention(q, k, v, metric="cosine", scale=5.0))


@pytest.mark.parametrize("case", [dict(ties=True), dict(causal=True, nq=100, nk=77), dict(mask="float", d=32)])
def test_l1_backward_sub_tiles_match_legacy(case):
    """The sub-tile backward kernels (BWD_IMPL 'sub', the default) against the legacy ones, fp32:
    exact ties (sign(0) = 0), uneven lengths with causal masking, a float mask with its gradient."""
    from fusion_backend.kernels import attention_l1 as L1
    torch.manual_seed(0)
    nq, nk, d = case.get("nq", 128), case.get("nk", 128), case.get("d", 64)
    q, k, v = torch.randn(1, 2, nq, d), torch.randn(1, 2, nk, d), torch.randn(1, 2, nk, d)
    if case.get("ties"):
        q, k = (q * 2).round() / 2, (k * 2).round() / 2
    sc = torch.tensor([0.05, 0.1])
    mask = torch.randn(1, 2, nq, nk) if case.get("mask") else None
    cfg = L1.default_l1_config(d, torch.float32, "cpu")
    assert L1.l1_bwd_sub_tiles(dict(BLOCK_M=64, BLOCK_N=64, num_warps=4), d, cfg, True) is not None
    kw = dict(causal=case.get("causal", False), mask=mask, mask_grad=mask is not None)
    o, st = L1.l1_attention_forward(q, k, v, sc, causal=kw["causal"], mask=mask, config=cfg)
    do = torch.randn_like(o)
    a = L1.l1_attention_backward(do, q, k, v, sc, o, st, config=dict(cfg, BWD_IMPL="legacy"), **kw)
    b = L1.l1_attention_backward(do, q, k, v, sc, o, st, config=dict(cfg, BWD_IMPL="sub"), **kw)
    for x, y in zip(a, b):
        if x is not None:
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


# -- soft-capped logits (Gemma 2) ------------------------------------------------------------------

def _capped_reference_grads(ins, g, attn_mask=None, **kw):
    """float64 reference output and gradients of every tensor in ins (q, k, v, then a float mask)."""
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    mask64 = ins64[3] if len(ins64) > 3 else attn_mask
    ref = attention_reference(*ins64[:3], attn_mask=mask64, **kw)
    return ref, torch.autograd.grad(ref, ins64, g.double())


@pytest.mark.parametrize("case", [
    dict(shape=(2, 4, 2, 37, 45, 24), scale=None, cap=50.0, causal=True),  # GQA, odd sizes
    dict(shape=(1, 2, 2, 29, 70, 40), scale=0.5, cap=5.0, mask="float"),  # saturating, learnable bias
    dict(shape=(1, 2, 1, 1, 77, 32), scale=None, cap=30.0, mask="bool"),  # decoding, key padding
])
def test_softcap_matches_float64(case):
    """cap * tanh(scale * q.k / cap) before the mask, forward and every gradient (q, k, v and a float
    mask's, which is taken after the cap), against float64 autograd of the reference."""
    B, H, Hkv, Nq, Nk, D = case["shape"]
    q, k, v = (t * 2 for t in make(B, H, Hkv, Nq, Nk, D, D))  # large logits, so that the cap bites
    ins = [t.requires_grad_() for t in (q, k, v)]
    mask = None
    if case.get("mask") == "float":
        mask = torch.randn(1, H, Nq, Nk).requires_grad_()
        ins.append(mask)
    elif case.get("mask") == "bool":
        mask = torch.rand(1, 1, 1, Nk) > 0.3
    kw = dict(scale=case["scale"], causal=case.get("causal", False), enable_gqa=H != Hkv, softcap=case["cap"])
    out = attention(*ins[:3], attn_mask=mask, **kw)
    assert torch.isfinite(out).all()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)
    ref, g64 = _capped_reference_grads(ins, g, attn_mask=mask, **kw)
    assert rel(out, ref) < 1e-5
    for a, b in zip(grads, g64):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-4
    # the cap is applied: without it the result is 100x further from the reference than the error
    fixed = [t.detach() for t in ins[:3]] + [mask.detach() if mask is not None else None]
    uncapped = attention(*fixed[:3], attn_mask=fixed[3], **dict(kw, softcap=None))
    assert rel(uncapped, ref.detach()) > 1e-3


def test_softcap_with_dropout_draws_the_references_mask():
    q, k, v = make(1, 2, 2, 19, 37, 16, 16)
    ins = [t.requires_grad_() for t in (q, k, v)]
    torch.manual_seed(3)
    seed = reference_seed()
    torch.manual_seed(3)
    out = attention(*ins, causal=True, dropout_p=0.3, softcap=2.0)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)
    ref, g64 = _capped_reference_grads(ins, g, causal=True, dropout_p=0.3, softcap=2.0, dropout_seed=seed)
    assert rel(out, ref) < 1e-5
    assert rel(attention(*(t.detach() for t in ins), causal=True, softcap=2.0), ref.detach()) > 1e-2  # it dropped
    for a, b in zip(grads, g64):
        assert rel(a, b) < 1e-4


def test_softcap_validation_and_sdpa():
    q, k, v = make(1, 2, 2, 8, 8, 16, 16)
    for bad in (0.0, -1.0, math.inf, "50", True):
        with pytest.raises(ValueError, match="softcap must be"):
            attention(q, k, v, softcap=bad)
    with pytest.raises(ValueError, match="metric 'dot' only"):
        attention(q, k, v, metric="l2", scale=0.1, softcap=10.0)
    with pytest.raises(ValueError, match="nonzero number scale"):
        attention(q, k, v, scale=torch.tensor(0.1, requires_grad=True), softcap=10.0)
    with pytest.raises(ValueError, match="soft-cap"):
        attention(q, k, v, softcap=10.0, config="sdpa")


def test_softcap_opcheck():
    q, k, v = make(1, 2, 1, 9, 11, 16, 16)
    for t in (q, k, v):
        t.requires_grad_()
    scale = torch.full((2,), 0.25)
    mask = torch.randn(1, 2, 9, 11, requires_grad=True)
    torch.library.opcheck(torch.ops.truthfuse.attention_fwd.default,
                          (q, k, v, scale, mask, None, "dot", True, 0.0, None, False, 20.0))


# -- block skipping from the mask's kept ranges ---------------------------------------------------

def _band(N, width):
    i = torch.arange(N)
    return (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - width)


def _torch_kept(mask4, float_mask):
    """Which entries count as kept (float rows with nothing kept read every key), by PyTorch."""
    keep = ~(mask4.float() <= -1e30) if float_mask else mask4
    if float_mask:
        keep = keep | ~keep.any(-1, keepdim=True)
    return keep


@pytest.mark.parametrize("kind", ["band_float", "band_bool", "docs_bool", "padding", "dead_rows"])
def test_mask_ranges_hold_every_kept_entry(kind):
    """Each query row's [lo, hi) holds all its kept keys, tight to one tile of the range kernel; a
    bool row with nothing kept is empty, a float one reads every key."""
    B, H, Nq, Nk = 2, 3, 150, 570
    fmin = torch.finfo(torch.float32).min
    band = _band(max(Nq, Nk), 40)[:Nq, :Nk]
    if kind == "band_float":
        mask = torch.zeros(Nq, Nk).masked_fill(~band, fmin)[None, None]
    elif kind == "band_bool":
        mask = band[None, None]
    elif kind == "docs_bool":  # packed documents: block-diagonal, per batch
        i = torch.arange(max(Nq, Nk))
        mask = torch.stack([(i[:Nq, None] // d) == (i[None, :Nk] // d) for d in (37, 64)])[:, None]
    elif kind == "padding":  # key padding on one batch row, broadcast over queries
        mask = torch.zeros(B, 1, 1, Nk)
        mask[0, ..., 300:] = float("-inf")
    else:  # per-head float masks, some rows with nothing kept
        mask = torch.zeros(1, H, Nq, Nk).masked_fill(~band, fmin)
        mask[0, 1, 20:30] = fmin
    m4 = mask.expand(B, H, Nq, Nk)
    r = tc.MaskRanges.compute(m4, B, H, Nq, Nk)
    keep = _torch_kept(m4[:r.bm, :r.hm], mask.dtype != torch.bool)  # broadcast dims: one copy
    cols = torch.arange(Nk)
    lo, hi = r.t[0].long(), r.t[1].long()
    inside = (cols >= lo[..., None]) & (cols < hi[..., None])
    assert not (keep & ~inside).any(), kind  # nothing kept outside the range
    first = torch.where(keep, cols, Nk).amin(-1)
    last = torch.where(keep, cols + 1, 0).amax(-1)
    some = keep.any(-1)
    assert ((first - lo)[some] < 256).all() and ((hi - last)[some] < 256).all(), kind  # tight to a tile
    assert (hi[~some] == 0).all(), kind  # nothing kept (bool): an empty range
    # the clean run: every key in it kept unchanged (bool True, float 0), so the kernels need not read it
    c_lo, c_hi = r.t[2].long(), r.t[3].long()
    in_run = (cols >= c_lo[..., None]) & (cols < c_hi[..., None])
    unchanged = m4[:r.bm, :r.hm] if mask.dtype == torch.bool else m4[:r.bm, :r.hm] == 0
    assert not (in_run & ~unchanged).any(), kind
    assert (c_lo <= c_hi).all(), kind
    if kind in ("docs_bool", "padding"):  # a whole 64-key tile fits (the 40-wide bands have none)
        assert ((c_hi - c_lo) > 0).any(), kind


@pytest.mark.parametrize("case", ["band_float_causal_dropout", "docs_bool_l2_learnable", "dead_float_rows_gqa"])
def test_block_skipping_matches_float64(case, monkeypatch):
    """With the kernels skipping the blocks a mask drops whole (threshold lowered so these small
    masks qualify), outputs and gradients still equal the float64 reference: sliding-window bands,
    packed documents, rows with nothing kept (uniform in eager for a float mask)."""
    monkeypatch.setattr(tc, "_RANGES_MIN_ENTRIES", 0)
    N, fmin = 300, torch.finfo(torch.float32).min  # over the interpreter's 64-wide tiles
    band = _band(N, 50)
    kw, metric, scale = {}, "dot", None
    if case == "band_float_causal_dropout":
        q, k, v = make(1, 2, 2, N, N, 16, 16)
        mask = torch.zeros(N, N).masked_fill(~band, fmin)
        kw = dict(causal=True, dropout_p=0.2)
    elif case == "docs_bool_l2_learnable":
        q, k, v = make(2, 2, 2, N, N, 16, 16)
        i = torch.arange(N)
        mask = (i[:, None] // 70) == (i[None, :] // 70)
        metric, scale = "l2", torch.tensor(0.1)
    else:
        q, k, v = make(1, 4, 2, N, N, 16, 16)
        mask = torch.zeros(1, 4, N, N).masked_fill(~band, fmin)
        mask[0, 2, 100:120] = fmin
        kw = dict(enable_gqa=True)
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(q.shape[0], q.shape[1], N, N)
    ranges = tc.MaskRanges.compute(m4, q.shape[0], q.shape[1], N, N).t
    assert ((ranges[1] - ranges[0]) < N - 64).any()  # some rows skip a whole tile: the test tests skipping
    _masked_call_matches_float64(q, k, v, mask, metric, scale, **kw)


def _masked_call_matches_float64(q, k, v, mask, metric, scale, **kw):
    """The op with `mask` (dropout seeded) against the float64 reference: output, and gradients of
    q, k, v, a tensor scale and a float mask."""
    ins = [t.requires_grad_() for t in (q, k, v)]
    if isinstance(scale, torch.Tensor):
        ins.append(scale.requires_grad_())
    if mask.is_floating_point():
        ins.append(mask.requires_grad_())
    torch.manual_seed(7)
    seed = reference_seed()
    torch.manual_seed(7)
    out = attention(q, k, v, metric=metric, scale=scale, attn_mask=mask, **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, g)
    ins64 = [t.detach().double().requires_grad_() for t in ins]
    it = iter(ins64[3:])
    s64 = next(it) if isinstance(scale, torch.Tensor) else scale
    m64 = next(it) if mask.is_floating_point() else mask
    ref = attention_reference(*ins64[:3], metric=metric, scale=s64, attn_mask=m64, dropout_seed=seed, **kw)
    g64 = torch.autograd.grad(ref, ins64, g.double())
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5
    for a, b in zip(grads, g64):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-4


def _clean_tiles(ranges, block_m, block_n, Nq, Nk):
    """How many (query block, key block) kernel tiles lie inside the clean run of all their rows."""
    c_lo, c_hi = ranges[2].long(), ranges[3].long()
    n = 0
    for i0 in range(0, Nq, block_m):
        lo = c_lo[..., i0:i0 + block_m].amax(-1)
        hi = c_hi[..., i0:i0 + block_m].amin(-1)
        for j0 in range(0, Nk, block_n):
            n += int(((lo <= j0) & (j0 + block_n <= hi)).sum())
    return n


@pytest.mark.parametrize("case", ["docs_bool_causal_gqa", "docs_float_l2_learnable", "biased_docs_float",
                                  "tril_bool_dropout", "docs_tril_bool"])
def test_clean_tiles_match_float64(case, monkeypatch):
    """Tiles inside a mask's clean run (the interior of a document, below the diagonal of a
    triangle) skip the mask read: outputs and gradients still equal the float64 reference. A float
    mask whose kept entries carry a bias has no clean run, and must still be added everywhere."""
    monkeypatch.setattr(tc, "_RANGES_MIN_ENTRIES", 0)
    N, fmin = 300, torch.finfo(torch.float32).min
    i = torch.arange(N)
    docs = (i[:, None] // 150) == (i[None, :] // 150)
    kw, metric, scale = {}, "dot", None
    if case == "docs_bool_causal_gqa":
        q, k, v = make(1, 4, 2, N, N, 16, 16)
        mask, kw = docs, dict(causal=True, enable_gqa=True)
    elif case == "docs_float_l2_learnable":
        q, k, v = make(2, 2, 2, N, N, 16, 16)
        mask = torch.zeros(N, N).masked_fill(~docs, fmin)
        metric, scale = "l2", torch.tensor(0.1)
    elif case == "biased_docs_float":
        q, k, v = make(1, 2, 2, N, N, 16, 16)
        mask = (torch.rand(N, N) - 0.5).masked_fill(~docs, fmin)
    elif case == "tril_bool_dropout":  # an exact triangle: the launch specialized as causal runs
        q, k, v = make(1, 2, 2, N, N, 16, 16)
        mask, kw = i[None, :] <= i[:, None], dict(dropout_p=0.2)
    else:  # nothing kept above the diagonal, but not the triangle: the launch that reads the mask
        q, k, v = make(1, 2, 2, N, N, 16, 16)
        mask = docs & (i[None, :] <= i[:, None])
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(q.shape[0], q.shape[1], N, N)
    ranges = tc.MaskRanges.compute(m4, q.shape[0], q.shape[1], N, N).t
    clean = _clean_tiles(ranges, 64, 64, N, N)  # the interpreter's attention tiles
    assert (clean == 0) if case == "biased_docs_float" else (clean > 0), clean
    _masked_call_matches_float64(q, k, v, mask, metric, scale, **kw)


def test_range_pass_finds_the_layout_flags():
    """For a bool mask shared by every batch and head, the ranges' pass also finds the layout
    flags (an exact lower triangle runs the causal specialization), equal to those of the
    separate layout pass used for smaller masks; other masks get none."""
    N = 200
    i = torch.arange(N)
    tril = i[None, :] <= i[:, None]
    holed = tril.clone()
    holed[150, 3] = False
    docs = (i[:, None] // 64) == (i[None, :] // 64)
    for mask, want in ((tril, 3), (holed, 1), (docs & tril, 1), (docs, 0), (torch.ones(N, N, dtype=torch.bool), 2)):
        r = tc.MaskRanges.compute(mask.expand(2, 3, N, N), 2, 3, N, N)
        assert int(r.flags) == want == int(tc._device_flags(mask, N, N))
    per_head = tril.expand(1, 3, N, N).clone()
    assert int(tc.MaskRanges.compute(per_head.expand(2, 3, N, N), 2, 3, N, N).flags) == 0
    assert int(tc.MaskRanges.compute(torch.zeros(N, N).expand(2, 3, N, N), 2, 3, N, N).flags) == 0


def test_clean_tiles_are_not_read(monkeypatch):
    """The kernels take the ranges' word for it: with NaN written into the mask inside the clean
    runs after the ranges were found, forward and backward are unchanged bit for bit (a kernel
    that read a clean tile would carry the NaN), and NaN outside the runs still reaches the result."""
    monkeypatch.setattr(tc, "_RANGES_MIN_ENTRIES", 0)
    N = 300
    i = torch.arange(N)
    mask = torch.zeros(1, 1, N, N).masked_fill(((i[:, None] // 150) != (i[None, :] // 150)), float("-inf"))
    q, k, v = make(1, 2, 2, N, N, 16, 16)
    m4 = mask.expand(1, 2, N, N)
    found = tc.MaskRanges.compute(m4, 1, 2, N, N).t.clone()
    assert _clean_tiles(found, 64, 64, N, N) > 0
    monkeypatch.setattr(tc.MaskRanges, "compute",
                        classmethod(lambda cls, m4, B, H, Nq, Nk, out=None: cls(
                            out.copy_(found) if out is not None else found.clone(), Nq, Nk)))
    c_lo, c_hi = found[2, 0, 0].long(), found[3, 0, 0].long()
    in_run = torch.zeros(N, N, dtype=torch.bool)  # the 64 x 64 kernel tiles inside all their rows' runs
    for i0 in range(0, N, 64):
        lo, hi = c_lo[i0:i0 + 64].max(), c_hi[i0:i0 + 64].min()
        for j0 in range(0, N, 64):
            if lo <= j0 and j0 + 64 <= hi:
                in_run[i0:i0 + 64, j0:j0 + 64] = True
    assert in_run.sum() >= 64 * 64
    poisoned = mask.clone()
    poisoned[0, 0][in_run] = float("nan")

    def step(m):
        ins = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention(*ins, attn_mask=m)
        return (out,) + torch.autograd.grad(out, ins, torch.ones_like(out))
    for a, b in zip(step(poisoned), step(mask)):
        assert torch.equal(a, b)
    outside = mask.clone()  # a kept entry in a tile that is read (it straddles two documents)
    outside[0, 0, 140, 145] = float("nan")
    assert not in_run[140, 145] and torch.isnan(step(outside)[0]).any()


def test_block_skipping_through_the_custom_ops(monkeypatch):
    """The forward hands its mask ranges to the backward as a third output: opcheck's fake tensors
    agree with the real ones, and a compiled call (aot_eager, fullgraph) equals the eager one."""
    monkeypatch.setattr(tc, "_RANGES_MIN_ENTRIES", 0)
    N = 140
    q, k, v = make(1, 2, 2, N, N, 16, 16)
    for t in (q, k, v):
        t.requires_grad_()
    mask = torch.zeros(1, 2, N, N).masked_fill(~_band(N, 30), torch.finfo(torch.float32).min).requires_grad_()
    torch.library.opcheck(torch.ops.truthfuse.attention_fwd.default,
                          (q, k, v, torch.full((2,), 0.25), mask, None, "dot", False, 0.0, None, False, 0.0))
    ranges = torch.ops.truthfuse.attention_fwd.default(q, k, v, torch.full((2,), 0.25), mask, None, "dot", False,
                                                       0.0, None, False, 0.0)[2]
    assert ranges.shape == (5, 1, 2, N) and ranges.dtype == torch.int32

    def f(q, k, v, mask):
        return attention(q, k, v, attn_mask=mask)
    g = torch.randn(1, 2, N, 16)
    want = torch.autograd.grad(f(q, k, v, mask), (q, k, v, mask), g)
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, mask), (q, k, v, mask), g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    # odd tiles: a dK/dV key tile of 8, a forward tile of 32 x 16
    odd = torch.autograd.grad(attention(q, k, v, attn_mask=mask, config="m32n16w4s1-bm32n8w4s1"), (q, k, v, mask), g)
    for a, b in zip(odd, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_reference_forward_then_kernel_backward(metric, monkeypatch):
    """A forward kernel that fails falls back to the reference; the backward may still run on the
    kernels, from the reference's row stats: they use the kernels' raw scores, so the gradients
    (the learnable scale's included) stay right."""
    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")
    monkeypatch.setattr(tc, "attention_forward", broken)
    fallback.reset_fallback_warnings()  # the one warning per process and reason comes here
    q, k, v = make(1, 2, 2, 37, 45, 16, 16)
    with pytest.warns(fallback.FusionFallbackWarning, match="simulated compile failure"):
        run_and_compare(metric, q * 2, k * 2 + 1, v, scale=torch.rand(2) + 0.2, causal=True)


def test_block_skipping_with_a_mask_expanded_by_the_caller(monkeypatch):
    """A mask the caller expanded over the batch (stride 0, shape B) gets ranges per batch row from
    the op's shape-based layout: the same result as the shared mask, no fallback."""
    monkeypatch.setattr(tc, "_RANGES_MIN_ENTRIES", 0)
    N = 120
    q, k, v = make(2, 2, 2, N, N, 16, 16)
    shared = torch.zeros(1, 1, N, N).masked_fill(~_band(N, 25), float("-inf"))
    a = attention(q, k, v, attn_mask=shared)
    b = attention(q, k, v, attn_mask=shared.expand(2, 1, N, N))
    assert torch.equal(a, b)
    assert rel(a, attention_reference(q.double(), k.double(), v.double(), attn_mask=shared.double())) < 1e-5


# ----------------------------------------------------------------------------------------------
# The split forward: a few query rows against many keys (decoding)
# ----------------------------------------------------------------------------------------------
def _one_pass_and_split(monkeypatch, q, k, v, scale, **kw):
    """(out, row stats) of the forward through the split kernels, then through the one-pass kernel
    (the split path turned off): `attention_forward`, or for metric l1 `l1_attention_forward`."""
    assert tc.split_applies(q.shape[2], q.shape[1] // k.shape[1], 0.0)
    forward = tc.attention_forward
    if kw.get("metric") == "l1":
        forward = l1_attention_forward
        kw = {key: val for key, val in kw.items() if key != "metric"}
    split = forward(q, k, v, scale, **kw)
    monkeypatch.setattr(tc, "SPLIT_MAX_QUERIES", 0)
    one_pass = forward(q, k, v, scale, **kw)
    monkeypatch.undo()
    return split, one_pass


@pytest.mark.parametrize("case", ["gqa_float_mask", "l2_stats", "cosine_causal", "softcap_bool", "sinks_dead_row",
                                  "exact_tril", "tril_not_exact", "one_split_sinks", "one_split_l2_stats",
                                  "l1_gqa_float_mask", "l1_causal_bool", "one_split_l1"])
def test_split_forward_equals_the_one_pass_kernel(case, monkeypatch):
    """Output and every row statistic the backward reads (max, log2 sum, E_p[raw]) are the same as
    the one-pass kernel's, to fp32 rounding: the splits are joined exactly, so the backward needs
    nothing new. Several splits per row, with empty ones under causal; or, with enough (b, kv head)
    programs to fill the device, one split that writes the result itself. L1 against its own
    one-pass kernel."""
    H, Hkv, Nq, Nk, D = 8, 2, 3, 300, 24
    B = 4 if case.startswith("one_split") else 2
    kw = dict(metric="dot")
    mask = None
    if case in ("gqa_float_mask", "l1_gqa_float_mask"):
        mask = torch.randn(2, 1, Nq, Nk)
        kw = dict(metric="l1" if case.startswith("l1") else "dot")
    elif case == "l1_causal_bool":
        mask = torch.rand(2, H, Nq, Nk) > 0.4
        kw = dict(metric="l1", causal=True)
    elif case == "one_split_l1":
        kw = dict(metric="l1")
    elif case == "l2_stats":
        kw = dict(metric="l2", stats=True)
    elif case == "cosine_causal":
        kw = dict(metric="cosine", causal=True, stats=True)
    elif case == "softcap_bool":
        kw = dict(metric="dot", softcap=2.0, stats=False)
        mask = torch.rand(2, H, Nq, Nk) > 0.5
    elif case in ("sinks_dead_row", "one_split_sinks"):
        mask = torch.rand(B, 1, Nq, Nk) > 0.3
        mask[1, 0, 2] = False
        kw = dict(metric="dot", sinks=torch.randn(H), stats=False)
    elif case == "one_split_l2_stats":
        kw = dict(metric="l2", stats=True)
    elif case in ("exact_tril", "tril_not_exact"):  # a shared bool mask: the two-launch pair
        Nq = 4
        mask = torch.ones(Nq, Nk, dtype=torch.bool).tril()
        if case == "tril_not_exact":
            mask[3, 1] = False
    q, k, v = make(B, H, Hkv, Nq, Nk, D, 40)
    scale = torch.rand(H) + 0.2 if case != "softcap_bool" else torch.full((H,), 0.5)  # the cap takes one scale
    n_splits = tc.split_plan(B, Hkv, Nq, Nk, tc._pad_dim(D), False, q.device)[0]
    assert (n_splits == 1) == case.startswith("one_split")
    (out_s, st_s), (out_1, st_1) = _one_pass_and_split(monkeypatch, q, k, v, scale, mask=mask, **kw)
    # L1's split forward sums each distance in another order than the one-pass kernel (chunks of
    # head dims, each a tree): the logits differ in fp32 rounding
    assert torch.isfinite(out_s).all() and rel(out_s, out_1) < (4e-6 if kw["metric"] == "l1" else 1e-6)
    assert torch.allclose(st_s, st_1, rtol=1e-5, atol=1e-5, equal_nan=True)
    ref = attention_reference(q.double(), k.double(), v.double(), metric=kw["metric"],
                              scale=0.5 if case == "softcap_bool" else scale.double(),
                              causal=kw.get("causal", False), attn_mask=mask, enable_gqa=True,
                              softcap=kw.get("softcap"), sinks=kw.get("sinks"))
    assert rel(out_s, ref) < 1e-5
    if "sinks" in case:
        assert torch.all(out_s[1, :, 2] == 0)


def test_split_forward_writes_every_output_row_and_trains():
    """Poisoned output fully written, and gradients (q, k, v, a learnable l2 scale) through the
    split forward's statistics against float64."""
    q, k, v = make(3, 6, 3, 2, 257, 40, 40)
    out = torch.full((3, 6, 2, 40), float("nan"))
    tc.attention_forward(q, k, v, torch.full((6,), 0.2), metric="l2", out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), metric="l2", scale=0.2, enable_gqa=True)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5
    run_and_compare("l2", q, k, v, scale=torch.rand(6) * 0.3 + 0.05, mask=torch.rand(3, 1, 2, 257) > 0.2)
    out = torch.full((3, 6, 2, 40), float("nan"))
    l1_attention_forward(q, k, v, torch.full((6,), 0.05), out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), metric="l1", scale=0.05, enable_gqa=True)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5
    run_and_compare("l1", q, k, v, scale=torch.rand(6) * 0.1 + 0.02, mask=torch.randn(3, 1, 2, 257))


def test_l1_split_forward_with_many_packed_rows():
    """64 packed rows (16 query heads of one kv head, 4 query rows each), and one row per program
    (multi-head attention, Nq=1, head dim not a power of two): every output row is written and
    matches float64."""
    q, k, v = make(1, 16, 1, 4, 200, 16, 24)
    mask = torch.rand(1, 1, 4, 200) > 0.3
    assert tc.split_applies(4, 16, 0.0)
    out = torch.full((1, 16, 4, 24), float("nan"))
    l1_attention_forward(q, k, v, torch.full((16,), 0.2), mask=mask, out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), metric="l1", scale=0.2, attn_mask=mask,
                              enable_gqa=True)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5
    q, k, v = make(2, 3, 3, 1, 150, 40, 24)
    out = torch.full((2, 3, 1, 24), float("nan"))
    l1_attention_forward(q, k, v, torch.full((3,), 0.1), out=out)
    ref = attention_reference(q.double(), k.double(), v.double(), metric="l1", scale=0.1)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-5


def test_split_plan():
    """Enough splits to fill the device, each a whole number of key tiles covering every key once;
    a causal call (top-left) visits only the first Nq keys."""
    cpu = torch.device("cpu")
    n, length, tile = tc.split_plan(1, 2, 1, 1000, 64, False, cpu)
    assert length % tile[0] == 0 and (n - 1) * length < 1000 <= n * length
    assert n == tc.SPLIT_WAVES * tc._sm_count(cpu) // 2
    assert tc.split_plan(64, 8, 1, 1000, 64, False, cpu)[0] == 1
    assert tc.split_plan(1, 2, 3, 1000, 64, True, cpu)[:2] == (1, 64)
    assert tc.split_plan(1, 2, 1, 1000, 64, False, cpu, max_block_n=32)[2][0] == 32
    # L1: a decoding step of multi-head attention is one row, not padded to 16; its tiles fit the
    # element budget, the key tile a multiple of 16 and the head-dim chunk a power of two
    small = tc.SPLIT_L1_SMALL_ROWS
    assert tc.l1_split_rows(1) == 1 and tc.l1_split_rows(small) == small and tc.l1_split_rows(small + 1) == 16
    for rows, d, dv in ((1, 64, 64), (4, 128, 128), (16, 64, 64), (64, 256, 256), (2, 16, 256)):
        bn, chunk = tc.l1_split_tile(rows, d, dv, 128)
        assert bn >= 16 and bn % 16 == 0 and chunk & (chunk - 1) == 0 and chunk <= d
        assert rows * bn * chunk <= tc.SPLIT_L1_TILE_ELEMENTS or chunk == 1
        assert rows < 16 or rows * bn <= tc.SPLIT_L1_MAX_SCORES  # one head-dim column a step
        assert rows >= 16 or rows * bn * dv <= tc.SPLIT_L1_TILE_ELEMENTS or bn == 16
    assert tc.split_applies(16, 4, 0.0) and tc.split_applies(1, 64, 0.0)
    assert not tc.split_applies(17, 1, 0.0) and not tc.split_applies(2, 64, 0.0) and not tc.split_applies(1, 8, 0.1)


def test_split_forward_with_kept_ranges_for_the_backward(monkeypatch):
    """A mask big enough for kept ranges (threshold lowered here) with few query rows: the split
    forward reads every key, and still fills the ranges that the backward skips by. Outputs and
    gradients against float64, with a sliding window that drops whole key tiles."""
    monkeypatch.setattr(tc, "_RANGES_MIN_ENTRIES", 0)
    Nq, Nk = 3, 400
    q, k, v = make(2, 4, 2, Nq, Nk, 16, 16)
    j = torch.arange(Nk)
    mask = ((j >= 250) & (j < 330)).expand(2, 1, Nq, Nk).clone()  # a window: keys 250-329 only
    mask[1, 0, 1] = False  # a row that keeps nothing
    assert tc.ranges_layout(mask, 2, 4, Nq, Nk) is not None and tc.split_applies(Nq, 2, 0.0)
    _masked_call_matches_float64(q, k, v, mask, "dot", None, enable_gqa=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_l2_key_parts_add_up_to_half_the_squared_norm(dtype):
    """The l2 forward's key parts (`l2_key_parts`): bf16 for 16-bit keys, three of them carrying
    fp32's 24 bits of -|k|^2/2; one fp32 part for fp32 keys; zeros in the rest of each row. An
    overflowing |k|^2 gives -inf then zeros, not NaN."""
    k = (torch.randn(2, 3, 37, 24) * 3).to(dtype)
    k[1, 2, 5] = 1e4 if dtype == torch.float16 else 1e20
    # the GPU's choice of dtype (the interpreter takes fp32 parts: its bf16 products are wrong)
    parts = tc.l2_key_parts(k, dtype=torch.float32 if dtype == torch.float32 else torch.bfloat16)
    n_parts = 1 if dtype == torch.float32 else 3
    assert parts.dtype == (torch.float32 if dtype == torch.float32 else torch.bfloat16)
    assert parts.shape == (6, 37, 16)
    assert (parts[..., n_parts:] == 0).all()
    half_sq = -0.5 * (k.double() ** 2).sum(-1).reshape(6, 37)
    total = parts.double().sum(-1)
    finite = torch.isfinite(half_sq.float())
    assert (total[finite] - half_sq[finite]).abs().le(2.5e-7 * half_sq[finite].abs()).all()
    if dtype == torch.float32:  # 1e20 squared overflows fp32, as eager's (q - k)**2 does
        assert total[5, 5].item() == float("-inf")  # (b, h) = (1, 2): row 1 * 3 + 2, key 5
        assert not parts.isnan().any()


@pytest.mark.parametrize("case", ["plain", "causal_gqa", "bool_mask", "float_mask", "far_from_origin"])
def test_l2_forward_key_parts_equal_the_fma_form(case, monkeypatch):
    """The l2 forward adds -|k|^2/2 by a product with the key parts (KEXT) in half units, its
    row statistic E_p[raw] stored back in whole units: outputs, row stats and E_p[raw] equal the
    FMA-per-score form's and float64's, and the backward (which reads them) is unchanged."""
    B, H, Hkv, Nq, Nk, D = 1, 4, 2 if case == "causal_gqa" else 4, 19, 37, 24
    q, k, v = make(B, H, Hkv, Nq, Nk, D, D)
    if case == "far_from_origin":
        q, k = q + 3.0, k + 3.0
    mask = None
    if case == "bool_mask":
        mask = torch.rand(B, 1, Nq, Nk) > 0.3
    elif case == "float_mask":
        mask = torch.randn(1, H, Nq, Nk)
    scale = torch.rand(H) * 0.3 + 0.05
    k_rep = k.repeat_interleave(H // Hkv, dim=1)
    results = {}
    for on in (True, False):
        monkeypatch.setattr(tc, "L2_KEY_PARTS_ON", on)
        out = torch.full((B, H, Nq, D), float("nan"))
        _, stats = tc.attention_forward(q, k, v, scale, metric="l2", causal=case == "causal_gqa", mask=mask,
                                        out=out, stats=True)
        results[on] = (out, stats)
    (out_p, st_p), (out_f, st_f) = results[True], results[False]
    assert torch.isfinite(out_p).all() and torch.isfinite(st_p).all()
    torch.testing.assert_close(out_p, out_f, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(st_p, st_f, atol=2e-5, rtol=2e-5)
    logits = -scale.double().view(1, H, 1, 1) * ((q.double()[..., :, None, :] - k_rep.double()[..., None, :, :]) ** 2).sum(-1)
    if case == "causal_gqa":
        logits = logits.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool).triu(1), float("-inf"))
    elif case == "bool_mask":
        logits = logits.masked_fill(~mask, float("-inf"))
    elif case == "float_mask":
        logits = logits + mask.double()
    p = torch.softmax(logits, -1)
    # off the origin the expanded form cancels (the op centres such inputs first; not here)
    assert rel(out_p, p @ v.repeat_interleave(H // Hkv, dim=1).double()) < (2e-5 if case == "far_from_origin" else 2e-6)
    # the kernels' raw score: 2 q.k - |k|^2 (|q|^2 cancels in the softmax)
    q64, k64 = q.double(), k_rep.double()
    raw = 2 * q64 @ k64.transpose(-2, -1) - (k64 ** 2).sum(-1)[..., None, :]
    expected_rbar = (p * raw).sum(-1).reshape(B * H, Nq)
    torch.testing.assert_close(st_p[1].double(), expected_rbar, atol=1e-3, rtol=1e-4)


def test_l2_key_whose_squared_norm_overflows_gets_no_weight():
    """A key of 1e20 (|k|^2 overflows fp32, as eager's (q - k)**2 does): eager gives it weight 0
    and the rest a finite softmax; the key parts must not turn its -inf into NaN."""
    q, k, v = make(1, 2, 2, 9, 15, 16, 16)
    k[0, 1, 4] = 1e20
    out = attention(q, k, v, metric="l2", scale=0.4)
    eager = torch.softmax(-0.4 * ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1), -1) @ v
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)


def test_dropout_default_config_reaches_the_backward_unpipelined_at_head_dim_64():
    """The default launch config of a call that drops probabilities, as the op resolves it: at
    head dim 64 on a GPU both backward kernels load unpipelined (one stage: ptxas serializes
    their wgmma products under the dropout draws otherwise), the forward and every tile as
    without dropout; other head dims and dropout-free calls are unchanged."""
    ops_attention = importlib.import_module("fusion_backend.ops.attention")  # the module, not the op
    no_ranges = torch.empty(0)
    plain = ops_attention._resolve_config(None, "l2", 64, torch.bfloat16, "cuda", no_ranges, 0.0)
    dropping = ops_attention._resolve_config(None, "l2", 64, torch.bfloat16, "cuda", no_ranges, 0.1)
    assert (dropping["bwd_num_stages"], dropping["dq_num_stages"]) == (1, 1)
    assert plain["bwd_num_stages"] > 1 and plain["dq_num_stages"] > 1
    assert {k: v for k, v in dropping.items() if not k.endswith("_stages")} == \
        {k: v for k, v in plain.items() if not k.endswith("_stages")}
    assert dropping["num_stages"] == plain["num_stages"]
    for d in (32, 128):
        assert ops_attention._resolve_config(None, "dot", d, torch.bfloat16, "cuda", no_ranges, 0.1) == \
            ops_attention._resolve_config(None, "dot", d, torch.bfloat16, "cuda", no_ranges, 0.0)
    assert tc.parse_config_key(tc.config_key(dropping)) == dropping
