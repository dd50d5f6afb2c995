"""Issue 4: every listed way of writing attention is found, fused with the right variant, and
matches eager in outputs and gradients (fp32, Triton interpreter). One small model per form."""
import copy
import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion_backend
from .checks import OPTIONS, assert_fused, assert_matches_eager, assert_near_miss, explain_sites, qkv
from .models import (MHA, SDPA, CosineAttention, DotAttention, L1Attention, L2Attention, MaskedFill, MaskedFillRepeatKV,
                     MaskedFillThenAdd)


def _pad_mask(B=2, S=8, dtype=torch.float32):
    """HF-style additive padding mask (B, 1, 1, S): 0 to keep, finfo.min for padded keys."""
    mask = torch.zeros(B, 1, 1, S, dtype=dtype)
    mask[0, ..., :3] = torch.finfo(dtype).min
    return mask


# ------------------------------------------------------------------------------------------------
# 1. hand-written dot-product attention
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", ["mul_float", "div_sqrt", "pow", "size", "tensor"])
def test_dot_scales(scale):
    model = DotAttention(scale=scale, causal="tril")
    assert_fused(model, *qkv(), variant="dot", rule="attention.dot")
    assert_matches_eager(model, *qkv())


@pytest.mark.parametrize("causal", ["tril", "where", "additive", "finfo"])
def test_dot_causal_masks(causal):
    model = DotAttention(causal=causal, upcast=causal == "finfo")
    assert_fused(model, *qkv(), variant="dot")
    assert_matches_eager(model, *qkv())


class AddedMask(torch.nn.Module):
    """softmax(q k^T / sqrt(d) + mask) v with a mask built from constants in forward."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        T, S = q.size(-2), k.size(-2)
        i = torch.arange(T)[:, None]
        j = torch.arange(S)[None, :]
        if self.kind == "hf_causal":  # HF's eager mask: arange comparison, finfo.min fill
            mask = torch.zeros(()).masked_fill(~(j <= i), torch.finfo(torch.float32).min)
        elif self.kind == "hf_5_17_causal":  # transformers 5.17 starts from torch.tensor(0.0)
            mask = torch.tensor(0.0, dtype=q.dtype).masked_fill(~(j <= i), torch.finfo(q.dtype).min)
        elif self.kind == "triu_inf":
            mask = torch.full((T, S), float("-inf")).triu(1)
        elif self.kind == "shifted":  # one more key visible: not SDPA's causal triangle
            mask = torch.full((T, S), float("-inf")).triu(2)
        else:  # "finite": -1e4 is not absorbed, so it is a bias, not a mask
            mask = torch.zeros(()).masked_fill(~(j <= i), -1e4)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1) @ v


@pytest.mark.parametrize("kind", ["hf_causal", "hf_5_17_causal", "triu_inf", "shifted", "finite"])
def test_constant_added_mask(kind):
    """A constant added mask that is exactly the causal triangle becomes causal=True (rule
    attention.dot_causal); any other is passed as a float mask (attention.dot). Both exact."""
    model = AddedMask(kind)
    causal = kind in ("hf_causal", "hf_5_17_causal", "triu_inf")
    assert_fused(model, *qkv(), variant="dot", rule="attention.dot_causal" if causal else "attention.dot")
    assert_matches_eager(model, *qkv())
    if kind == "hf_causal":  # Nq != Nk: SDPA's causal is the top-left triangle, as is this mask
        assert_fused(model, *qkv(T=5, S=9), variant="dot", rule="attention.dot_causal")
        assert_matches_eager(model, *qkv(T=5, S=9))


class TwoBiases(torch.nn.Module):
    """T5's eager attention: unscaled scores, plus a learned position bias, plus a mask (an
    additive padding mask passed in, or HF's constant causal mask)."""

    def __init__(self, H=2, T=8, S=8, mask="padding"):
        super().__init__()
        self.position_bias = torch.nn.Parameter(torch.randn(1, H, T, S))
        self.mask = mask

    def forward(self, q, k, v, pad=None):
        s = torch.matmul(q, k.transpose(2, 3)) * 1.0 + self.position_bias
        if self.mask == "padding":
            s = s + pad
        else:
            i = torch.arange(q.size(-2))[:, None]
            j = torch.arange(k.size(-2))[None, :]
            s = s + torch.zeros(()).masked_fill(~(j <= i), torch.finfo(torch.float32).min)
        return torch.softmax(s, dim=-1) @ v


def test_two_added_terms_position_bias_and_padding():
    """Both additive terms reach the op as one mask, and the position bias gets its gradient."""
    model = TwoBiases()
    q, k, v = qkv()
    assert_fused(model, q, k, v, _pad_mask(), variant="dot", rule="attention.dot")
    assert_matches_eager(model, q, k, v, _pad_mask())


def test_two_added_terms_with_a_constant_causal_mask():
    """The outer term proven causal becomes causal=True; the position bias stays a mask."""
    model = TwoBiases(mask="causal")
    assert_fused(model, *qkv(), variant="dot", rule="attention.dot_causal")
    assert_matches_eager(model, *qkv())


class BiasBeforeScale(torch.nn.Module):
    """Falcon's ALiBi path: (q.k + alibi) * inv_norm + mask, scores upcast to fp32 first; the
    slopes are learnable here so that their gradient is checked too."""

    def __init__(self, H=2, S=8, metric="dot"):
        super().__init__()
        self.slopes = torch.nn.Parameter(torch.rand(H, 1, 1))
        self.S, self.metric = S, metric

    def forward(self, q, k, v, pad):
        alibi = self.slopes * torch.arange(self.S, dtype=torch.float32)
        if self.metric == "dot":
            s = (q @ k.transpose(-1, -2)).to(torch.float32)
        else:
            s = torch.cdist(q, k) ** 2
        s = s + alibi
        s *= -0.5 if self.metric == "l2" else 1 / math.sqrt(q.size(-1))
        return torch.softmax(s + pad, dim=-1) @ v


@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_additive_term_before_the_scale(metric):
    model = BiasBeforeScale(metric=metric)
    q, k, v = qkv()
    assert_fused(model, q, k, v, _pad_mask(), variant=metric)
    assert_matches_eager(model, q, k, v, _pad_mask())


def _dead_rows():
    """Query rows 0-2 of batch 0 see no key (causal + padding of keys 0-2): a real loss ignores
    them (padded positions), so their outputs get no gradient."""
    live = torch.ones(2, 1, 8, 1)
    live[0, :, :3] = 0
    return live


def test_dot_padding_mask_with_fully_masked_rows():
    # finfo.min padding on the first keys plus causal masking leaves query rows 0-2 of batch 0 with
    # no visible key: eager gives them a uniform average of v, and so must the fused op
    model = DotAttention(causal="tril", pad=True, upcast=True)
    q, k, v = qkv()
    assert_fused(model, q, k, v, _pad_mask(), variant="dot")
    assert_matches_eager(model, q, k, v, _pad_mask(), loss_mask=_dead_rows())


@pytest.mark.parametrize("fill", [-1e9, torch.finfo(torch.float32).min])
def test_dot_masked_fill_with_fully_masked_rows(fill):
    # the Annotated Transformer's scores.masked_fill(mask == 0, -1e9), MPT's finfo.min; batch 0
    # pads keys 0-2, so with the causal mask its rows 0-2 see nothing: eager fills every score of
    # those rows, makes them uniform over all keys and gives q and k no gradient through them.
    # The loss reads those rows too (a model whose loss reads padded positions found this).
    model = MaskedFill(fill)
    mask = ~torch.ones(8, 8, dtype=torch.bool).tril()
    mask = mask | (torch.arange(8) < 3)[None, None, None, :] & torch.tensor([True, False])[:, None, None, None]
    q, k, v = qkv()
    assert_fused(model, q, k, v, mask, variant="dot")
    assert_matches_eager(model, q, k, v, mask)


def test_constants_of_a_replacement_are_registered_with_the_graph():
    # a finite fill becomes a constant tensor in the replacement; fx warned where it was a plain
    # attribute of the graph module rather than a buffer
    import warnings

    mask = torch.rand(2, 1, 8, 8) < 0.3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(MaskedFill(-1e9), backend="truthfuse", options=OPTIONS)(*qkv(), mask)
    assert not [w for w in caught if "get_attr" in str(w.message)], [str(w.message) for w in caught]
    torch._dynamo.reset()


def test_masked_fill_rows_filled_whole_with_grouped_kv_heads():
    # the rows' mean of v is taken per K/V head and read by each of its query heads
    model = MaskedFillRepeatKV(torch.finfo(torch.float32).min)
    q, k, v = torch.randn(2, 4, 8, 8), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, :2] = True   # rows 0-1 of batch 0 masked whole
    mask[1, :, 3, 5:] = True
    assert_fused(model, q, k, v, mask, variant="dot")
    assert_matches_eager(model, q, k, v, mask)


def test_finite_fill_followed_by_an_added_mask_is_a_near_miss():
    # masked_fill(m, -1e9) and then + bias: a row m masks whole is softmax(-1e9 + bias) in eager,
    # not uniform; with m an input the rule cannot rule such rows out, so the site is kept
    model = MaskedFillThenAdd(-1e9)
    q, k, v = qkv()
    mask = torch.rand(2, 1, 8, 8) < 0.3
    assert_near_miss(model, q, k, v, mask, _pad_mask(), reason="may mask whole rows")


