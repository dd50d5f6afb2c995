"""Feed-forward rules: the transformer MLP, plain or gated, replaced by
`fusion_backend.ops.feedforward`.

Every form shares one tail, written once in `_tail`:

    hidden -> [dropout] -> Linear -> [dropout] -> [+ residual]

and differs in how `hidden` is made, one pattern each:

    plain:    act(Linear(x))                        nn.Sequential MLPs, GPT-2's GPT2MLP (Conv1D),
                                                    BERT's Intermediate+Output, TransformerEncoderLayer
    gated:    act(Linear_gate(x)) * Linear_up(x)    Llama/Mistral MLP (SwiGLU), T5 v1.1 (GEGLU)
    chunked:  a, b = Linear(x).chunk(2, -1);        GEGLU/SwiGLU with one fused projection
              act(a) * b  (either half the gate)    (also split(h, -1) or split([h, h], -1))

times six activations (GELU exact or tanh, ReLU, SiLU, SiLU written out as z * sigmoid(z), CLIP's
quick_gelu, the squared ReLU): eighteen rules. Canonicalization makes them
cover nn.Linear, F.linear, `x @ W (+ b)`, mm, HF Conv1D's addmm, the written-out GELUs (tanh:
gelu_new, gelu_fast; erf: gelu_python), `z.sigmoid()` as torch.sigmoid(z), module or functional dropout,
eval-mode dropout (removed), and `up * act(gate)` in either operand order. The two Linears may
live in different modules: the rules see Dynamo's flattened graph. A residual add is taken only when the residual has exactly the block's output
shape (a broadcasting add is something else; BERT's `LayerNorm(x + residual)` keeps its
LayerNorm outside the site). A residual laid out otherwise (a transpose, added first) gives eager's
sum its layout; the replacement copies the op's result into it, as for every rule (`replace.py`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from fusion_backend import Match, Rule, known_equal, maybe, plain_tensors, register_rule
from fusion_backend.ops import feedforward as feedforward_op

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_GELU_APPROXIMATIONS = {"none": "gelu", "tanh": "gelu_tanh"}
# The tuner's launch configs: "<impl>" (that implementation's default tiles) or a key of
# feedforward_config_space(impl), whose prefix names the implementation.
_IMPLS = ("cublas", "triton")


# ------------------------------------------------------------------------------------------------
# Activations (the `approx` wildcard binds GELU's approximate=; the others ignore it)
# ------------------------------------------------------------------------------------------------

def _gelu(z, approx):
    return F.gelu(z, approximate=approx)


def _relu(z, approx):
    return torch.relu(z)


def _silu(z, approx):
    return F.silu(z)


def _quick_gelu(z, approx):
    # CLIP's quick_gelu (HF QuickGELUActivation)
    return torch.mul(z, torch.sigmoid(torch.mul(z, 1.702)))


def _silu_written(z, approx):
    # SiLU written out, as hand-written SwiGLU MLPs do; the op computes it as "silu"
    return torch.mul(z, torch.sigmoid(z))


def _relu2(z, approx):
    # the squared ReLU (HF ReLUSquaredActivation, "relu2": Nemotron, Persimmon); canonicalization
    # reads torch.square(r), r * r and r ** 2 as this pow
    return torch.pow(torch.relu(z), 2)


ACTIVATIONS = {"gelu": _gelu, "relu": _relu, "silu": _silu, "silu_written": _silu_written, "quick_gelu": _quick_gelu,
               "relu2": _relu2}


# ------------------------------------------------------------------------------------------------
# Patterns
# ------------------------------------------------------------------------------------------------

def _tail(hidden, p_hidden, w_out, b_out, p_out, residual):
    h = maybe(F.dropout)(hidden, p_hidden, True)
    y = F.linear(h, w_out, b_out)
    y = maybe(F.dropout)(y, p_out, True)
    return maybe(torch.add)(y, residual)


def _plain_pattern(act: Callable) -> Callable:
    def plain(x, w_in, b_in, approx, p_hidden, w_out, b_out, p_out, residual):
        return _tail(act(F.linear(x, w_in, b_in), approx), p_hidden, w_out, b_out, p_out, residual)
    return plain


def _gated_pattern(act: Callable) -> Callable:
    def gated(x, w_gate, b_gate, w_in, b_in, approx, p_hidden, w_out, b_out, p_out, residual):
        hidden = torch.mul(act(F.linear(x, w_gate, b_gate), approx), F.linear(x, w_in, b_in))
        return _tail(hidden, p_hidden, w_out, b_out, p_out, residual)
    return gated


def _chunked_pattern(act: Callable) -> Callable:
    def chunked(x, w_cat, b_cat, gate_half, up_half, approx, p_hidden, w_out, b_out, p_out, residual):
        halves = torch.chunk(F.linear(x, w_cat, b_cat), 2, -1)
        hidden = torch.mul(act(halves[gate_half], approx), halves[up_half])
        return _tail(hidden, p_hidden, w_out, b_out, p_out, residual)
    return chunked


# ------------------------------------------------------------------------------------------------
# Constraints
# ------------------------------------------------------------------------------------------------

def _weights(m: Match) -> dict:
    """The projection weights and biases the op will get, by the op's names: (h, d) w_in and
    w_gate, (d_out, h) w_out. For the chunked form, the two halves of w_cat's rows."""
    v = m.values
    if "w_cat" in v:
        w, b = v["w_cat"], v.get("b_cat")
        out = {"w_cat": w, "b_cat": b, "w_out": v["w_out"], "b_out": v.get("b_out")}
        return {k: t for k, t in out.items() if t is not None}
    names = ("w_in", "b_in", "w_gate", "b_gate", "w_out", "b_out")
    return {k: v[k] for k in names if v.get(k) is not None}


