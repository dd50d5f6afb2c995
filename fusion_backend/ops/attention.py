"""The `attention` op: dot / l2 / l1 / cosine attention with the semantics of
`F.scaled_dot_product_attention`, as `torch.library` custom ops with fake kernels and autograd.

    attention(q, k, v, *, metric="dot", scale=None, causal=False, attn_mask=None, dropout_p=0.0,
              enable_gqa=False, softcap=None, sinks=None, config=None)

q (B, H, Nq, D); k (B, Hkv, Nk, D); v (B, Hkv, Nk, Dv); output (B, H, Nq, Dv) in q's dtype.
Logits: dot scale*q.k (default 1/sqrt(D)); l2 -scale*|q-k|^2; l1 -scale*sum|q-k|; cosine
scale*cos(q, k) (default scale 1.0 for the distances). `scale` is a float or a tensor with 1 or H
elements (any shape) that receives a gradient. `softcap` (dot only, with a number scale) soft-caps
the logits as Gemma 2 does: cap * tanh(scale*q.k / cap), before the mask. `sinks` (dot, H
elements, learnable) are GPT-OSS's attention sinks: each head's softmax also sums exp(sinks[h])
over one more key that has no value, so the weights of a row sum to less than 1. A bool mask
keeps where True, a float mask is added to the logits (and gets a gradient if it requires one);
both broadcast to (B, H, Nq, Nk). `causal` is the top-left lower triangle. A fully masked row gives 0. Blocks a
large mask drops whole are skipped (`kernels.attention.MaskRanges`), with the same result.

Two custom ops carry the work: truthfuse::attention_fwd returns (out, row stats, mask ranges) and
truthfuse::attention_bwd returns (dq, dk, dv, dscale, dmask); `register_autograd` joins them. The
dropout seed is an input tensor drawn from the device's torch generator, so the ops themselves are
deterministic and the backward regenerates the forward's dropout mask.

Where kernels cannot run (CPU without TRITON_INTERPRET=1) the PyTorch reference computes the
result. Where they should but cannot (unsupported shape, compile or launch failure), the op warns
once (`warn_fallback_once`) and uses the reference.
"""
import difflib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fusion_backend.kernels import attention as _tc
from fusion_backend.kernels import attention_l1 as _l1
from fusion_backend.kernels.philox import dropout_scale, philox_keep_mask
from fusion_backend.kernels.runtime import can_launch, device_unsupported, interpreting
from fusion_backend.ops.fallback import warn_fallback_once
from fusion_backend.ops.eager import eager_function, outside_autocast, plain_eager_call, reference_only
from fusion_backend.ops.seed import draw_seed, reference_seed, seed_value

METRICS = ("dot", "l2", "l1", "cosine")
COSINE_EPS = _tc.COSINE_EPS
"""Cosine divides by max(|x|, COSINE_EPS), as F.normalize(x, eps=COSINE_EPS) does (its default)."""
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

config_key = _tc.config_key


def default_attention_config(metric: str, head_dim: int, dtype: torch.dtype, device_type: str,
                             skips: bool = False, dropout: bool = False) -> dict:
    """The launch config used when `config=None`, per metric, head dim, dtype and device type,
    whether the call skips blocks by its mask (`kernels.attention.ranges_layout`) and whether it
    drops probabilities."""
    if metric == "l1":
        return _l1.default_l1_config(head_dim, dtype, device_type)
    return _tc.default_attention_config(metric, head_dim, dtype, device_type, skips, dropout)


def attention_config_space(metric: str, head_dim: int, dtype: torch.dtype, device_type: str) -> list:
    """Launch configs the tuner may search for this call (dicts; `config_key` gives each a string
    that `attention(..., config=key)` accepts). L1 has its own kernel and space."""
    if metric == "l1":
        return _l1.l1_config_space(head_dim, dtype, device_type)
    return _tc.attention_config_space(metric, head_dim, dtype, device_type)


