"""Forms that look like attention but mean something else (or something the op cannot reproduce
exactly): explain() reports them as kept near-misses with the reason, and the compiled model still
equals eager."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion_backend
from fusion_backend import FusionWarning

from .checks import OPTIONS, assert_fused, assert_matches_eager, assert_near_miss, qkv
from .models import MHA, MaskedFill, NonScalarScale, ReturnsWeights, SoftmaxOverQueries


def test_softmax_over_queries():
    assert_near_miss(SoftmaxOverQueries(), *qkv(), reason="softmax over dim -2")
    assert_matches_eager(SoftmaxOverQueries(), *qkv())


def test_scale_varies_per_key():
    assert_near_miss(NonScalarScale(), *qkv(), reason="neither a scalar nor per-head")
    assert_matches_eager(NonScalarScale(), *qkv())


def test_a_scale_per_batch_and_head_is_named_as_a_scale():
    """The model's one scale, per (batch, head): the reason said "scale2 of shape (2, 2, 1, 1)",
    the name of the pattern's second optional product, which names nothing in the user's code."""
    class PerBatchAndHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.rand(2, 2, 1, 1) + 0.1)

        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * self.s, -1) @ v

    sites = assert_near_miss(PerBatchAndHead(), *qkv(), reason="a scale of shape (2, 2, 1, 1) is neither")
    assert not any("scale2" in s.reason for s in sites), [s.reason for s in sites]


def test_attention_weights_returned():
    assert_near_miss(ReturnsWeights(), *qkv(), reason="also used outside the pattern")
    assert_matches_eager(ReturnsWeights(), *qkv())


class _ReturnsCausalWeights(nn.Module):
    """Causal attention (a constant additive triangle, as HF's eager masks) whose probabilities
    are also returned, or not."""

    def __init__(self, returns=True):
        super().__init__()
        self.returns = returns

    def forward(self, q, k, v):
        n = q.shape[-2]
        causal = torch.full((n, n), float("-inf"), device=q.device).triu(1)
        a = torch.softmax(q @ k.transpose(-2, -1) * 0.35 + causal, dim=-1)
        return (a @ v, a) if self.returns else a @ v


@pytest.mark.parametrize("causal", [False, True])
def test_one_kept_entry_per_place_named_after_the_rule_that_applies(causal):
    """Where the general and the causal rule both match a place and its probabilities are returned,
    explain() lists it once: under the causal rule only where the mask is the causal triangle."""
    if causal:  # not returned, the causal rule fuses it
        assert_fused(_ReturnsCausalWeights(returns=False), *qkv(), variant="dot", rule="attention.dot_causal")
    sites = assert_near_miss(_ReturnsCausalWeights() if causal else ReturnsWeights(), *qkv(),
                             reason="also used outside the pattern")
    attention = [s for s in sites if s.kind == "attention"]
    assert [s.rule for s in attention] == ["attention.dot_causal" if causal else "attention.dot"], \
        [(s.rule, s.reason) for s in attention]


def test_multihead_attention_weights_returned():
    x = torch.randn(2, 8, 16)
    assert_near_miss(MHA(need_weights=True), x, reason="attention weights returned")


def test_finite_fill_is_not_absorbed():
    # -1e4 is not "minus infinity" to softmax: a fully masked row is not uniform in eager
    mask = torch.rand(8, 8) > 0.5
    assert_near_miss(MaskedFill(-1e4), *qkv(), mask, reason="is not -inf")
    assert_matches_eager(MaskedFill(-1e4), *qkv(), mask)


class AddBias(nn.Module):
    def forward(self, q, k, v, bias):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.35 + bias, dim=-1) @ v


def test_bias_that_broadcasts_the_scores_up():
    # (2, 3, 8, 8) + a (2, 1, 8, 8)-shaped score would make 3 "heads" out of 1: not the op's shape
    q, k, v = qkv(H=1)
    bias = torch.randn(2, 3, 8, 8)
    assert_near_miss(AddBias(), q, k, v, bias, reason="does not broadcast to the scores")
    assert_matches_eager(AddBias(), q, k, v, bias)


class SharedKeys(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.35, dim=-1) @ v


def test_keys_shared_by_heads_but_values_not():
    # one key head for every query head, but a value head each: not grouped-query attention
    q, _, v = qkv()
    k = torch.randn(2, 1, 8, 8)
    assert_near_miss(SharedKeys(), q, k, v, reason="(broadcasting)")
    assert_matches_eager(SharedKeys(), q, k, v)


def test_keys_broadcast_over_the_batch():
    q, _, _ = qkv()
    k, v = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    assert_near_miss(SharedKeys(), q, k, v, reason="(broadcasting)")
    assert_matches_eager(SharedKeys(), q, k, v)


class NoTemperature(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(torch.cdist(q, k) ** 2, dim=-1) @ v


def test_distance_without_temperature():
    # softmax(+distance) favours far keys: not the L2 attention the op computes
    assert_near_miss(NoTemperature(), *qkv(), reason="without a temperature")


class SDPAMaskOtherDtype(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask).float()


def test_sdpa_float64():
    q, k, v = qkv()
    assert_near_miss(SDPAMaskOtherDtype(), q, k, v, torch.zeros(8, 8, dtype=torch.float64), reason="float64")


class SDPAMixedDtypes(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_mixed_dtypes_under_autocast_fuse():
    # Llama's sdpa path under torch.autocast: rotated q, k in fp32, v in bf16. SDPA casts all three
    # to bf16, and so does the replacement (autocast_dtype); the site was kept ("q, k, v dtypes
    # differ"). The result is eager's: bf16, within bf16 rounding.
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_fused(SDPAMixedDtypes(), q, k, v.bfloat16(), variant="dot", rule="attention.sdpa")
        eager = SDPAMixedDtypes()(q, k, v.bfloat16())
        fused = torch.compile(SDPAMixedDtypes(), backend=fusion_backend.backend(**OPTIONS))(q, k, v.bfloat16())
    assert fused.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), eager.float(), atol=2e-2, rtol=2e-2)


def test_multihead_attention_bias_kv():
    mha = nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True)

    def f(x):
        return mha(x, x, x, need_weights=False)[0]

    assert_near_miss(f, torch.randn(2, 8, 16), reason="bias_k is set")


class TensorCapped(nn.Module):
    """Soft-capped scores with a learnable cap: the kernels take a number."""

    def __init__(self):
        super().__init__()
        self.cap = nn.Parameter(torch.tensor(50.0))

    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(2, 3)) * q.size(-1) ** -0.5
        s = torch.tanh(s / self.cap) * self.cap
        return torch.matmul(F.softmax(s, dim=-1), v)


def test_soft_cap_that_is_a_tensor_is_kept():
    sites = assert_near_miss(TensorCapped(), *qkv(), reason="soft cap")
    # the reason names the tensor by its shape: it read "the soft cap FakeTensor(..., size=()) is ..."
    assert any(s.reason == "the soft cap (a tensor of shape ()) is not a nonzero Python number" for s in sites), \
        [s.reason for s in sites]
    assert_matches_eager(TensorCapped(), *qkv())


class _FiveDimScale(nn.Module):
    """A one-element scale of rank 5 makes the scores (and the output) rank 5."""

    def __init__(self):
        super().__init__()
        self.register_buffer("lam", torch.full((1, 1, 1, 1, 1), 0.3))

    def forward(self, q, k, v):
        return torch.softmax(-torch.cdist(q, k) ** 2 * self.lam, -1) @ v


def test_one_element_scale_that_broadcasts_the_scores_up():
    q, k, v = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)  # a near-miss, not a replacement that fails
        assert_near_miss(_FiveDimScale(), q, k, v, reason="neither a scalar nor per-head")
    assert_matches_eager(_FiveDimScale(), q, k, v)


class _BufferCache(nn.Module):
    """A KV cache kept as buffers and written in place, as HF's static cache is; `late` moves the
    key's write to where a fused op that reads its inputs at the site's end could see it."""

    def __init__(self, late=False):
        super().__init__()
        self.late = late
        self.register_buffer("k_cache", torch.randn(2, 4, 12, 16))
        self.register_buffer("v_cache", torch.randn(2, 4, 12, 16))


class _CacheWrittenInPlace(_BufferCache):
    """The cache written, then read by SDPA; late: read first and written after."""

    def forward(self, q, k, v):
        if self.late:
            out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache)
        self.k_cache[:, :, 4:4 + k.shape[2]] = k
        self.v_cache[:, :, 4:4 + v.shape[2]].copy_(v)
        if self.late:
            return out
        return F.scaled_dot_product_attention(q, self.k_cache, self.v_cache)


def _cache_inputs():
    return torch.randn(2, 4, 3, 16), torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 16)


def _compiled_equals_eager_and_writes_the_cache_alike(model, twin, q, k, v):
    """From one state, the model run eagerly and its twin compiled give the same output and leave
    the same cache behind."""
    model.load_state_dict(twin.state_dict())
    want = model(q, k, v)
    got = torch.compile(twin, backend="truthfuse", options=OPTIONS)(q, k, v)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(twin.k_cache, model.k_cache, atol=0, rtol=0)


def test_cache_written_in_place_before_attention_reads_it():
    torch.manual_seed(0)
    q, k, v = _cache_inputs()
    model, twin = _CacheWrittenInPlace(), _CacheWrittenInPlace()
    assert_fused(model, q, k, v, variant="dot", rule="attention.sdpa")
    _compiled_equals_eager_and_writes_the_cache_alike(model, twin, q, k, v)


def test_cache_written_in_place_after_attention_read_it():
    q, k, v = _cache_inputs()
    sites = assert_near_miss(_CacheWrittenInPlace(late=True), q, k, v, reason="written in place")
    assert {s.rule for s in sites if s.kind == "attention"} == {"attention.sdpa"}


def test_reasons_name_values_as_the_users_code_does():
    """A kept site's reason named graph values by their FX names ('l_self_buffers_k_cache_,
    transpose may be written in place', 'intermediate value a is also used'); it names a graph
    input by the expression it came from and another value with the line that made it."""
    q, k, v = _cache_inputs()
    sites = assert_near_miss(_EagerCacheWrittenInPlace(True), q, k, v, reason="written in place")
    reason = next(s.reason for s in sites if s.kind == "attention")
    assert reason.startswith("self.k_cache, transpose (patterns/test_attention_near_misses.py:"), reason
    assert "l_self_buffers" not in reason
    sites = assert_near_miss(ReturnsWeights(), *qkv(), reason="also used outside the pattern")
    assert all("(patterns/models.py:" in s.reason for s in sites if s.kind == "attention"), [s.reason for s in sites]


class _EagerCacheWrittenInPlace(_BufferCache):
    """Attention written out (matmul, softmax, matmul) over the cache: the key written before its
    transpose (HF's static cache under eager attention: fused), or, late, between the transpose,
    a view of the cache, and the product that reads it (kept: eager reads the new values there)."""

    def forward(self, q, k, v):
        self.v_cache.index_copy_(2, torch.arange(4, 4 + v.shape[2]), v)
        if not self.late:
            self.k_cache.index_copy_(2, torch.arange(4, 4 + k.shape[2]), k)
        keys_t = self.k_cache.transpose(-1, -2)
        if self.late:
            self.k_cache.index_copy_(2, torch.arange(4, 4 + k.shape[2]), k)
        scores = torch.matmul(q, keys_t) / 4.0
        return torch.matmul(torch.softmax(scores, dim=-1), self.v_cache)


@pytest.mark.parametrize("write_between", [False, True])
def test_written_out_attention_over_a_cache_written_in_place(write_between):
    torch.manual_seed(0)
    q, k, v = _cache_inputs()
    model, twin = _EagerCacheWrittenInPlace(write_between), _EagerCacheWrittenInPlace(write_between)
    if write_between:
        assert_near_miss(model, q, k, v, reason="written in place")
    else:
        assert_fused(model, q, k, v, variant="dot")
    # explain() ran the model and wrote its cache: the helper starts both from the twin's state
    _compiled_equals_eager_and_writes_the_cache_alike(model, twin, q, k, v)


class _HeadDimZero(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, q, k, v):
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


@pytest.mark.parametrize("form", ["sdpa", "hand_written"])
def test_head_dim_zero_is_kept_as_empty(form):
    """q and k with head dim 0: every logit is 0 and eager's rows are the mean of v. The SDPA rule's
    replacement failed to build (the op's default scale 1/sqrt(0)), which kept the site with a
    FusionWarning that reads as a truthfuse bug; both forms are now kept with a reason."""
    q, k, v = torch.randn(1, 2, 3, 0), torch.randn(1, 2, 4, 0), torch.randn(1, 2, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)
        assert_near_miss(_HeadDimZero(form), q, k, v, reason="head dim 0")
        assert_matches_eager(_HeadDimZero(form), q, k, v)


class _DropoutOfAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = 0.1

    def forward(self, q, k, v):
        return F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1), self.p, True) @ v


def test_a_dropout_probability_that_changes_to_one_is_a_near_miss():
    """A probability changed between calls becomes a symbolic float; at 1.0 the replacement, which
    guards on the value, failed to build (a FusionWarning that calls itself a truthfuse bug)
    instead of the near-miss a constant 1.0 gets."""
    import fusion_backend

    model, (q, k, v) = _DropoutOfAttribute(), qkv()
    backend = fusion_backend.backend(**OPTIONS)
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)
        for p in (0.1, 0.3, 1.0):
            model.p = p
            out = compiled(q, k, v)
    assert out.abs().max() == 0
    last = [s for s in backend.records[-1].sites if s.kind == "attention"]
    assert last and all(s.decision == "kept" and "dropout probability 1.0 is outside [0, 1)" in s.reason
                        for s in last), [(s.decision, s.reason) for s in last]
    torch._dynamo.reset()


class _NumberScale(nn.Module):
    """Dot-product attention scaled by Python numbers, written as `spelling`; Gemma 2's soft cap
    when `cap` is given; SDPA with scale=c when spelling is "sdpa"."""

    def __init__(self, spelling, c, cap=None):
        super().__init__()
        self.spelling, self.c, self.cap = spelling, c, cap

    def forward(self, q, k, v):
        if self.spelling == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, scale=self.c)
        s = q @ k.transpose(-2, -1)
        s = s / self.c if self.spelling == "div" else s * self.c
        if self.cap is not None:
            s = torch.tanh(s / self.cap) * self.cap
        return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("spelling,c,cap", [("div", 1e-45, None), ("mul", 1e20, None), ("mul", float("inf"), None),
                                            ("sdpa", 1e39, None), ("mul", 1e39, 10.0)])
def test_a_number_scale_past_float32_is_kept(spelling, c, cap):
    """A number scale past float32's range (s / 1e-45 is s * 1e45; two scales of 1e20 make 1e40;
    SDPA's scale; a soft cap's scale times the cap): the op takes the scale in fp32, and the fused
    call raised RuntimeError "value cannot be converted to type float without overflow" where eager's
    fp32 scores are inf and its rows NaN. The site is kept with that reason, and the compiled model
    gives eager's result (NaN included; finite with the cap)."""
    model = _NumberScale(spelling, c, cap)
    if spelling == "mul" and cap is None and c == 1e20:
        model.forward = lambda q, k, v: torch.softmax(q @ k.transpose(-2, -1) * 1e20 * 1e20, -1) @ v
    q, k, v = qkv()
    assert_near_miss(model, q, k, v, reason="is not a finite float32 number")
    compiled = torch.compile(model, backend="truthfuse", options=OPTIONS)
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v), equal_nan=True)
    torch._dynamo.reset()