def test_dot_padding_mask_fp16():
    # fp16's finfo.min (-65504) masks: eager's fp16 addition absorbs them in fully masked rows
    model = DotAttention(causal="tril", pad=True)
    q, k, v = (t.half() for t in qkv())
    pad = _pad_mask(dtype=torch.float16)
    assert_fused(model, q, k, v, pad, variant="dot")
    out = torch.compile(model, backend="truthfuse", options=OPTIONS)(q, k, v, pad)
    torch.testing.assert_close(out, model(q, k, v, pad), atol=2e-3, rtol=2e-3)


class _MaskedScores(nn.Module):
    """Scores and an additive mask: `upcast` computes the scores in fp32 (an fp16 model that
    upcasts them), `mask_first` adds the mask before the scale (Falcon's order)."""

    def __init__(self, upcast=False, mask_first=False):
        super().__init__()
        self.upcast, self.mask_first = upcast, mask_first

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1)
        if self.upcast:
            s = s.float()
        s = (s + mask) * 0.125 if self.mask_first else s * 0.125 + mask
        return torch.softmax(s, -1).to(v.dtype) @ v


def _fp16_min_rows():
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2] = torch.finfo(torch.float16).min  # query row 2 masked whole
    return mask.half()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp16_mask_added_to_fp32_scores(dtype):
    # promoted to fp32, -65504 swallows no score: eager's row 2 is softmax(scores), not uniform,
    # so the op adds the mask as it is instead of absorbing it (GPT-J and GPT-Neo upcast so in fp16)
    model = _MaskedScores(upcast=dtype == torch.float16)
    q, k, v = (t.to(dtype) for t in qkv())
    mask = _fp16_min_rows()
    assert_fused(model, q, k, v, mask, variant="dot")
    out = torch.compile(model, backend="truthfuse", options=OPTIONS)(q, k, v, mask)
    torch.testing.assert_close(out, model(q, k, v, mask), atol=2e-3, rtol=2e-3)
    torch._dynamo.reset()


def test_fp16_mask_added_before_the_scale():
    # (scores + mask) * scale in fp16: the addition swallows row 2's scores before the scale
    model = _MaskedScores(mask_first=True)
    q, k, v = (t.half() for t in qkv())
    mask = _fp16_min_rows()
    assert_fused(model, q, k, v, mask, variant="dot")
    out = torch.compile(model, backend="truthfuse", options=OPTIONS)(q, k, v, mask)
    torch.testing.assert_close(out, model(q, k, v, mask), atol=2e-3, rtol=2e-3)


class _ScoresRoundedToHalf(nn.Module):
    """An fp32 model that rounds its scores to fp16 before the softmax."""

    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1) * 0.25).half(), -1).float() @ v


def test_narrowing_cast_inside_the_site_is_a_near_miss():
    # eager rounds (or overflows) the scores there; the op would not
    assert_near_miss(_ScoresRoundedToHalf(), *qkv(), reason="a cast from float32 to float16")


@pytest.mark.parametrize("where", ["scores", "softmax"])
def test_float64_inside_an_fp32_site_is_a_near_miss(where):
    # the kernels compute in fp32: a site eager computes partly in float64 stays eager's
    class Float64(nn.Module):
        def forward(self, q, k, v):
            if where == "scores":
                s = q.double() @ k.double().transpose(-2, -1)
            else:
                s = (q @ k.transpose(-2, -1)).double()
            return torch.softmax(s, -1).float() @ v

    sites = explain_sites(Float64(), *qkv())
    assert sites and all(s.decision == "kept" for s in sites), [(s.rule, s.reason) for s in sites]


class _Float64Mask(nn.Module):
    """An fp32 attention with a float64 mask (built with numpy, say), no cast: the add promotes
    the scores to float64, the softmax runs there, and .float() comes back for the product."""

    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.35 + mask, -1).float() @ v


def test_scores_promoted_to_float64_by_a_mask_stay_eagers():
    # each row's mask carries a large common offset, which eager's float64 softmax cancels and the
    # fused site, adding the mask in fp32, would round away (4e-3 off float64, against eager's 1e-7)
    q, k, v = qkv(T=4, S=6)
    mask = -1e5 * torch.arange(4, dtype=torch.float64)[:, None] + 0.3 * torch.randn(4, 6, dtype=torch.float64)
    assert_near_miss(_Float64Mask(), q, k, v, mask, reason="computed in float64")
    ref = torch.softmax((q.double() @ k.double().transpose(-2, -1)) * 0.35 + mask, -1) @ v.double()
    out = torch.compile(_Float64Mask(), backend="truthfuse", options=OPTIONS)(q, k, v, mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_cast_back_to_the_models_dtype_still_fuses():
    # bf16 models: softmax(scores, dtype=float32).to(q.dtype) narrows to the result's own dtype
    class Upcast(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1, dtype=torch.float32).to(q.dtype) @ v

    assert_fused(Upcast(), *(t.bfloat16() for t in qkv()), variant="dot")


def test_fp16_mask_before_a_tiny_scale_is_a_near_miss():
    # (scores + mask) * 1e-5: -65504 * 1e-5 = -0.66 hides nothing in eager; the op's -1e30 would
    class TinyScale(nn.Module):
        def forward(self, q, k, v, mask):
            return torch.softmax((q @ k.transpose(-2, -1) + mask) * 1e-5, -1) @ v

    q, k, v = (t.half() for t in qkv())
    assert_near_miss(TinyScale(), q, k, v, _fp16_min_rows(), reason="an fp16 mask added before a scale")


class _AttributeScale(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, mask):
        return torch.softmax((q @ k.transpose(-2, -1) + mask) * self.scale, -1) @ v


@pytest.mark.parametrize("scale", [0.35, 1e-5])
def test_fp16_mask_before_an_attribute_scale_under_dynamic_true(scale):
    """Under dynamic=True the module's scale is a SymFloat: an fp16 mask added before it was kept as
    'an fp16 mask added before a scale that is not a number of at least 0.0153' where the scale is
    0.35. It is read at the call's value now (guarded): 0.35 fuses as it does without dynamic=True,
    and 1e-5 stays a near-miss (a fourteenth fuzz round)."""
    model, mask = _AttributeScale(scale), _fp16_min_rows()
    q, k, v = (t.half() for t in qkv())
    backend = fusion_backend.backend(**OPTIONS)
    out = torch.compile(model, backend=backend, dynamic=True)(q, k, v, mask)
    sites = [(s.rule, s.decision, s.reason) for r in backend.records for s in r.sites]
    if scale == 0.35:
        assert sites and all(d == "fused" for _, d, _ in sites), sites
        ref = model(q.double(), k.double(), v.double(), mask.double())
        # as close to float64 as eager's fp16 (one fp16 step of the outputs, near 1)
        err, err_eager = ((x.double() - ref).abs().max() for x in (out, model(q, k, v, mask)))
        assert err <= 2 * err_eager + 1e-3, (float(err), float(err_eager))
    else:
        assert sites and all(d == "kept" and "an fp16 mask added before a scale" in why for _, d, why in sites), sites
        torch.testing.assert_close(out, model(q, k, v, mask))
    torch._dynamo.reset()


def test_fp16_bias_gradient_through_a_row_hidden_whole():
    # a learned fp16 bias plus finfo(fp16).min padding: eager's hidden row is uniform and passes
    # gradients to all of its bias entries, so the fused site must too
    class Biased(nn.Module):
        def forward(self, q, k, v, bias):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.125 + bias, -1) @ v

    q, k, v = (t.half() for t in qkv())
    bias = (torch.randn(2, 1, 8, 8) + _fp16_min_rows().float()).half().requires_grad_()
    assert_fused(Biased(), q, k, v, bias, variant="dot")
    compiled = torch.compile(Biased(), backend="truthfuse", options=OPTIONS)
    weight = torch.randn_like(Biased()(q, k, v, bias))
    got = torch.autograd.grad((compiled(q, k, v, bias) * weight).float().sum(), bias)[0]
    want = torch.autograd.grad((Biased()(q, k, v, bias) * weight).float().sum(), bias)[0]
    assert want[:, :, 2].abs().max() > 0.1  # the hidden row's entries do get a gradient in eager
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    torch._dynamo.reset()


def test_dot_padding_mask_gradient_through_fully_masked_rows():
    # every logit of rows 0-2 of batch 0 sits near the same huge negative: eager's softmax is
    # uniform there and the rows get gradients; the backward must recompute those probabilities
    model = DotAttention(causal="tril", pad=True, upcast=True)
    assert_matches_eager(model, *qkv(), _pad_mask())


@pytest.mark.parametrize("layout", ["bmm", "einsum"])
def test_dot_layouts(layout):
    model = DotAttention(layout=layout, causal="tril" if layout == "bmm" else None, scale="div_sqrt")
    inputs = [t.flatten(0, 1) for t in qkv()] if layout == "bmm" else qkv()
    assert_fused(model, *inputs, variant="dot")
    assert_matches_eager(model, *inputs)