# ----------------------------------------------------------------------------------------------
# Validation and support
# ----------------------------------------------------------------------------------------------
def _validate(q, k, v, metric, attn_mask, dropout_p, enable_gqa, scale, softcap=None, sinks=None, causal=False):
    if metric not in METRICS:
        raise ValueError(f"attention: unknown metric {metric!r}; valid metrics are {', '.join(METRICS)}")
    for name, flag in (("causal", causal), ("enable_gqa", enable_gqa)):
        # as SDPA's is_causal and enable_gqa: a string or a tensor is no flag ("no" is truthy)
        if not isinstance(flag, (bool, torch.SymBool)):
            raise ValueError(f"attention: {name} must be True or False, got {flag!r}")
    if sinks is not None:
        H = q.shape[1] if isinstance(q, Tensor) and q.dim() == 4 else None
        if not isinstance(sinks, Tensor) or not sinks.dtype.is_floating_point or sinks.numel() != H:
            raise ValueError(f"attention: sinks must be a floating tensor with one logit per query head ({H}), got "
                             f"{tuple(sinks.shape) if isinstance(sinks, Tensor) else type(sinks).__name__}")
        if metric != "dot":
            raise ValueError(f"attention: sinks apply to metric 'dot' only, not {metric!r}")
        if softcap is not None:
            raise ValueError("attention: sinks and softcap cannot be combined")
        if _needs_scale_grad(scale):
            raise ValueError("attention: with sinks the scale must be a number or a tensor that needs no gradient")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < math.inf:
            raise ValueError(f"attention: softcap must be None or a positive finite number, got {softcap!r}")
        if metric != "dot":
            raise ValueError(f"attention: softcap applies to metric 'dot' only, not {metric!r}")
        if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale == 0):
            raise ValueError(f"attention: softcap needs a nonzero number scale (or None), got {scale!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-d tensor (B, H, N, D), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    B, H, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"attention: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"attention: q and k head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if D == 0 and metric == "dot" and scale is None:
        raise ValueError("attention: head dim 0 has no default scale (1/sqrt(D)); pass scale")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: k and v must share (B, Hkv, Nk): k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"attention: inputs must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    Hkv = k.shape[1]
    if Hkv != H:
        if not enable_gqa:
            raise ValueError(f"attention: q has {H} heads and k/v have {Hkv}; pass enable_gqa=True for grouped-query attention")
        if Hkv == 0 or H % Hkv != 0:
            raise ValueError(f"attention: enable_gqa needs q heads ({H}) to be a multiple of k/v heads ({Hkv})")
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"attention: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise ValueError(f"attention: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise ValueError(f"attention: attn_mask must be bool (keep) or floating (additive), got {attn_mask.dtype}")
        if attn_mask.dim() > 4:
            raise ValueError(f"attention: attn_mask has {attn_mask.dim()} dims; at most 4")
        target = (B, H, Nq, k.shape[2])
        shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        for got, want in zip(shape, target):
            if got != 1 and got != want:
                raise ValueError(f"attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}")
    if isinstance(scale, Tensor):
        if scale.dtype.is_complex:  # the cast to fp32 would drop the imaginary part
            raise ValueError(f"attention: a tensor scale must be real (floating, integer or bool), got {scale.dtype}")
        if scale.numel() != 1 and scale.numel() != H:
            raise ValueError(f"attention: a tensor scale needs 1 or H={H} elements, got shape {tuple(scale.shape)}")
    elif scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"attention: scale must be a float, a tensor or None, got {type(scale).__name__}")
    elif scale is not None and math.isfinite(scale) and abs(scale) > torch.finfo(torch.float32).max:
        # the kernels take the scale in fp32: torch.full raised "value cannot be converted to type
        # float without overflow" from inside the call
        raise ValueError(f"attention: a number scale must fit float32 (|scale| <= 3.4e38), got {scale!r}")


def attention_supports(q, k, v, metric="dot", *, attn_mask=None, dropout_p=0.0, **_ignored):
    """(True, "") if the Triton kernels can take this call, else (False, reason). Reads only shapes,
    dtypes and devices, so it works on fake and meta tensors."""
    if metric not in METRICS:
        return False, f"unknown metric {metric!r}"
    if q.dtype not in _DTYPES:
        return False, f"dtype {q.dtype} (kernels take float16, bfloat16, float32)"
    D, Dv = q.shape[-1], v.shape[-1]
    if D > _tc.MAX_HEAD_DIM or Dv > _tc.MAX_HEAD_DIM:
        sizes = [d.node.hint if isinstance(d, torch.SymInt) else d for d in (D, Dv)]  # a symbol's example size
        return False, f"head dim {max(sizes)} > {_tc.MAX_HEAD_DIM}"
    if q.shape[-2] == 0 or k.shape[-2] == 0 or q.shape[0] == 0 or q.shape[1] == 0:
        return False, "empty input"
    if D == 0:  # eager's logits are all 0 (SDPA's default scale 1/sqrt(D) has no value)
        return False, "empty input (head dim 0)"
    reason = _past_32_bit_offsets(q, k, v, attn_mask)
    if reason:
        return False, reason
    reason = device_unsupported(q)
    return (False, reason) if reason else (True, "")


_MAX_OFFSET = 2**31 - 1
"""The kernels index within one (batch, head) slice with 32-bit offsets (their per-slice bases are
64-bit where a tensor needs it, so the batch and head counts are free): a slice must span fewer
elements than this, and the B*H*Nq query rows must number fewer."""


def _size_hint(x):
    """An int for a size or stride, a symbol's example value (None when it has none): the check
    below must not add guards on a dynamic graph's sizes (the call checks its real sizes again)."""
    return x.node.hint if isinstance(x, torch.SymInt) else int(x)