@pytest.mark.parametrize("c,cap", [(1e39, None), (1e39, 10.0)])
def test_a_number_scale_past_float32_under_dynamic_true_is_kept(c, cap):
    """Under torch.compile(dynamic=True) the module's float scale (and cap) are SymFloats: the
    float32 range check skipped them, and the replacement failed to build ('a number scale must fit
    float32'), a FusionWarning. They are read at the call's value now: a near-miss with the reason
    (a fourteenth fuzz round)."""
    model, (q, k, v) = _NumberScale("mul", c, cap), qkv()
    backend = fusion_backend.backend(**OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)
        out = torch.compile(model, backend=backend, dynamic=True)(q, k, v)
    torch.testing.assert_close(out, model(q, k, v), equal_nan=True)
    sites = [s for r in backend.records for s in r.sites if s.kind == "attention"]
    assert sites and all(s.decision == "kept" and "is not a finite float32 number" in s.reason for s in sites), \
        [(s.rule, s.decision, s.reason) for s in sites]
    torch._dynamo.reset()


class _FillAttribute(nn.Module):
    def __init__(self, fill):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, mask):
        return (q @ k.transpose(-2, -1) * 0.35).masked_fill(~mask, self.fill).softmax(-1) @ v


def test_masked_fill_value_of_an_attribute_under_dynamic_true():
    """Under dynamic=True the module's fill is a SymFloat: the site was kept as 'masked_fill value
    is not a Python number' for a fill of -1e9. It is read at the call's value now (guarded): -1e9
    fuses, a row it hides whole included, and a fill changed to -1e4 compiles anew and is kept
    with its own reason (a fourteenth fuzz round)."""
    model = _FillAttribute(-1e9)
    q, k, v = qkv(T=6)
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True
    mask[0, 0, 2] = False  # a row hidden whole: uniform in eager
    backend = fusion_backend.backend(**OPTIONS)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for fill in (-1e9, -1e4):
        model.fill = fill
        with warnings.catch_warnings():
            warnings.simplefilter("error", FusionWarning)
            torch.testing.assert_close(compiled(q, k, v, mask), model(q, k, v, mask), atol=2e-5, rtol=2e-4)
    sites = [[(s.decision, s.reason) for s in r.sites if s.kind == "attention"] for r in backend.records]
    assert len(sites) == 2 and sites[0] and all(d == "fused" for d, _ in sites[0]), sites
    assert sites[1] and all(d == "kept" and "masked_fill value -10000.0" in why for d, why in sites[1]), sites
    torch._dynamo.reset()
    model.fill = -1e9
    assert_matches_eager(model, q, k, v, mask, dynamic=True)


