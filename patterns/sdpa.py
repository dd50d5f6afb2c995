"""Attention written as a library call: `F.scaled_dot_product_attention` and
`nn.MultiheadAttention` (which Dynamo shows as one `F.multi_head_attention_forward` call), replaced
by `fusion_backend.ops.attention`.

Canonicalization makes every argument of both calls positional with its default filled in, so one
pattern per call covers every keyword spelling; the aten ops SDPA lowers to are canonicalized to
the same call. Grouped-query attention written with `repeat_interleave` or HF's
`expand`+`reshape` of K/V (canonical: repeat_interleave) is matched by `attention.sdpa_repeat_kv`,
which passes the un-repeated K/V with `enable_gqa=True` (the same pairing of query head h with K/V
head h // n), saving the copies; K/V with one head that SDPA broadcasts over q's heads (Falcon's
multi-query path) go with `enable_gqa=True` too. With `need_weights=True` and the weights used,
nn.MultiheadAttention is kept: its call node escapes the match and explain() says so.
"""
from __future__ import annotations

import operator
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from fusion_backend import Match, Rule, guard_equal, known_equal, plain_tensors, register_rule
from fusion_backend.ops import attention as attention_op

from .attention import (autocast_dtype, check_repeat_kv, check_supported_shapes, configs_for, exact_unless_dropout,
                        kv_heads_broadcast, number_value)

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _broadcasts_to(t: torch.Tensor, target) -> bool:
    if t.dim() > len(target):
        return False
    return all(known_equal(a, 1) or known_equal(a, b)
               for a, b in zip(reversed(list(t.shape)), reversed(list(target))))


# ------------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention
# ------------------------------------------------------------------------------------------------

def sdpa_pattern(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    # HF attn_implementation="sdpa", nanoGPT's flash path, nn.MultiheadAttention's fast path
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def check_sdpa(m: Match) -> Optional[str]:
    """The call is one the op reproduces exactly: 3-D or 4-D q/k/v without batch broadcasting, a
    bool or same-dtype float mask that broadcasts to the scores, constant flags."""
    return _check_sdpa(m, repeated_kv=False)


def check_sdpa_repeated_kv(m: Match) -> Optional[str]:
    """check_sdpa, for K/V that check_repeat_kv showed are repeated up to q's heads."""
    return _check_sdpa(m, repeated_kv=True)


def _check_sdpa(m: Match, repeated_kv: bool) -> Optional[str]:
    q, k, v = m["q"], m["k"], m["v"]
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "q, k and v must all be tensors"
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return f"q, k, v must all be 3-D or 4-D (got {q.dim()}, {k.dim()}, {v.dim()})"
    cast = autocast_dtype(m)  # torch.autocast casts q, k, v and a float mask to it
    if len({q.dtype, k.dtype, v.dtype}) != 1 and cast is None:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if q.dtype not in _FLOATS:
        return f"q, k, v dtype {q.dtype} is not one of float16, bfloat16, float32"
    for name in ("is_causal", "enable_gqa"):
        if not isinstance(m[name], bool):
            return f"{name} is not a constant bool"
    dropout_p, scale = number_value(m["dropout_p"]), number_value(m["scale"])
    if not _is_number(dropout_p) or not 0 <= dropout_p < 1:
        return f"dropout_p {dropout_p!r} is not a constant in [0, 1)"
    if scale is not None and not _is_number(scale):
        return "scale is not a Python number"
    if scale is not None and not abs(float(scale)) <= torch.finfo(torch.float32).max:  # NaN too
        # the op takes it as an fp32 scale vector: past 3.4e38 that raised an overflow RuntimeError
        return f"scale {scale!r} is not a finite float32 number (eager's scores are inf or NaN there)"
    if q.dim() == 4 and not known_equal(q.shape[0], k.shape[0]):
        return "q and k batch sizes differ (broadcast batch)"
    # SDPA needs k and v of one length; read from a KV cache in a dynamic-shape graph, the two may
    # still be separate symbols: equal under a guard, so a call where they differ compiles anew
    if not (known_equal(k.shape[-3], v.shape[-3]) and guard_equal(k.shape[-2], v.shape[-2])):
        return "k and v differ in heads or sequence length"
    hq, hk = q.shape[-3], k.shape[-3]
    if not known_equal(hq, hk):
        if not (m["enable_gqa"] or repeated_kv or kv_heads_broadcast(q, k, v)):
            return f"q has {hq} heads and k {hk} without enable_gqa (broadcasting)"
        # one K/V head serves any number of query heads (a symbolic count under dynamic=True too);
        # with enable_gqa=True SDPA itself raises unless hk divides hq, so symbolic counts there
        # divide in every call that runs (the op guards on it)
        symbolic = not (isinstance(hq, int) and isinstance(hk, int))
        if not (known_equal(hk, 1) or (symbolic and m["enable_gqa"] is True)
                or (not symbolic and hq % hk == 0)):
            return f"q heads {hq} are not a known multiple of k/v heads {hk}"
    mask = m["attn_mask"]
    if m.present("attn_mask"):
        if not isinstance(mask, torch.Tensor):
            return "attn_mask is not a tensor"
        if mask.dtype != torch.bool and mask.dtype != q.dtype and not (cast and mask.dtype in _FLOATS):
            return f"attn_mask dtype {mask.dtype} is neither bool nor q's {q.dtype}"
        if not _broadcasts_to(mask, tuple(q.shape[:-1]) + (k.shape[-2],)):
            return f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the scores"
        if m["is_causal"]:
            return "attn_mask together with is_causal=True (SDPA rejects it)"
    return check_supported_shapes(q, k, v, "dot")


def _cast_as_autocast(dtype, q, k, v, attn_mask):
    """SDPA's floating arguments cast to `autocast_dtype`, as autocast casts them (a bool mask stays)."""
    if dtype is None:
        return q, k, v, attn_mask
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype), attn_mask