def check_tensors(m: Match) -> Optional[str]:
    """x and every weight are floating tensors on one device, in one dtype, unless torch.autocast
    casts them: the block's Linears then compute in the autocast dtype (`compute_dtype`), whatever
    x's and the weights' (fp32 weights, bf16 products), and the op gets them cast the same way."""
    x = m.values.get("x")
    if not isinstance(x, torch.Tensor):
        return "the block's input is not a tensor"
    if x.dtype not in _FLOATS:
        return f"input dtype {x.dtype} is not supported (float16, bfloat16, float32)"
    cast_by_autocast = compute_dtype(m) is not None
    tensors = _weights(m)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            return f"{name} is a {type(t).__name__}, not a tensor"
        if t.dtype != x.dtype and not (cast_by_autocast and t.dtype in _FLOATS):
            return f"{name} has dtype {t.dtype} but the input has {x.dtype} (mixed precision)"
        if t.device != x.device:
            return f"{name} is on {t.device} but the input is on {x.device}"
    return None


def _is_size(t: Any, *sizes: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == len(sizes) and \
        all(known_equal(a, b) for a, b in zip(t.shape, sizes))


def check_shapes(m: Match) -> Optional[str]:
    """Weights have nn.Linear's layout and agree on d and h; biases are (h,) and (d_out,)."""
    x, w = m.values["x"], _weights(m)
    if x.dim() < 1:
        return "the block's input is a 0-d tensor"
    d = x.shape[-1]
    if "w_cat" in w:
        w_cat = w["w_cat"]
        if w_cat.dim() != 2 or not known_equal(w_cat.shape[1], d):
            return f"fused gate/up weight of shape {tuple(w_cat.shape)} does not take inputs of size {d}"
        if not known_equal(w_cat.shape[0] % 2, 0):
            return f"fused gate/up weight has {w_cat.shape[0]} rows: chunk(2) halves are unequal"
        h = w_cat.shape[0] // 2
        if "b_cat" in w and not _is_size(w["b_cat"], 2 * h):
            return f"fused gate/up bias of shape {tuple(w['b_cat'].shape)} is not ({2 * h},)"
    else:
        w_in = w["w_in"]
        if w_in.dim() != 2 or not known_equal(w_in.shape[1], d):
            return f"first weight of shape {tuple(w_in.shape)} is not (h, {d})"
        h = w_in.shape[0]
        for name in ("w_gate",):
            if name in w and not _is_size(w[name], h, d):
                return f"gate weight of shape {tuple(w[name].shape)} differs from the up weight's {tuple(w_in.shape)}"
        for name in ("b_in", "b_gate"):
            if name in w and not _is_size(w[name], h):
                return f"{name} of shape {tuple(w[name].shape)} is not ({h},)"
    w_out = w["w_out"]
    if w_out.dim() != 2 or not known_equal(w_out.shape[1], h):
        return f"second weight of shape {tuple(w_out.shape)} is not (d_out, {h})"
    if "b_out" in w and not _is_size(w["b_out"], w_out.shape[0]):
        return f"second bias of shape {tuple(w['b_out'].shape)} is not ({w_out.shape[0]},)"
    return None


def _block_output_shape(m: Match) -> tuple:
    x = m.values["x"]
    return tuple(x.shape[:-1]) + (m.values["w_out"].shape[0],)


def check_halves(m: Match) -> Optional[str]:
    """The chunked form's gate and up halves are the two different halves."""
    if "w_cat" not in m.values:
        return None
    gate, up = m.values.get("gate_half"), m.values.get("up_half")
    if {gate, up} != {0, 1}:
        return f"the gated product takes chunk halves {gate} and {up}, not 0 and 1"
    return None


def _constant_float(p: Any) -> Any:
    """A SymFloat whose expression is a number (dynamic=True wraps float attributes such as
    nn.Dropout's p this way, then pins them) as that number; anything else as it is."""
    if isinstance(p, torch.SymFloat) and getattr(p.node.expr, "is_number", False):
        return float(p.node.expr)
    return p


def check_dropout(m: Match) -> Optional[str]:
    """Dropout probabilities are compile-time Python numbers in [0, 1)."""
    for name in ("p_hidden", "p_out"):
        if not m.present(name):
            continue
        p = _constant_float(m.values[name])
        if isinstance(p, torch.Tensor):
            return f"dropout probability ({name}) is a tensor"
        if not isinstance(p, (int, float)) or isinstance(p, bool):
            return (f"dropout probability ({name}) is symbolic, not a Python number (dynamic=True traces "
                    "float attributes as tensors; torch._dynamo.config.specialize_float=True keeps them constant)")
        if not 0 <= p < 1:
            return f"dropout probability {p} is outside [0, 1)"
    return None


def check_residual(m: Match) -> Optional[str]:
    """A residual add is fused only when it adds a tensor of exactly the block's output shape and
    dtype: a broadcasting add (a bias row, a scalar) is something else."""
    if not m.present("residual"):
        return None
    r = m.values["residual"]
    node = m.nodes.get("residual")
    if node in set(m.covered):
        if len(m.anchor.args) == 2 and m.anchor.args[0] is m.anchor.args[1]:
            return "the value added is the block's own output (y + y), not a residual"
        return (f"the value added ({node.name}) is computed inside the block (its up projection, gate, "
                "pre-activation or hidden value), not a residual")
    if not isinstance(r, torch.Tensor):
        return "the value added to the block's output is a Python number, not a residual tensor"
    want = _block_output_shape(m)
    if not _is_size(r, *want):
        return f"residual of shape {tuple(r.shape)} does not have the block's output shape {want} (broadcasting)"
    if r.dtype not in _FLOATS:
        return f"residual dtype {r.dtype} is not supported (float16, bfloat16, float32)"
    block = _block_dtype(m)
    result = _dtype(m.anchor)
    if result is not None and result != torch.promote_types(block, r.dtype):
        return (f"the residual add returns {result} where the block's {block} output plus a {r.dtype} residual "
                f"gives {torch.promote_types(block, r.dtype)} (a cast between them, such as .float())")
    if r.device != m.values["x"].device:
        return "the residual is on another device"
    return None


def _dtype(node: Any) -> Optional[torch.dtype]:
    v = Match.value_of(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _linear_dtypes(m: Match) -> set:
    return {_dtype(n) for n in m.covered if n.op == "call_function" and n.target is F.linear}


def compute_dtype(m: Match) -> Optional[torch.dtype]:
    """The dtype the block's Linears compute in, when their example values show one that differs
    from an operand's: torch.autocast's (F.linear casts its input, weight and bias to it; without
    autocast eager's F.linear takes one dtype only). None otherwise: the block computes in x's."""
    dtypes = _linear_dtypes(m)
    if len(dtypes) != 1 or None in dtypes:
        return None
    (dtype,) = dtypes
    operands = [m.values.get("x")] + list(_weights(m).values())
    if all(not isinstance(t, torch.Tensor) or t.dtype == dtype for t in operands):
        return None
    return dtype


def _block_dtype(m: Match) -> torch.dtype:
    """The dtype the op computes the block in, and returns."""
    return compute_dtype(m) or m.values["x"].dtype


def check_precision(m: Match) -> Optional[str]:
    """The op computes the block in one dtype: its Linears' (`compute_dtype`). Under torch.autocast
    the values between them may be float32 (an activation autocast runs in float32, such as the
    squared ReLU's pow): the second Linear casts them back, as the op rounds its fp32 epilogue's
    hidden values. Anything else (Linears in two dtypes) is kept."""
    dtypes = _linear_dtypes(m)
    if None in dtypes:
        return None  # no example values to read: check_tensors asks for one dtype throughout
    if len(dtypes) > 1:
        return "the block's Linears compute in " + " and ".join(sorted(str(d) for d in dtypes))
    block = _block_dtype(m)
    if block not in _FLOATS:
        return f"the block's Linears compute in {block} (float16, bfloat16, float32 are supported)"
    if compute_dtype(m) is None:
        return None
    residual_add = m.anchor if m.present("residual") else None
    for n in m.covered:
        dtype = _dtype(n)
        if n is not residual_add and dtype is not None and dtype not in (block, torch.float32):
            return f"{n.name} computes in {dtype} inside a block whose Linears compute in {block} (torch.autocast)"
    return None


def check_activation(m: Match) -> Optional[str]:
    """GELU's approximate= is one the op implements ("none" or "tanh")."""
    approx = m.values.get("approx")
    if m.present("approx") and approx not in _GELU_APPROXIMATIONS:
        return f"GELU approximate={approx!r} is not supported"
    return None


def _check_supported(activation: str) -> Callable:
    def check_supported(m: Match) -> Optional[str]:
        """What the op itself says about these shapes, dtypes and devices."""
        from fusion_backend.ops.feedforward import feedforward_supports

        kw = _op_arguments(activation, m.values, compute_dtype(m))
        kw.pop("residual_outside")
        args = [kw.pop(k) for k in ("x", "w_in", "b_in", "w_out", "b_out")]
        ok, reason = feedforward_supports(*args, **kw)
        return None if ok else reason
    return check_supported


CONSTRAINTS = (plain_tensors, check_tensors, check_shapes, check_halves, check_dropout, check_residual,
               check_activation, check_precision)


# ------------------------------------------------------------------------------------------------
# Replacement
# ------------------------------------------------------------------------------------------------

def _activation_name(rule_activation: str, approx: Any) -> str:
    if rule_activation == "gelu":
        return _GELU_APPROXIMATIONS.get(approx or "none", "gelu")
    if rule_activation == "silu_written":
        return "silu"
    return rule_activation


def _op_arguments(rule_activation: str, v: dict, dtype: Optional[torch.dtype] = None) -> dict:
    """The op's keyword arguments from a site's wildcard values (fake tensors while tracing), cast to
    `dtype` (`compute_dtype`: torch.autocast's casts of the Linears' operands) when given. A residual
    of another dtype than the block's is not the op's: `residual_outside` is added to its result,
    in the promoted dtype, as eager adds it."""
    activation = _activation_name(rule_activation, v.get("approx"))

    def cast(t):
        return t.to(dtype) if (dtype is not None and t is not None and t.dtype != dtype) else t

    w_in, b_in, w_gate, b_gate = (cast(v.get(k)) for k in ("w_in", "b_in", "w_gate", "b_gate"))
    if v.get("w_cat") is not None:
        w_cat, b_cat = cast(v["w_cat"]), cast(v.get("b_cat"))
        h = w_cat.shape[0] // 2
        gate, up = v.get("gate_half", 0), v.get("up_half", 1)
        w_gate, w_in = w_cat.narrow(0, gate * h, h), w_cat.narrow(0, up * h, h)
        if b_cat is not None:
            b_gate, b_in = b_cat.narrow(0, gate * h, h), b_cat.narrow(0, up * h, h)
    x = cast(v["x"])
    residual = v.get("residual")
    outside = residual is not None and residual.dtype != x.dtype
    p_hidden, p_out = v.get("p_hidden"), v.get("p_out")
    return dict(x=x, w_in=w_in, b_in=b_in, w_out=cast(v["w_out"]), b_out=cast(v.get("b_out")),
                activation=activation, w_gate=w_gate, b_gate=b_gate,
                hidden_dropout_p=float(p_hidden) if p_hidden is not None else 0.0,
                output_dropout_p=float(p_out) if p_out is not None else 0.0,
                residual=None if outside else residual, residual_outside=residual if outside else None)


def split_config(config: Optional[str]) -> tuple:
    """(impl, config key) for the op from a tuner config: None (the op's defaults), "<impl>"
    (that implementation's default tiles) or a config key "<impl>:<tiles>"."""
    if config is None:
        return None, None
    if config in _IMPLS:
        return config, None
    return config.split(":", 1)[0], config


def _make_replacement(activation: str) -> Callable:
    def replacement(config=None, dtype=None, **values):
        impl, key = split_config(config)
        kw = _op_arguments(activation, values, dtype)
        residual_outside = kw.pop("residual_outside")
        out = feedforward_op(**kw, impl=impl, config=key)
        return out if residual_outside is None else out + residual_outside
    return replacement


def _replacement_args(m: Match) -> dict:
    return {"dtype": compute_dtype(m)}


def _configs(gated: bool) -> Callable:
    """The tuner's choices for a site: on CUDA, cuBLAS products with the fused epilogue kernel
    and Triton GEMMs with fused epilogues, each with its default tiles and a few others; on CPU
    only the op's default (timing in Triton's interpreter says nothing about a GPU)."""
    def configs(m: Match):
        from fusion_backend.ops.feedforward import default_feedforward_config, feedforward_config_space

        if m.values["x"].device.type != "cuda":
            return [None]
        choices = list(_IMPLS)
        for impl, extra in (("triton", 3), ("cublas", 2)):
            default = default_feedforward_config(impl, gated=gated, interpret=False)["key"]
            keys = [c["key"] for c in feedforward_config_space(impl, gated=gated)]
            choices += [k for k in keys if k != default][:extra]
        return choices
    return configs


def _variant(structure: str, rule_activation: str) -> Callable:
    gated_names = {"gelu": "geglu", "gelu_tanh": "geglu", "relu": "reglu", "silu": "swiglu",
                   "quick_gelu": "quick_geglu", "relu2": "relu2_glu"}

    def variant(m: Match) -> str:
        act = _activation_name(rule_activation, m.values.get("approx"))
        return act if structure == "plain" else gated_names[act]
    return variant


def is_exact(m: Match) -> bool:
    """The block's math up to rounding order, unless it has dropout: the op draws its masks from
    its own Philox stream, not torch's dropout stream ("conservative" fuses only exact sites)."""
    return not (m.present("p_hidden") or m.present("p_out"))


_STRUCTURES = {"plain": _plain_pattern, "gated": _gated_pattern, "chunked": _chunked_pattern}


def _rule(structure: str, activation: str) -> Rule:
    return Rule(name=f"feedforward.{structure}.{activation}", kind="feedforward",
                pattern=_STRUCTURES[structure](ACTIVATIONS[activation]),
                replacement=_make_replacement(activation),
                constraints=CONSTRAINTS + (_check_supported(activation),), priority=50,
                variant=_variant(structure, activation),
                exact=is_exact, configs=_configs(gated=structure != "plain"), replacement_args=_replacement_args,
                keeps_result_for_backward=False)  # it saves x and the pre-activations, not its output


RULES = [_rule(s, a) for s in _STRUCTURES for a in ACTIVATIONS]

for _r in RULES:
    register_rule(_r, replace=True)