def test_dtensor_inputs_are_a_near_miss(tmp_path):
    """Attention on DTensors (tensor parallelism: heads sharded over a mesh) matched, and tracing
    the replacement failed ("truthfuse.attention_fwd.default got mixed torch.Tensor and DTensor"):
    the site was kept with a FusionWarning that calls itself a truthfuse bug. The fused ops take
    plain tensors, so such a site is a near-miss naming the DTensor. (SDPA on CPU DTensors fails in
    eager already: DTensor has no sharding strategy for its CPU flash kernel.)"""
    from torch.distributed.tensor import Shard

    from .checks import assert_dtensor_site_kept, one_rank_mesh

    def written(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.35, dim=-1) @ v

    with one_rank_mesh(tmp_path) as mesh:
        assert_dtensor_site_kept(written, qkv(B=1, H=2, T=6, D=8), mesh, "attention", [Shard(1)])


class _ItemScale(nn.Module):
    """A learnable temperature read as a Python number with .item()."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(0.35))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * self.t.item(), dim=-1) @ v


def test_scale_read_with_item_under_capture_scalar_outputs():
    """With capture_scalar_outputs, t.item() is a number the graph reads while it runs (an unbacked
    symbol). The replacement guarded on it to take it as a constant, which failed the whole compile
    (BackendCompilerFailed: GuardOnDataDependentSymNode); the site is now a near-miss, and the
    compiled model follows the temperature as training changes it."""
    model = _ItemScale()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        assert_near_miss(model, *qkv(), reason="is read from a tensor while the graph runs")
        compiled = torch.compile(model, backend="truthfuse", options=OPTIONS)
        for t in (0.35, 2.0):
            with torch.no_grad():
                model.t.fill_(t)
            q, k, v = qkv()
            torch.testing.assert_close(compiled(q, k, v), model(q, k, v))


def test_queries_of_a_data_dependent_count_say_so():
    """Queries picked by a boolean mask under capture_dynamic_output_shape_ops have a size known
    only while the graph runs: the site is kept (a constraint cannot decide on it), and its reason
    says so in one line instead of torch's GuardOnDataDependentSymNode message and its hints."""
    class Picked(nn.Module):
        def forward(self, x, keep, k, v):
            q = x[keep].unsqueeze(0).unsqueeze(0)
            return torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v

    fn = Picked()

    x, keep = torch.randn(10, 8), torch.rand(10) > 0.4
    k, v = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        sites = assert_near_miss(fn, x, keep, k, v, reason="known only while the graph runs (data-dependent")
        assert all("Could not guard" not in s.reason.split(": ", 1)[0] and "\n" not in s.reason for s in sites)
        assert_matches_eager(fn, x, keep, k, v)


