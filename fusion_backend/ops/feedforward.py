"""The `feedforward` op: Linear -> activation -> dropout -> Linear -> dropout (+ residual), plain or
gated (SwiGLU / GEGLU), forward and backward, as `torch.library` custom ops.

    non-gated: hidden = act(x @ w_in.T + b_in)
    gated:     hidden = act(x @ w_gate.T + b_gate) * (x @ w_in.T + b_in)
    hidden = dropout(hidden, hidden_dropout_p)
    out    = dropout(hidden @ w_out.T + b_out, output_dropout_p) [+ residual]

Two implementations, chosen by `impl` (the tuner picks per shape):
  "triton": Triton GEMMs whose epilogues do bias, activation, gating, dropout and residual.
  "cublas": torch.matmul / addmm for the products and one fused Triton elementwise pass per
            epilogue. Where the forward keeps no pre-activation and has no hidden dropout, ReLU
            and tanh GELU come from cuBLASLt's epilogue of the first product instead
            (`gemm_epilogue_computes`), with no elementwise pass over the hidden at all.
Training memory: forward saves x, the pre-activation(s) and the dropout seed, never the
activation output or a mask; backward regenerates the masks from the seed (Philox) and recomputes
the activation from the pre-activation.

`feedforward_reference` is the same function in plain PyTorch. It draws its dropout mask with the
same Philox stream as the kernels, so under one `torch.manual_seed` both give the same result.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false

from ..kernels import feedforward as K
from ..kernels.philox import dropout_scale, philox_keep_mask
from ..kernels.runtime import can_launch, device_unsupported, interpreting
from .eager import eager_function, outside_autocast, plain_eager_call, reference_only
from .fallback import warn_fallback_once
from .seed import draw_seed, reference_seed, seed_value

__all__ = [
    "ACTIVATIONS",
    "IMPLS",
    "feedforward",
    "feedforward_reference",
    "feedforward_supports",
    "feedforward_config_space",
    "default_feedforward_config",
]

ACTIVATIONS = tuple(K.ACTIVATIONS)
"""Valid `activation` names: gelu (exact erf), gelu_tanh, relu, silu, quick_gelu (z * sigmoid(1.702 z)),
relu2 (relu(z)**2, the squared ReLU of Nemotron and Persimmon)."""
IMPLS = ("triton", "cublas")
"""Valid `impl` names; None picks `_DEFAULT_IMPL`."""
_DEFAULT_IMPL = "cublas"  # cuBLAS products + fused epilogues: the faster of the two on H100 at LLM sizes
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_NUMEL = 2**31 - 1  # the Triton GEMM indexes with int32 offsets (the elementwise kernels do not)

# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------


def _gemm_cfg(bm, bn, bk, g, w, s):
    return {
        "key": f"triton:m{bm}n{bn}k{bk}g{g}w{w}s{s}", "impl": "triton",
        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g, "num_warps": w, "num_stages": s,
    }


def _ew_cfg(bm, bn, w):
    return {"key": f"cublas:m{bm}n{bn}w{w}", "impl": "cublas", "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w}


# The interpreter runs one program at a time in numpy: big tiles mean few programs.
_INTERP_GEMM = _gemm_cfg(64, 64, 64, 4, 4, 1)
_INTERP_EW = _ew_cfg(64, 128, 4)
_GEMM_SPACE = [_INTERP_GEMM] + [
    _gemm_cfg(bm, bn, bk, 8, w, s)
    for (bm, bn, bk, w, s) in (
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
        (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
        (256, 128, 64, 8, 3),
    )
]
_EW_SPACE = [_INTERP_EW] + [_ew_cfg(bm, bn, w) for (bm, bn, w) in ((16, 256, 4), (32, 128, 4), (32, 256, 8), (8, 512, 4))]
_BY_KEY = {c["key"]: c for c in _GEMM_SPACE + _EW_SPACE}


def feedforward_config_space(impl: str = "triton", *, gated: bool = False) -> list[dict]:
    """Launch configs the tuner may pass as `config=` for `impl`, each a dict with a stable string
    `key` (pass that key to `feedforward`). "triton": GEMM tiles (BLOCK_M/N/K, GROUP_M, num_warps,
    num_stages), used by every GEMM of the op; "cublas": tiles of the elementwise epilogue.
    Gated GEMMs hold two accumulators, so the widest tiles are left out for them."""
    _check_impl(impl)
    if impl == "cublas":
        return [dict(c) for c in _EW_SPACE]
    space = _GEMM_SPACE
    if gated:
        space = [c for c in space if c["BLOCK_M"] * c["BLOCK_N"] <= 128 * 128]
    return [dict(c) for c in space]


def default_feedforward_config(impl: str = "triton", *, gated: bool = False, interpret: Optional[bool] = None) -> dict:
    """The config used when `config=None`."""
    _check_impl(impl)
    if interpret is None:
        interpret = interpreting()
    if impl == "cublas":
        return dict(_INTERP_EW if interpret else _BY_KEY["cublas:m32n128w4"])
    if interpret:
        return dict(_INTERP_GEMM)
    return dict(_BY_KEY["triton:m128n128k64g8w8s4" if gated else "triton:m128n256k64g8w8s3"])


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"feedforward: impl must be None or one of {IMPLS}, got {impl!r}")


def _resolve_config(impl: str, config: Optional[str], gated: bool):
    """(gemm config, elementwise config) for a launch. Read-only: the dicts are shared."""
    return _resolved_config(impl, config, gated, interpreting())


@functools.lru_cache(maxsize=None)  # every forward and backward asks again, and host time counts
def _resolved_config(impl: str, config: Optional[str], gated: bool, interpret: bool):
    ew = default_feedforward_config("cublas", interpret=interpret)
    gemm = default_feedforward_config("triton", gated=gated, interpret=interpret)
    if config:
        cfg = _BY_KEY.get(config)
        if cfg is None or cfg["impl"] != impl:
            valid = [c["key"] for c in feedforward_config_space(impl)]
            raise ValueError(f"feedforward: unknown config {config!r} for impl={impl!r}; valid keys: {valid}")
        if impl == "cublas":
            ew = cfg
        else:
            gemm = cfg
    return gemm, ew


# ----------------------------------------------------------------------------------------------
# Validation and support
# ----------------------------------------------------------------------------------------------


def _validate(x, w_in, b_in, w_out, b_out, activation, w_gate, b_gate, hidden_dropout_p, output_dropout_p, residual, impl, config):
    """Raise ValueError on anything the op cannot compute. Uses shapes, dtypes and devices only."""
    if not isinstance(activation, str) or activation not in K.ACTIVATIONS:  # a list is unhashable
        raise ValueError(f"feedforward: unknown activation {activation!r}; valid: {ACTIVATIONS}")
    if impl is not None:
        _check_impl(impl)
    for name, p in (("hidden_dropout_p", hidden_dropout_p), ("output_dropout_p", output_dropout_p)):
        if not isinstance(p, (int, float)) or not (0.0 <= float(p) <= 1.0):
            raise ValueError(f"feedforward: {name} must be a float in [0, 1], got {p!r}")
    for name, t in (("x", x), ("w_in", w_in), ("w_out", w_out)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"feedforward: {name} must be a tensor, got {type(t).__name__}")
    for name, t in (("b_in", b_in), ("b_out", b_out), ("w_gate", w_gate), ("b_gate", b_gate), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"feedforward: {name} must be a tensor or None, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("feedforward: x must have shape (..., d), got a scalar")
    if w_in.dim() != 2 or w_out.dim() != 2:
        raise ValueError(f"feedforward: w_in and w_out must be 2-D (nn.Linear layout), got {tuple(w_in.shape)} and {tuple(w_out.shape)}")
    h, d = w_in.shape
    if x.shape[-1] != d:
        raise ValueError(f"feedforward: x's last dim {x.shape[-1]} does not match w_in {tuple(w_in.shape)} (expected (h, d) with d = {x.shape[-1]})")
    if w_out.shape[1] != h:
        raise ValueError(f"feedforward: w_out {tuple(w_out.shape)} must be (d_out, h) with h = {h}")
    d_out = w_out.shape[0]
    if w_gate is not None and tuple(w_gate.shape) != tuple(w_in.shape):
        raise ValueError(f"feedforward: w_gate {tuple(w_gate.shape)} must have w_in's shape {tuple(w_in.shape)}")
    if b_gate is not None and w_gate is None:
        raise ValueError("feedforward: b_gate given without w_gate")
    for name, b, n in (("b_in", b_in, h), ("b_gate", b_gate, h), ("b_out", b_out, d_out)):
        if b is not None and (b.dim() != 1 or b.shape[0] != n):
            raise ValueError(f"feedforward: {name} must have shape ({n},), got {tuple(b.shape)}")
    if residual is not None:
        want = tuple(x.shape[:-1]) + (d_out,)
        if tuple(residual.shape) != want:
            raise ValueError(f"feedforward: residual must have shape {want}, got {tuple(residual.shape)}")
    tensors = [t for t in (x, w_in, b_in, w_out, b_out, w_gate, b_gate, residual) if t is not None]
    if not x.dtype.is_floating_point:
        raise ValueError(f"feedforward: x must be floating point, got {x.dtype}")
    if any(t.dtype != x.dtype for t in tensors):
        raise ValueError(f"feedforward: all tensors must share x's dtype {x.dtype}, got {sorted({str(t.dtype) for t in tensors})}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"feedforward: all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if config is not None:
        if not isinstance(config, str):  # a config dict: its "key" is the argument (dicts are unhashable)
            raise ValueError(f"feedforward: config must be None or a key string from feedforward_config_space(impl) "
                             f"(its dicts' 'key'), got {type(config).__name__}")
        _resolve_config(impl or _DEFAULT_IMPL, config, w_gate is not None)


def feedforward_supports(
    x, w_in, b_in=None, w_out=None, b_out=None, *, activation="gelu", w_gate=None, b_gate=None,
    hidden_dropout_p=0.0, output_dropout_p=0.0, residual=None, impl=None, config=None,
) -> tuple[bool, str]:
    """Whether `feedforward` would run its Triton kernels on these arguments, and why not.

    Reads only shapes, dtypes and devices, so fake tensors work. (False, reason) means the op
    would raise (invalid arguments) or compute the site with the PyTorch reference.
    """
    if w_out is None:
        return False, "w_out is missing"
    try:
        _validate(x, w_in, b_in, w_out, b_out, activation, w_gate, b_gate, hidden_dropout_p, output_dropout_p, residual, impl, config)
    except ValueError as e:
        return False, str(e)
    if x.dtype not in _KERNEL_DTYPES:
        return False, f"dtype {x.dtype} has no kernel (supported: float16, bfloat16, float32)"
    reason = device_unsupported(x)
    return (False, reason) if reason else (True, "ok")


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------


def _act_ref(z, activation):
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "relu":
        return F.relu(z)
    if activation == "quick_gelu":
        return z * torch.sigmoid(K.QUICK_GELU_SLOPE * z)
    if activation == "relu2":
        return F.relu(z).square()
    return F.silu(z)


def _act_and_grad_ref(z, activation):
    """(act(z), act'(z)) by formula, matching the kernels' `_act_and_grad`."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * K._SQRT1_2))
        return z * cdf, cdf + z * torch.exp(-0.5 * z * z) * K._INV_SQRT_2PI
    if activation == "gelu_tanh":
        t = torch.tanh(K._SQRT_2_OVER_PI * (z + 0.044715 * z**3))
        dinner = K._SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner
    if activation == "relu":
        return z.clamp_min(0.0), (z > 0).to(z.dtype)
    if activation == "relu2":
        r = z.clamp_min(0.0)
        return r * r, 2.0 * r
    slope = K.QUICK_GELU_SLOPE if activation == "quick_gelu" else 1.0
    s = torch.sigmoid(slope * z)
    return z * s, s * (1.0 + slope * z * (1.0 - s))


def _mask_scale(seed: int, rows: int, cols: int, p: float, device, dtype):
    """Dropout multiplier (keep / (1 - p)) of a (rows, cols) matrix, the kernels' Philox stream."""
    return philox_keep_mask(seed, rows, cols, p, device=device).to(dtype) * dropout_scale(p)


def _rows_of(x):
    """The rows (tokens) of x (..., d): the product of its leading dims, not reshape's -1, which
    has no value where x or the output holds no element (d = 0, d_out = 0)."""
    return math.prod(x.shape[:-1])


def feedforward_reference(
    x, w_in, b_in, w_out, b_out, *, activation="gelu", w_gate=None, b_gate=None,
    hidden_dropout_p=0.0, output_dropout_p=0.0, residual=None, seed=None, impl=None, config=None,
):
    """`feedforward` in plain, differentiable PyTorch, in x's dtype.

    seed: the dropout seed (int); None draws it from torch's default generator exactly as
    `feedforward` does, so the same `torch.manual_seed` gives both the same dropout masks.
    impl and config are accepted and ignored, so both functions take the same arguments.
    """
    _validate(x, w_in, b_in, w_out, b_out, activation, w_gate, b_gate, hidden_dropout_p, output_dropout_p, residual, None, None)
    p_h, p_o = float(hidden_dropout_p), float(output_dropout_p)
    if seed is None and (p_h > 0 or p_o > 0):
        seed = reference_seed(x.device)
    x2 = x.reshape(_rows_of(x), x.shape[-1])
    if w_gate is not None:
        hid = _act_ref(F.linear(x2, w_gate, b_gate), activation) * F.linear(x2, w_in, b_in)
    else:
        hid = _act_ref(F.linear(x2, w_in, b_in), activation)
    if p_h > 0:
        hid = hid * _mask_scale(seed, hid.shape[0], hid.shape[1], p_h, x.device, x.dtype)
    out = F.linear(hid, w_out, b_out)
    if p_o > 0:
        out = out * _mask_scale(seed + 1, out.shape[0], out.shape[1], p_o, x.device, x.dtype)
    out = out.reshape(tuple(x.shape[:-1]) + (w_out.shape[0],))
    if residual is not None:
        out = out + residual
    return out


def _ref_forward(x, w_in, b_in, w_out, b_out, w_gate, b_gate, residual, seed, act, p_h, p_o, save):
    """Reference forward on 2-D x returning (out, z, zu) like the fused forward (fallback path)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    f = lambda t: None if t is None else t.to(ct)  # noqa: E731
    if w_gate is not None:
        z = F.linear(f(x), f(w_gate), f(b_gate)).to(x.dtype)
        zu = F.linear(f(x), f(w_in), f(b_in)).to(x.dtype)
        hid = _act_ref(z.to(ct), act) * zu.to(ct)
    else:
        z = F.linear(f(x), f(w_in), f(b_in)).to(x.dtype)
        zu = None
        hid = _act_ref(z.to(ct), act)
    if p_h > 0:
        hid = hid * _mask_scale(seed, hid.shape[0], hid.shape[1], p_h, x.device, ct)
    out = F.linear(hid.to(x.dtype).to(ct), f(w_out), f(b_out))
    if p_o > 0:
        out = out * _mask_scale(seed + 1, out.shape[0], out.shape[1], p_o, x.device, ct)
    if residual is not None:
        out = out + residual.to(ct)
    if not save:  # distinct empties: a custom op's outputs may not alias each other
        return out.to(x.dtype), x.new_empty(0), x.new_empty(0)
    return out.to(x.dtype), z, zu if zu is not None else x.new_empty(0)


def _ref_backward(grad, x, z, zu, w_in, w_out, w_gate, seed, act, p_h, p_o, needs):
    """Reference backward on 2-D tensors: the 7 gradients (x, w_in, b_in, w_out, b_out, w_gate, b_gate)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    M = x.shape[0]
    h = w_in.shape[0]
    gy = grad.to(ct)
    if p_o > 0:
        gy = gy * _mask_scale(seed + 1, M, gy.shape[1], p_o, x.device, ct)
    a_val, a_grad = _act_and_grad_ref(z.to(ct), act)
    keep = _mask_scale(seed, M, h, p_h, x.device, ct) if p_h > 0 else None
    hid = a_val * zu.to(ct) if zu is not None else a_val
    if keep is not None:
        hid = hid * keep
    hid = hid.to(x.dtype).to(ct)
    dh = gy @ w_out.to(ct)
    if keep is not None:
        dh = dh * keep
    if zu is not None:
        dz, dzu = dh * zu.to(ct) * a_grad, dh * a_val
    else:
        dz, dzu = dh * a_grad, None
    dz = dz.to(x.dtype).to(ct)
    xc = x.to(ct)
    up = dzu.to(x.dtype).to(ct) if dzu is not None else dz  # gradient of the w_in projection
    dx = up @ w_in.to(ct)
    if zu is not None:
        dx = dx + dz @ w_gate.to(ct)
    res = [dx, up.t() @ xc, up.sum(0), gy.t() @ hid, gy.sum(0), None, None]
    if zu is not None:
        res[5], res[6] = dz.t() @ xc, dz.sum(0)
    return [r.to(x.dtype) if (r is not None and n) else None for r, n in zip(res, needs)]


# ----------------------------------------------------------------------------------------------
# Fused implementations
# ----------------------------------------------------------------------------------------------


def _rows(t):
    """t itself when its columns are contiguous, else a contiguous copy (elementwise kernels)."""
    return t if t.stride(1) == 1 else t.contiguous()


def _fused_forward(x, w_in, b_in, w_out, b_out, w_gate, b_gate, residual, seed, act, p_h, p_o, impl, gemm_cfg, ew_cfg, save):
    code = K.ACTIVATIONS[act]
    gated = w_gate is not None
    b_in, b_out, b_gate = (b.contiguous() if b is not None else None for b in (b_in, b_out, b_gate))
    if residual is not None and impl != "triton":
        residual = _rows(residual)
    if impl == "triton":
        hid, z, zu = K.gemm(
            x, w_in.t(), epi=K.EPI_HIDDEN, act=code, bias=b_in,
            b2=w_gate.t() if gated else None, bias2=b_gate, seed=seed, p=p_h, store_z=save, config=gemm_cfg,
        )
        out = K.gemm(hid, w_out.t(), epi=K.EPI_OUT, bias=b_out, residual=residual, seed=seed, seed_offset=1, p=p_o,
                     config=gemm_cfg)
    else:
        def lin(w, b):
            return torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t())

        if not (gated or save or p_h > 0):  # nothing reads the pre-activation after the activation
            z = zu = None
            # relu2 takes its ReLU from the epilogue and squares in place with ATen: one pass over
            # the hidden, and eager's roundings (ReLU commutes with rounding to x's dtype)
            epilogue_act = "relu" if act == "relu2" else act
            if gemm_epilogue_computes(epilogue_act, x.device):
                # cuBLASLt applies the bias and activation to the product's fp32 accumulator: one
                # pass over the (T, h) hidden less, and one rounding less.
                bias = b_in if b_in is not None else x.new_zeros(w_in.shape[0])
                hid = torch._addmm_activation(bias, x, w_in.t(), use_gelu=epilogue_act == "gelu_tanh")
                if act == "relu2":
                    hid.square_()
            elif act in _ACTIVATE_IN_PLACE:
                # ATen's activation in place: the same float32 math and single rounding as our
                # epilogue kernel, for a quarter of a Triton launch's host time (exact GELU, SiLU).
                hid = _ACTIVATE_IN_PLACE[act](lin(w_in, b_in))
            else:  # no ATen op computes it in one pass (quick_gelu, relu2): our epilogue, in place
                z = lin(w_in, b_in)
                hid = K.hidden_epilogue(z, act=code, seed=seed, p=0.0, out=z, config=ew_cfg)
                z = None
        else:
            z = lin(w_gate, b_gate) if gated else lin(w_in, b_in)
            zu = lin(w_in, b_in) if gated else None
            # Without backward, the pre-activation is dead once read: the hidden overwrites it.
            hid = K.hidden_epilogue(z, act=code, zu=zu, seed=seed, p=p_h, out=None if save else z, config=ew_cfg)
        out = torch.addmm(b_out, hid, w_out.t()) if b_out is not None else torch.mm(hid, w_out.t())
        if p_o > 0:
            K.output_epilogue(out, residual=residual, out=out, seed=seed, seed_offset=1, p=p_o, config=ew_cfg)
        elif residual is not None:  # same rounding as the epilogue, one cheaper launch
            out.add_(residual)
    if not save:  # distinct empties: a custom op's outputs may not alias each other
        return out, x.new_empty(0), x.new_empty(0)
    return out, z, zu if zu is not None else x.new_empty(0)