class _Baddbmm(nn.Module):
    """3-D scores by baddbmm: BLOOM's `alibi.baddbmm(q, kT, beta=1, alpha=scale)` and the
    Megatron-style `baddbmm(buffer, q, kT, beta=0, alpha=scale)`, whose buffer is ignored."""

    def __init__(self, beta, added):
        super().__init__()
        self.beta = beta
        self.register_buffer("added", added)

    def forward(self, q, k, v):
        s = torch.baddbmm(self.added, q, k.transpose(1, 2), beta=self.beta, alpha=0.3)
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_dot_scores_by_baddbmm(beta):
    q, k, v = (t.flatten(0, 1) for t in qkv())
    # a per-key bias as ALiBi's (heads in batch, one row broadcast over queries); NaN where beta=0
    # ignores it
    model = _Baddbmm(beta, torch.full((4, 1, 8), float("nan")) if beta == 0 else torch.randn(4, 1, 8))
    assert_fused(model, q, k, v, variant="dot")
    assert_matches_eager(model, q, k, v)


class _HeadsInBatch(nn.Module):
    """Scores from 3-d bmm with the heads folded into the batch plus a per-(batch*head) key bias,
    viewed to 4-d for a 4-d mask, the softmax and dropout (p=0: canonicalization drops it), and
    back for the product with v."""

    def __init__(self, return_scores=False):
        super().__init__()
        self.return_scores = return_scores

    def forward(self, q, k, v, bias, mask):
        B, H, N, D = q.shape
        q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
        s3 = torch.bmm(q3, k3.transpose(1, 2)) * D ** -0.5 + bias
        s4 = s3.view(B, H, N, -1) + mask
        p4 = F.dropout(torch.softmax(s4.float(), dim=-1).to(q.dtype), 0.0, self.training)
        out = torch.bmm(p4.view(B * H, N, -1), v3).view(B, H, N, D)
        return (out, s3) if self.return_scores else out


def _heads_in_batch_inputs():
    q, k, v = qkv(H=3, T=6, S=6)
    return q, k, v, torch.randn(6, 1, 6), _pad_mask(B=2, S=6)


def test_heads_folded_into_the_batch_unfold_to_one_4d_attention():
    model = _HeadsInBatch()
    assert_fused(model, *_heads_in_batch_inputs(), variant="dot")
    assert_matches_eager(model, *_heads_in_batch_inputs())