class _ClampedScores(nn.Module):
    """XGLM: the masked scores clamped from below with torch.max(scores, tensor(finfo.min))."""

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1) * 0.3 + mask
        s = torch.max(s, torch.tensor(torch.finfo(s.dtype).min))
        return torch.softmax(s, dim=-1) @ v


class _ScoresAcrossAGraphBreak(nn.Module):
    """The scores computed in one graph and the softmax in the next (DeBERTa's .item() break)."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * 0.3
        torch._dynamo.graph_break()
        return torch.softmax(s, dim=-1) @ v


class _HeadsSecondEinsum(nn.Module):
    """Funnel: q, k, v laid out (B, N, H, D), scores and output by einsums over the head dim in
    place, and the padding mask subtracted."""

    def forward(self, q, k, v, pad):
        s = torch.einsum("bind,bjnd->bnij", q, k) * 0.3 - pad[:, None, None, :] * 1e6
        return torch.einsum("bnij,bjnd->bind", torch.softmax(s, dim=-1), v)


class _AttentionPooling(nn.Module):
    """Scores from a Linear, not from q and k: not q.k attention, and not reported as attention."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(8, 1)

    def forward(self, x):
        return torch.softmax(self.score(x).transpose(-2, -1), dim=-1) @ x


def _pad(B=2, S=8):
    pad = torch.zeros(B, S)
    pad[0, -3:] = 1.0
    return pad


