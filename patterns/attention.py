"""Attention rules: dot-product, L2, L1 and cosine attention written by hand, replaced by
`fusion_backend.ops.attention`.

Every form shares one tail, written once in `_scores_to_output`:

    scores -> [+ bias0] -> [* scale] -> [* scale2] -> [masked_fill] -> [+ bias2] -> [+ bias]
           -> [masked_fill]
           -> softmax(-1) -> [dropout] -> @ v

Canonicalization makes this cover `/ sqrt(d)`, `* d ** -0.5`, `mul_`, `/=`, casts around softmax,
`torch.where` masks, module or functional dropout, `bmm`, `einsum` and transposes by permute. The
forms differ only in how the scores are computed, one rule each. Soft-capped dot-product scores
(Gemma 2: `tanh(scores * scales / cap) * cap`, then the masks) have rules of their own, which pass
the cap to the op's `softcap`. Two refinements of the dot rule
win where they apply: `dot_repeat_kv` (K/V repeated per head, Llama eager) passes the un-repeated
K/V with enable_gqa, and `dot_causal` turns an added mask that is provably the causal triangle
(built from constants, as HF's eager masks are) into causal=True. K and V with a single head that
every query head shares by broadcasting (multi-query attention, Falcon's) go to the op with
enable_gqa as one K/V head (`kv_heads_broadcast`).

Masks: -inf fills become a bool mask; finite fills become -1e30 in an additive mask, and fp16's
"masked" value -65504 in a hand-written fp16 form becomes -1e30 too, so that the op, which adds
masks in fp32, absorbs the score as eager does (absorbing_fp16_mask). A row that a finite fill
masks whole is uniform in eager with no gradient to q and k; the replacement gives it that
(`_rows_filled_whole_as_eager`) where the fill is the last step before the softmax, and other
combinations of finite fills are fused only with constant masks that together mask no row whole.
softmax over any dim but the last, scales that vary per key, masks that would broadcast the
scores up, finite fills above -1e9 and intermediates used elsewhere are near-misses, reported
with their reason.
"""
from __future__ import annotations

import math
import operator
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from fusion_backend import Match, Rule, dtype_in, is_scalar_like, known_equal, maybe, plain_tensors, register_rule
from fusion_backend.canonicalize import WRITTEN_IN_PLACE, softmax_with_sinks
from fusion_backend.ops import attention as attention_op
from fusion_backend.ops.attention import COSINE_EPS, SDPA_CONFIG

# One call in the traced patterns, as canonicalization writes it in the target graphs.
fx.wrap("softmax_with_sinks")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
# A finite fill at or below this is absorbed exactly when added in fp32 to any realistic score:
# s + fill rounds to fill for |s| < ~1e22, so a fully masked row stays uniform, as masked_fill gives.
_HUGE_NEGATIVE = -1e30
# masked_fill replaces scores by its fill. A finite fill at or below this gives masked entries
# probability exactly 0 in eager (exp(fill - row max) underflows for any row max above -1e9 + 104)
# and, when a whole row is masked, a uniform row: what -1e30 gives in the fused op, so such fills
# (the Annotated Transformer's -1e9, finfo.min) are passed as -1e30. Larger fills (-1e4) are not
# "masked" so surely, and are near-misses.
_MASKING_FILL = -1e9