class _HeadsInBatchRelativeTerms(nn.Module):
    """DeBERTa v2: folded-head scores plus a computed (B*H, N, S) term, a sum of relative-position
    products of q and of k gathered per (query, key) offset, added before the view to 4-d."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(11, 8))

    def forward(self, q, k, v, mask):
        B, H, N, D = q.shape
        q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
        offsets = (torch.arange(N)[None, :] - torch.arange(N)[:, None]).clamp(-5, 5) + 5
        index = offsets.expand(B * H, N, N)
        c2p = torch.gather(torch.matmul(q3, self.pos.t()), -1, index)
        p2c = torch.gather(torch.matmul(k3, self.pos.t()), -1, index).transpose(-1, -2)
        rel = 0 + c2p * 0.5 + p2c * 0.5
        s3 = torch.matmul(q3, k3.transpose(-1, -2) * D ** -0.5) + rel
        p4 = torch.softmax(s3.view(B, H, N, -1) + mask, dim=-1)
        return torch.matmul(p4.view(B * H, N, -1), v3).view(B, H, N, D)


def test_heads_folded_into_the_batch_with_relative_terms_unfold():
    """The scores' add reads two computed (B*H, N, S) values: the product's side is the way up
    (DeBERTa v2's attention was not found at all). Fused, and equal to eager, q, k, v and the
    relative positions' gradients included."""
    torch.manual_seed(0)
    model = _HeadsInBatchRelativeTerms()
    q, k, v = qkv(H=3, T=6, S=6)
    inputs = (q, k, v, _pad_mask(B=2, S=6))
    assert_fused(model, *inputs, variant="dot", rule="attention.dot")
    assert_matches_eager(model, *inputs)


class _KeysLaidOutTransposed(nn.Module):
    """Keys made (B, H, D, S) directly, so that the scores are q @ k with no transpose: by a
    permute that is no swap of two dims, or by SqueezeBERT's view of channels-first keys."""

    def __init__(self, layout):
        super().__init__()
        self.layout = layout
        self.q, self.k, self.v = (nn.Linear(16, 16) for _ in range(3))

    def forward(self, x, mask):
        B, N, _ = x.shape
        q, v = (p(x).view(B, N, 2, 8).permute(0, 2, 1, 3) for p in (self.q, self.v))
        if self.layout == "permute":
            kt = self.k(x).view(B, N, 2, 8).permute(0, 2, 3, 1)
        else:
            kt = self.k(x).transpose(1, 2).contiguous().view(B, 2, 8, N)
        s = torch.matmul(q, kt) / math.sqrt(8) + mask
        return torch.matmul(nn.Softmax(dim=-1)(s), v)


@pytest.mark.parametrize("layout", ["permute", "view"])
def test_dot_keys_laid_out_transposed(layout):
    torch.manual_seed(0)
    model = _KeysLaidOutTransposed(layout)
    inputs = (torch.randn(2, 8, 16), _pad_mask())
    assert_fused(model, *inputs, variant="dot", rule="attention.dot")
    assert_matches_eager(model, *inputs)


class _ScoresInBatch(nn.Module):
    """GPT-NeoX-Japanese: only q and k folded, the scores by baddbmm on zeros of their own size
    (or a bias of that size), viewed to 4-d, and the 4-d probabilities times a 4-d v."""

    def __init__(self, added):
        super().__init__()
        self.added = added

    def forward(self, q, k, v, mask, bias):
        B, H, N, D = q.shape
        q3, k3 = q.reshape(B * H, N, D), k.reshape(B * H, -1, D)
        added = torch.zeros(B * H, N, k3.shape[1], dtype=q.dtype) if self.added == "zeros" else bias
        s = torch.baddbmm(added, q3, k3.transpose(1, 2), beta=1.0, alpha=D ** -0.5)
        p = torch.softmax(s.view(B, H, N, -1) + mask, dim=-1)
        return torch.matmul(p, v)


@pytest.mark.parametrize("added", ["zeros", "bias"])
def test_scores_folded_into_the_batch_with_4d_probabilities_unfold(added):
    q, k, v = qkv(H=3, T=6, S=6)
    inputs = (q, k, v, _pad_mask(B=2, S=6), torch.randn(6, 6, 6))
    model = _ScoresInBatch(added)
    assert_fused(model, *inputs, variant="dot", rule="attention.dot")
    assert_matches_eager(model, *inputs)


@pytest.mark.parametrize("return_scores", [False, True])
def test_heads_folded_into_the_batch_unfold_only_where_nothing_else_reads_the_scores(return_scores):
    """The canonical graph computes what the model does either way; where the 3-d scores are also
    returned, it keeps them as written (unfolding would compute them twice)."""
    from fusion_backend.canonicalize import canonical_copy

    captured = []
    model = _HeadsInBatch(return_scores=return_scores)
    torch.compile(model, backend=lambda gm, ex: captured.append((gm, ex)) or gm.forward, fullgraph=True)(
        *_heads_in_batch_inputs())
    gm, inputs = captured[0]  # the graph's placeholders come in the order of first use
    canon = canonical_copy(gm)
    unfolded = any(n.target is torch.unflatten for n in canon.graph.nodes)
    assert unfolded != return_scores
    want, got = gm(*inputs), canon(*inputs)
    assert len(want) == len(got) == (2 if return_scores else 1)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


class _WindowMaskIn5d(nn.Module):
    """Scores of B*nW windows plus a per-window mask added through a (B, nW, H, N, N) view, once
    or twice (Swin V2), and a per-head term of lower rank."""

    def __init__(self, windows, twice=True, read_5d=False):
        super().__init__()
        self.windows, self.twice, self.read_5d = windows, twice, read_5d

    def forward(self, q, k, v, mask, head_term):
        BW, H, N, _ = q.shape
        s = (q @ k.transpose(-2, -1)) * 0.3
        s5 = s.view(BW // self.windows, self.windows, H, N, N) + mask.unsqueeze(1).unsqueeze(0)
        if self.twice:
            s5 = s5 + head_term
        out = torch.softmax(s5.view(-1, H, N, N), dim=-1) @ v
        return (out, s5) if self.read_5d else out


def _window_inputs():
    q, k, v = qkv(B=6, H=2, T=5)  # 2 images of 3 windows
    mask = torch.zeros(3, 5, 5).masked_fill(torch.rand(3, 5, 5) < 0.3, -100.0)
    return q, k, v, mask, torch.randn(2, 1, 5)


@pytest.mark.parametrize("twice", [False, True])
def test_window_masks_added_through_a_5d_view_fuse(twice):
    model = _WindowMaskIn5d(3, twice=twice)
    assert_fused(model, *_window_inputs(), variant="dot")
    assert_matches_eager(model, *_window_inputs())


@pytest.mark.parametrize("read_5d", [False, True])
def test_window_masks_fold_only_where_nothing_else_reads_the_5d_scores(read_5d):
    from fusion_backend.canonicalize import canonical_copy

    captured = []
    model = _WindowMaskIn5d(3, read_5d=read_5d)
    torch.compile(model, backend=lambda gm, ex: captured.append((gm, ex)) or gm.forward, fullgraph=True)(
        *_window_inputs())
    gm, inputs = captured[0]  # the graph's placeholders come in the order of first use
    canon = canonical_copy(gm)
    assert any(n.target is torch.broadcast_to for n in canon.graph.nodes) != read_5d
    want, got = gm(*inputs), canon(*inputs)
    assert len(want) == len(got) == (2 if read_5d else 1)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


class _MaskThrough4d(nn.Module):
    """LED's attention: heads folded into the batch, bmm scores, the (B, 1, T, S) mask added through
    a (B, H, T, S) view and viewed back, then a 3-d softmax and bmm with v."""

    def forward(self, q, k, v, mask):
        B, H, T, D = q.shape
        q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
        s = torch.bmm(q3 * D ** -0.5, k3.transpose(1, 2))
        s = (s.view(B, H, T, -1) + mask).view(B * H, T, -1)
        return torch.bmm(torch.softmax(s, dim=-1), v3).view(B, H, T, D)


def test_a_mask_added_through_a_4d_view_of_3d_scores_fuses():
    q, k, v = qkv(H=3, T=6, S=6)
    assert_fused(_MaskThrough4d(), q, k, v, _pad_mask(S=6), variant="dot")
    assert_matches_eager(_MaskThrough4d(), q, k, v, _pad_mask(S=6))


def test_window_terms_outside_attention_stay_as_written():
    """The same 5-d view and add feeding anything but a softmax is left alone (the folded term is a
    copy the size of the mask per image)."""
    from fusion_backend.canonicalize import canonical_copy

    def windows(x, mask):
        return torch.relu((x.view(2, 3, 2, 5, 5) + mask.unsqueeze(1).unsqueeze(0)).view(-1, 2, 5, 5))

    captured = []
    torch.compile(windows, backend=lambda gm, ex: captured.append(gm) or gm.forward, fullgraph=True)(
        torch.randn(6, 2, 5, 5), torch.randn(3, 5, 5))
    assert not any(n.target is torch.broadcast_to for n in canonical_copy(captured[0]).graph.nodes)


class _WhereWithTensorFill(nn.Module):
    """GPT-Neo's causal mask: torch.where(keep, scores, torch.tensor(finfo.min, dtype=scores.dtype))."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1)
        keep = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
        s = torch.where(keep, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype, device=s.device))
        return torch.softmax(s, dim=-1) @ v


def test_where_with_a_tensor_literal_fill_is_a_masked_fill():
    assert_fused(_WhereWithTensorFill(), *qkv(), variant="dot")
    assert_matches_eager(_WhereWithTensorFill(), *qkv())


class _ScoresIndexedByMask(nn.Module):
    """Hand-written masking by assignment: `scores[mask] = fill` (index_put on the scores)."""

    def __init__(self, index, fill):
        super().__init__()
        self.index, self.fill = index, fill

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.index == "whole":
            s[mask] = self.fill
        elif self.index == "ellipsis":
            s[..., mask] = self.fill
        else:
            s[:, :, mask] = self.fill
        return torch.softmax(s, dim=-1) @ v


def _masked_out(shape):
    """A random bool mask, True where the scores are filled, that leaves key 0 of every row (so no
    row is filled whole)."""
    mask = torch.rand(shape) < 0.4
    mask[..., 0] = False
    return mask


def _fused_as_eager(model, mask_shape):
    """The model's attention, masked by `_masked_out(mask_shape)`, is fused (dot) and equals eager."""
    mask = _masked_out(mask_shape)
    q, k, v = qkv()
    assert_fused(model, q, k, v, mask, variant="dot")
    assert_matches_eager(model, q, k, v, mask)


@pytest.mark.parametrize("index, fill, mask_shape", [
    ("whole", float("-inf"), (2, 2, 8, 8)), ("whole", torch.finfo(torch.float32).min, (2, 2, 8, 8)),
    ("ellipsis", float("-inf"), (8, 8)), ("ellipsis", -1e9, (8,)), ("slices", -1e9, (8, 8)),
])
def test_scores_masked_by_index_assignment_fuse(index, fill, mask_shape):
    # `scores[mask] = float("-inf")` is scores.masked_fill_(mask, -inf) (True = hidden): it was not
    # found at all. Random masks that leave every row a key (no row is hidden whole).
    model = _ScoresIndexedByMask(index, fill)
    _fused_as_eager(model, mask_shape)


class _FilledWithATensorLiteral(nn.Module):
    def __init__(self, write):
        super().__init__()
        self.write = write

    def forward(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.write == "masked_fill":
            s = s.masked_fill(mask, torch.tensor(float("-inf")))
        else:
            s[mask] = torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype)
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("write", ["masked_fill", "assignment"])
def test_scores_filled_with_a_tensor_literal(write):
    # a fill `torch.tensor(number)` of the scores' dtype is that number: it was a near-miss
    # ("masked_fill value is not a Python number"), or by assignment not found at all
    model = _FilledWithATensorLiteral(write)
    _fused_as_eager(model, (2, 2, 8, 8))


def test_scores_masked_by_index_assignment_over_leading_dims_stay_as_written():
    # a mask over the (B, H) dims hides whole score matrices: not a masked_fill of the scores'
    # shape, nothing to fuse, and the result stays eager's
    model = _ScoresIndexedByMask("whole", -1e9)
    mask = torch.tensor([[True, False], [False, True]])
    q, k, v = qkv()
    assert not [s for s in explain_sites(model, q, k, v, mask) if s.decision == "fused"]
    assert_matches_eager(model, q, k, v, mask)


def test_scores_masked_by_index_assignment_with_an_overflowing_fill_in_fp16():
    # fp16 index_put rounds -1e9 to -inf where masked_fill raises: such a write stays as written
    model = _ScoresIndexedByMask("ellipsis", -1e9)
    q, k, v = (t.half() for t in qkv())
    mask = _masked_out((8, 8))
    sites = explain_sites(model, q, k, v, mask)
    assert not [s for s in sites if s.decision == "fused"], sites
    torch.testing.assert_close(torch.compile(model, backend="truthfuse", options=OPTIONS)(q, k, v, mask),
                               model(q, k, v, mask))
    torch._dynamo.reset()


class _MaskedInPlaceThroughAView(nn.Module):
    """Scores viewed to their own shape (as code that folds and unfolds heads writes it), then
    masked in place through the view; `read_base` reads the viewed tensor afterwards too."""

    def __init__(self, write, read_base=False):
        super().__init__()
        self.write, self.read_base = write, read_base

    def forward(self, q, k, v, mask):
        base = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
        s = base.view(q.shape[0], q.shape[1], q.shape[2], k.shape[2]) if self.write != "reshape" else \
            base.reshape(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if self.write == "masked_fill_":
            s.masked_fill_(mask, float("-inf"))
        else:
            s[mask] = float("-inf")
        return torch.softmax(base if self.read_base else s, dim=-1) @ v


@pytest.mark.parametrize("write", ["masked_fill_", "reshape"])
def test_scores_masked_in_place_through_a_view_of_their_own(write):
    # the write lands in memory that only the view reads: it becomes functional like a write into
    # the scores themselves (it was left in place, and the site not found, or a near-miss)
    model = _MaskedInPlaceThroughAView(write)
    _fused_as_eager(model, (2, 2, 8, 8))


def test_scores_masked_in_place_through_a_view_and_read_as_well_stay_as_written():
    # the viewed tensor is read after the write (it sees the write): nothing may be rewritten
    model = _MaskedInPlaceThroughAView("masked_fill_", read_base=True)
    mask = _masked_out((2, 2, 8, 8))
    q, k, v = qkv()
    assert not [s for s in explain_sites(model, q, k, v, mask) if s.decision == "fused"]
    assert_matches_eager(model, q, k, v, mask)


class _MaskedBeforeTheScale(nn.Module):
    """The raw q.k masked with -inf, then scaled (divided by sqrt(d), or times a number)."""

    def __init__(self, divide):
        super().__init__()
        self.divide = divide

    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-2, -1)).masked_fill(mask, float("-inf"))
        s = s / math.sqrt(q.shape[-1]) if self.divide else s * 0.3
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("divide", [True, False], ids=["divided", "multiplied"])
def test_scores_masked_before_the_scale_fuse(divide):
    # masked_fill(-inf) then the scale is the scale then masked_fill(-inf), exactly: the site was
    # not found at all
    model = _MaskedBeforeTheScale(divide)
    _fused_as_eager(model, (2, 1, 8, 8))


class _FiniteFillBeforeTheScale(nn.Module):
    def forward(self, q, k, v, mask):
        s = torch.matmul(q, k.transpose(-2, -1)).masked_fill(mask, -1e9) / math.sqrt(q.shape[-1])
        return torch.softmax(s, dim=-1) @ v


def test_finite_fill_before_the_scale_stays_as_written():
    # -1e9 / sqrt(d) is another fill than -1e9: the order stays, and so does eager's result
    model = _FiniteFillBeforeTheScale()
    mask = torch.rand(2, 1, 8, 8) < 0.4
    q, k, v = qkv()
    assert not [s for s in explain_sites(model, q, k, v, mask) if s.decision == "fused"]
    assert_matches_eager(model, q, k, v, mask)


def test_dot_cross_attention_and_non_contiguous_inputs():
    # Nq != Nk, Dv != D, and q/k/v as transposed views of (B, N, H, D) tensors
    q, k, v = (t.transpose(1, 2) for t in (torch.randn(2, 5, 2, 8), torch.randn(2, 11, 2, 8), torch.randn(2, 11, 2, 4)))
    model = DotAttention(scale="size", d=8)
    assert_fused(model, q, k, v, variant="dot")
    assert_matches_eager(model, q, k, v)


@pytest.mark.parametrize("kind", ["functional", "module"])
def test_dot_dropout_eval_fuses_without_dropout(kind):
    model = DotAttention(causal="tril", dropout=kind, p=0.3).eval()
    assert_fused(model, *qkv(), variant="dot")
    assert_matches_eager(model, *qkv())  # exact: no dropout in eval


@pytest.mark.parametrize("kind", ["functional", "module"])
def test_dot_dropout_training_uses_the_ops_rng(kind):
    """In training the fused op draws its own Philox mask: the compiled model equals the op called
    with the same dropout_p under the same seed, forward and backward."""
    model = DotAttention(causal="tril", dropout=kind, p=0.25, scale="div_sqrt").train()
    q, k, v = qkv()
    assert_fused(model, q, k, v, variant="dot")
    compiled = torch.compile(model, backend="truthfuse", options={"strategy": "aggressive", "inner": "eager", "cache": False})
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    keep = torch.ones(8, 8, dtype=torch.bool).tril()
    torch.manual_seed(7)
    out = compiled(*a)
    torch.manual_seed(7)
    ref = fusion_backend.ops.attention(*b, scale=1 / math.sqrt(8), attn_mask=keep, dropout_p=0.25)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
    # and it is dropout: some probabilities were dropped, so it differs from the p=0 result
    model.eval()
    assert not torch.allclose(out, model(q, k, v))


class DotRepeatKV(torch.nn.Module):
    """Llama-eager-style grouped-query attention: K/V heads repeated, then hand-written attention
    with an HF finfo.min causal mask added."""

    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, mask):
        rep = q.size(1) // k.size(1)
        if self.form == "repeat_interleave":
            k, v = torch.repeat_interleave(k, rep, dim=1), v.repeat_interleave(rep, 1)
        else:
            b, h, s, d = k.shape
            k = k[:, :, None, :, :].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)
            v = v[:, :, None, :, :].expand(b, h, rep, s, d).reshape(b, h * rep, s, d)
        w = torch.matmul(q, k.transpose(2, 3)) * q.size(-1) ** -0.5 + mask
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)