@pytest.mark.parametrize("case, reason", [
    ("clamp", "the scores are clamped with torch.max"),
    ("graph_break", "the scores come into this graph as an input (s): a graph break"),
    ("einsum", "the scores are an einsum 'bind,bjnd->bnij'"),
])
def test_attention_no_rule_lines_up_with_is_reported_with_what_is_in_the_way(case, reason):
    """Attention that no rule lined up with at all (XGLM's clamp, a graph break between the scores
    and the softmax, Funnel's einsums over the head dim and subtracted mask) was missing from
    explain(), which said no attention site was found: it is listed as kept, naming what stands
    in the way. The compiled model equals eager."""
    torch.manual_seed(0)
    q, k, v = qkv()
    mask = torch.zeros(2, 1, 1, 8)
    mask[0, ..., -3:] = torch.finfo(torch.float32).min
    model, inputs = {"clamp": (_ClampedScores(), (q, k, v, mask)),
                     "graph_break": (_ScoresAcrossAGraphBreak(), (q, k, v)),
                     "einsum": (_HeadsSecondEinsum(), (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       _pad()))}[case]
    sites = assert_near_miss(model, *inputs, reason=reason)
    assert [s.rule for s in sites if s.kind == "attention"] == ["(no rule)"], sites
    if case == "einsum":
        assert "a term is subtracted from the scores" in sites[0].reason
        assert "the probabilities meet v in an einsum 'bnij,bjnd->bind'" in sites[0].reason
    assert_matches_eager(model, *inputs)