_ACTIVATE_IN_PLACE = {
    "gelu": lambda z: torch.ops.aten.gelu_(z),
    "gelu_tanh": lambda z: torch.ops.aten.gelu_(z, approximate="tanh"),
    "relu": torch.relu_,
    "silu": lambda z: torch.ops.aten.silu_(z),
}

_GEMM_EPILOGUE_ACTIVATIONS = ("relu", "gelu_tanh")
_gemm_epilogue_checked: dict = {}


def gemm_epilogue_computes(activation: str, device: torch.device) -> bool:
    """Whether `torch._addmm_activation` computes `activation` on `device`, so that the forward may
    take the activation from the first product's epilogue (cuBLASLt's RELU_BIAS / GELU_BIAS).

    Its GELU is not the same function everywhere: the tanh approximation on CUDA (cuBLASLt's
    epilogue, and ATen's fallback when cuBLASLt is not used) but exact GELU on CPU (torch 2.13).
    So its meaning is measured once per device and activation, on inputs whose products are exact
    in fp32 and TF32 alike, against both GELUs; a device where it does not match the tanh form
    (or ReLU) keeps the two-pass path. Never measured during CUDA-graph capture (a host sync)."""
    if activation not in _GEMM_EPILOGUE_ACTIVATIONS or not hasattr(torch, "_addmm_activation"):
        return False
    key = (device.type, device.index, activation)
    known = _gemm_epilogue_checked.get(key)
    if known is not None:
        return known
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    # Multiples of 1/8 in [-1, 1] with 16 terms: every product and sum is exact, and the
    # pre-activations spread over about [-5, 4], where the two GELUs differ by up to 5e-4.
    steps = torch.arange(-8, 9, dtype=torch.float32) / 8
    x = steps[(torch.arange(64 * 16) * 7) % 17].reshape(64, 16)
    w = steps[(torch.arange(48 * 16) * 5 + 3) % 17].reshape(48, 16)
    b = steps[torch.arange(48) % 17] * 2
    try:
        got = torch._addmm_activation(b.to(device), x.to(device), w.to(device).t(),
                                      use_gelu=activation == "gelu_tanh").double().cpu()
    except RuntimeError:
        got = None
    if got is None:
        ok = False
    else:
        z = torch.addmm(b.double(), x.double(), w.double().t())
        want = F.gelu(z, approximate="tanh") if activation == "gelu_tanh" else F.relu(z)
        err = (got - want).abs().max().item()
        ok = err <= 5e-5
        if activation == "gelu_tanh":  # and tell the tanh form from exact GELU
            ok = ok and (got - F.gelu(z)).abs().max().item() > 4 * err
    _gemm_epilogue_checked[key] = ok
    return ok