def _past_32_bit_offsets(q, k, v, attn_mask) -> str:
    """Why a (b, h) slice of the call is too large for the kernels' 32-bit offsets, or "": a slice
    of q, k, v or the mask as its strides lay it out (a mask sliced from a larger buffer spans that
    buffer's rows), and the mask's Nq x Nk plane (its gradient and layout passes index one)."""
    named = [("q", q), ("k", k), ("v", v)] + ([("attn_mask", attn_mask)] if attn_mask is not None else [])
    for name, t in named:
        # a rule's stand-in for a tensor not built yet has no strides: count it as contiguous
        strides = t.stride()[-2:] if hasattr(t, "stride") else (t.shape[-1], 1)
        dims = [(_size_hint(n), _size_hint(st)) for n, st in zip(t.shape[-2:], strides)]
        if any(n is None or st is None for n, st in dims):
            continue
        span = sum((n - 1) * abs(st) for n, st in dims) + 1
        if span > _MAX_OFFSET:
            return f"a (batch, head) slice of {name} spans {span} elements, past the kernels' 32-bit offsets"
    rows = [_size_hint(n) for n in q.shape[:3]]
    if None not in rows and math.prod(rows) > _MAX_OFFSET:  # the decoding join launches one program a row
        return f"{math.prod(rows)} query rows (B*H*Nq), more than one launch grid dimension holds"
    if attn_mask is not None:
        nq, nk = _size_hint(q.shape[-2]), _size_hint(k.shape[-2])
        if nq is not None and nk is not None and nq * nk > _MAX_OFFSET:
            return f"a {nq} x {nk} mask plane is past the kernels' 32-bit offsets"
    return ""


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def _scale_vector(scale, metric, D, H, device):
    """The scale as an (H,) fp32 tensor, still connected to a tensor scale's autograd graph."""
    if scale is None:
        scale = 1.0 / math.sqrt(D) if metric == "dot" else 1.0
    if isinstance(scale, Tensor):
        s = scale.reshape(-1).to(device=device, dtype=torch.float32)
        return (s.expand(H) if s.numel() == 1 else s).contiguous()
    return torch.full((H,), float(scale), device=device, dtype=torch.float32)


def _infinite_scale_as_nan(scale_h, scale, softcap=None, sinks=None):
    """scale_h (`_scale_vector`) with an infinite scale (a learnable temperature divided by 0, or
    exp'd past its dtype's range) as NaN. Eager's logits are then +-inf and every softmax row is NaN
    (inf - inf, or a row of -inf), but the kernels take a row whose logits are all -inf as one that
    sees no key and give it 0 (a fully masked row): such rows, and their gradients, came out 0
    where eager's were NaN, and training went on where eager's loss was NaN. A NaN scale makes
    every logit NaN, as eager's rows are. NaN is added where the scale is infinite and 0 elsewhere,
    so a finite scale and every scale's gradient pass unchanged (NaN through an infinite one, as in
    eager); s + s * 0 would do the same, but Inductor simplifies it to s. Not with a soft cap (tanh
    keeps eager's capped logits finite) or sinks (a row of -inf logits then gives its weight to the
    sink, 0 in eager too)."""
    if softcap is not None or sinks is not None:
        return scale_h
    if isinstance(scale, Tensor):
        return scale_h + torch.where(scale_h.isinf(), math.nan, 0.0)
    if isinstance(scale, (int, float)) and math.isinf(scale):
        return torch.full_like(scale_h, math.nan)
    return scale_h


def _dropout_keep_reference(shape, p, seed, device):
    """The kernels' dropout mask, in PyTorch: `kernels.philox` with seed + b*H + h per head."""
    B, H, Nq, Nk = shape
    heads = [philox_keep_mask(int(seed) + i, Nq, Nk, p, device=device, bits=_tc.DROPOUT_BITS)
             for i in range(B * H)]
    return torch.stack(heads).view(B, H, Nq, Nk)