@pytest.mark.parametrize("form", ["repeat_interleave", "expand"])
def test_dot_grouped_query(form):
    q, k, v = qkv(H=4, Hkv=2)
    mask = torch.full((8, 8), torch.finfo(torch.float32).min).triu(1)[None, None]
    assert_fused(DotRepeatKV(form), q, k, v, mask, variant="dot", rule="attention.dot_repeat_kv")
    assert_matches_eager(DotRepeatKV(form), q, k, v, mask)


class SharedKV(nn.Module):
    """Multi-query attention written with broadcasting, as Falcon does: one K/V head for all."""

    def __init__(self, metric):
        super().__init__()
        self.metric = metric
        self.lam = nn.Parameter(torch.tensor(0.3))

    def forward(self, q, k, v):
        if self.metric == "dot":
            scores = q @ k.transpose(-1, -2) * 0.25
        elif self.metric == "l2":
            scores = -self.lam * torch.cdist(q, k) ** 2
        else:
            scores = self.lam * (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2))
        return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("metric", ["dot", "l2", "cosine"])
def test_keys_and_values_broadcast_over_heads(metric):
    # the same math as grouped-query attention with one K/V head; dK and dV sum over the heads
    q, k, v = qkv(H=4, Hkv=1, T=9, S=11)
    assert_fused(SharedKV(metric), q, k, v, variant=metric)
    assert_matches_eager(SharedKV(metric), q, k, v)


def test_dot_dynamic_shapes():
    model = DotAttention(causal="tril", scale="size")
    backend = fusion_backend.backend(strategy="aggressive", inner="eager", cache=False)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for T in (6, 9):
        q, k, v = qkv(T=T)
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), atol=2e-5, rtol=2e-4)
    fused = [s for r in backend.records for s in r.sites if s.decision == "fused"]
    assert fused and all(s.variant == "dot" for s in fused)
    assert_matches_eager(model, *qkv(T=7), dynamic=True)


# ------------------------------------------------------------------------------------------------
# 2. F.scaled_dot_product_attention
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "causal", "scale", "bool_mask", "float_mask", "cross"])
def test_sdpa(case):
    model = SDPA(is_causal=case == "causal", scale=0.3 if case == "scale" else None)
    q, k, v = qkv(S=11) if case == "cross" else qkv()
    mask = None
    if case == "bool_mask":
        mask = torch.rand(2, 1, 8, 8) > 0.3
        mask[..., 0] = True
    elif case == "float_mask":
        mask = torch.randn(2, 2, 8, 8).requires_grad_()  # a learnable additive bias: gets a gradient
    args = (q, k, v) if mask is None else (q, k, v, mask)
    assert_fused(model, *args, variant="dot", rule="attention.sdpa")
    assert_matches_eager(model, *args)


@pytest.mark.parametrize("gqa", ["native", "repeat_interleave", "expand"])
def test_sdpa_grouped_query(gqa):
    model = SDPA(is_causal=True, gqa=gqa)
    inputs = qkv(H=4, Hkv=2)
    # repeated K/V (by hand or HF's expand+reshape) go to the op un-repeated, with enable_gqa
    rule = "attention.sdpa" if gqa == "native" else "attention.sdpa_repeat_kv"
    assert_fused(model, *inputs, variant="dot", rule=rule)
    assert_matches_eager(model, *inputs)


def test_sdpa_broadcasts_one_kv_head():
    # SDPA broadcasts a single K/V head over q's heads: enable_gqa with one K/V head
    inputs = qkv(H=4, Hkv=1)
    assert_fused(SDPA(is_causal=True), *inputs, variant="dot", rule="attention.sdpa")
    assert_matches_eager(SDPA(is_causal=True), *inputs)


def test_sdpa_dropout_training_and_eval():
    model = SDPA(p=0.2).train()
    q, k, v = qkv()
    assert_fused(model, q, k, v, variant="dot")
    compiled = torch.compile(model, backend="truthfuse", options={"strategy": "aggressive", "inner": "eager", "cache": False})
    torch.manual_seed(3)
    out = compiled(q, k, v)
    torch.manual_seed(3)
    torch.testing.assert_close(out, fusion_backend.ops.attention(q, k, v, dropout_p=0.2))
    torch._dynamo.reset()
    model.eval()
    assert_fused(model, q, k, v, variant="dot")
    assert_matches_eager(model, q, k, v)


class AtenSDPA(torch.nn.Module):
    """The aten ops SDPA lowers to, called directly (what an aten-level capture shows)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.register_buffer("bias", torch.randn(2, 1, 8, 8))  # flash_for_cpu gives the mask no gradient

    def forward(self, q, k, v):
        if self.form == "aten":
            return torch.ops.aten.scaled_dot_product_attention(q, k, v, self.bias, scale=0.3)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=self.bias,
                                                                          scale=0.3)[0]


@pytest.mark.parametrize("form", ["aten", "flash_for_cpu"])
def test_sdpa_aten_forms(form):
    model = AtenSDPA(form)
    assert_fused(model, *qkv(), variant="dot", rule="attention.sdpa")
    assert_matches_eager(model, *qkv())


def test_sdpa_dynamic_shapes():
    assert_matches_eager(SDPA(is_causal=True), *qkv(T=7), dynamic=True)


def test_sdpa_enable_gqa_with_one_kv_head_under_dynamic_true():
    """Under dynamic=True q's head count is a symbol; with one K/V head it is a multiple of it
    whatever its value, but the site was kept as 'q heads s85 are not a known multiple of k/v
    heads 1'. It fuses now, and one graph serves several head counts (a fourteenth fuzz round)."""
    model = SDPA(is_causal=True, gqa="native")
    backend = fusion_backend.backend(**OPTIONS)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for H, T in ((2, 5), (3, 6), (4, 7)):
        q, k, v = qkv(T=T, H=H, Hkv=1)
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), atol=2e-5, rtol=2e-4)
    table = [(s.rule, s.decision, s.reason) for r in backend.records for s in r.sites]
    assert table and all(s.decision == "fused" for r in backend.records for s in r.sites), table
    torch._dynamo.reset()
    assert_matches_eager(model, *qkv(T=7, H=3, Hkv=1), dynamic=True)