SAVE_PRE_ACTIVATION = None
"""Whether training keeps the (T, h) pre-activation for backward (True), or backward recomputes
it from x block by block (False: one more GEMM, a (T, h) matrix less). None decides by size, see
`_saves_pre_activation`."""
HOST_BOUND_MACS = 2**36
"""Below this many multiply-adds per GEMM (T * d * h), a training step on an H100 is paced by the
host issuing its launches, not by the GPU (about 0.5 ms of GEMMs at T=8192, d=1024, h=4096
against 1.7 ms or more of host time): recomputing costs no time there, and fewer blocks save
launches. Measured in bench/feedforward_gpu.py (docs/performance.md)."""
BACKWARD_ROW_BLOCKS = 2
RECOMPUTE_ROW_BLOCKS = 2
"""Backward walks the rows (tokens) in this many blocks (BACKWARD_ROW_BLOCKS when the
pre-activation was saved, RECOMPUTE_ROW_BLOCKS when it is recomputed) once a (T, h) matrix has
2**24 elements or more, so that only slices of hidden, dL/dhidden (and the recomputed
pre-activation) are alive at a time: that is what keeps training memory under eager's. Weight
gradients accumulate over the blocks (C += A @ B in the output dtype, as cuBLAS's beta=1), and
each block after the first reads and writes them once more: at T=16384, d=4096, h=16384 on an
H100, 2 blocks ran 20.48 ms at 0.65x eager's memory against 20.72 ms at 0.60x for 4 (1.01x and
0.99x eager's speed; docs/performance.md)."""
_CHUNK_MIN_ELEMENTS = 2**24
_backward_rows = None  # tests set a row count here to force the blocked path on small shapes