def _autocast_args(m: Match) -> dict:
    return {"dtype": autocast_dtype(m)}


def sdpa_replacement(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, config=None, dtype=None):
    q, k, v, attn_mask = _cast_as_autocast(dtype, q, k, v, attn_mask)
    enable_gqa = enable_gqa or kv_heads_broadcast(q, k, v)  # SDPA broadcasts a single K/V head
    three_d = q.dim() == 3
    if three_d:  # the op left-pads the mask's dims, so a (N, L, S) mask lines up with (1, N, L, S)
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if isinstance(scale, (torch.SymFloat, torch.SymInt)):
        scale = float(scale)  # guards on this call's value (number_value)
    out = attention_op(q, k, v, metric="dot", scale=scale, causal=is_causal, attn_mask=attn_mask,
                       dropout_p=float(dropout_p), enable_gqa=enable_gqa, config=config)
    return out.squeeze(0) if three_d else out


# ------------------------------------------------------------------------------------------------
# Grouped-query attention written by repeating K/V
# ------------------------------------------------------------------------------------------------

def sdpa_repeat_kv_pattern(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, n, nv):
    # K/V repeated per head: k.repeat_interleave(n, dim=1), or HF's repeat_kv (expand + reshape),
    # which canonicalization writes as repeat_interleave
    return F.scaled_dot_product_attention(q, torch.repeat_interleave(k, n, -3), torch.repeat_interleave(v, nv, -3),
                                          attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def sdpa_repeat_kv_replacement(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                               config=None, dtype=None, **_):
    q, k, v, attn_mask = _cast_as_autocast(dtype, q, k, v, attn_mask)
    if isinstance(scale, (torch.SymFloat, torch.SymInt)):
        scale = float(scale)  # guards on this call's value (number_value)
    return attention_op(q, k, v, metric="dot", scale=scale, causal=is_causal, attn_mask=attn_mask,
                        dropout_p=float(dropout_p), enable_gqa=True, config=config)


# ------------------------------------------------------------------------------------------------
# nn.MultiheadAttention (F.multi_head_attention_forward)
# ------------------------------------------------------------------------------------------------

def mha_pattern(query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training, key_padding_mask,
                need_weights, attn_mask, use_separate_proj_weight, q_proj_weight, k_proj_weight,
                v_proj_weight, static_k, static_v, average_attn_weights, is_causal):
    # nn.MultiheadAttention.forward, batch_first either way (the module transposes around it).
    # [1] (the averaged weights) is not part of the pattern: when the caller uses it, the call
    # node escapes the match and the site is a near-miss that says so.
    return operator.getitem(F.multi_head_attention_forward(
        query, key, value, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
        add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training, key_padding_mask,
        need_weights, attn_mask, use_separate_proj_weight, q_proj_weight, k_proj_weight,
        v_proj_weight, static_k, static_v, average_attn_weights, is_causal), 0)


def check_mha(m: Match) -> Optional[str]:
    """The subset of multi_head_attention_forward the replacement reproduces: batched 3-D inputs,
    no bias_k/bias_v, no zero attention, no static K/V, constant flags, 2-D/3-D attn_mask."""
    query, key, value = m["query"], m["key"], m["value"]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in (query, key, value)):
        return "nn.MultiheadAttention with unbatched (2-D) inputs"
    if query.dtype not in _FLOATS:
        return f"dtype {query.dtype} is not float16, bfloat16 or float32"
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if m.present(name):
            return f"{name} is set (add_bias_kv / static keys are not supported)"
    for name in ("add_zero_attn", "training", "need_weights", "use_separate_proj_weight", "is_causal"):
        if not isinstance(m[name], bool):
            return f"{name} is not a constant bool"
    if m["add_zero_attn"]:
        return "add_zero_attn=True"
    if not _is_number(number_value(m["dropout_p"])) or not 0 <= number_value(m["dropout_p"]) < 1:
        return "dropout_p is not a constant in [0, 1)"
    heads, E = m["num_heads"], query.shape[-1]
    if not isinstance(heads, int) or not isinstance(m["embed_dim"], int) or not known_equal(m["embed_dim"], E):
        return "embed_dim/num_heads are not constants matching the input"
    if E % heads:
        return f"embed_dim {E} is not divisible by num_heads {heads}"
    if m["is_causal"] and not m.present("attn_mask"):
        return "is_causal without attn_mask (nn.MultiheadAttention rejects it)"
    packed = not m["use_separate_proj_weight"]
    if packed and not m.present("in_proj_weight"):
        return "no in_proj_weight"
    L, N, S = query.shape[0], query.shape[1], key.shape[0]
    if m.present("attn_mask"):
        mask = m["attn_mask"]
        # multi_head_attention_forward raises on any other mask shape, so sizes Dynamo traced
        # apart (a static mask, L made dynamic by a recompile) are equal in every valid call
        ok = (mask.dim() == 2 and guard_equal(mask.shape[0], L) and guard_equal(mask.shape[1], S)) or \
             (mask.dim() == 3 and all(guard_equal(a, b) for a, b in zip(mask.shape, (N * heads, L, S))))
        if not ok:
            return f"attn_mask of shape {tuple(mask.shape)} is not (L, S) or (N*H, L, S), with (N, L, S) = {(N, L, S)}"
        if mask.dtype != torch.bool and not mask.is_floating_point():
            return f"attn_mask dtype {mask.dtype}"
    if m.present("key_padding_mask"):
        kpm = m["key_padding_mask"]
        if kpm.dim() != 2 or not (guard_equal(kpm.shape[0], N) and guard_equal(kpm.shape[1], S)):
            return f"key_padding_mask of shape {tuple(kpm.shape)} is not (N, S) = {(N, S)}"
        if kpm.dtype != torch.bool and not kpm.is_floating_point():
            return f"key_padding_mask dtype {kpm.dtype}"
    q4 = SimpleNamespace(shape=(N, heads, L, E // heads), dtype=query.dtype, device=query.device)
    kv4 = SimpleNamespace(shape=(N, heads, S, E // heads), dtype=query.dtype, device=query.device)
    return check_supported_shapes(q4, kv4, kv4, "dot")


def mha_replacement(query, key, value, embed_dim, num_heads, in_proj_weight=None, in_proj_bias=None,
                    bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=None,
                    out_proj_bias=None, training=True, key_padding_mask=None, need_weights=True,
                    attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
                    k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                    average_attn_weights=True, is_causal=False, config=None):
    """F.multi_head_attention_forward's output for the subset check_mha admits, step for step,
    with its attention core as the fused op. The mask handling is torch's own helpers, so bool
    masks (True = masked out) become the same additive -inf masks as in eager."""
    tgt_len, bsz, E = query.shape
    src_len = key.shape[0]
    head_dim = E // num_heads
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    # eager uses SDPA's is_causal only without padding mask and weights; else the given mask
    causal = bool(is_causal) and key_padding_mask is None and not need_weights
    if causal:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
    if use_separate_proj_weight:
        b_q = b_k = b_v = None
        if in_proj_bias is not None:
            b_q, b_k, b_v = in_proj_bias.chunk(3)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight, v_proj_weight, b_q, b_k, b_v)
    else:
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    p = float(dropout_p) if training else 0.0
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = attention_op(q, k, v, metric="dot", causal=causal, attn_mask=attn_mask,
                       dropout_p=p, config=config)
    out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, E)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    return out.view(tgt_len, bsz, out.size(1))


RULES = [
    Rule(name="attention.sdpa", kind="attention", pattern=sdpa_pattern, replacement=sdpa_replacement,
         constraints=(plain_tensors, check_sdpa,), priority=100, variant="dot", exact=exact_unless_dropout("dropout_p"),
         configs=configs_for("dot", offer_sdpa=False), replacement_args=_autocast_args),
    Rule(name="attention.sdpa_repeat_kv", kind="attention", pattern=sdpa_repeat_kv_pattern,
         replacement=sdpa_repeat_kv_replacement, constraints=(plain_tensors, check_repeat_kv, check_sdpa_repeated_kv), priority=120,
         variant="dot", exact=exact_unless_dropout("dropout_p"), configs=configs_for("dot", offer_sdpa=False),
         replacement_args=_autocast_args),
    Rule(name="attention.multihead", kind="attention", pattern=mha_pattern, replacement=mha_replacement,
         constraints=(plain_tensors, check_mha,), priority=100, variant="dot", exact=exact_unless_dropout("dropout_p"),
         configs=configs_for("dot", offer_sdpa=False)),
]

for _r in RULES:
    register_rule(_r, replace=True)