def test_sdpa_enable_gqa_with_symbolic_kv_heads_under_dynamic_true():
    """Under dynamic=True both head counts are symbols; with enable_gqa=True SDPA raises unless
    the K/V heads divide the query heads, so every call that runs has them divide. Such a site
    (a decoding step of a grouped-query model compiled with dynamic=True) was kept as 'q heads s34
    are not a known multiple of k/v heads s25'; it fuses now, one graph for several head counts
    (a fifteenth fuzz round)."""
    model = SDPA(gqa="native")
    backend = fusion_backend.backend(**OPTIONS)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for H, Hkv, T in ((6, 3, 5), (8, 4, 7), (9, 3, 6)):  # no size of the first call equals another
        q, k, v = qkv(T=T, H=H, Hkv=Hkv)
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), atol=2e-5, rtol=2e-4)
    table = [(s.rule, s.decision, s.reason) for r in backend.records for s in r.sites]
    assert len(backend.records) == 1, table
    assert table and all(s.decision == "fused" for r in backend.records for s in r.sites), table
    torch._dynamo.reset()
    assert_matches_eager(model, *qkv(T=7, H=6, Hkv=3), dynamic=True)


@pytest.mark.parametrize("gqa", [None, "repeat_interleave"])
@pytest.mark.parametrize("train", [False, True])
def test_sdpa_number_attributes_under_dynamic_true(gqa, train):
    """torch.compile(dynamic=True) makes a module's float attributes (its scale, its dropout p)
    SymFloats. The SDPA rules kept such a site as 'scale is not a Python number' or 'dropout_p 0.0
    is not a constant in [0, 1)', where the hand-written rules fuse the same numbers; now they fuse
    too, guarded on the value, so a changed scale compiles anew (an eleventh fuzz round)."""
    model = SDPA(scale=0.7, p=0.0, gqa=gqa).train(train)
    backend = fusion_backend.backend(**OPTIONS)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for T, scale in ((5, 0.7), (6, 0.7), (6, 2.0)):
        model.scale = scale
        q, k, v = qkv(T=T, H=2, Hkv=1 if gqa else 2)
        torch.testing.assert_close(compiled(q, k, v), model(q, k, v), atol=2e-5, rtol=2e-4)
    table = [(s.rule, s.decision, s.reason) for r in backend.records for s in r.sites]
    assert len(backend.records) == 2, table  # the new scale fails the guard: a second graph
    assert all(any(s.decision == "fused" for s in r.sites) for r in backend.records), table
    torch._dynamo.reset()
    assert_matches_eager(model, *qkv(T=7, H=2, Hkv=1 if gqa else 2), dynamic=True)


def test_sdpa_with_k_and_v_lengths_traced_as_separate_symbols():
    """K and V read from a cache can reach Dynamo with one length symbol each. The site fuses on
    a guard that the two are equal, and a call where they differ fails the guard and compiles
    anew. (Its result is not compared: SDPA on CPU does not check the lengths either, and reads
    past the shorter one.)"""
    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(2, 2, 1, 16)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    torch._dynamo.mark_dynamic(k, 2)
    torch._dynamo.mark_dynamic(v, 2)
    sites = explain_sites(attend, q, k, v)
    assert [s.decision for s in sites] == ["fused"]
    torch._dynamo.reset()
    compiled = torch.compile(attend, backend="truthfuse", options=OPTIONS)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), atol=2e-6, rtol=2e-5)
    k2, v2 = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    torch.testing.assert_close(compiled(q, k2, v2), attend(q, k2, v2), atol=2e-6, rtol=2e-5)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled(q, torch.randn(2, 2, 12, 16), torch.randn(2, 2, 13, 16))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1

class _HeadsSplitByTranspose(nn.Module):
    """Heads split as `view(B, T, H, D).transpose(1, 2)`: eager's SDPA output follows q's layout,
    (B, T, H, D) in memory, so the heads merge back by `.transpose(1, 2).view(...)` with no
    `.contiguous()`."""

    def __init__(self, H=2, D=8):
        super().__init__()
        self.H, self.D = H, D
        self.qkv = nn.Linear(H * D, 3 * H * D)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.H, self.D).transpose(1, 2) for t in self.qkv(x).split(self.H * self.D, -1))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).view(B, T, self.H * self.D)


@pytest.mark.parametrize("dynamic", [False, True])
def test_sdpa_output_keeps_eager_layout(dynamic):
    # the fused op returned (B, H, T, D) contiguous, and the view after the transpose raised
    model, x = _HeadsSplitByTranspose(), torch.randn(2, 6, 16)
    assert_fused(model, x, variant="dot", rule="attention.sdpa")
    assert_matches_eager(model, x, dynamic=dynamic)



# ------------------------------------------------------------------------------------------------
# 3. nn.MultiheadAttention
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention(batch_first):
    model = MHA(batch_first=batch_first, causal=batch_first)
    x = torch.randn(2, 8, 16) if batch_first else torch.randn(8, 2, 16)
    assert_fused(model, x, variant="dot", rule="attention.multihead")
    assert_matches_eager(model, x)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_inference(batch_first):
    # eval + no_grad is where eager takes MHA's native fast path; under Dynamo it is the same call
    model = MHA(batch_first=batch_first, p=0.1).eval()
    x = torch.randn(2, 8, 16) if batch_first else torch.randn(8, 2, 16)
    with torch.no_grad():
        assert_fused(model, x, variant="dot", rule="attention.multihead")
        out = torch.compile(model, backend="truthfuse", options=OPTIONS)(x)
        torch.testing.assert_close(out, model(x), atol=2e-5, rtol=2e-4)


class _MHAInAutocastRegion(nn.Module):
    """nn.MultiheadAttention inside a `torch.autocast` region of the model's own code (autocast off,
    or to another dtype), in a model called under autocast to bf16."""

    def __init__(self, region):
        super().__init__()
        self.mha, self.region = nn.MultiheadAttention(16, 2, batch_first=True), region

    def forward(self, x):
        with self.region():
            return self.mha(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("region, dtype", [
    (lambda: torch.autocast("cpu", enabled=False), torch.float32),
    (lambda: torch.autocast("cpu", dtype=torch.float16), torch.float16)], ids=["autocast_off", "fp16"])
def test_multihead_attention_in_an_autocast_region_computes_in_its_dtype(region, dtype):
    """The replacement is traced under the site's own autocast regions: traced under the caller's
    autocast alone, make_fx wrote bf16 casts into its Linears, and MHA inside
    `autocast(enabled=False)` computed in bf16 (4.9e-3 off eager's fp32 output, which is 1e-7 off
    float64), inside `autocast(dtype=float16)` in bf16 too (7x eager's error)."""
    torch.manual_seed(0)
    model, x = _MHAInAutocastRegion(region), torch.randn(2, 8, 16)
    ref = copy.deepcopy(model).double()(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_fused(model, x, variant="dot", rule="attention.multihead")
        eager = model(x)
        got = torch.compile(model, backend="truthfuse", options=OPTIONS)(x)
    torch._dynamo.reset()
    assert got.dtype == eager.dtype == dtype
    err_eager, err_got = ((t.double() - ref).abs().max() / ref.abs().max() for t in (eager, got))
    assert err_got <= 3 * err_eager + 1e-6, (float(err_got), float(err_eager))


class _MHAAfterSetAutocastEnabled(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        torch.set_autocast_enabled("cpu", False)
        out = self.mha(x, x, x, need_weights=False)[0]
        torch.set_autocast_enabled("cpu", True)
        return out


def test_multihead_attention_after_set_autocast_enabled_is_kept():
    """torch.set_autocast_enabled("cpu", False) called as a function (no `with` block) in a model
    called under autocast: no autocast region of the graph says so, the replacement was traced under
    the caller's autocast and the MHA computed in bf16 (4.9e-3 off float64, eager's fp32 1.4e-7).
    Such a site is kept, with a reason naming the call."""
    torch.manual_seed(0)
    model, x = _MHAAfterSetAutocastEnabled(), torch.randn(2, 8, 16)
    ref = copy.deepcopy(model).double().mha
    ref = ref(x.double(), x.double(), x.double(), need_weights=False)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_near_miss(model, x, reason="torch.set_autocast_enabled() before the site")
        eager = model(x)
        got = torch.compile(model, backend="truthfuse", options=OPTIONS)(x)
    torch._dynamo.reset()
    assert got.dtype == eager.dtype == torch.float32
    err_eager, err_got = ((t.double() - ref).abs().max() / ref.abs().max() for t in (eager, got))
    assert err_got <= 3 * err_eager + 1e-6, (float(err_got), float(err_eager))


def test_multihead_attention_dynamic_shapes():
    assert_matches_eager(MHA(), torch.randn(2, 7, 16), dynamic=True)


def test_multihead_attention_training_under_dynamic_true():
    # dynamic=True makes the module's dropout (0.0) a SymFloat: the site was kept as 'dropout_p is
    # not a constant in [0, 1)' (an eleventh fuzz round)
    backend = fusion_backend.backend(**OPTIONS)
    model = MHA().train()
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(torch.compile(model, backend=backend, dynamic=True)(x), model(x), atol=2e-5, rtol=2e-4)
    assert [s.decision for r in backend.records for s in r.sites] == ["fused"], \
        [(s.rule, s.reason) for r in backend.records for s in r.sites]
    torch._dynamo.reset()
    assert_matches_eager(model, x, dynamic=True)


def test_multihead_attention_static_mask_with_dynamic_tokens():
    # compiled after a layer with other sizes, automatic dynamic shapes make the token count a
    # symbol while the causal mask stays (7, 7): the site was kept, its reason "attn_mask of
    # shape (7, 7) is not (L, S)"; MHA takes no other mask shape, so they are equal under a guard
    with torch.no_grad():
        fusion_backend.explain(nn.TransformerEncoderLayer(16, 2, 32).eval(), torch.randn(5, 3, 16), options=OPTIONS)
        layer = nn.TransformerEncoderLayer(16, 2, 32).eval()
        x, mask = torch.randn(7, 2, 16), nn.Transformer.generate_square_subsequent_mask(7)
        report = fusion_backend.explain(layer, x, src_mask=mask, is_causal=True, options=OPTIONS)
        sites = [s for s in report.sites if s.kind == "attention"]
        assert sites and all(s.decision == "fused" for s in sites), str(report)
        out = torch.compile(layer, backend="truthfuse", options=OPTIONS)(x, src_mask=mask, is_causal=True)
        torch.testing.assert_close(out, layer(x, src_mask=mask, is_causal=True), atol=2e-5, rtol=2e-4)
    torch._dynamo.reset()


def test_multihead_attention_key_padding_mask_eval():
    mha = nn.MultiheadAttention(16, 4, dropout=0.1, batch_first=True).eval()

    def f(x, pad):
        return mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    x = torch.randn(2, 8, 16)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, 5:] = True
    assert_fused(f, x, pad, variant="dot", rule="attention.multihead")
    ref = f(x, pad)
    out = torch.compile(f, backend="truthfuse", options={"strategy": "aggressive", "inner": "eager", "cache": False})(x, pad)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)


def test_multihead_attention_weights_returned_is_kept():
    model = MHA(need_weights=True)
    x = torch.randn(2, 8, 16)
    sites = explain_kept(model, x)
    assert any("attention weights returned" in s.reason for s in sites), [(s.rule, s.reason) for s in sites]
    assert_matches_eager(model, x)


def explain_kept(model, *inputs):
    from .checks import explain_sites

    sites = [s for s in explain_sites(model, *inputs) if s.kind == "attention"]
    assert sites and all(s.decision == "kept" for s in sites)
    return sites


# ------------------------------------------------------------------------------------------------
# 5. distance attention
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["cdist", "broadcast", "expanded"])
@pytest.mark.parametrize("lam", ["scalar", "per_head"])
def test_l2(form, lam):
    model = L2Attention(form, lam, causal=form == "cdist")
    assert_fused(model, *qkv(), variant="l2", rule=f"attention.l2_{form}")
    assert_matches_eager(model, *qkv())