_replayed_as_graphs = False  # set while `replayed_as_cuda_graphs` is active


@contextlib.contextmanager
def replayed_as_cuda_graphs():
    """Trace feed-forward calls for steps that replay as CUDA graphs (torch.compile's
    mode="reduce-overhead", where the backend enters this). A replay issues every launch at no
    host cost, so no size is host-bound: training keeps the pre-activation, the scheme that is
    fastest on the GPU (`_saves_pre_activation`)."""
    global _replayed_as_graphs
    before, _replayed_as_graphs = _replayed_as_graphs, True
    try:
        yield
    finally:
        _replayed_as_graphs = before


def _saves_pre_activation(M, d, h):
    """SAVE_PRE_ACTIVATION, or by size when it is None: recompute (in RECOMPUTE_ROW_BLOCKS
    blocks) where the step is host-bound, save (and walk BACKWARD_ROW_BLOCKS blocks) where the
    GPU work dominates and the extra GEMM would cost its time, or where CUDA graphs replay the
    step (`replayed_as_cuda_graphs`)."""
    if SAVE_PRE_ACTIVATION is not None:
        return bool(SAVE_PRE_ACTIVATION)
    # A row count known only while the graph runs (tokens a router selects, under
    # capture_dynamic_output_shape_ops; mark_unbacked) cannot be guarded on: the op's `bool save`
    # refused the SymBool and the replacement failed to build. Recomputing suits every size.
    return _replayed_as_graphs or guard_or_false(M * d * h >= HOST_BOUND_MACS)