def test_softmax_over_scores_from_a_linear_is_not_reported_as_attention():
    report = fusion_backend.explain(_AttentionPooling(), torch.randn(2, 8, 8), options=OPTIONS)
    torch._dynamo.reset()
    assert not [s for s in report.sites if s.kind == "attention"], str(report)


class _ProbabilitiesLiveAcrossAGraphBreak(nn.Module):
    """I-BERT in training: a graph break after the attention (QuantAct's asserts), and code after
    it that names the probabilities (returned only with output_attentions): Dynamo returns them
    from the attention's graph."""

    def __init__(self):
        super().__init__()
        self.output_attentions = False

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1)
        out = p @ v
        torch._dynamo.graph_break()
        return (out, p) if self.output_attentions else out


def test_probabilities_kept_live_by_a_graph_break_say_so():
    """The probabilities were reported as "used outside the pattern (for example attention weights
    returned to the caller)" where the model returns none: the reason also says that the graph
    returns them, to the caller or to the code after a graph break."""
    sites = assert_near_miss(_ProbabilitiesLiveAcrossAGraphBreak(), *qkv(), reason="is also used outside the pattern")
    assert any("this graph returns it, to the caller or to the code after a graph break" in s.reason for s in sites)
    assert_matches_eager(_ProbabilitiesLiveAcrossAGraphBreak(), *qkv())


class _CosineSimilarityAttention(nn.Module):
    """Cosine attention written with F.cosine_similarity over broadcast queries and keys."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v):
        if self.spelling == "unsqueeze":
            cos = F.cosine_similarity(q.unsqueeze(-2), k.unsqueeze(-3), dim=-1)
        else:
            cos = F.cosine_similarity(q[..., :, None, :], k[..., None, :, :], -1, 1e-6)
        return torch.softmax(cos * 10.0, dim=-1) @ v


@pytest.mark.parametrize("spelling", ["unsqueeze", "indexed"])
def test_cosine_similarity_attention_is_a_near_miss(spelling):
    # F.cosine_similarity clamps the norms at eps (1e-8) and differentiates through the clamp; the
    # fused cosine op is F.normalize's (1e-12, no gradient through it): a zero query row (padding
    # through a projection without bias) gets a dq 1e4 times eager's. The site was not reported at
    # all ("no attention site was found"); it is kept, and explain says why and what fuses.
    model = _CosineSimilarityAttention(spelling)
    q, k, v = qkv()
    q[0, 1, 2] = 0.0
    assert_near_miss(model, q, k, v, reason="F.cosine_similarity clamps the norms")
    assert_matches_eager(model, q, k, v)