@pytest.mark.parametrize("form", ["cdist", "broadcast"])
@pytest.mark.parametrize("lam", ["scalar", "per_head"])
def test_l1(form, lam):
    model = L1Attention(form, lam)
    assert_fused(model, *qkv(), variant="l1", rule=f"attention.l1_{form}")
    assert_matches_eager(model, *qkv())


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_an_infinite_learnable_temperature_gives_nan_as_eager(inner):
    """A per-head temperature that overflowed to inf: eager's logits of that head are -inf and its
    rows NaN, and so are the gradients. The fused op took such rows as ones that see no key and
    gave them 0 with finite gradients (a NaN loss in eager trained on, compiled). They are NaN now,
    under Inductor too, which simplifies an arithmetic s + s * 0 away (a fifteenth fuzz round)."""
    model = L1Attention("cdist", "per_head")
    with torch.no_grad():
        model.lam[1] = math.inf
    q, k, v = (t.requires_grad_() for t in qkv())
    backend = fusion_backend.backend(strategy="aggressive", inner=inner, cache=False, disable=["feedforward"])
    out = torch.compile(model, backend=backend)(q, k, v)
    assert [s.decision for r in backend.records for s in r.sites] == ["fused"]
    ref = model(q, k, v)
    assert torch.isnan(ref[:, 1]).all() and torch.isfinite(ref[:, 0]).all()
    g = torch.randn_like(ref)
    for a, b in zip((out,) + torch.autograd.grad(out, (q, k, v, model.lam), g),
                    (ref,) + torch.autograd.grad(ref, (q, k, v, model.lam), g)):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=2e-5, rtol=2e-4)
    torch._dynamo.reset()


class _KeyMinusQuery(nn.Module):
    """The broadcast distances written with the key first: (k_j - q_i) ** 2 and |k_j - q_i|, the
    same numbers as (q_i - k_j) bit for bit."""

    def __init__(self, metric):
        super().__init__()
        self.metric = metric
        self.lam = nn.Parameter(torch.tensor(0.3) + 0.05 * torch.rand(()))

    def forward(self, q, k, v):
        diff = k[..., None, :, :] - q[..., :, None, :]
        d = diff.pow(2).sum(-1) if self.metric == "l2" else diff.abs().sum(dim=-1)
        return torch.softmax(-self.lam * d, dim=-1) @ v


@pytest.mark.parametrize("metric", ["l2", "l1"])
def test_distance_written_key_minus_query(metric):
    model = _KeyMinusQuery(metric)
    inputs = qkv(T=6, S=5)
    assert_fused(model, *inputs, variant=metric, rule=f"attention.{metric}_broadcast")
    assert_matches_eager(model, *inputs)