def _scores_to_output(scores, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim):
    # A term added before the scales (Falcon's ALiBi: (q.k + alibi) * inv_norm): the op takes it
    # scaled, as part of its mask.
    s = maybe(torch.add)(scores, bias0)
    s = maybe(torch.mul)(s, scale)
    s = maybe(torch.mul)(s, scale2)
    return _logits_to_output(s, v, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def _logits_to_output(s, v, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim):
    s = maybe(torch.masked_fill)(s, mask_a, fill_a)
    # Two additive terms, as T5 adds its position bias and then the padding mask. The outer add is
    # `bias` (a single add binds there first), the one the causal check reads.
    s = maybe(torch.add)(s, bias2)
    s = maybe(torch.add)(s, bias)
    s = maybe(torch.masked_fill)(s, mask_b, fill_b)
    probs = torch.softmax(s, sdim)
    probs = maybe(F.dropout)(probs, p)
    return torch.matmul(probs, v)


# ------------------------------------------------------------------------------------------------
# Score forms (one pattern each)
# ------------------------------------------------------------------------------------------------

def dot_pattern(q, k, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim):
    # nanoGPT, HF GPT-2/BERT/Llama eager, nn.MultiheadAttention's math path, 3-D bmm forms
    return _scores_to_output(torch.matmul(q, torch.transpose(k, -2, -1)), v,
                             bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def dot_repeat_kv_pattern(q, k, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim, n, nv):
    # Llama/Mistral eager: repeat_kv(k), repeat_kv(v) (canonical: repeat_interleave over heads)
    kr, vr = torch.repeat_interleave(k, n, -3), torch.repeat_interleave(v, nv, -3)
    return _scores_to_output(torch.matmul(q, torch.transpose(kr, -2, -1)), vr,
                             bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def l2_cdist_pattern(q, k, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim):
    # TruthGPT: softmax(-lam * cdist(q, k) ** 2)
    d2 = torch.pow(torch.cdist(q, k, 2.0), 2)
    return _scores_to_output(d2, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def l2_broadcast_pattern(q, k, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim):
    # ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1)
    diff = torch.sub(torch.unsqueeze(q, -2), torch.unsqueeze(k, -3))
    d2 = torch.sum(torch.pow(diff, 2), -1, False)
    return _scores_to_output(d2, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def _l2_expanded(norms_first: bool, key_norms_row: bool):
    """|q|^2 - 2 q.k + |k|^2 with |q|^2 a (..., N, 1) column and |k|^2 a row: the column transposed
    (key_norms_row=False) or the sums unsqueezed at -2 (`k.pow(2).sum(-1)[..., None, :]`), and the
    terms in either order Python groups them: (qq - 2 qk) + kk, or (qq + kk) - 2 qk
    (norms_first, as k-nearest-neighbour code writes it). `(2 * q) @ k.mT` and
    `qq.sum(-1).unsqueeze(-1)` are canonicalized to these spellings."""
    def pattern(q, k, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim):
        qq = torch.sum(torch.pow(q, 2), -1, True)
        if key_norms_row:
            kk = torch.unsqueeze(torch.sum(torch.pow(k, 2), -1, False), -2)
        else:
            kk = torch.transpose(torch.sum(torch.pow(k, 2), -1, True), -2, -1)
        two_qk = torch.mul(torch.matmul(q, torch.transpose(k, -2, -1)), 2)
        d2 = torch.sub(torch.add(qq, kk), two_qk) if norms_first else torch.add(torch.sub(qq, two_qk), kk)
        return _scores_to_output(d2, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)
    pattern.__name__ = pattern.__qualname__ = (
        "l2_expanded" + ("_norms_first" if norms_first else "") + ("_row" if key_norms_row else "") + "_pattern")
    return pattern


l2_expanded_pattern = _l2_expanded(norms_first=False, key_norms_row=False)


def l1_cdist_pattern(q, k, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim):
    d1 = torch.cdist(q, k, 1.0)
    return _scores_to_output(d1, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def l1_broadcast_pattern(q, k, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim):
    diff = torch.sub(torch.unsqueeze(q, -2), torch.unsqueeze(k, -3))
    d1 = torch.sum(torch.abs(diff), -1, False)
    return _scores_to_output(d1, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def cosine_pattern(q, k, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim, eps_q, eps_k):
    # F.normalize(q) @ F.normalize(k).T times a (learnable, possibly clamped-and-exp'd) scale;
    # Swin-V2 adds its relative-position bias afterwards
    cos = torch.matmul(F.normalize(q, 2.0, -1, eps_q), torch.transpose(F.normalize(k, 2.0, -1, eps_k), -2, -1))
    return _scores_to_output(cos, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def cosine_similarity_pattern(q, k, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim,
                              eps):
    # F.cosine_similarity(q.unsqueeze(-2), k.unsqueeze(-3), dim=-1): every query against every key
    cos = torch.cosine_similarity(torch.unsqueeze(q, -2), torch.unsqueeze(k, -3), -1, eps)
    return _scores_to_output(cos, v, bias0, scale, scale2, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def _sinks_to_output(scores, v, scale, scale2, bias2, bias, sinks, shifted, sdtype, p):
    # GPT-OSS: (q.k * scaling + mask), a sink logit per head as one more softmax column, dropped
    s = maybe(torch.mul)(scores, scale)
    s = maybe(torch.mul)(s, scale2)
    s = maybe(torch.add)(s, bias2)
    s = maybe(torch.add)(s, bias)
    probs = maybe(F.dropout)(softmax_with_sinks(s, sinks, shifted, sdtype), p)
    return torch.matmul(probs, v)


def dot_sinks_pattern(q, k, v, scale, scale2, bias2, bias, sinks, shifted, sdtype, p):
    return _sinks_to_output(torch.matmul(q, torch.transpose(k, -2, -1)), v, scale, scale2, bias2, bias, sinks,
                            shifted, sdtype, p)


def dot_repeat_kv_sinks_pattern(q, k, v, scale, scale2, bias2, bias, sinks, shifted, sdtype, p, n, nv):
    kr, vr = torch.repeat_interleave(k, n, -3), torch.repeat_interleave(v, nv, -3)
    return _sinks_to_output(torch.matmul(q, torch.transpose(kr, -2, -1)), vr, scale, scale2, bias2, bias, sinks,
                            shifted, sdtype, p)


# ------------------------------------------------------------------------------------------------
# Constraints
# ------------------------------------------------------------------------------------------------

def _heads(m: Match) -> Optional[Any]:
    q = m.values["q"]
    return q.shape[-3] if q.dim() == 4 else None


def kv_heads_broadcast(q, k, v) -> bool:
    """4-D k and v with a single head that q's H > 1 heads share by broadcasting (multi-query
    attention, as Falcon writes it): the same math as enable_gqa with one K/V head, whose
    gradient the op sums over the H query heads as autograd sums over the broadcast."""
    # a symbolic head count is at least 2: Dynamo specializes sizes 0 and 1
    heads = q.shape[1] if q.dim() == 4 else 0
    return (q.dim() == k.dim() == v.dim() == 4 and known_equal(k.shape[1], 1) and known_equal(v.shape[1], 1)
            and (isinstance(heads, torch.SymInt) or (isinstance(heads, int) and heads > 1)))


def check_qkv(m: Match) -> Optional[str]:
    """q, k, v are 3-D or 4-D floating tensors with identical leading dims (or k and v with one
    head that q's heads share, `kv_heads_broadcast`), one device."""
    q, k, v = (m.values.get(n) for n in ("q", "k", "v"))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "q, k and v must all be tensors"
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return f"q, k, v must all be 3-D or 4-D (got {q.dim()}, {k.dim()}, {v.dim()})"
    repeats = m.values.get("n")  # grouped-query rules: K/V heads are repeated n times
    one_kv_head = repeats is None and kv_heads_broadcast(q, k, v)
    for name, t in (("k", k), ("v", v)):
        lead = list(t.shape[:-2])
        if isinstance(repeats, int) and len(lead) == 2:
            lead[-1] = lead[-1] * repeats
        elif one_kv_head:
            lead[-1] = q.shape[1]
        if not all(known_equal(a, b) for a, b in zip(q.shape[:-2], lead)):
            return f"{name}'s batch/head dims {tuple(t.shape[:-2])} differ from q's {tuple(q.shape[:-2])} (broadcasting)"
    if not known_equal(k.shape[-2], v.shape[-2]):
        return "k and v have different sequence lengths"
    if not known_equal(q.shape[-1], k.shape[-1]):
        return "q and k have different head dims"
    if len({q.dtype, k.dtype, v.dtype}) != 1 and not (m.rule.variant_of(m) == "dot" and autocast_dtype(m)):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if len({q.device, k.device, v.device}) != 1:
        return "q, k, v are on different devices"
    return None


def _dtype(node: Any) -> Optional[torch.dtype]:
    value = Match.value_of(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def autocast_dtype(m: Match) -> Optional[torch.dtype]:
    """The dtype torch.autocast runs a dot-product site in, where it casts q, k or v to it: q and k
    rotated with fp32 tables (DeepSeek-V3), or fp32 q, k and v, under autocast to bf16. Written out,
    both products (q @ k^T and p @ v) return it, one of them from an operand of another dtype;
    as one SDPA call, its result has it while q, k or v has another (without autocast, eager's
    matmul and SDPA take one dtype only). The replacement casts q, k and v to it, as autocast does
    (SDPA's float mask too), and the site is the one it would be with q, k and v in that dtype.
    None otherwise."""
    qkv = [m.values.get(name) for name in ("q", "k", "v")]
    if not all(isinstance(t, torch.Tensor) and t.dtype in _FLOATS for t in qkv):
        return None
    if m.anchor.target is F.scaled_dot_product_attention:
        dtype = _dtype(m.anchor)
    else:
        products = [n for n in m.covered if n.op == "call_function" and n.target is torch.matmul]
        if len(products) != 2 or m.anchor not in products or len({_dtype(n) for n in products}) != 1:
            return None
        dtype = _dtype(m.anchor)
        if not any(_dtype(a) not in (None, dtype) for n in products for a in n.args if isinstance(a, fx.Node)):
            return None
    return dtype if dtype in _FLOATS and any(t.dtype != dtype for t in qkv) else None


def check_repeat_kv(m: Match) -> Optional[str]:
    """K and V are 4-D (B, Hkv, S, D) and repeated the same number of times up to q's head count:
    then enable_gqa on the originals pairs query head h with K/V head h // n, the same math."""
    q, k, v = m["q"], m["k"], m["v"]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "repeated K/V must be 4-D"
    n, nv = m["n"], m["nv"]
    if not isinstance(n, int) or not isinstance(nv, int) or n != nv or n < 1:
        return f"K and V are repeated differently or by a non-constant ({n!r}, {nv!r})"
    if not known_equal(q.shape[1], k.shape[1] * n):
        return f"K/V heads {k.shape[1]} x {n} differ from q's {q.shape[1]}"
    if m.present("enable_gqa") and m["enable_gqa"] is not False:
        return "enable_gqa on top of repeated K/V"
    return None


def check_scales(m: Match) -> Optional[str]:
    """Scales are Python numbers or tensors that are scalar or per-head."""
    heads = _heads(m)
    for name in ("scale", "scale2"):
        if not m.present(name):
            continue
        value = m.values[name]
        # "a scale", not the wildcard's name: which of the two optional products binds a model's one
        # scale depends on the alignment ("scale2 of shape ..." named no scale of the user's code)
        if not is_scalar_like(value, per_head=heads, rank=m.values["q"].dim()):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            return f"a scale of shape {shape} is neither a scalar nor per-head"
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            return f"a scale is an integer tensor ({value.dtype})"
    return _check_number_scale(m, "scale")


_FP32_MAX = torch.finfo(torch.float32).max


def _check_number_scale(m: Match, what: str, *extra: float) -> Optional[str]:
    """The product of the scales that are Python numbers (and `extra` factors) is a float32 number:
    the op takes it as one (an fp32 scale vector), which past 3.4e38 raised "value cannot be
    converted to type float without overflow" where eager's fp32 scores are inf (s / 1e-45,
    s * 1e39), and at inf or NaN eager's rows are NaN, which the op does not reproduce wholly."""
    # a module's float attribute under dynamic=True (or once it changed) is a SymFloat, read at this
    # call's value (`number_value`), on which the replacement guards
    numbers = [number_value(m.values[n]) for n in ("scale", "scale2") if m.present(n)]
    numbers = [float(x) for x in numbers if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if not numbers:
        return None
    product = math.prod(numbers + [float(number_value(x)) for x in extra])
    if not abs(product) <= _FP32_MAX:  # NaN too
        return (f"the {what} {product:g} (a division counts as its reciprocal) is not a finite float32 "
                "number: eager's float32 scores are inf or NaN there, which the fused op does not reproduce")
    return None


def _broadcastable_to_scores(t: torch.Tensor, m: Match) -> bool:
    q, k = m.values["q"], m.values["k"]
    scores = list(q.shape[:-1]) + [k.shape[-2]]
    if t.dim() > len(scores):
        return False
    for a, b in zip(reversed(list(t.shape)), reversed(scores)):
        if not (known_equal(a, 1) or known_equal(a, b)):
            return False
    return True


def check_masks(m: Match) -> Optional[str]:
    """Masks broadcast to the scores; fills are -inf or a huge negative that addition absorbs;
    an additive bias is a floating tensor (its gradient is supported)."""
    for mask, fill in (("mask_a", "fill_a"), ("mask_b", "fill_b")):
        if not m.present(mask):
            continue
        # a module's float attribute is a SymFloat under dynamic=True: read at this call's value,
        # on which the replacement guards (`number_value`)
        t, value = m.values[mask], number_value(m.values[fill])
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
            return f"masked_fill mask is not a bool tensor"
        if not _broadcastable_to_scores(t, m):
            return f"mask of shape {tuple(t.shape)} does not broadcast to the scores"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "masked_fill value is not a Python number"
        if not (value == -math.inf or value <= _MASKING_FILL):
            return (f"masked_fill value {value} is not -inf or <= {_MASKING_FILL:g}: the fused kernel "
                    "would not reproduce fully masked rows exactly")
    for name in ("bias0", "bias2", "bias"):
        if not m.present(name):
            continue
        b = m.values[name]
        if not isinstance(b, torch.Tensor) or not b.is_floating_point():
            return "the added mask/bias is not a floating tensor"
        if not _broadcastable_to_scores(b, m):
            return f"bias of shape {tuple(b.shape)} does not broadcast to the scores"
        if name == "bias0" and b.dtype == torch.float16 and _added_in_fp16(m, name) and not _still_masks_after_scales(m):
            return ("an fp16 mask added before a scale that is not a number of at least "
                    f"{_LEAST_SCALE_AFTER_FP16_MASK:g}: scaled, its -65504 may no longer hide a key")
    return _check_whole_rows_filled(m)


# An fp16 mask added before the scales hides a key in eager when -65504 * scale stays far below
# the row's scores (|score| < 16 for the addition to absorb them): at 1e3 and more it does, as
# the -1e30 the op adds does; at 1e-5 (-0.66) it hides nothing.
_LEAST_SCALE_AFTER_FP16_MASK = 1e3 / 65504


def _still_masks_after_scales(m: Match) -> bool:
    factor = 1.0
    for name in ("scale", "scale2"):
        if m.present(name):
            value = number_value(m.values[name])  # a SymFloat attribute under dynamic=True: its value
            if not _is_number(value):
                return False
            factor *= value
    return abs(factor) >= _LEAST_SCALE_AFTER_FP16_MASK


def _added_in_fp16(m: Match, name: str) -> bool:
    """Whether the site adds the term `name` to the scores in fp16, where its -65504 entries
    swallow the scores (what `absorbing_fp16_mask` gives the op). Added to fp32 scores (an fp16
    model that upcasts its scores), the term is promoted and swallows nothing."""
    node = m.nodes.get(name)
    adds = [n for n in m.covered if node is not None and node in n.all_input_nodes]
    dtypes = {getattr(Match.value_of(n), "dtype", None) for n in adds}
    return dtypes == {torch.float16}


def _final_fill(mask_a, fill_a, mask_b, fill_b, bias2, bias) -> Optional[str]:
    """"mask_a" or "mask_b" where a site's only masked_fill has a finite fill and nothing is added
    to the scores after it, so that a row it masks whole is uniform over all keys in eager, with no
    gradient to the scores (`_rows_filled_whole_as_eager`); None otherwise. Arguments: whether
    each is present, and the fills. (Terms added before the fill must also mask nothing:
    `_check_whole_rows_filled`.)"""
    fills = [(name, fill) for name, present, fill in (("mask_a", mask_a, fill_a), ("mask_b", mask_b, fill_b))
             if present]
    if len(fills) != 1 or fills[0][1] == -math.inf:
        return None
    name = fills[0][0]
    return name if name == "mask_b" or not (bias2 or bias) else None


def _masks_nothing(m: Match, name: str) -> bool:
    """An added term that is a constant above the masking range everywhere (ALiBi's slopes times
    distances): no score it is added to can fall below a finite fill."""
    value = constant_value(m.nodes.get(name))
    return value is not None and value.is_floating_point() and bool((value.float() > _MASKING_FILL).all())


def _described(node: Any) -> str:
    """A node as explain() names it: `add_13 (deberta_v2/modeling_deberta_v2.py:240)`."""
    from fusion_backend.match.sites import describe

    return describe(node) if isinstance(node, fx.Node) else repr(node)


def _check_whole_rows_filled(m: Match) -> Optional[str]:
    """masked_fill with a finite fill: a row it masks whole comes out uniform in eager, and its
    scores get no gradient, while the op, which adds the fill as -1e30, would give them one. The
    replacement reproduces such rows where they are uniform over all keys (`_final_fill`); other
    combinations (two fills, additive terms that can mask) are fused only when every mask is a
    constant and together they mask no row whole."""
    finite = [name for name, fill in (("mask_a", "fill_a"), ("mask_b", "fill_b"))
              if m.present(name) and m.values[fill] != -math.inf]
    if not finite:
        return None
    present = {name: m.present(name) for name in ("mask_a", "mask_b", "bias2", "bias")}
    # A row that the fill covers only in part, its other scores masked by an added term (-inf,
    # finfo.min: left padding under a causal mask), is uniform over the filled keys in eager, with
    # no gradient to q and k; the op would give them one. So every added term must mask nothing.
    added = [name for name in ("bias0", "bias2", "bias") if m.present(name)]
    if _final_fill(present["mask_a"], m.values.get("fill_a"), present["mask_b"], m.values.get("fill_b"),
                   present["bias2"], present["bias"]) and all(_masks_nothing(m, name) for name in added):
        return None
    # Otherwise every mask must be a constant, and no row may be masked whole by the fills and the
    # added terms together: then each row keeps a score, and masked entries get probability 0 (and
    # no gradient) in eager and in the op alike.
    masked = None
    for name in finite + added:
        value = constant_value(m.nodes.get(name))
        if value is None:
            # name the terms computed at run time (DeBERTa's relative-position terms): the user
            # reads what stands in the way, not only a class of causes
            computed = [_described(m.nodes.get(t)) for t in added if constant_value(m.nodes.get(t)) is None]
            terms = f" (added to the scores and not a constant: {', '.join(computed)})" if computed else ""
            return ("a masked_fill with a finite fill, combined with other masks or added terms, may mask "
                    f"whole rows, which eager computes differently from the fused op{terms}")
        value = value if name in finite else value.float() <= _MASKING_FILL
        masked = value if masked is None else masked | value
    if bool(masked.all(-1).any()):
        return "constant masks hide whole rows, which eager computes differently from the fused op"
    return None


def check_sinks(m: Match) -> Optional[str]:
    """Sinks (GPT-OSS): q is 4-D, the sinks a floating tensor of one logit per query head, and the
    scales numbers or tensors that need no gradient (the op takes no scale gradient with sinks)."""
    q, sinks = m.values["q"], m.values["sinks"]
    if q.dim() != 4:
        return "attention with sinks needs 4-D q, k, v"
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point() or not known_equal(sinks.numel(),
                                                                                                 q.shape[1]):
        return "the sinks are not a floating tensor of one logit per query head"
    for name in ("scale", "scale2"):
        value = m.values.get(name)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return f"{name} needs a gradient, which the op does not compute with sinks"
    return None


def check_softmax_dim(m: Match) -> Optional[str]:
    """softmax runs over the keys (the last dim): over any other dim it is not attention."""
    if "sdim" not in m.rule.traced.wildcards:  # softmax_with_sinks: over the last dim by definition
        return None
    dim = m.values.get("sdim")
    rank = m.values["q"].dim() if isinstance(m.values.get("q"), torch.Tensor) else None
    if isinstance(dim, int) and rank is not None and dim == rank - 1:
        dim = -1
    if dim != -1:
        return f"softmax over dim {dim}, not over the keys (dim -1)"
    return None


def number_value(x):
    """A Python number as the rules read it. Under torch.compile(dynamic=True), or once a value
    has changed, Dynamo makes float attributes (a module's scale, its dropout p) SymFloats that
    carry this call's value as their hint: that value, on which the replacement's float() guards,
    so a call with another one compiles anew. A symbol without a hint stays as it is."""
    if isinstance(x, (torch.SymFloat, torch.SymInt)) and x.node.hint is not None:
        return x.node.hint
    return x


def check_dropout(m: Match) -> Optional[str]:
    if not m.present("p"):
        return None
    p = m.values["p"]
    if isinstance(p, torch.Tensor):
        return "dropout probability is a tensor"
    # symbolic once it changed: checked at this call's value, which the op refuses outside [0, 1)
    # (a "failed to build" FusionWarning)
    p = number_value(p)
    if isinstance(p, (int, float)) and not 0 <= p < 1:
        return f"dropout probability {p} is outside [0, 1)"
    return None


def check_supported_shapes(q, k, v, metric: str) -> Optional[str]:
    """What the op itself says about these shapes, dtypes and devices (3-D inputs count as one
    batch). Anything with .shape, .dtype and .device will do."""
    from fusion_backend.ops.attention import attention_supports

    if len(q.shape) == 3:
        q, k, v = (SimpleNamespace(shape=(1,) + tuple(t.shape), dtype=t.dtype, device=t.device,
                                   stride=lambda t=t: (0,) + tuple(t.stride())) for t in (q, k, v))
    ok, reason = attention_supports(q, k, v, metric)
    return None if ok else reason


def check_supported(m: Match) -> Optional[str]:
    """What the op itself says about these shapes, dtypes and devices."""
    return check_supported_shapes(m.values["q"], m.values["k"], m.values["v"], m.rule.variant_of(m) or "dot")


COMMON_CONSTRAINTS = (plain_tensors, check_qkv, check_softmax_dim, dtype_in("q", _FLOATS), check_scales, check_masks,
                      check_dropout, check_supported)


# -- an added mask that is the causal triangle, computed from constants (HF's eager masks) -----

# Ops a mask may be built from and still be a compile-time constant: index arithmetic,
# comparisons, views and fills. Nothing random, nothing reading an input.
_CONSTANT_FUNCTIONS = {
    torch.arange, torch.zeros, torch.ones, torch.full, torch.tensor, torch.scalar_tensor, torch.tril,
    torch.triu, torch.masked_fill, torch.where, torch.unsqueeze, torch.logical_not, torch.logical_and,
    torch.logical_or,
    torch.add, torch.sub, torch.mul, torch.le, torch.lt, torch.ge, torch.gt, torch.eq, torch.ne,
    torch.Tensor.to, torch.transpose, torch.reshape, torch.broadcast_to, torch.pow, torch.div, torch.cat,
    torch.concat, torch.squeeze, operator.mul, operator.truediv, operator.pow,
    operator.add, operator.sub, operator.le, operator.lt, operator.ge, operator.gt, operator.eq,
    operator.ne, operator.and_, operator.or_, operator.invert, operator.getitem, operator.neg,
}
_CONSTANT_METHODS = {
    "expand", "view", "reshape", "unsqueeze", "to", "bool", "float", "half", "bfloat16", "masked_fill",
    "__and__", "__or__", "__invert__", "le", "lt", "ge", "gt", "eq", "ne", "tril", "triu",
    "logical_not", "logical_and", "logical_or", "type", "transpose", "permute", "contiguous", "clone",
    "__getitem__", "expand_as", "add", "sub", "mul", "div", "pow", "squeeze", "__mul__", "__rmul__",
    "__truediv__", "__rtruediv__", "__pow__", "__rpow__", "__neg__",
}
_CONSTANT_MAX_NODES = 64
_CONSTANT_MAX_NUMEL = 1 << 26


class _NotConstant(Exception):
    pass


def constant_value(node) -> Optional[torch.Tensor]:
    """The value of a tensor node computed only from constants by whitelisted ops (no input, no
    parameter, no symbolic size, nothing random), evaluated now; None otherwise. A value that an
    in-place write left in place may change (`WRITTEN_IN_PLACE`: a causal mask whose prefix is
    then unmasked by `mask[:, :p] = 0`) is not what its node computes, so it is not a constant."""
    memo: dict = {}

    def value(x):
        if isinstance(x, fx.Node):
            if x in memo:
                return memo[x]
            if len(memo) >= _CONSTANT_MAX_NODES or x.op not in ("call_function", "call_method"):
                raise _NotConstant
            if x.meta.get(WRITTEN_IN_PLACE):
                raise _NotConstant
            if x.op == "call_function" and x.target not in _CONSTANT_FUNCTIONS:
                raise _NotConstant
            if x.op == "call_method" and x.target not in _CONSTANT_METHODS:
                raise _NotConstant
            args = fx.node.map_aggregate(x.args, value)
            kwargs = fx.node.map_aggregate(x.kwargs, value)
            out = x.target(*args, **kwargs) if x.op == "call_function" else getattr(args[0], x.target)(*args[1:], **kwargs)
            if isinstance(out, torch.Tensor) and out.untyped_storage().nbytes() > 4 * _CONSTANT_MAX_NUMEL:
                raise _NotConstant  # (expanded views count by their storage, not their shape)
            memo[x] = out
            return out
        if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise _NotConstant
        return x

    try:
        with torch.no_grad():
            out = value(node)
    except Exception:  # noqa: BLE001 -- not constant, or not evaluable here: no claim
        return None
    return out if isinstance(out, torch.Tensor) else None


def is_causal_bias(bias: torch.Tensor, nq: int, nk: int) -> bool:
    """An additive mask that is exactly SDPA's top-left causal triangle: 0 where key j <= query i,
    -inf or <= -1e30 (absorbing, so probability exactly 0, and no row is fully masked) above it,
    the same for every batch and head."""
    if not bias.is_floating_point() or bias.dim() < 2 or tuple(bias.shape[-2:]) != (nq, nk):
        return False
    for d in range(bias.dim() - 2):  # a dim broadcast by expand holds one value: check it once
        if bias.stride(d) == 0:
            bias = bias.narrow(d, 0, 1)
    keep = torch.ones(nq, nk, dtype=torch.bool, device=bias.device).tril()
    b = bias.float()
    return bool(((b == 0) | ~keep).all()) and bool(((b <= _HUGE_NEGATIVE) | keep).all())


def check_constant_causal_bias(m: Match) -> Optional[str]:
    """The added mask is computed from constants and is the causal triangle, so the op can take
    causal=True (skipping the masked half) instead of reading a mask."""
    node = m.nodes.get("bias")
    q, k = m.values["q"], m.values["k"]
    nq, nk = q.shape[-2], k.shape[-2]
    if node is None or not isinstance(nq, int) or not isinstance(nk, int):
        return "no added mask with static sizes"
    value = constant_value(node)
    if value is None or not is_causal_bias(value, nq, nk):
        return "the added mask is not a constant causal triangle"
    return None


def check_distance_scale(m: Match) -> Optional[str]:
    # either optional multiplication may carry the temperature, depending on the alignment
    if not (m.present("scale") or m.present("scale2")):
        return "distance attention without a temperature: softmax(+distance) is not supported"
    return None


def check_cosine_eps(m: Match) -> Optional[str]:
    """The kernels divide by max(|x|, COSINE_EPS): another eps changes rows whose norm is below
    the larger of the two (a zero row, from a padding token through a projection without bias,
    gets a gradient scaled by 1/eps), so only F.normalize's default matches."""
    for name in ("eps_q", "eps_k"):
        eps = m.values.get(name)
        if not isinstance(eps, (int, float)) or eps != COSINE_EPS:
            return f"F.normalize eps={eps} is not the kernels' {COSINE_EPS:g} (F.normalize's default)"
    return None


def check_not_cosine_similarity(m: Match) -> Optional[str]:
    """Never fused: F.cosine_similarity divides each row by max(|x|, eps) (eps 1e-8 by default) and
    differentiates through that clamp as if the norm were not clamped, where the op divides by
    max(|x|, 1e-12) as F.normalize does, with no gradient through the clamp. Rows whose norm is
    below eps (a zero query or key, from padding through a projection without bias) would get
    other scores or other gradients (1e4 times larger for a zero row), and no compile-time check
    sees a row's norm. The site is reported, with the spelling that fuses."""
    eps = m.values.get("eps")
    return (f"F.cosine_similarity clamps the norms at eps={eps:g} and passes gradients through the clamp; the fused "
            f"cosine op is F.normalize's (max(|x|, {COSINE_EPS:g}), no gradient through the clamp), so rows whose "
            f"norm is below eps would differ. F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) "
            f"fuses" if isinstance(eps, (int, float)) else "F.cosine_similarity with a non-number eps")


# ------------------------------------------------------------------------------------------------
# Replacement
# ------------------------------------------------------------------------------------------------

def _combined_scale(scale, scale2, default, negate=False, heads=None):
    """The product of the present scales (a number or a tensor of H elements)."""
    parts = [s for s in (scale, scale2) if s is not None]
    if not parts:
        value: Any = default
    else:
        value = parts[0]
        for s in parts[1:]:
            value = value * s
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1)
        if negate:
            value = -value
        return value
    return -float(value) if negate else float(value)


def absorbing_fp16_mask(mask):
    """The hand-written form's additive mask as the op should add it. The op adds float masks in
    fp32, as eager does for fp32 and bf16 masks (finfo.min padding rows come out uniform in both,
    with the same gradients), so those pass unchanged. fp16's "masked" value is its min, -65504:
    eager's fp16 score + mask rounds every such entry of a row to -65504 (absorbed, as finfo.min is
    in fp32), while in fp32 it would not be; as -1e30 it is absorbed there too. (SDPA's kernels add
    an fp16 mask in fp32, as the op does, so the SDPA rules pass masks unchanged.)"""
    if mask is not None and mask.dtype == torch.float16:
        # added, not substituted: the mask's gradient still reaches every entry, as in eager,
        # where a row hidden whole is uniform and passes gradients to all of its entries
        return mask.float() + torch.where(mask == torch.finfo(torch.float16).min, _HUGE_NEGATIVE, 0.0)
    return mask


def _mask_for_op(q, mask_a, fill_a, terms, mask_b, fill_b):
    """One attn_mask for the op: bool (keep) when only -inf fills are present, float additive
    otherwise (finite fills, all at or below -1e9, as -1e30: see _MASKING_FILL). `terms` are the
    additive terms present (fp16 ones already as the op should add them: `absorbing_fp16_mask`),
    summed first (one rounding fewer than eager's adds into the scores; a
    padding mask's 0 and finfo.min come out exact)."""
    fills = [(m, f) for m, f in ((mask_a, fill_a), (mask_b, fill_b)) if m is not None]
    mask = None
    for term in terms:
        mask = term if mask is None else mask + term
    if mask is None and fills and all(f == -math.inf for _, f in fills):
        keep = ~fills[0][0]
        for m, _ in fills[1:]:
            keep = keep & ~m
        return keep
    for m, f in fills:
        fill = torch.tensor(f if f == -math.inf else _HUGE_NEGATIVE, dtype=torch.float32, device=q.device)
        if mask is None:
            mask = torch.zeros((), dtype=torch.float32, device=q.device).masked_fill(m, fill)
        else:
            mask = mask.masked_fill(m, fill)
    return mask


def _rows_filled_whole_as_eager(out, v, fill_mask):
    """Rows of `out` whose scores masked_fill replaced whole (the site's only fill, nothing added
    after it: `_final_fill`) as eager computes them: softmax of equal scores is uniform over all
    keys, so the row is the mean of v, and the replaced scores get no gradient, so q and k get none
    from it. The op, which adds the fill as -1e30, gives the same mean but passes gradients to q
    and k through such a row. Rows with dropout: eager drops entries of the uniform weights; here
    they are the plain mean (the expectation), the one place where the fused site draws no dropout.
    Other rows are the op's."""
    whole = fill_mask.all(-1, keepdim=True)  # broadcasts over (B, H, Nq, 1)
    mean = v.float().mean(-2, keepdim=True)
    if mean.shape[-3] not in (1, out.shape[-3]):  # grouped K/V heads: query head h reads h // group
        mean = mean.repeat_interleave(out.shape[-3] // mean.shape[-3], dim=-3)
    return torch.where(whole, mean.to(out.dtype), out)


def _make_replacement(metric: str, gqa: bool = False, causal_bias: bool = False):
    """causal_bias: check_constant_causal_bias proved the added mask is the causal triangle; it
    becomes causal=True and is not read. A site with a soft cap (`cap`) passes it as softcap, one
    with sinks (`sinks`) passes them."""
    def replacement(q, k, v, bias0=None, scale=None, scale2=None, mask_a=None, fill_a=None, bias2=None, bias=None,
                    mask_b=None, fill_b=None, p=None, config=None, cap=None, sinks=None, promoted_terms=(), dtype=None,
                    **_):
        if dtype is not None:  # autocast_dtype: the products' operands cast as autocast casts them
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        final_fill = _final_fill(mask_a is not None, fill_a, mask_b is not None, fill_b, bias2 is not None,
                                 bias is not None)
        whole_rows = None if final_fill is None else (mask_a if final_fill == "mask_a" else mask_b)
        if causal_bias:
            bias = None
        if bias0 is not None:  # (scores + bias0) * scales: the op adds bias0 * scales, in fp32 like the scores
            if "bias0" not in promoted_terms:
                bias0 = absorbing_fp16_mask(bias0)  # absorbed by the fp16 addition, before the scales
            for factor in (scale, scale2):
                if factor is not None:
                    bias0 = bias0.float() * factor
        three_d = q.dim() == 3
        if three_d:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        softcap = None
        if cap is not None:
            s, softcap = _softcap_args(scale, scale2, cap)
        else:
            s = _combined_scale(scale, scale2, 1.0, negate=metric in ("l2", "l1"))
        terms = [(t if name in promoted_terms else absorbing_fp16_mask(t))
                 for name, t in (("bias0", bias0), ("bias2", bias2), ("bias", bias)) if t is not None]
        mask = _mask_for_op(q, mask_a, fill_a, terms, mask_b, fill_b)
        if mask is not None and three_d and mask.dim() == 3:
            mask = mask.unsqueeze(0)
        grouped = gqa or kv_heads_broadcast(q, k, v)
        out = attention_op(q, k, v, metric=metric, scale=s, attn_mask=mask, enable_gqa=bool(grouped), causal=causal_bias,
                           dropout_p=float(p) if p is not None else 0.0, softcap=softcap, sinks=sinks, config=config)
        if whole_rows is not None:
            out = _rows_filled_whole_as_eager(out, v, whole_rows.unsqueeze(0) if three_d else whole_rows)
        return out.squeeze(0) if three_d else out
    replacement.__name__ = f"{metric}_attention_replacement"
    return replacement


def configs_for(metric: str, causal_bias: bool = False, offer_sdpa: bool = True):
    """The configs the tuner may try for a site of this metric, the default first: on CUDA, torch's
    SDPA kernels for a dot-product site they compute exactly (no mask besides a causal one, a
    number scale; see `sdpa_supports`), which are the fastest for plain dot-product attention,
    then the op's Triton kernels with their default and other launch configs. On CPU only the
    op's default: timing launch configs in Triton's interpreter tells nothing. The rules that
    match SDPA calls themselves pass offer_sdpa=False: their "keep" already is SDPA."""
    def configs(m: Match):
        q = m.values["q"] if "q" in m.values else m.values["query"]
        if q.device.type != "cuda":
            return [None]
        choices = [None]
        if offer_sdpa and metric == "dot" and _sdpa_computes(m, causal_bias):
            choices = [SDPA_CONFIG, None]
        try:
            from fusion_backend.ops.attention import attention_config_space, config_key

            dtype = (autocast_dtype(m) if metric == "dot" else None) or q.dtype  # what the op will get
            space = attention_config_space(metric, int(q.shape[-1]), dtype, q.device.type)
        except Exception:  # noqa: BLE001 -- no declared space: the op's default only
            return choices
        return choices + [config_key(c) for c in space][:7]
    return configs


def _sdpa_computes(m: Match, causal_bias: bool) -> bool:
    """Whether the site's replacement would call the op with no mask and a number scale."""
    masks = ["mask_a", "mask_b", "bias0", "bias2"] + ([] if causal_bias else ["bias"])
    if any(m.present(name) for name in masks):
        return False
    return not any(isinstance(m.values.get(name), torch.Tensor) for name in ("scale", "scale2"))


def exact_unless_dropout(name):
    """Flash-style attention is the same math as the pattern (rounding order aside), except that a
    site with dropout draws its mask from the kernel's Philox stream, not torch's."""
    def exact(m: Match) -> bool:
        p = m.values.get(name)
        return not m.present(name) or (isinstance(p, (int, float)) and p == 0)
    return exact


def promoted_fp16_terms(m: Match) -> dict:
    """The replacement's `promoted_terms`: fp16 additive terms that the site adds to scores of
    another dtype (an fp16 model upcasting its scores: GPT-J, GPT-Neo, Falcon with ALiBi). Promoted,
    their -65504 swallows nothing, so the op adds them as they are instead of absorbing them."""
    return {"promoted_terms": tuple(name for name in ("bias0", "bias2", "bias")
                                    if m.present(name) and isinstance(m.values[name], torch.Tensor)
                                    and m.values[name].dtype == torch.float16 and not _added_in_fp16(m, name))}


def _dot_replacement_args(m: Match) -> dict:
    return {**promoted_fp16_terms(m), "dtype": autocast_dtype(m)}


def _rule(name, metric, pattern, extra=(), priority=100, gqa=False, causal_bias=False, offer_sdpa=True):
    return Rule(name=name, kind="attention", pattern=pattern, replacement=_make_replacement(metric, gqa, causal_bias),
                replacement_args=_dot_replacement_args if metric == "dot" else promoted_fp16_terms,
                constraints=COMMON_CONSTRAINTS[:-1] + tuple(extra) + COMMON_CONSTRAINTS[-1:],
                priority=priority, variant=metric, exact=exact_unless_dropout("p"),
                configs=configs_for(metric, causal_bias, offer_sdpa),
                # bf16 q/k upcast for the scores: the kernels accumulate in fp32 from the bf16 values,
                # which is what the upcast computes, without the copies
                look_through_upcasts=("q", "k"))


# -- soft-capped dot-product scores (Gemma 2) -------------------------------------------------------

def _capped(scores, scale, scale2, cap):
    # Gemma 2: tanh(q.k * scaling / softcap) * softcap, the masks added after the cap
    s = maybe(torch.mul)(scores, scale)
    s = maybe(torch.mul)(s, scale2)
    return torch.mul(torch.tanh(s), cap)


def softcap_pattern(q, k, v, scale, scale2, cap, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim):
    capped = _capped(torch.matmul(q, torch.transpose(k, -2, -1)), scale, scale2, cap)
    return _logits_to_output(capped, v, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def softcap_repeat_kv_pattern(q, k, v, scale, scale2, cap, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim,
                              n, nv):
    kr, vr = torch.repeat_interleave(k, n, -3), torch.repeat_interleave(v, nv, -3)
    capped = _capped(torch.matmul(q, torch.transpose(kr, -2, -1)), scale, scale2, cap)
    return _logits_to_output(capped, vr, mask_a, fill_a, bias2, bias, mask_b, fill_b, p, sdim)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_softcap(m: Match) -> Optional[str]:
    """The cap and the scales before tanh are nonzero Python numbers: the kernels take one number
    scale and a positive cap (a tensor there, learnable or per-head, is left to eager)."""
    # a SymFloat (a module's float attribute under dynamic=True, or once it changed) is read at this
    # call's value (`number_value`), on which the replacement guards
    cap = number_value(m.values.get("cap"))
    if not _is_number(cap) or cap == 0:
        shown = f"(a tensor of shape {tuple(cap.shape)})" if isinstance(cap, torch.Tensor) else repr(cap)
        return f"the soft cap {shown} is not a nonzero Python number"
    for name in ("scale", "scale2"):
        value = number_value(m.values.get(name))
        if m.present(name) and (not _is_number(value) or value == 0):
            return f"the {name} before the soft cap is not a nonzero Python number"
    return _check_number_scale(m, "scale times the soft cap", cap)  # the op's scale: `_softcap_args`


def _softcap_args(scale, scale2, cap):
    """(scale, softcap) for the op from the pattern's cap * tanh(scale * scale2 * q.k): the op
    computes softcap * tanh(scale * q.k / softcap), so softcap = |cap| and scale = the scales * cap
    (a negative cap is tanh's oddness: -c * tanh(x) = c * tanh(-x))."""
    pre = _combined_scale(scale, scale2, 1.0)
    return pre * cap, abs(float(cap))


def _kernel_only_rules(name, pattern, repeat_kv_pattern, check):
    """The four rules of a score form that SDPA cannot compute, whose sites go to the op's kernels
    only: as written, with K/V repeated per head (grouped K/V), and each with HF's constant causal
    mask read as causal=True."""
    return [
        _rule(f"attention.{name}", "dot", pattern, (check,), offer_sdpa=False),
        _rule(f"attention.{name}_repeat_kv", "dot", repeat_kv_pattern, (check, check_repeat_kv), priority=120,
              gqa=True, offer_sdpa=False),
        _rule(f"attention.{name}_causal", "dot", pattern, (check, check_constant_causal_bias), priority=105,
              causal_bias=True, offer_sdpa=False),
        _rule(f"attention.{name}_repeat_kv_causal", "dot", repeat_kv_pattern,
              (check, check_repeat_kv, check_constant_causal_bias), priority=125, gqa=True, causal_bias=True,
              offer_sdpa=False),
    ]


RULES = [
    _rule("attention.dot", "dot", dot_pattern),
    _rule("attention.dot_repeat_kv", "dot", dot_repeat_kv_pattern, (check_repeat_kv,), priority=120, gqa=True),
    # HF eager builds its causal mask from aranges: proven causal at compile time, it becomes
    # causal=True (the kernels skip the masked half); other masks go to the rules above
    _rule("attention.dot_causal", "dot", dot_pattern, (check_constant_causal_bias,), priority=105,
          causal_bias=True),
    _rule("attention.dot_repeat_kv_causal", "dot", dot_repeat_kv_pattern,
          (check_repeat_kv, check_constant_causal_bias), priority=125, gqa=True, causal_bias=True),
    _rule("attention.l2_cdist", "l2", l2_cdist_pattern, (check_distance_scale,)),
    _rule("attention.l2_broadcast", "l2", l2_broadcast_pattern, (check_distance_scale,)),
    _rule("attention.l2_expanded", "l2", l2_expanded_pattern, (check_distance_scale,), priority=110),
    *(_rule(f"attention.l2_expanded{'_norms_first' if first else ''}{'_row' if row else ''}", "l2",
            _l2_expanded(first, row), (check_distance_scale,), priority=110)
      for first, row in ((False, True), (True, False), (True, True))),
    _rule("attention.l1_cdist", "l1", l1_cdist_pattern, (check_distance_scale,)),
    _rule("attention.l1_broadcast", "l1", l1_broadcast_pattern, (check_distance_scale,)),
    _rule("attention.cosine", "cosine", cosine_pattern, (check_cosine_eps,), priority=110),
    # found only to say why it stays (its replacement never runs): `check_not_cosine_similarity`
    _rule("attention.cosine_similarity", "cosine", cosine_similarity_pattern, (check_not_cosine_similarity,),
          priority=110),
    # Gemma 2's soft-capped scores and GPT-OSS's sinks (SDPA has neither)
    *_kernel_only_rules("softcap", softcap_pattern, softcap_repeat_kv_pattern, check_softcap),
    *_kernel_only_rules("sinks", dot_sinks_pattern, dot_repeat_kv_sinks_pattern, check_sinks),
]

for _r in RULES:
    register_rule(_r, replace=True)