def _reference_core(q, k, v, scale_h, metric, causal, mask, dropout_p, seed, dtype, softcap=0.0, sinks=None):
    """Float (dtype) reference returning (out, stats): stats are the kernels' row stats
    (`kernels.attention.new_row_stats`: row max, E_p[raw], log2 of the row sum). scale_h: (H,).
    softcap > 0: logits softcap * tanh(scale * raw / softcap) (dot). sinks: (H,) sink logits, a
    last column of every row's softmax, dropped before the product with v."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    if Hkv != H:
        kf = kf.repeat_interleave(H // Hkv, dim=1)
        vf = vf.repeat_interleave(H // Hkv, dim=1)
    if metric == "dot":
        raw = qf @ kf.transpose(-1, -2)
    elif metric == "l2":
        # -|q - k|^2 up to -|q|^2, constant along a softmax row: the kernels' raw score, so that
        # the row stats of a reference forward serve a backward on the kernels as their own do
        raw = 2 * qf @ kf.transpose(-1, -2) - (kf * kf).sum(-1)[..., None, :]
    elif metric == "l1":
        raw = -(qf[..., :, None, :] - kf[..., None, :, :]).abs().sum(-1) if Nq * Nk * D <= 2**24 \
            else -torch.cdist(qf, kf, p=1.0)
    else:
        raw = F.normalize(qf, dim=-1, eps=_tc.COSINE_EPS) @ F.normalize(kf, dim=-1, eps=_tc.COSINE_EPS).transpose(-1, -2)
    s = raw * scale_h.to(dtype).view(1, H, 1, 1)
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.to(dtype)
    if causal:
        tri = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~tri, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(dtype).view(1, H, 1, 1).expand(B, H, Nq, 1)], -1)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    # softmax, not exp(s - logsumexp): where a whole row sits near a huge finite negative (finfo.min
    # padding masks) the logsumexp loses the log(N) term to rounding and exp(s - lse) sums to N
    p = torch.softmax(s, -1).masked_fill(dead, 0.0)
    with torch.no_grad():
        # no key at all (Nk = 0, no sinks): every row is dead, and amax has nothing to reduce
        row_max = s.amax(-1, keepdim=True) if s.shape[-1] else s.new_zeros(s.shape[:-1] + (1,))
        log2_sum = torch.log2(torch.exp(s - row_max).sum(-1, keepdim=True))
        rbar = (torch.softmax(s, -1)[..., :Nk] * raw).sum(-1)
    if sinks is not None:
        p = p[..., :Nk]
    if dropout_p > 0:
        keep = _dropout_keep_reference(p.shape, dropout_p, seed, q.device)
        p = p * keep * dropout_scale(dropout_p, _tc.DROPOUT_BITS)
    out = p @ vf
    stats = torch.stack([row_max.masked_fill(dead, float("inf")).reshape(B * H, Nq), rbar.reshape(B * H, Nq),
                         log2_sum.masked_fill(dead, 0.0).reshape(B * H, Nq)])
    return out, stats.float()


def attention_reference(q, k, v, *, metric="dot", scale=None, causal=False, attn_mask=None, dropout_p=0.0,
                        enable_gqa=False, softcap=None, sinks=None, dropout_seed=None, config=None):
    """Pure PyTorch `attention` with identical semantics (float32 math, float64 for float64 inputs).
    Dropout draws the kernels' Philox mask for `dropout_seed` (or a fresh seed from torch's default
    generator), so with the seed the kernels were given it drops the same elements."""
    _validate(q, k, v, metric, attn_mask, dropout_p, enable_gqa, scale, softcap, sinks, causal)
    B, H, Nq, D = q.shape
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale_h = _infinite_scale_as_nan(_scale_vector(scale, metric, D, H, q.device), scale, softcap, sinks).to(dtype)
    mask = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = reference_seed(q.device)
    out, _ = _reference_core(q, k, v, scale_h, metric, causal, mask, float(dropout_p), dropout_seed or 0, dtype,
                             float(softcap or 0.0), None if sinks is None else sinks.reshape(-1))
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# Dispatch to kernels or reference
# ----------------------------------------------------------------------------------------------
def _kernel_inputs(*ts):
    """The interpreter computes bf16 wrongly: upcast bf16 CPU tensors to fp32."""
    return tuple(t.float() if (t is not None and t.device.type == "cpu" and t.dtype == torch.bfloat16) else t
                 for t in ts)


def _resolve_config(config, metric, D, dtype, device_type, ranges, dropout_p=0.0):
    """The launch config of a call: the key given, or the default (for a call with mask ranges, a
    non-empty `ranges`, the default of calls that skip blocks; with dropout, of calls that drop)."""
    if config is None:
        return default_attention_config(metric, D, dtype, device_type, ranges is not None and ranges.numel() > 0,
                                        dropout_p > 0)
    return _tc.parse_config_key(config)


def _use_kernels(q, k, v, metric, mask, dropout_p):
    if q.device.type == "cpu" and not interpreting():
        warn_fallback_once("attention", device_unsupported(q))
        return False
    ok, reason = attention_supports(q, k, v, metric, attn_mask=mask, dropout_p=dropout_p)
    if not ok:
        warn_fallback_once("attention", reason)
        return False
    if not can_launch(q, k, v, mask):
        warn_fallback_once("attention", "tensors on different devices")
        return False
    return True


def _new_ranges(q, k, mask, metric):
    """The forward's mask-ranges output: `kernels.attention.new_ranges` where the mask gets them,
    else an empty int32 tensor. Decided from shapes alone, as the fake implementation does."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    layout = _tc.ranges_layout(mask, B, H, Nq, Nk, metric)
    if layout is None:
        return q.new_empty(0, dtype=torch.int32)
    return _tc.new_ranges(layout, Nq, q.device)


@outside_autocast
def _fwd_impl(q, k, v, scale, mask, seed, metric, causal, dropout_p, config, scale_grad, softcap, sinks=None):
    ranges = _new_ranges(q, k, mask, metric)
    why_reference = reference_only((q, k, v, scale, mask, sinks))
    if why_reference:
        warn_fallback_once("attention", why_reference)
    elif _use_kernels(q, k, v, metric, mask, dropout_p):
        try:
            qk, kk, vk, mk = _kernel_inputs(q, k, v, mask)
            cfg = _resolve_config(config, metric, q.shape[-1], q.dtype, q.device.type, ranges, dropout_p)
            launch = _l1.l1_attention_forward if metric == "l1" else _tc.attention_forward
            kw = {} if metric == "l1" else dict(metric=metric, softcap=softcap, ranges=ranges, sinks=sinks)
            out, lse = launch(qk, kk, vk, scale, causal=causal, mask=mk, dropout_p=dropout_p, seed=seed,
                              config=cfg, stats=scale_grad, **kw)
            return out.to(q.dtype), lse, ranges
        except Exception as e:  # compile / launch failure: keep the model running
            warn_fallback_once("attention", f"kernel failed: {type(e).__name__}: {str(e)[:200]}")
    out, lse = _reference_core(q, k, v, scale, metric, causal, mask, dropout_p, seed_value(seed), torch.float32,
                               softcap, sinks)
    if ranges.numel():  # whole ranges: a backward on the kernels skips nothing
        _tc.MaskRanges.full(ranges, q.shape[2], k.shape[2])
    return out.to(q.dtype).contiguous(), lse, ranges