def _row_block(M, h, recompute):
    if _backward_rows is not None:
        return max(1, min(M, int(_backward_rows)))
    if M * h < _CHUNK_MIN_ELEMENTS:
        return M
    blocks = RECOMPUTE_ROW_BLOCKS if recompute else BACKWARD_ROW_BLOCKS
    return min(M, -(-M // (blocks * 128)) * 128)  # keep GEMM edges on 128 rows


def _linear_into(out, x, w, b):
    """out = x @ w.T (+ b), written into out."""
    if b is not None:
        torch.addmm(b, x, w.t(), out=out)
    else:
        torch.mm(x, w.t(), out=out)


def _fused_backward(grad, x, z, zu, w_in, b_in, w_out, w_gate, b_gate, seed, act, p_h, p_o, impl, gemm_cfg, ew_cfg,
                    needs):
    """The 7 gradients of `_fused_forward` (see `_feedforward_backward_op`). z None: the
    pre-activations were not saved, and each row block recomputes its own from x.

    At transformer sizes the step is host-bound (each launch costs the CPU more than the GPU), so
    each block reuses one (rows, h) buffer for the recomputed hidden and then dL/dhidden, and the
    kernels that make a gradient also add its bias's partial sums into one buffer summed once at
    the end, instead of a sum and an add per block.
    """
    code = K.ACTIVATIONS[act]
    gated = w_gate is not None
    n_dx, n_win, n_bin, n_wout, n_bout, n_wg, n_bg = needs
    use_triton = impl == "triton"
    grad = _rows(grad)  # the elementwise kernels want unit column stride (grads may be expanded)
    # the Triton GEMM reads a bias with unit stride, as the forward gives it; a recomputing
    # backward read an expanded or strided b_in (b_gate) at other elements than the forward's
    b_in, b_gate = (b.contiguous() if b is not None else None for b in (b_in, b_gate))
    M = x.shape[0]
    h = w_in.shape[0]
    recompute = z is None
    R = _row_block(M, h, recompute)
    starts = range(0, M, R)

    def mm(a, b, out=None):
        if use_triton:
            return K.gemm(a, b, out=out, config=gemm_cfg)
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)

    def acc(dst, a, b):
        """dst + a @ b (dst None: a @ b), accumulating in place."""
        if dst is None:
            return mm(a, b)
        if use_triton:
            return K.gemm(a, b, residual=dst, out=dst, config=gemm_cfg)
        return dst.addmm_(a, b)

    need_dz = n_dx or n_win or n_bin or n_wg or n_bg
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if n_dx else None
    # dL/dy = dropout(dL/dout) (the output dropout's mask comes back from seed + 1), with the
    # output bias's partial sums; without that dropout it is dL/dout itself. When dx has its shape,
    # dL/dy is made for all rows in one launch into dx's memory: block r's rows of dL/dy are last
    # read before block r's dx overwrites them.
    db_out = grad.sum(0) if (n_bout and p_o == 0) else None
    gy = gy_buf = out_partials = None
    if p_o > 0:
        whole = dx is not None and dx.shape == grad.shape
        rows = M if whole else min(R, M)
        if n_bout:
            out_partials = torch.empty(K.bias_partial_rows(rows, ew_cfg), grad.shape[1], device=x.device,
                                       dtype=torch.float32)
        if whole:
            gy = K.output_epilogue(grad, out=dx, seed=seed, seed_offset=1, p=p_o, bias_partials=out_partials,
                                   config=ew_cfg)
        else:
            gy_buf = torch.empty(rows, grad.shape[1], device=x.device, dtype=grad.dtype)
    # One buffer per block: the recomputed hidden, then (in place) dL/dhidden and dL/dz.
    buf = torch.empty(min(R, M), h, device=x.device, dtype=x.dtype) if (n_wout or need_dz) else None
    buf2 = torch.empty_like(buf) if (gated and need_dz) else None
    if recompute:
        zbuf = torch.empty(min(R, M), h, device=x.device, dtype=x.dtype)
        zubuf = torch.empty_like(zbuf) if gated else None
    partials = partials2 = None
    bias_grad = need_dz and (n_bin or (gated and n_bg))
    if bias_grad:  # one buffer for all blocks: the first writes, later ones add
        rows = K.bias_partial_rows(min(R, M), gemm_cfg if use_triton else ew_cfg)
        partials = torch.empty(rows, h, device=x.device, dtype=torch.float32)
        partials2 = torch.empty_like(partials) if gated else None
    dw_out = dw_in = dw_g = None
    for r0 in starts:
        r1 = min(M, r0 + R)
        if gy is not None:
            gy_r = gy[r0:r1]
        elif gy_buf is not None:
            gy_r = K.output_epilogue(grad[r0:r1], out=gy_buf[: r1 - r0], seed=seed, seed_offset=1, p=p_o, row0=r0,
                                     bias_partials=out_partials, accumulate_partials=r0 > 0, config=ew_cfg)
        else:
            gy_r = grad[r0:r1]
        x_r = x[r0:r1]
        buf_r = buf[: r1 - r0] if buf is not None else None
        hidden_done = False
        if recompute:
            z_r = zbuf[: r1 - r0]
            zu_r = zubuf[: r1 - r0] if gated else None
            if use_triton:  # one GEMM gives the pre-activations and the hidden
                K.gemm(x_r, w_in.t(), epi=K.EPI_HIDDEN, act=code, bias=b_in, b2=w_gate.t() if gated else None,
                       bias2=b_gate, seed=seed, p=p_h, row0=r0, out=buf_r, z=z_r, zu=zu_r, config=gemm_cfg)
                hidden_done = True
            else:
                up_proj = zu_r if gated else z_r  # z is the gate's projection when gated
                _linear_into(up_proj, x_r, w_in, b_in)
                if gated:
                    _linear_into(z_r, x_r, w_gate, b_gate)
        else:
            z_r = z[r0:r1]
            zu_r = zu[r0:r1] if gated else None
        if n_wout:
            # The hidden, recomputed from the pre-activations; it lives only for this product.
            if not hidden_done:
                K.hidden_epilogue(z_r, act=code, zu=zu_r, seed=seed, p=p_h, row0=r0, out=buf_r, config=ew_cfg)
            dw_out = acc(dw_out, gy_r.t(), buf_r)
        if not need_dz:
            continue
        parts = (partials, partials2) if bias_grad else None
        buf2_r = buf2[: r1 - r0] if gated else None
        if use_triton:
            dz, dzu, _, _ = K.gemm(gy_r, w_out, epi=K.EPI_DHIDDEN, act=code, z=z_r, zu=zu_r, seed=seed, p=p_h,
                                   row0=r0, out=buf_r, out2=buf2_r, bias_partials=parts, accumulate_partials=r0 > 0,
                                   config=gemm_cfg)
        else:
            dh = torch.mm(gy_r, w_out, out=buf_r)  # the hidden above is consumed: same stream, in order
            dz, dzu, _, _ = K.hidden_epilogue(z_r, act=code, zu=zu_r, grad=dh, out=dh, out2=buf2_r, seed=seed,
                                              p=p_h, row0=r0, bias_partials=parts, accumulate_partials=r0 > 0,
                                              config=ew_cfg)
        up = dzu if gated else dz  # gradient of the w_in projection's pre-activation
        if n_dx:
            dx_r = dx[r0:r1]
            if gated and use_triton:
                K.gemm(up, w_in, a2=dz, b2=w_gate, out=dx_r, config=gemm_cfg)
            else:
                mm(up, w_in, out=dx_r)
                if gated:
                    dx_r.addmm_(dz, w_gate)
        if n_win:
            dw_in = acc(dw_in, up.t(), x_r)
        if gated and n_wg:
            dw_g = acc(dw_g, dz.t(), x_r)
    if out_partials is not None:
        db_out = out_partials.sum(0)
    db_in = db_g = None
    if bias_grad:
        # gated: partials hold dL/dz_gate, partials2 dL/dz_up (the w_in projection)
        db_a = partials.sum(0)
        db_in, db_g = (partials2.sum(0), db_a) if gated else (db_a, None)
    cast = lambda t, n: t.to(grad.dtype) if (t is not None and n) else None  # noqa: E731
    return [dx, dw_in, cast(db_in, n_bin), dw_out, cast(db_out, n_bout), dw_g, cast(db_g, n_bg)]


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


def _use_kernels(tensors, dtype, M):
    if tensors[0].device.type == "cpu" and not interpreting():
        warn_fallback_once("feedforward", device_unsupported(tensors[0]))
        return False
    return can_launch(*tensors) and dtype in _KERNEL_DTYPES and M > 0


def _fit_impl(impl, M, w_in, w_out):
    """The Triton GEMM indexes with int32: past 2**31 elements in a matrix, use cuBLAS products
    (with the same epilogue kernels, so the same numbers up to GEMM rounding)."""
    h, d = w_in.shape
    widest = max(M * max(d, h, w_out.shape[0]), h * max(d, w_out.shape[0]))
    return "cublas" if (impl == "triton" and widest > _MAX_NUMEL) else impl


@outside_autocast
def _forward_impl(x, w_in, b_in, w_out, b_out, w_gate, b_gate, residual, seed, activation,
                  hidden_dropout_p, output_dropout_p, impl, config, save):
    """Forward on 2-D x; see `_feedforward_op`. Shared by the custom op and the eager path."""
    args = (x, w_in, b_in, w_out, b_out, w_gate, b_gate, residual)
    why_reference = reference_only(args)
    if why_reference:
        warn_fallback_once("feedforward", why_reference)
    elif _use_kernels([t for t in args if t is not None], x.dtype, x.shape[0]):
        gemm_cfg, ew_cfg = _resolve_config(impl, config or None, w_gate is not None)
        impl = _fit_impl(impl, x.shape[0], w_in, w_out)
        try:
            return _fused_forward(*args, seed, activation, hidden_dropout_p, output_dropout_p, impl, gemm_cfg, ew_cfg,
                                  save)
        except Exception as e:  # a kernel that cannot compile or launch must not break the model
            warn_fallback_once("feedforward", f"{type(e).__name__}: {str(e)[:200]}")
    return _ref_forward(*args, seed_value(seed), activation, hidden_dropout_p, output_dropout_p, save)


@outside_autocast
def _backward_impl(grad, x, z, zu, w_in, b_in, w_out, w_gate, b_gate, seed, activation,
                   hidden_dropout_p, output_dropout_p, impl, config, needs):
    """Backward on 2-D tensors; see `_feedforward_backward_op`. Shared like `_forward_impl`."""
    gated = w_gate is not None
    tensors = [t for t in (grad, x, w_in, b_in, w_out, w_gate, b_gate) if t is not None]
    kernels = _use_kernels(tensors, x.dtype, x.shape[0])
    res = None
    if kernels:
        gemm_cfg, ew_cfg = _resolve_config(impl, config or None, gated)
        impl = _fit_impl(impl, x.shape[0], w_in, w_out)
        try:
            saved = z.dim() == 2
            res = _fused_backward(grad, x, z if saved else None, zu if (saved and gated) else None, w_in, b_in,
                                  w_out, w_gate, b_gate, seed, activation, hidden_dropout_p, output_dropout_p, impl,
                                  gemm_cfg, ew_cfg, needs)
        except Exception as e:
            warn_fallback_once("feedforward", f"{type(e).__name__}: {str(e)[:200]}")
    if res is None:
        s = seed_value(seed)
        if z.dim() != 2:
            _, z, zu = _ref_forward(x, w_in, b_in, w_out, None, w_gate, b_gate, None, s, activation, 0.0, 0.0, True)
        res = _ref_backward(grad, x, z, zu if gated else None, w_in, w_out, w_gate, s, activation,
                            hidden_dropout_p, output_dropout_p, needs)
    return [r if r is not None else x.new_empty(0) for r in res]


@torch.library.custom_op("truthfuse::feedforward", mutates_args=())
def _feedforward_op(
    x: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor], w_out: torch.Tensor,
    b_out: Optional[torch.Tensor], w_gate: Optional[torch.Tensor], b_gate: Optional[torch.Tensor],
    residual: Optional[torch.Tensor], seed: Optional[torch.Tensor], activation: str,
    hidden_dropout_p: float, output_dropout_p: float, impl: str, config: str, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward on 2-D x (M, d). Returns (out (M, d_out), z, zu): z the (gate's, when gated)
    pre-activation (M, h), zu the up projection's (M, h) when gated; each an empty (0,) tensor
    when not saved (save=False, or no gate). `seed` is the dropout's 0-d int64 tensor on x's
    device (or None without dropout); config "" means the default."""
    return _forward_impl(x, w_in, b_in, w_out, b_out, w_gate, b_gate, residual, seed, activation,
                         hidden_dropout_p, output_dropout_p, impl, config, save)


@_feedforward_op.register_fake
def _(x, w_in, b_in, w_out, b_out, w_gate, b_gate, residual, seed, activation, hidden_dropout_p, output_dropout_p, impl, config, save):
    M = x.shape[0]
    h = w_in.shape[0]
    out = x.new_empty(M, w_out.shape[0])
    z = x.new_empty(M, h) if save else x.new_empty(0)
    zu = x.new_empty(M, h) if (save and w_gate is not None) else x.new_empty(0)
    return out, z, zu


@torch.library.custom_op("truthfuse::feedforward_backward", mutates_args=())
def _feedforward_backward_op(
    grad: torch.Tensor, x: torch.Tensor, z: torch.Tensor, zu: torch.Tensor, w_in: torch.Tensor,
    b_in: Optional[torch.Tensor], w_out: torch.Tensor, w_gate: Optional[torch.Tensor],
    b_gate: Optional[torch.Tensor], seed: Optional[torch.Tensor], activation: str,
    hidden_dropout_p: float, output_dropout_p: float, impl: str, config: str, needs: list[bool],
) -> list[torch.Tensor]:
    """Backward of `truthfuse::feedforward` on 2-D tensors. Returns the gradients of
    (x, w_in, b_in, w_out, b_out, w_gate, b_gate), each an empty (0,) tensor where `needs` is
    False. z/zu are forward's saved pre-activations; when forward did not save them (z empty),
    they are recomputed from x (b_in / b_gate are needed only for that)."""
    return _backward_impl(grad, x, z, zu, w_in, b_in, w_out, w_gate, b_gate, seed, activation,
                          hidden_dropout_p, output_dropout_p, impl, config, needs)


@_feedforward_backward_op.register_fake
def _(grad, x, z, zu, w_in, b_in, w_out, w_gate, b_gate, seed, activation, hidden_dropout_p, output_dropout_p, impl, config, needs):
    h, d = w_in.shape
    shapes = [x.shape, (h, d), (h,), w_out.shape, (w_out.shape[0],), (h, d), (h,)]
    return [x.new_empty(tuple(s)) if n else x.new_empty(0) for s, n in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    x, w_in, b_in, w_out, b_out, w_gate, b_gate, residual, seed, act, p_h, p_o, impl, config, save = inputs
    _, z, zu = output
    # z and zu are saved, not results: no gradient flows into them, and autograd must not
    # materialize a (T, h) zero gradient for them in backward.
    ctx.mark_non_differentiable(z, zu)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, z, zu, w_in, b_in, w_out, w_gate, b_gate, seed)
    ctx.attrs = (act, p_h, p_o, impl, config)
    ctx.has = (b_in is not None, b_out is not None, w_gate is not None, b_gate is not None, residual is not None)


def _input_grads(ctx, grad_out, backward):
    """The 15 input gradients of the forward's arguments, computing the 7 tensor ones with
    `backward` (the backward op, or its implementation on the eager path)."""
    x, z, zu, w_in, b_in, w_out, w_gate, b_gate, seed = ctx.saved_tensors
    act, p_h, p_o, impl, config = ctx.attrs
    has_bin, has_bout, has_gate, has_bgate, has_res = ctx.has
    ng = ctx.needs_input_grad
    needs = [ng[0], ng[1], has_bin and ng[2], ng[3], has_bout and ng[4], has_gate and ng[5], has_bgate and ng[6]]
    grads = [None] * 15
    if grad_out is None:
        return tuple(grads)
    if any(needs):
        res = backward(grad_out, x, z, zu, w_in, b_in, w_out, w_gate, b_gate, seed, act, p_h, p_o, impl, config, needs)
        grads[:7] = [r if n else None for r, n in zip(res, needs)]
    if has_res and ng[7]:
        grads[7] = grad_out
    return tuple(grads)


def _backward(ctx, grad_out, _grad_z, _grad_zu):
    return _input_grads(ctx, grad_out, torch.ops.truthfuse.feedforward_backward)


_feedforward_op.register_autograd(_backward, setup_context=_setup_context)


_EagerFeedforward = eager_function("_EagerFeedforward", _forward_impl, _setup_context, _input_grads, _backward_impl)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def feedforward(
    x, w_in, b_in, w_out, b_out, *, activation="gelu", w_gate=None, b_gate=None,
    hidden_dropout_p=0.0, output_dropout_p=0.0, residual=None, impl=None, config=None,
):
    """Fused feed-forward block; see the module docstring for the math.

    x: (..., d); w_in, w_gate: (h, d); w_out: (d_out, h); b_in, b_gate: (h,); b_out: (d_out,)
    or None; residual: (..., d_out) or None. Any strides (HF Conv1D weights arrive transposed).
    activation: "gelu" (exact), "gelu_tanh", "relu", "silu", "quick_gelu" or "relu2". Dropout p > 0 means training-mode
    dropout, seeded from torch's default generator. impl: None, "triton" or "cublas"; config: a
    key from `feedforward_config_space(impl)` or None. Raises ValueError on invalid arguments.
    Returns (..., d_out) in x's dtype; differentiable in every tensor argument.
    """
    _validate(x, w_in, b_in, w_out, b_out, activation, w_gate, b_gate, hidden_dropout_p, output_dropout_p, residual, impl, config)
    impl = impl or _DEFAULT_IMPL
    p_h, p_o = float(hidden_dropout_p), float(output_dropout_p)
    seed = draw_seed(x) if (p_h > 0 or p_o > 0) else None
    d_out = w_out.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(_rows_of(x), x.shape[-1])
    res2 = residual.reshape(_rows_of(x), d_out) if residual is not None else None
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_in, b_in, w_out, b_out, w_gate, b_gate, residual)
    )
    save = differentiable and _saves_pre_activation(x2.shape[0], x2.shape[1], w_in.shape[0])
    args = (x2, w_in, b_in, w_out, b_out, w_gate, b_gate, res2, seed, activation, p_h, p_o, impl, config or "", save)
    if reference_only(args[:8]):  # forward-mode AD, a torch.func transform: the reference's PyTorch ops
        out, _, _ = _forward_impl(*args)
    elif plain_eager_call(args[:8]):  # eager: skip the dispatch layers (and autograd when unneeded)
        out, _, _ = _EagerFeedforward.apply(*args) if differentiable else _forward_impl(*args)
    else:
        out, _, _ = torch.ops.truthfuse.feedforward(*args)
    return out.reshape(tuple(lead) + (d_out,))