class _ExpandedL2(nn.Module):
    """softmax(-lam * (|q|^2 - 2 q.k + |k|^2)) v, the norms and the product spelled as plain PyTorch
    code spells them: `2 * q @ k.mT` (Python reads (2 * q) @ k.mT), the norms as rows and columns
    by unsqueeze or None-indexing, and the two norms added first (k-nearest-neighbour code)."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.lam = nn.Parameter(torch.tensor(0.3) + 0.05 * torch.rand(()))

    def forward(self, q, k, v):
        qq, kk = (q ** 2).sum(-1), (k ** 2).sum(-1)
        if self.spelling == "operand_doubled":
            d2 = qq.unsqueeze(-1) - 2 * q @ k.mT + kk.unsqueeze(-1).mT
        elif self.spelling == "norms_indexed":
            d2 = qq[..., :, None] - 2 * (q @ k.transpose(-2, -1)) + kk[..., None, :]
        elif self.spelling == "norms_first":
            d2 = q.pow(2).sum(-1, keepdim=True) + k.pow(2).sum(-1, keepdim=True).mT - (q @ k.mT) * 2
        else:  # "knn": (x**2).sum(-1)[:, None] + (y**2).sum(-1)[None, :] - 2 * x @ y.T, per head
            d2 = qq.unsqueeze(-1) + kk.unsqueeze(-2) - 2 * q @ k.mT
        return torch.softmax(-self.lam * d2, dim=-1) @ v


@pytest.mark.parametrize("spelling", ["operand_doubled", "norms_indexed", "norms_first", "knn"])
def test_expanded_l2_as_written_by_hand(spelling):
    model = _ExpandedL2(spelling)
    inputs = qkv(T=6, S=5)
    sites = assert_fused(model, *inputs, variant="l2")
    assert all(s.rule.startswith("attention.l2_expanded") for s in sites if s.decision == "fused")
    assert_matches_eager(model, *inputs)


def test_operand_doubled_before_a_product_stays_as_written_where_nothing_fuses(inner_graphs):
    """c - 2 * x @ y, (2 * x) @ y subtracted, is read as c - (x @ y) * 2 for the expanded distance;
    where no site takes it, it goes on as written beside the attention that fuses (an fp16 2 * x
    past 32752 is inf, which (x @ y) * 2 need not be)."""
    def f(q, k, v, x, y):
        return torch.softmax(q @ k.mT * 0.3, dim=-1) @ v, torch.relu(x.sum(-1, keepdim=True) - 2 * x @ y.mT)

    inputs = (*qkv(T=6, S=5), torch.randn(3, 4, 8), torch.randn(3, 5, 8))
    compiled = torch.compile(f, backend=fusion_backend.backend(**OPTIONS))
    out, want = compiled(*inputs), f(*inputs)
    torch.testing.assert_close(out[0], want[0])
    torch.testing.assert_close(out[1], want[1], atol=0, rtol=0)
    graph = inner_graphs[-1].graph
    assert any(str(n.target).startswith("truthfuse") for n in graph.nodes if n.op == "call_function"), graph
    products = [n for n in graph.nodes if n.op == "call_function" and n.target in (torch.matmul, operator.matmul)]
    assert len(products) == 1, graph
    scaled = products[0].args[0]
    assert scaled.op == "call_function" and scaled.target in (torch.mul, operator.mul), graph


@pytest.mark.parametrize("kind", ["scalar", "per_head", "swin"])
def test_cosine(kind):
    model = CosineAttention(swin=kind == "swin", lam=kind)
    assert_fused(model, *qkv(), variant="cosine", rule="attention.cosine")
    assert_matches_eager(model, *qkv())


def test_l2_dynamic_shapes():
    assert_matches_eager(L2Attention("broadcast", "per_head"), *qkv(T=6), dynamic=True)


def test_one_kv_head_shared_by_broadcasting_under_dynamic_shapes():
    # multi-query attention (Falcon's spelling) with every size symbolic, the head count included
    def mqa(q, k, v):
        return (q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v

    backend = fusion_backend.backend(**OPTIONS)
    compiled = torch.compile(mqa, backend=backend, dynamic=True)
    for heads, n in ((4, 8), (3, 11)):
        q = torch.randn(2, heads, n, 16, requires_grad=True)
        k, v = (torch.randn(2, 1, n, 16, requires_grad=True) for _ in range(2))
        out, ref = compiled(q, k, v), mqa(q, k, v)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
        for got, want in zip(torch.autograd.grad(out.square().sum(), (q, k, v)),
                             torch.autograd.grad(ref.square().sum(), (q, k, v))):
            torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    sites = [s for r in backend.records for s in r.sites]
    assert sites and all(s.decision == "fused" for s in sites), [(s.rule, s.decision, s.reason) for s in sites]
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# end to end with the default inner compiler (Inductor), as a user would run it
# ------------------------------------------------------------------------------------------------

def test_inductor_end_to_end_training():
    model = DotAttention(causal="tril", upcast=True, scale="size")
    q, k, v = qkv()
    backend = fusion_backend.backend(strategy="aggressive", cache=False)  # inner: Inductor
    compiled = torch.compile(model, backend=backend)
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    out, ref = compiled(*a), model(*b)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, atol=2e-4, rtol=2e-3)
    fused = [s for r in backend.records for s in r.sites if s.decision == "fused"]
    assert [s.variant for s in fused] == ["dot"], [(s.rule, s.decision, s.reason) for r in backend.records for s in r.sites]


@pytest.mark.parametrize("metric", ["l2", "l1"])
def test_distance_cross_attention(metric):
    # Nq != Nk, per-head temperature
    model = L2Attention("broadcast", "per_head") if metric == "l2" else L1Attention("cdist", "per_head")
    inputs = qkv(T=5, S=11)
    assert_fused(model, *inputs, variant=metric)
    assert_matches_eager(model, *inputs)


# ------------------------------------------------------------------------------------------------
# soft-capped scores (Gemma 2): cap * tanh(scale * q.k / cap), then the mask
# ------------------------------------------------------------------------------------------------

class SoftCapped(nn.Module):
    """Gemma 2's eager attention: scaled, divided by the cap, tanh, times the cap, mask, softmax in
    fp32; K/V repeated per head when there are fewer of them."""

    def __init__(self, cap=50.0, repeat=1):
        super().__init__()
        self.cap, self.repeat = cap, repeat

    def forward(self, q, k, v, mask):
        if self.repeat > 1:
            k, v = (t.repeat_interleave(self.repeat, dim=1) for t in (k, v))
        s = torch.matmul(q, k.transpose(2, 3)) * q.size(-1) ** -0.5
        s = s / self.cap
        s = torch.tanh(s)
        s = s * self.cap
        return torch.matmul(F.softmax(s + mask, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _causal_additive(T):
    return torch.zeros(T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))


@pytest.mark.parametrize("cap, repeat, rule", [
    (2.0, 1, "attention.softcap"),  # a cap that saturates on these scores
    (50.0, 2, "attention.softcap_repeat_kv"),
    (-3.0, 1, "attention.softcap"),  # tanh is odd: the op takes |cap| and flips the scale
])
def test_softcap(cap, repeat, rule):
    model = SoftCapped(cap, repeat)
    q, k, v = qkv(H=4, Hkv=4 // repeat, T=8, D=8)
    q, k = q * 3, k * 3
    mask = torch.randn(2, 1, 8, 8)  # not causal: the general rules
    assert_fused(model, q, k, v, mask, variant="dot", rule=rule)
    assert_matches_eager(model, q, k, v, mask)


def test_softcap_causal_mask_becomes_causal():
    class Constant(SoftCapped):
        def forward(self, q, k, v):
            return super().forward(q, k, v, _causal_additive(q.shape[-2]))

    model = Constant(5.0, 2)
    q, k, v = qkv(H=4, Hkv=2, T=8, D=8)
    assert_fused(model, q, k, v, variant="dot", rule="attention.softcap_repeat_kv_causal")
    assert_matches_eager(model, q, k, v)


def test_softcap_attribute_under_dynamic_true():
    """torch.compile(dynamic=True) (or a cap that changed) makes the module's float cap a SymFloat:
    the site was kept as 'the soft cap zf79 is not a nonzero Python number', where the user's cap
    is one. It is read at the call's value now, guarded, so a new cap compiles anew (a fourteenth
    fuzz round)."""
    model = SoftCapped(2.0)
    backend = fusion_backend.backend(**OPTIONS)
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for T, cap in ((6, 2.0), (7, 2.0), (7, -3.0)):
        model.cap = cap
        q, k, v = (t * 3 for t in qkv(H=2, T=T, D=8))
        mask = torch.randn(2, 1, T, T)
        torch.testing.assert_close(compiled(q, k, v, mask), model(q, k, v, mask), atol=2e-5, rtol=2e-4)
    table = [(s.rule, s.decision, s.reason) for r in backend.records for s in r.sites]
    assert len(backend.records) == 2, table  # the new cap fails the guard: a second graph
    assert all(any(s.decision == "fused" and s.rule == "attention.softcap" for s in r.sites)
               for r in backend.records), table
    torch._dynamo.reset()
    model.cap = 2.0
    q, k, v = (t * 3 for t in qkv(H=2, T=7, D=8))
    assert_matches_eager(model, q, k, v, torch.randn(2, 1, 7, 7), dynamic=True)


class _CausalThenFill(nn.Module):
    """(scores + a causal -inf triangle).masked_fill(pad, -1e9): a left-padded row whose unpadded
    keys the triangle hides sees only filled keys, so eager makes it uniform over those and gives q
    and k no gradient through it (found by fuzzing hand-written attention)."""

    def __init__(self, metric, constant):
        super().__init__()
        self.metric, self.constant = metric, constant
        self.register_buffer("triangle", torch.full((8, 8), float("-inf")).triu(1))

    def forward(self, q, k, v, pad):
        if self.metric == "dot":
            s = q @ k.transpose(-2, -1) * 0.35
        else:
            s = -0.3 * torch.cdist(q, k) ** 2
        triangle = torch.full((8, 8), float("-inf")).triu(1) if self.constant else self.triangle
        return torch.softmax((s + triangle).masked_fill(pad, -1e9), -1) @ v


@pytest.mark.parametrize("metric,constant", [("dot", True), ("dot", False), ("l2", True)])
def test_fill_after_an_added_mask_is_kept_and_matches_eager(metric, constant):
    model = _CausalThenFill(metric, constant)
    q, k, v = qkv()
    pad = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    pad[0, ..., :3] = True
    assert_near_miss(model, q, k, v, pad, reason="may mask whole rows")
    assert_matches_eager(model, q, k, v, pad)


class _CosineWithEps(nn.Module):
    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, q, k, v):
        s = F.normalize(q, dim=-1, eps=self.eps) @ F.normalize(k, dim=-1, eps=self.eps).transpose(-2, -1)
        return torch.softmax(s * 10.0, -1) @ v


def test_cosine_fuses_only_with_the_kernels_eps():
    # a zero query row (a padding token through a projection without bias): its gradient is
    # scaled by 1/eps, so a fused site must divide by the same eps as eager
    q, k, v = qkv()
    q[0, 0, 0] = 0.0
    assert_fused(_CosineWithEps(1e-12), q, k, v, variant="cosine")
    assert_matches_eager(_CosineWithEps(1e-12), q, k, v)
    # with another eps the cosine rule does not apply; the dot rule takes the normalized q and k
    # as they are (exact), and its valid site hides the cosine rule's near-miss at that anchor
    sites = explain_sites(_CosineWithEps(1e-6), q, k, v)
    assert [(s.rule, s.decision) for s in sites] == [("attention.dot", "fused")], sites
    assert_matches_eager(_CosineWithEps(1e-6), q, k, v)


class _ConstantCausalThenConstantFill(_CausalThenFill):
    """_CausalThenFill with the padding a constant too: the fill alone hides no row whole, but
    with the triangle it does."""

    def __init__(self):
        super().__init__("dot", True)

    def forward(self, q, k, v):
        pad = (torch.arange(8) < 3)[None, None, None, :] & torch.tensor([True, False])[:, None, None, None]
        return super().forward(q, k, v, pad)


def test_constant_masks_that_hide_rows_together_are_a_near_miss():
    q, k, v = qkv()
    assert_near_miss(_ConstantCausalThenConstantFill(), q, k, v, reason="constant masks hide whole rows")
    assert_matches_eager(_ConstantCausalThenConstantFill(), q, k, v)


def test_head_dim_too_large_is_reported_by_its_size_under_dynamic_shapes():
    # the reason names the size the call had, not Dynamo's symbol for it
    backend = fusion_backend.backend(**OPTIONS)
    compiled = torch.compile(lambda q, k, v: (q @ k.transpose(-2, -1)).softmax(-1) @ v, backend=backend, dynamic=True)
    for d in (16, 300):
        compiled(*(torch.randn(1, 2, 8, d) for _ in range(3)))
    reason = backend.records[-1].sites[0].reason
    assert "head dim 300 > 256" in reason, reason
    torch._dynamo.reset()