@outside_autocast
def _bwd_impl(grad_out, q, k, v, scale, mask, out, lse, seed, metric, causal, dropout_p, config, mask_grad,
              scale_grad, softcap, ranges=None, sinks=None):
    if _use_kernels(q, k, v, metric, mask, dropout_p):
        try:
            gk, qk, kk, vk, mk, ok = _kernel_inputs(grad_out, q, k, v, mask, out)
            cfg = _resolve_config(config, metric, q.shape[-1], q.dtype, q.device.type, ranges, dropout_p)
            if metric == "l1":
                r = _l1.l1_attention_backward(gk, qk, kk, vk, scale, ok, lse, causal=causal, mask=mk,
                                              dropout_p=dropout_p, seed=seed, mask_grad=mask_grad,
                                              scale_grad=scale_grad, config=cfg)
            else:
                r = _tc.attention_backward(gk, qk, kk, vk, scale, ok, lse, metric=metric, causal=causal, mask=mk,
                                           dropout_p=dropout_p, seed=seed, mask_grad=mask_grad,
                                           scale_grad=scale_grad, config=cfg, softcap=softcap, ranges=ranges)
            dq, dk, dv, dscale, dmask = r
            dmask = dmask.to(mask.dtype) if mask_grad else q.new_empty(0)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dscale, dmask
        except Exception as e:
            warn_fallback_once("attention", f"backward kernel failed: {type(e).__name__}: {str(e)[:200]}")
    # Reference backward: it regenerates the forward's dropout mask (kernels and reference draw
    # the same Philox mask for a seed), so it also serves a forward that ran the kernels. Taken by
    # torch.func.vjp: a custom op's body runs below autograd, where autograd.grad records nothing.
    ins = [t.detach().float() for t in (q, k, v, scale)] + ([mask.detach().float()] if mask_grad else [])

    def reference_out(qf, kf, vf, sf, *mf):
        o, _ = _reference_core(qf, kf, vf, sf, metric, causal, mf[0] if mask_grad else mask, dropout_p,
                               seed_value(seed), torch.float32, softcap, None if sinks is None else sinks.detach())
        return o

    _, pullback = torch.func.vjp(reference_out, *ins)
    gs = pullback(grad_out.float())  # zeros, never None, for an input the output does not use
    dmask = gs[4].to(mask.dtype) if mask_grad else q.new_empty(0)
    return gs[0].to(q.dtype), gs[1].to(k.dtype), gs[2].to(v.dtype), gs[3], dmask


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("truthfuse::attention_fwd", mutates_args=())
def attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, scale: Tensor, attn_mask: Optional[Tensor],
                     seed: Optional[Tensor], metric: str, causal: bool, dropout_p: float, config: Optional[str],
                     scale_grad: bool, softcap: float = 0.0,
                     sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Forward: (out (B, H, Nq, Dv) in q's dtype, row stats (3, B*H, Nq) fp32: row max, E_p[raw]
    (when scale_grad, else 0) and log2 of the row sum, the mask's kept ranges for the backward
    (`kernels.attention.MaskRanges`; empty without). scale (H,) fp32; attn_mask 4-d broadcastable
    or None; seed the dropout's 0-d int64 tensor on q's device (`ops.seed`), None without dropout;
    softcap the dot logits' soft cap, 0 for none; sinks (H,) fp32 sink logits or None."""
    return _fwd_impl(q, k, v, scale, attn_mask, seed, metric, causal, dropout_p, config, scale_grad, softcap, sinks)


@attention_fwd_op.register_fake
def _(q, k, v, scale, attn_mask, seed, metric, causal, dropout_p, config, scale_grad, softcap=0.0, sinks=None):
    B, H, Nq, _ = q.shape
    return (q.new_empty((B, H, Nq, v.shape[-1])), q.new_empty((3, B * H, Nq), dtype=torch.float32),
            _new_ranges(q, k, attn_mask, metric))


@torch.library.custom_op("truthfuse::attention_bwd", mutates_args=())
def attention_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: Tensor, attn_mask: Optional[Tensor],
                     out: Tensor, lse: Tensor, seed: Optional[Tensor], metric: str, causal: bool, dropout_p: float,
                     config: Optional[str], mask_grad: bool, scale_grad: bool, softcap: float = 0.0,
                     ranges: Optional[Tensor] = None,
                     sinks: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: (dq, dk, dv, dscale (H,) fp32 (zeros unless scale_grad), dmask (attn_mask's shape,
    or empty when not mask_grad)). ranges: the forward's third output."""
    return _bwd_impl(grad_out, q, k, v, scale, attn_mask, out, lse, seed, metric, causal, dropout_p, config, mask_grad,
                     scale_grad, softcap, ranges, sinks)


@attention_bwd_op.register_fake
def _(grad_out, q, k, v, scale, attn_mask, out, lse, seed, metric, causal, dropout_p, config, mask_grad, scale_grad,
      softcap=0.0, ranges=None, sinks=None):
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else q.new_empty(0)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            scale.new_empty(scale.shape, dtype=torch.float32), dmask)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, mask, seed, metric, causal, dropout_p, config, scale_grad = inputs[:11]
    softcap = inputs[11] if len(inputs) > 11 else 0.0
    sinks = inputs[12] if len(inputs) > 12 else None
    out, lse, ranges = output
    ctx.mark_non_differentiable(lse, ranges)  # saved for backward, never results
    ctx.set_materialize_grads(False)  # so autograd does not fill a zero gradient for lse every backward
    ctx.mask_grad = mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[4]
    ctx.scale_grad = ctx.needs_input_grad[3]
    ctx.args = (metric, causal, dropout_p, config, softcap)
    ctx.n_inputs = len(inputs)
    ctx.sink_grad = sinks is not None and ctx.needs_input_grad[12]
    ctx.save_for_backward(q, k, v, scale, mask, seed, out, lse, ranges, sinks)


def _input_grads(ctx, grad_out, backward):
    """Gradients of the forward's inputs (11, or 12 with softcap), computed by `backward` (the
    backward op, or its implementation on the eager path)."""
    if grad_out is None:  # the output did not reach the loss
        return (None,) * ctx.n_inputs
    q, k, v, scale, mask, seed, out, lse, ranges, sinks = ctx.saved_tensors
    metric, causal, dropout_p, config, softcap = ctx.args
    dq, dk, dv, dscale, dmask = backward(grad_out, q, k, v, scale, mask, out, lse, seed, metric, causal, dropout_p,
                                         config, ctx.mask_grad, ctx.scale_grad, softcap, ranges, sinks)
    grads = (dq, dk, dv, dscale, (dmask if ctx.mask_grad else None)) + (None,) * (ctx.n_inputs - 5)
    if ctx.sink_grad:
        grads = grads[:12] + (_sink_grad(grad_out, out, lse, sinks),)
    return grads


def _sink_grad(grad_out, out, stats, sinks):
    """d loss / d sinks (H,) fp32: the sink's column of dS is -P_sink * delta per row (it has no
    value, so dP is 0 there), with P_sink = exp(sink - logsumexp) from the forward's row stats."""
    B, H, Nq, _ = out.shape
    # in torch ops, not the kernels' row_dot: this runs in the autograd formula, which
    # torch.compile traces (and Inductor fuses); the backward kernels' own delta stays inside them
    delta = (grad_out.float() * out.float()).sum(-1)
    lse = (stats[0] + stats[2] * math.log(2.0)).view(B, H, Nq)
    return -(torch.exp(sinks.view(1, H, 1) - lse) * delta).sum(dim=(0, 2))


def _backward(ctx, grad_out, grad_lse, grad_ranges):
    return _input_grads(ctx, grad_out, attention_bwd_op)


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


_EagerAttention = eager_function("_EagerAttention", _fwd_impl, _setup_context, _input_grads, _bwd_impl)


# ----------------------------------------------------------------------------------------------
# Row normalization (cosine on SDPA)
# ----------------------------------------------------------------------------------------------
def _normalize_reference(x, scale):
    y = F.normalize(x.float(), dim=-1, eps=_tc.COSINE_EPS)
    if scale is not None:
        y = y * scale.float().view(-1, 1, 1)
    return y.to(x.dtype)


def _normalize_kernels(x):
    return can_launch(x) and x.dtype in _DTYPES and x.numel() > 0


@torch.library.custom_op("truthfuse::normalize_rows", mutates_args=())
def normalize_rows_op(x: Tensor, scale: Optional[Tensor]) -> Tensor:
    """x / max(|x|, eps) over the last dim of a (B, H, N, D) tensor, times scale[h] ((H,) fp32) when
    given, rounded once to x's dtype: cosine attention's inputs, in one Triton pass."""
    if _normalize_kernels(x):
        try:
            (xk,) = _kernel_inputs(x)
            return _tc.normalize_rows(xk, scale)[0].to(x.dtype)
        except Exception as e:  # compile / launch failure: keep the model running
            warn_fallback_once("normalize_rows", f"kernel failed: {type(e).__name__}: {str(e)[:200]}")
    return _normalize_reference(x, scale).contiguous()


@normalize_rows_op.register_fake
def _(x, scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("truthfuse::normalize_rows_bwd", mutates_args=())
def normalize_rows_bwd_op(grad: Tensor, x: Tensor, scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Backward of truthfuse::normalize_rows: (dx, dscale (H,) fp32, empty without a scale)."""
    if _normalize_kernels(x):
        try:
            gk, xk = _kernel_inputs(grad, x)
            dx, dscale = _tc.normalize_rows_backward(xk, gk, scale)
            return dx.to(x.dtype), dscale if dscale is not None else x.new_empty(0, dtype=torch.float32)
        except Exception as e:
            warn_fallback_once("normalize_rows", f"backward kernel failed: {type(e).__name__}: {str(e)[:200]}")
    ins = [x.detach().float()] + ([scale.detach().float()] if scale is not None else [])
    _, pullback = torch.func.vjp(lambda xf, *sf: _normalize_reference(xf, sf[0] if sf else None), *ins)
    gs = pullback(grad.float())
    return gs[0].to(x.dtype), gs[1] if scale is not None else x.new_empty(0, dtype=torch.float32)


@normalize_rows_bwd_op.register_fake
def _(grad, x, scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
        scale.shape if scale is not None else (0,), dtype=torch.float32)


def _normalize_setup(ctx, inputs, output):
    x, scale = inputs
    ctx.save_for_backward(x, scale)


def _normalize_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    dx, dscale = normalize_rows_bwd_op(grad, x, scale)
    return dx, (dscale if (scale is not None and ctx.needs_input_grad[1]) else None)


normalize_rows_op.register_autograd(_normalize_backward, setup_context=_normalize_setup)


def _cosine_on_sdpa(q, k, v, scale_h, causal, dropout_p, enable_gqa):
    """Cosine attention as torch's SDPA (cuDNN or FlashAttention on a GPU) on λ·q^ and k^: the rows
    normalized (and q's scaled per head) by one Triton pass each way, the rest SDPA's kernels."""
    qs = normalize_rows_op(q, scale_h)
    kh = normalize_rows_op(k, None)
    return F.scaled_dot_product_attention(qs, kh, v, dropout_p=float(dropout_p), is_causal=bool(causal), scale=1.0,
                                          enable_gqa=bool(enable_gqa))


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------
SDPA_CONFIG = "sdpa"
"""The config that computes the call with torch's own fused SDPA kernels (cuDNN or FlashAttention
where they apply) instead of truthfuse's attention kernels: for plain dot-product attention they
are the fastest there is, and cosine runs on them after a Triton pass that normalizes q and k.
The tuner may choose them for a site whose math they compute exactly (`sdpa_supports`); for
cosine on a GPU without a mask, dropout or a learnable scale they are the default."""


def sdpa_supports(metric, attn_mask, scale, softcap=None, sinks=None) -> tuple:
    """(True, "") if config="sdpa" computes this call with the op's semantics, else (False, why).
    SDPA computes dot-product logits (cosine's on normalized rows) with a number scale (cosine: any
    scale, folded into q); masks stay with truthfuse's kernels, which give a fully masked row 0
    where SDPA's fused kernels give NaN or uniform rows."""
    if metric not in ("dot", "cosine"):
        return False, f"config='sdpa' computes dot-product and cosine attention only, not {metric!r}"
    if attn_mask is not None:
        return False, "config='sdpa' takes no attn_mask (causal=True is fine)"
    if softcap is not None:
        return False, "config='sdpa' does not soft-cap the logits"
    if sinks is not None:
        return False, "config='sdpa' has no attention sinks"
    if metric == "dot" and isinstance(scale, Tensor):
        return False, "config='sdpa' takes a number scale for dot-product attention, not a tensor"
    if metric == "cosine" and _needs_scale_grad(scale):
        return False, ("config='sdpa' for cosine takes a scale that needs no gradient: its scale gradient, "
                       "summed from SDPA's rounded dq, is up to 14% off at scales near 100 in bf16")
    return True, ""


def _centred_on_key_mean(q, k):
    """fp32 q and k less the mean key of their (b, kv head), in the coordinates where that mean
    lies more than 8 standard deviations from 0: |q - k|^2 does not change, but the kernels'
    expanded form 2 q.k - |k|^2 then works on the keys' spread instead of their distance from the
    origin. It loses about |k|^2 * 2^-24 per logit to cancellation, where eager's subtract-first
    form is exact: coordinates near 40 that differ by 0.3 were 4.6e-3 off float64. Below 8
    deviations that loss is under 64 * 2^-24 of the spread's, and centring could only hurt: keys
    that a mask hides may hold anything (an uninitialized cache), and a mean pulled to 1e18 by
    them would leave q - mean nothing of q. Such keys, or an inf or NaN among them, widen the
    deviation past the mean, and q and k pass unchanged. The subtraction's own rounding is 2^-24 of
    the spread. Half-precision inputs pass unchanged: rounding them after the subtraction costs
    precision on ordinary inputs, and the extra passes took 0.3 ms of a 1.5 ms bf16 forward at
    N=8192 (docs/troubleshooting.md has their limits). The mean is detached: the output does not
    depend on it, so the gradients through the subtraction are exact."""
    if k.dtype != torch.float32 or k.shape[2] == 0:
        return q, k
    spread, centre = torch.std_mean(k.detach(), dim=2, keepdim=True, correction=0)
    centre = torch.where(centre.abs() > 8 * spread, centre, 0.0)  # false for NaN too
    q_centre = centre if q.shape[1] == k.shape[1] else centre.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q - q_centre, k - centre


def _needs_scale_grad(scale) -> bool:
    return isinstance(scale, Tensor) and scale.requires_grad and torch.is_grad_enabled()


def _cosine_default_on_sdpa(q, metric, attn_mask, dropout_p, scale) -> bool:
    """config=None for cosine on a GPU without a mask, dropout or a scale that needs a gradient:
    SDPA's kernels after the Triton normalization (faster than the fused Triton kernels on an
    H100, docs/performance.md). The fused kernels keep the rest: their own Philox dropout, and an
    accurate scale gradient (centred on E_p[cos] per row, which cancels the error that delta =
    rowsum(dO * O) carries on peaked rows; summed from SDPA's dq it was 14% off at scale 100)."""
    return (metric == "cosine" and attn_mask is None and float(dropout_p) == 0.0 and not _needs_scale_grad(scale)
            and q.device.type == "cuda" and not interpreting())


def _checked_config_key(config) -> Optional[str]:
    """A call's config as the kernels' key string (None for the default), or a ValueError naming
    the valid forms: a malformed key or dict failed only inside the kernels' launch, which then
    warned and fell back to the reference, and a number raised re's TypeError."""
    if config is None:
        return None
    if isinstance(config, dict):
        try:
            key = config_key(config)
        except (KeyError, TypeError):
            key = ""
        if not key:
            raise ValueError(f"attention: config dict {config!r} is not a launch config; "
                             "attention_config_space gives them (or pass None, 'sdpa' or a config key)")
    elif isinstance(config, str):
        key = config
    else:
        raise ValueError(f"attention: config must be None, 'sdpa', a config key string or a dict from "
                         f"attention_config_space, got {type(config).__name__}")
    _tc.parse_config_key(key)  # a ValueError on a malformed key
    return key


_KEYWORDS = ("metric", "scale", "causal", "attn_mask", "dropout_p", "enable_gqa", "softcap", "sinks", "config")
_SDPA_SPELLINGS = {"is_causal": "causal"}  # F.scaled_dot_product_attention's names for ours


def _unknown_keywords(unknown: dict) -> None:
    """A TypeError naming the keywords `attention` takes: SDPA's is_causal (ours is causal) gave
    Python's bare "unexpected keyword argument", which does not say what the keyword is here."""
    name = next(iter(unknown))
    close = [_SDPA_SPELLINGS[name]] if name in _SDPA_SPELLINGS else difflib.get_close_matches(name, _KEYWORDS, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise TypeError(f"attention: unknown keyword {name!r}{hint}; the keywords are {', '.join(_KEYWORDS)}")


def attention(q, k, v, *, metric="dot", scale=None, causal=False, attn_mask=None, dropout_p=0.0,
              enable_gqa=False, softcap=None, sinks=None, config=None, **unknown):
    """Fused attention with the semantics of F.scaled_dot_product_attention and a choice of
    metric ("dot", "l2", "l1", "cosine"); see the module docstring. `config` is None (the
    device default), a config dict from `attention_config_space`, its `config_key` string, or
    "sdpa" (torch's SDPA kernels, see `sdpa_supports`; their dropout draws torch's own random
    stream; cosine on a GPU without a mask, dropout or a learnable scale takes them by default).
    `softcap` (dot, a number scale): logits softcap * tanh(scale * q.k / softcap), as Gemma 2.
    `sinks` (dot; H elements, may require grad; a scale that needs no gradient): GPT-OSS's sink
    logits, one value-less key per head in every row's softmax.
    Raises ValueError on bad input before anything is launched."""
    if unknown:
        _unknown_keywords(unknown)
    _validate(q, k, v, metric, attn_mask, dropout_p, enable_gqa, scale, softcap, sinks, causal)
    B, H, Nq, D = q.shape
    if config == SDPA_CONFIG:
        ok, why = sdpa_supports(metric, attn_mask, scale, softcap, sinks)
        if not ok:
            raise ValueError(f"attention: {why}")
        if metric == "cosine":
            return _cosine_on_sdpa(q, k, v, _scale_vector(scale, metric, D, H, q.device), causal, dropout_p,
                                   enable_gqa)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=float(dropout_p), is_causal=bool(causal),
                                              scale=None if scale is None else float(scale),
                                              enable_gqa=bool(enable_gqa))
    config = _checked_config_key(config)
    scale_h = _infinite_scale_as_nan(_scale_vector(scale, metric, D, H, q.device), scale, softcap, sinks)
    if metric == "l2":
        q, k = _centred_on_key_mean(q, k)
    if config is None and _cosine_default_on_sdpa(q, metric, attn_mask, dropout_p, scale):
        return _cosine_on_sdpa(q, k, v, scale_h, causal, 0.0, enable_gqa)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if mask.device != q.device:
            mask = mask.to(q.device)
    seed = draw_seed(q) if dropout_p > 0 else None
    scale_grad = isinstance(scale, Tensor) and scale.requires_grad and torch.is_grad_enabled()
    args = (q, k, v, scale_h, mask, seed, metric, bool(causal), float(dropout_p), config, scale_grad,
            float(softcap or 0.0))
    tensors = args[:5]
    if sinks is not None:  # (H,) fp32, still connected to the sinks' autograd graph
        args = args + (sinks.reshape(-1).to(device=q.device, dtype=torch.float32).contiguous(),)
        tensors = tensors + args[12:]
    if reference_only(tensors):  # forward-mode AD, a torch.func transform: the reference's PyTorch ops
        out = _fwd_impl(*args)[0]
    elif plain_eager_call(tensors):  # eager: skip the dispatch layers (and autograd when unneeded)
        differentiable = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        out = (_EagerAttention.apply(*args) if differentiable else _fwd_impl(*args))[0]
    else:
        out = attention_fwd_op(*args)[0]
    return out
