"""The canonicalization passes over an FX graph (Dynamo's torch-level graph, or a traced pattern).

Canonical vocabulary (all positional, dims negative where the rank is known):

    torch.matmul(a, b)              matmul, bmm, @, two-operand einsum that is a batched matmul;
                                    attention scores q @ kT with kT not a transpose read it as
                                    transpose(transpose(kT)) (SqueezeBERT's keys, viewed (B, H, D, S));
                                    baddbmm as that product scaled by alpha, plus beta * input;
                                    an attention with its heads folded into the batch whose scores
                                    are viewed to (B, H, N, S) and back, unfolded to 4-d (BLOOM)
    torch.add(scores, term)         terms added to (B*nW, ...) scores through a (B, nW, ...) view and
                                    viewed back (Swin V2's window mask, LED's mask): one term
    torch.transpose(x, d0, d1)      transpose, swapaxes, .t(), .T (2-D), .mT, a permute that swaps two dims
    torch.mul(x, s)                 *, mul, and / by s (as * 1/s), unary minus (as * -1.0); a
                                    subtracted product of a doubled operand as the product doubled
                                    (|q|^2 - 2 * q @ k.mT: (2 * q) @ k.mT as (q @ k.mT) * 2)
    torch.add(a, b), torch.sub(a, b)  a broadcast difference read only by ** 2 or abs() with the
                                    query first: (k - q) ** 2 as (q - k) ** 2
    torch.softmax(x, dim)           F.softmax / Tensor.softmax; a dtype= becomes a cast before it
    torch.Tensor.to(x, dtype)       .float(), .half(), .to(dtype), .type(dtype), .type_as(t)
    F.dropout(x, p, True)           functional, module and torch.dropout; eval-mode dropout and
                                    p == 0 are removed (they are the identity)
    torch.masked_fill(x, m, v)      masked_fill, and torch.where with a scalar on one side (or a
                                    torch.tensor(scalar) of the other side's dtype); `x[m] = v`
                                    (also `x[..., m] = v`) with a bool mask, as masked_fill_; a
                                    fill v = torch.tensor(number) of x's dtype as that number;
                                    x.masked_fill(m, -inf) * c (c > 0, or / s) as
                                    (x * c).masked_fill(m, -inf)
    torch._C._nn.linear(x, w, b)    F.linear, nn.Linear, addmm(b, x, w) (HF Conv1D, its flatten/
                                    restore views dropped), x @ W and mm(x, W) with W a 2-D
                                    parameter, a following + b of shape (out,) as the bias
    torch.chunk(x, n, dim)          chunk, method or function; split into two halves by size
    F.gelu(x, approximate=a)        F.gelu, nn.GELU, and 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x**3)))
                                    written out (HF gelu_new; also with the argument factored as
                                    x*sqrt(2/pi)*(1+0.044715*x*x), HF gelu_fast) as
                                    approximate="tanh", and
                                    0.5*x*(1+erf(x/sqrt(2))) (HF gelu_python) as approximate="none"
    torch.sum(x, d, keepdim)        x.sum(d).unsqueeze(d) (and x.sum(-1)[..., None]) as keepdim=True
    torch.pow, torch.abs, torch.exp, torch.clamp, torch.cdist, F.normalize,
    torch.cosine_similarity(a, b, dim, eps) (F.cosine_similarity),
    torch.relu, F.silu, torch.tanh, torch.sigmoid, torch.erf (function or method)
    softmax_with_sinks(s, sinks, shifted, dtype)
                                    softmax(cat([s, sinks per head], -1) [- row max], -1)[..., :-1]
                                    (GPT-OSS's attention sinks)

`t = x.new_empty(...)` filled by slice copies that tile its last dim, read only after them, is
the `torch.cat` of the pieces (DeepSeek-V3's keys).

Identity casts and views or reshapes to a tensor's own shape are removed (`.contiguous()` is
not: a later `.view` depends on it). In-place variants become functional when that is
provably the same: the mutated tensor is a fresh intermediate (not an input, not a view; or a view
of all of one that nothing else reads) and every later reader is redirected to the functional result.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import operator
from typing import Any, Callable, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .aliasing import (
    alias_sources, changes_metadata, is_fresh, mutates, read_where_used, shared_storage_inputs, sharing_memory,
    written_family,
)

Node = fx.Node

_linear = torch._C._nn.linear
_to = torch.Tensor.to

def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor, shifted: bool, dtype: Optional[torch.dtype]):
    """Attention sinks (GPT-OSS): the softmax over the last dim of `scores` (B, H, N, S) with one
    more column, each head's sink logit `sinks[h]`, and that column dropped. `shifted`: the
    columns' row max is subtracted first (as GPT-OSS writes it); `dtype`: the softmax's dtype
    (None: the scores'). The canonical form of that computation, which it also computes exactly."""
    B, H, N, _ = scores.shape
    dt = torch.promote_types(scores.dtype, sinks.dtype)  # as torch.cat promotes
    c = torch.cat([scores.to(dt), sinks.reshape(1, H, 1, 1).expand(B, H, N, 1).to(dt)], -1)
    if shifted:
        c = c - c.amax(-1, keepdim=True)
    if dtype is not None:
        c = c.to(dtype)
    return torch.softmax(c, -1)[..., :-1]


# The targets the canonical graph uses; the matcher compares against these.
CANONICAL_TARGETS = {
    softmax_with_sinks,
    torch.matmul, torch.transpose, torch.mul, torch.add, torch.sub, torch.softmax, _to,
    F.dropout, torch.masked_fill, _linear, torch.pow, torch.sum, torch.abs, torch.exp,
    torch.clamp, torch.cdist, F.normalize, F.gelu, torch.relu, F.silu, torch.tanh, torch.sigmoid, torch.erf,
    torch.reciprocal, torch.logical_not, torch.where, torch.unsqueeze, torch.repeat_interleave,
}

_REQUIRED = object()


def _library_signatures() -> dict:
    """Parameter names and defaults of the library attention calls whose arguments are made
    positional (keyword-only ones stay keywords, always present, so the call still runs): SDPA (a
    builtin without an inspectable signature, so spelled out) and F.multi_head_attention_forward
    (what nn.MultiheadAttention shows Dynamo)."""
    import inspect

    sdpa = (("query", _REQUIRED), ("key", _REQUIRED), ("value", _REQUIRED), ("attn_mask", None),
            ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False))
    mha_params = list(inspect.signature(F.multi_head_attention_forward).parameters.values())
    mha = tuple((p.name, _REQUIRED if p.default is p.empty else p.default) for p in mha_params)
    mha_kw = tuple(p.name for p in mha_params if p.kind is p.KEYWORD_ONLY)
    return {F.scaled_dot_product_attention: (sdpa, ("scale", "enable_gqa")),
            F.multi_head_attention_forward: (mha, mha_kw)}


_LIBRARY_SIGNATURES = _library_signatures()


# ----------------------------------------------------------------------------------------------
# Small helpers on nodes
# ----------------------------------------------------------------------------------------------

def example_value(x: Any) -> Any:
    """The fake value Dynamo recorded for a node (or the constant itself)."""
    if isinstance(x, Node):
        return x.meta.get("example_value", x.meta.get("val"))
    return x


def _fresh_like(value: torch.Tensor) -> torch.Tensor:
    """A new fake tensor with value's shape, strides, dtype and device (its own memory)."""
    mode = getattr(value, "fake_mode", None)
    if mode is None:
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    with mode:
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)


def rank_of(x: Any) -> Optional[int]:
    v = example_value(x)
    return v.dim() if isinstance(v, torch.Tensor) else None


def dtype_of(x: Any) -> Optional[torch.dtype]:
    v = example_value(x)
    return v.dtype if isinstance(v, torch.Tensor) else None


def is_tensor_node(x: Any) -> bool:
    """A node holding a tensor. Pattern graphs carry no example values: there, every node may be
    a tensor, so their canonical form is the one a tensor would get."""
    if not isinstance(x, Node):
        return False
    v = example_value(x)
    return v is None or isinstance(v, torch.Tensor)


def _neg_dim(dim: Any, rank: Optional[int]) -> Any:
    """A dim as a negative index when the rank is known, so -1 and 3 compare equal on 4-D."""
    if isinstance(dim, int) and rank is not None and dim >= 0:
        return dim - rank
    return dim


def is_cast(node: Any) -> bool:
    """A canonical dtype cast (the matcher may look through these)."""
    return isinstance(node, Node) and node.op == "call_function" and node.target is _to


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _writers_behind(node: Node) -> set:
    """The in-place writes (`WRITTEN_IN_PLACE`) of `node` and of every value it may be a view of
    (a call a rewrite emitted is not marked itself)."""
    seen, stack, writers = set(), [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        writers.update(n.meta.get(WRITTEN_IN_PLACE, ()))
        stack.extend(alias_sources(n))
    return writers


def _read_moved_across_a_write(args, kwargs, before: Node) -> list:
    """The arguments of a call placed at `before` that it would read on the other side of an
    in-place write from where the graph reads them: written values (or views of them) that
    `before` does not read itself, with a write between the first read of them that `before`'s
    value rests on and `before`. A write before that read (the BLOOM static cache: written, then
    reshaped and read) or after `before` (a graph input updated after `x * 0.5 * 0.25`, which left
    the whole graph unfused) is read on the same side of by both."""
    moved = []
    order = None
    for a in _tensor_args(args, kwargs):
        writers = _writers_behind(a)
        if not writers or a in read_where_used(before):
            continue
        if order is None:
            order = {n: i for i, n in enumerate(before.graph.nodes)}
        first = _first_read_behind(a, before, order)
        if any(w not in order or first <= order[w] < order[before] for w in writers):
            moved.append(a)
    return moved


def _first_read_behind(a: Node, before: Node, order: dict) -> int:
    """The position of the first node that reads `a` among those `before`'s value rests on (its
    inputs, theirs, back to `a`); `a`'s own where none does."""
    first, seen, stack = None, set(), list(before.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen or order.get(n, -1) <= order[a]:
            continue
        seen.add(n)
        if a in n.all_input_nodes:
            first = order[n] if first is None else min(first, order[n])
        stack.extend(n.all_input_nodes)
    return order[a] if first is None else first


def _tensor_args(args, kwargs) -> list:
    out: list = []
    fx.node.map_aggregate((args, kwargs or {}), lambda a: out.append(a) if isinstance(a, Node) else None)
    return out


def _fake_mode_of(graph: fx.Graph):
    for n in graph.nodes:
        v = example_value(n)
        if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode"):
            return v.fake_mode
    return None


def refresh_meta(node: Node, fake_mode) -> None:
    """Compute a new node's example value from its inputs' example values (under the fake mode),
    so later passes and rules can read its shape and dtype. Best effort: on failure, no meta."""
    if fake_mode is None:
        return

    def value(a):
        return example_value(a) if isinstance(a, Node) else a

    try:
        args = fx.node.map_aggregate(node.args, value)
        kwargs = fx.node.map_aggregate(node.kwargs, value)
        with contextlib.ExitStack() as blocks, fake_mode:
            # under the node's `with torch.autocast(...)` blocks, as it runs: computed under the
            # caller's autocast alone, a product emitted inside `autocast(enabled=False)` read bf16
            # (and a site there was cast to bf16 where eager computes in fp32), and one inside an
            # autocast block of a graph called without it read fp32
            for block in _autocast_blocks(node):
                blocks.enter_context(torch.autocast(*block.args))
            if node.op == "call_function":
                out = node.target(*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                return
        node.meta["example_value"] = out
    except Exception:  # noqa: BLE001 -- meta is an aid, never a requirement
        node.meta.pop("example_value", None)


def _autocast_blocks(node: Node) -> List[Node]:
    """The `_enter_autocast` nodes of the blocks `node` runs inside (its MODE_REGION), outermost
    first; none where one of its switches cannot be entered again (an exit whose enter is not in
    this graph, a set_autocast_* call): there the caller's autocast stays, as before."""
    region = node.meta.get(MODE_REGION)
    blocks = list(region[2]) if region is not None else []
    if any(b.target is not torch.amp.autocast_mode._enter_autocast for b in blocks):
        return []
    return blocks


def _in_graph(node: Node, graph: fx.Graph) -> bool:
    """Whether `node` is still one of `graph`'s nodes (not erased by an earlier rewrite). torch.fx's
    node list has no `__contains__`, so `node in graph.nodes` walks the whole graph: the passes that
    asked that of every node took time quadratic in the graph's size (a 12-layer T5's 1,800 nodes:
    1.3 s of canonicalizing). A node of this graph is in its list until it is erased, which torch.fx
    records on the node; a torch without that record walks the list, as before."""
    erased = getattr(node, "_erased", None)
    if erased is None:
        return node in graph.nodes
    return node.graph is graph and not erased


class UnsafeRewrite(Exception):
    """Canonicalization cannot keep this graph's meaning: a rewrite would read a value written in
    place somewhere other than where the graph reads it, or an in-place op changes a shape the
    recorded metadata assumes. The graph is left unfused."""


class _Rewriter:
    """Replaces nodes by canonical calls, keeping meta (stack trace, example value, marks). A new
    call reads its inputs where it is placed: one that reads a value written in place
    (`WRITTEN_IN_PLACE`) that the node it is placed at did not read there (a fold across a chain of
    computing nodes) could read it on the other side of a write, and raises `UnsafeRewrite`."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.fake_mode = _fake_mode_of(graph)
        self.changed = 0
        self.writes_marked = False  # set once `canonicalize` marks WRITTEN_IN_PLACE: only then can a read move

    def emit(self, before: Node, target: Callable, args: tuple, meta_from: Optional[Node] = None,
             kwargs: Optional[dict] = None) -> Node:
        moved = _read_moved_across_a_write(args, kwargs, before) if self.writes_marked else []
        if moved:
            raise UnsafeRewrite(f"a rewrite would read {', '.join(sorted(a.name for a in moved))}, which is "
                                f"written in place, at {before.name} instead of where the graph reads it")
        with self.graph.inserting_before(before):
            new = self.graph.call_function(target, args, kwargs)
        src = meta_from if meta_from is not None else before
        for key in ("stack_trace", "source_fn_stack", "nn_module_stack", "truthfuse_optional"):
            if key in src.meta:
                new.meta[key] = src.meta[key]
        if meta_from is not None and WRITTEN_IN_PLACE in meta_from.meta:  # the same value: its writes
            new.meta[WRITTEN_IN_PLACE] = meta_from.meta[WRITTEN_IN_PLACE]
        if MODE_REGION in before.meta:  # it runs where `before` does
            new.meta[MODE_REGION] = before.meta[MODE_REGION]
        if meta_from is not None and "example_value" in meta_from.meta:
            new.meta["example_value"] = meta_from.meta["example_value"]
        else:
            refresh_meta(new, self.fake_mode)
        return new

    def replace(self, node: Node, target: Callable, args: tuple, kwargs: Optional[dict] = None) -> Node:
        if mutates(node):  # its write would be lost with it
            raise UnsafeRewrite(f"a rewrite would replace {node.name}, which writes in place")
        _not_without_grad(node)
        new = self.emit(node, target, args, meta_from=node, kwargs=kwargs)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.changed += 1
        return new

    def bypass(self, node: Node, value: Any) -> None:
        """Remove an identity node, handing its users the value it passed through."""
        node.replace_all_uses_with(value)
        self.erase(node)
        self.changed += 1

    def erase(self, node: Node) -> None:
        """Erase a node a rewrite folded into another."""
        _not_without_grad(node)
        self.graph.erase_node(node)


# ----------------------------------------------------------------------------------------------
# In-place variants
# ----------------------------------------------------------------------------------------------

_INPLACE_METHODS = {
    "mul_": torch.mul, "div_": torch.div, "add_": torch.add, "sub_": torch.sub,
    "masked_fill_": torch.masked_fill, "relu_": torch.relu, "exp_": torch.exp,
    "neg_": torch.neg, "clamp_": torch.clamp, "tanh_": torch.tanh, "pow_": torch.pow,
    "abs_": torch.abs,
}


# `x *= y` and the like on a tensor: Dynamo records the operator module's in-place functions.
_INPLACE_OPERATORS = {
    operator.imul: torch.mul, operator.itruediv: torch.div, operator.iadd: torch.add, operator.isub: torch.sub,
}

# Out-of-place forms that may promote: t.mul_(w) keeps t's dtype, torch.mul(t, w) may not.
_PROMOTING = (torch.mul, torch.div, torch.add, torch.sub, torch.pow, torch.clamp)


def _keeps_dtype(functional, args, kwargs) -> bool:
    """Whether the out-of-place `functional` gives the mutated tensor's dtype, as the in-place op
    does by casting its result back (a bf16 activation scaled in place by an fp32 vector stays
    bf16; out of place it would become fp32). Unknown operand dtypes: no. A pattern graph carries no
    example values: there the in-place op takes the functional form, so that a pattern written with
    one matches targets whose in-place op became functional (and no other)."""
    mutated = example_value(args[0])
    if mutated is None and isinstance(args[0], Node):
        return True
    if not isinstance(mutated, torch.Tensor):
        return False
    if functional not in _PROMOTING:
        return True
    for operand in list(args[1:]) + [v for k, v in kwargs.items() if k in ("other", "exponent", "min", "max")]:
        if operand is None:
            continue
        value = example_value(operand)
        if isinstance(value, torch.SymFloat):
            value = 1.0
        elif isinstance(value, (torch.SymInt, torch.SymBool)):
            value = 1
        if not isinstance(value, (torch.Tensor, bool, int, float)):
            return False
        if torch.result_type(mutated, value) != mutated.dtype:
            return False
    return True


def _is_fresh_intermediate(x: Any) -> bool:
    """A tensor computed inside the graph into memory nothing else shares (`aliasing.is_fresh`)."""
    return is_fresh(x) and is_tensor_node(x)


def _last_dim_slice(index: Any, size: int) -> Optional[tuple]:
    """(start, stop) of an index `(..., a:b)` over a last dim of `size` (static ints, step 1), else None."""
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice)
            and index[1].step in (None, 1)):
        return None
    start, stop = index[1].start, index[1].stop
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (start, stop)):
        return None
    start, stop, _ = slice(start, stop).indices(size)
    return (start, stop) if start < stop else None


def _assembled_by_slice_copies(rw: _Rewriter) -> None:
    """`t = x.new_empty(...)`, then `t[..., a:b].copy_(src)` for slices that tile its last dim (or
    `t[..., a:b] = src`), read only after the copies: that is `torch.cat` of the sources (cast to
    t's dtype), which builds the same tensor (DeepSeek-V3 assembles its keys this way). Only where
    every size is a static int, every source has its slice's exact shape, and nothing else touches
    t before the copies or writes it after them."""
    graph = rw.graph
    for node in list(graph.nodes):
        if not (node.op == "call_method" and node.target == "new_empty"):
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}  # afresh: an earlier rewrite adds nodes
        tv = example_value(node)
        if not (isinstance(tv, torch.Tensor) and tv.dim() >= 1 and isinstance(tv.shape[-1], int)):
            continue
        D = tv.shape[-1]
        pieces, readers = [], []
        for user in node.users:
            writer = None
            if user.op == "call_function" and user.target is operator.getitem and len(user.users) == 1:
                (writer,) = user.users
                if not (writer.op == "call_method" and writer.target == "copy_" and len(writer.args) == 2
                        and writer.args[0] is user and not writer.kwargs and not writer.users):
                    writer = None
                bounds, src = _last_dim_slice(user.args[1], D), writer.args[1] if writer is not None else None
            elif user.op == "call_function" and user.target is operator.setitem and user.args[0] is node:
                writer, bounds, src = user, _last_dim_slice(user.args[1], D), user.args[2]
            if writer is None:
                readers.append(user)
                continue
            sv = example_value(src)
            view = example_value(user) if writer is not user else None
            want = tuple(tv.shape[:-1]) + ((bounds[1] - bounds[0]),) if bounds else None
            if not (bounds and isinstance(src, Node) and isinstance(sv, torch.Tensor) and sv.dtype.is_floating_point
                    and sv.device == tv.device and tuple(sv.shape) == want
                    and (view is None or tuple(view.shape) == want)):
                pieces = None
                break
            pieces.append((bounds, src, writer, user))
        if not pieces or not readers:
            continue
        pieces.sort(key=lambda piece: piece[0])
        tiled = pieces[0][0][0] == 0 and pieces[-1][0][1] == D and all(
            a[0][1] == b[0][0] for a, b in zip(pieces, pieces[1:]))
        writers = {w for _, _, w, _ in pieces}
        first_write = min(order[w] for w in writers)
        last_write = max(order[w] for w in writers)
        first_read = min(order[r] for r in readers)
        # cat reads the sources where t is first read, not where each was copied: nothing else
        # may write anything in between
        views = {v for _, _, _, v in pieces}
        if any(n.meta.get(WITHOUT_GRAD) for n in [node, *writers, *views, *readers]):
            continue  # cat would record gradients the copies made without them do not
        # any other write into t's memory, through whatever alias, would be lost with t
        others = sharing_memory([node]) - {node} - writers - views
        if (not tiled or first_read < last_write or any(mutates(n) for n in others)
                or _writes_between(graph, order, first_write, first_read, writers)):
            continue
        first = min(readers, key=order.get)
        sources = [s if example_value(s).dtype == tv.dtype else rw.emit(first, _to, (s, tv.dtype))
                   for _, s, _, _ in pieces]
        cat = rw.emit(first, torch.cat, (sources, -1))
        for reader in readers:
            reader.replace_input_with(node, cat)
        for _, _, writer, view in pieces:
            graph.erase_node(writer)
            if view is not writer:
                graph.erase_node(view)
        graph.erase_node(node)
        rw.changed += 1


def _writes_between(graph: fx.Graph, order: dict, lo: int, hi: int, allowed=()) -> bool:
    """Whether a node strictly between positions lo and hi of `order` (besides `allowed`) may
    write into a value in place: then a read moved across that span could see another value."""
    return any(lo < order[n] < hi and n not in allowed and mutates(n) for n in graph.nodes)


# Views of a whole tensor's elements, each once (no expand: a write through one would hit an
# element several times; no narrow or indexing: a part).
_WHOLE_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "unflatten",
                       "view_as", "reshape_as", "contiguous", "swapaxes", "swapdims", "movedim", "t"}
_WHOLE_VIEW_FUNCTIONS = {torch.transpose, torch.permute, torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten,
                         torch.swapaxes, torch.movedim, torch.t}


def _sole_whole_view_of_fresh(view: Any) -> bool:
    """`view` views all of a fresh intermediate that nothing else reads (`scores = torch.bmm(q, kT)
    .view(B, H, N, S)`): a write into it changes memory that no other value reads, so it may
    become functional as a write into a fresh value does."""
    if not (isinstance(view, Node) and not mutates(view) and view.args
            and ((view.op == "call_method" and view.target in _WHOLE_VIEW_METHODS)
                 or (view.op == "call_function" and _hashable(view.target) and view.target in _WHOLE_VIEW_FUNCTIONS))):
        return False
    base = view.args[0]
    return alias_sources(view) == [base] and _is_fresh_intermediate(base) and set(base.users) == {view}


def _hashable(target: Any) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def _setitem_as_masked_fill(node: Node) -> Optional[tuple]:
    """(t, mask, value) when `t[mask] = value` (also `t[..., mask]`, `t[:, :, mask]`) is
    `t.masked_fill_(mask, value)`: a bool mask on t's device whose shape is t's trailing dims
    (broadcast as masked_fill broadcasts it), and a Python number t's dtype holds without
    overflow (index_put rounds -1e9 to -inf in fp16, where masked_fill raises). Else None.
    Hand-written attention masks its scores so (`scores[mask] = float("-inf")`)."""
    if len(node.args) != 3 or node.kwargs:
        return None
    target, index, value = node.args
    value = _literal_of_dtype(value, target)  # `= torch.tensor(number)` of target's dtype
    tv = example_value(target)
    if not (isinstance(tv, torch.Tensor) and tv.dtype.is_floating_point and isinstance(value, (int, float))
            and not isinstance(value, bool)):
        return None
    if math.isfinite(value) and abs(value) > torch.finfo(tv.dtype).max:
        return None
    full = slice(None, None, None)
    lead = ()
    if isinstance(index, tuple):
        if not index:
            return None
        *lead, index = index
        lead = tuple(lead)
    mask = example_value(index)
    if not (isinstance(index, Node) and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool
            and mask.device == tv.device and mask.dim() >= 1):
        return None
    if lead == (Ellipsis,):
        pass
    elif all(i == full for i in lead):  # `t[mask]`, `t[:, :, mask]`
        if len(lead) + mask.dim() != tv.dim():
            return None
    else:
        return None
    if mask.dim() > tv.dim() or not all(_same_size(a, b) for a, b in zip(mask.shape, tv.shape[tv.dim() - mask.dim():])):
        return None
    return target, index, value


def _functionalize_inplace(rw: _Rewriter) -> None:
    graph = rw.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        functional = None
        args, kwargs = node.args, dict(node.kwargs)
        if node.op == "call_method" and node.target in _INPLACE_METHODS:
            functional = _INPLACE_METHODS[node.target]
        elif node.op == "call_function" and node.target in _INPLACE_OPERATORS:
            functional = _INPLACE_OPERATORS[node.target]
        elif node.op == "call_function" and node.target is operator.setitem:
            fill = _setitem_as_masked_fill(node)
            if fill is not None:
                functional, args, kwargs = torch.masked_fill, fill, {}
        elif node.op == "call_function" and node.target in (F.dropout, F.relu, F.silu) and \
                (kwargs.get("inplace") or (node.target is F.dropout and len(args) > 3 and args[3])):
            functional = node.target
            kwargs["inplace"] = False
            if node.target is F.dropout and len(args) > 3:
                args = args[:3]
        if functional is None or not args or node.meta.get(WITHOUT_GRAD):
            continue
        mutated = args[0]
        if not (_is_fresh_intermediate(mutated) or _sole_whole_view_of_fresh(mutated)):
            continue
        # An in-place op casts its result back to the mutated tensor's dtype (a bf16 t times an
        # fp32 w stays bf16): out of place, a cast after the op does the same, rounding once.
        cast_back = not _keeps_dtype(functional, args, kwargs)
        if cast_back and not isinstance(example_value(mutated), torch.Tensor):
            continue
        later = [u for u in mutated.users if u is not node and order.get(u, -1) > order[node]]
        earlier_aliases = [u for u in mutated.users if u is not node and order.get(u, -1) < order[node]
                           and mutated in alias_sources(u)]
        if earlier_aliases:
            continue  # a view (or the value itself) taken before the mutation would observe it
        with graph.inserting_before(node):
            new = graph.call_function(functional, tuple(args), kwargs)
            if cast_back:
                new.meta.update(node.meta)
                # its own value (the promoted dtype), not the in-place result's: a rule that reads
                # it (a feed-forward block's residual add, `y += x` with fp32 x under autocast)
                # found no value and its replacement failed ('matched site does not produce a tensor')
                new.meta.pop("example_value", None)
                refresh_meta(new, rw.fake_mode)
                new = graph.call_function(_to, (new, example_value(mutated).dtype))
        new.meta.update(node.meta)
        target_value = example_value(mutated)
        if isinstance(target_value, torch.Tensor) and (example_value(new) is target_value
                                                       or node.target is operator.setitem):  # setitem gives None
            # Dynamo gave the in-place result the target's fake; out of place it is memory of its own
            new.meta["example_value"] = _fresh_like(target_value)
        node.replace_all_uses_with(new)
        for user in later:
            user.replace_input_with(mutated, new)
        graph.erase_node(node)
        order[new] = order[node]
        rw.changed += 1


# ----------------------------------------------------------------------------------------------
# Per-node canonical forms
# ----------------------------------------------------------------------------------------------

def _method_or_function(node: Node, methods: set, functions: set) -> bool:
    if node.op == "call_method":
        return node.target in methods
    if node.op == "call_function":
        return node.target in functions
    return False


def _single_none_index(index: tuple, rank: Optional[int]) -> Optional[int]:
    """For x[idx] where idx holds only full slices, one Ellipsis at most and exactly one None,
    the (negative) dim at which that None inserts a new axis; otherwise None."""
    full = slice(None, None, None)
    if sum(i is None for i in index) != 1 or sum(i is Ellipsis for i in index) > 1:
        return None
    if not all(i is None or i is Ellipsis or i == full for i in index):
        return None
    if Ellipsis not in index:
        if rank is None:
            return None
        index = index + (Ellipsis,)
    pos = index.index(None)
    ell = index.index(Ellipsis)
    if pos > ell:  # counted from the end
        return -(len(index) - pos)
    if rank is None:
        return None
    return pos - (rank + 1)


def _parse_einsum_matmul(equation: str):
    """For a two-operand einsum that is a (batched) matrix product, say which operands need a
    transpose: returns (transpose_a, transpose_b) or None. Batch letters must lead in the same
    order in both inputs and the output, and exactly one letter is contracted."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if len(set(a)) != len(a) or len(set(b)) != len(b) or len(a) != len(b) or len(a) < 2:
        return None
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1:
        return None
    batch = a[:-2]
    if b[:-2] != batch or out[:-2] != batch:
        return None
    c = contracted[0]
    free_a = [x for x in a[-2:] if x != c]
    free_b = [x for x in b[-2:] if x != c]
    if len(free_a) != 1 or len(free_b) != 1 or c not in a[-2:] or c not in b[-2:]:
        return None
    if out[-2:] != free_a[0] + free_b[0]:
        return None
    return a[-1] != c, b[-2] != c


def _respells_a_view(node: Node) -> bool:
    """A transpose, permute, `.t()`/`.T`/`.mT` or unsqueeze: `_canonical_node` writes each as
    `torch.transpose` or `torch.unsqueeze` of the same input, a view of the same memory."""
    if _method_or_function(node, {"transpose", "swapaxes", "swapdims", "permute", "unsqueeze"},
                           {torch.transpose, torch.swapaxes, torch.permute, torch.unsqueeze}):
        return True
    if node.op == "call_method" and node.target == "t":
        return True
    return node.op == "call_function" and node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT")


# The leading parameters of the functions `_canonical_node` rewrites, in their positional order
# (each may be passed positionally). Called with some of them as keywords (timm's Swin V2 calls
# `F.linear(input=x, weight=w, bias=b)`), a call is respelled with them positional first: the
# rewrites read operands by position.
_POSITIONAL_PARAMS = {
    F.linear: ("input", "weight", "bias"),
    torch.matmul: ("input", "other"), torch.bmm: ("input", "mat2"), torch.mm: ("input", "mat2"),
    torch.transpose: ("input", "dim0", "dim1"), torch.swapaxes: ("input", "axis0", "axis1"),
    torch.permute: ("input", "dims"),
    torch.mul: ("input", "other"), torch.div: ("input", "other"), torch.add: ("input", "other"),
    torch.sub: ("input", "other"), torch.neg: ("input",), torch.pow: ("input", "exponent"),
    torch.square: ("input",), torch.abs: ("input",), torch.exp: ("input",), torch.relu: ("input",),
    torch.tanh: ("input",), torch.reciprocal: ("input",), F.relu: ("input",), F.gelu: ("input",),
    F.silu: ("input",),
    torch.softmax: ("input", "dim"), F.softmax: ("input", "dim"),
    F.dropout: ("input", "p", "training"), torch.dropout: ("input", "p", "train"),
    torch.masked_fill: ("input", "mask", "value"), torch.where: ("condition", "input", "other"),
    torch.sum: ("input", "dim", "keepdim"), torch.clamp: ("input", "min", "max"),
    torch.clip: ("input", "min", "max"), torch.cdist: ("x1", "x2", "p", "compute_mode"),
    F.normalize: ("input", "p", "dim", "eps"), torch.chunk: ("input", "chunks", "dim"),
    torch.unsqueeze: ("input", "dim"), torch.repeat_interleave: ("input", "repeats", "dim"),
    torch.addmm: ("input", "mat1", "mat2"),
}


def _keywords_to_positions(graph: fx.Graph) -> None:
    """Respell calls of `_POSITIONAL_PARAMS` functions whose leading parameters come as keywords
    with those parameters positional, up to the first one not given (the same call)."""
    for node in graph.nodes:
        names = _POSITIONAL_PARAMS.get(node.target) if node.op == "call_function" else None
        if not names or not node.kwargs or not any(n in node.kwargs for n in names[len(node.args):]):
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        for name in names[len(args):]:
            if name not in kwargs:
                break
            args.append(kwargs.pop(name))
        node.args, node.kwargs = tuple(args), kwargs


def _canonical_node(rw: _Rewriter, node: Node) -> None:  # noqa: C901 -- one table, read top to bottom
    op, t = node.op, node.target
    if op not in ("call_function", "call_method") or mutates(node) or node.meta.get(WITHOUT_GRAD):
        return  # an in-place write left in place, or what no_grad computes, stays as it is
    if node.meta.get(WRITTEN_IN_PLACE) and not _respells_a_view(node):
        # what a write may change stays as it is, except a view spelled another way: the canonical
        # call views the same memory at the same place and keeps the node's writes
        # (`match.sites` decides whether a site may read it)
        return
    args = node.args

    # matmul family
    if _method_or_function(node, {"matmul", "bmm", "__matmul__"}, {operator.matmul, torch.bmm}):
        if len(args) == 2 and not node.kwargs:  # an out= must stay where it is
            rw.replace(node, torch.matmul, (args[0], args[1]))
        return
    if op == "call_function" and t is torch.einsum:
        equation = args[0]
        operands = args[1:] if len(args) > 2 else (list(args[1]) if len(args) == 2 and
                                                     isinstance(args[1], (list, tuple)) else [])
        if isinstance(equation, str) and len(operands) == 2:
            parsed = _parse_einsum_matmul(equation)
            if parsed is not None:
                a, b = operands
                if parsed[0]:
                    a = rw.emit(node, torch.transpose, (a, -2, -1))
                if parsed[1]:
                    b = rw.emit(node, torch.transpose, (b, -2, -1))
                # einsum computes through bmm, whose result can differ from matmul's in the last
                # bit (2-d CPU products): `restore_spellings` puts it back where no site took it
                rw.replace(node, torch.matmul, (a, b)).meta[RESPELLED] = ("einsum", equation) + tuple(parsed)
        return

    # transposes of two dims, and permutes that are one
    if _method_or_function(node, {"transpose", "swapaxes", "swapdims"}, {torch.transpose, torch.swapaxes}):
        rank = rank_of(args[0])
        d0 = _neg_dim(_arg(node, 1, "dim0"), rank)
        d1 = _neg_dim(_arg(node, 2, "dim1"), rank)
        if isinstance(d0, int) and isinstance(d1, int):
            d0, d1 = min(d0, d1), max(d0, d1)
            if (t, args[1:]) != (torch.transpose, (d0, d1)):
                rw.replace(node, torch.transpose, (args[0], d0, d1))
        return
    if _method_or_function(node, {"permute"}, {torch.permute}):
        dims = args[1:] if op == "call_method" else (args[1],)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        rank = rank_of(args[0]) or len(dims)
        dims = tuple(d % rank if isinstance(d, int) else d for d in dims)
        moved = [i for i, d in enumerate(dims) if d != i]
        if len(moved) == 2 and dims[moved[0]] == moved[1] and dims[moved[1]] == moved[0]:
            rw.replace(node, torch.transpose, (args[0], moved[0] - rank, moved[1] - rank))
        return
    if op == "call_method" and t == "t" and rank_of(args[0]) == 2:
        rw.replace(node, torch.transpose, (args[0], -2, -1))
        return
    # the .T and .mT properties, which Dynamo records as getattr (Falcon's `x @ self.weight.T`).
    # .mT is transpose(-2, -1) whatever the rank (both fail below 2-D), so also in a pattern, whose
    # nodes have no rank: there `k.mT` stayed a getattr that no model's graph has
    if op == "call_function" and t is getattr and len(args) == 2 and not node.kwargs and (
            (args[1] == "T" and rank_of(args[0]) == 2) or
            (args[1] == "mT" and (rank_of(args[0]) is None or rank_of(args[0]) >= 2))):
        rw.replace(node, torch.transpose, (args[0], -2, -1))
        return

    # multiplication, division by a scale, negation
    if _method_or_function(node, {"mul", "__mul__", "__rmul__", "multiply"}, {operator.mul, torch.mul}):
        # x * x is x ** 2 bit for bit (aten's pow(x, 2) squares by one multiply), forward and
        # backward; one spelling lets |q|^2 written either way match one pattern
        if len(args) == 2 and not node.kwargs and args[0] is args[1] and is_tensor_node(args[0]) and \
                _floating(args[0]):  # bool * bool stays bool; pow(bool, 2) would not
            rw.replace(node, torch.pow, (args[0], 2)).meta[RESPELLED] = "x * x"
            return
        if len(args) == 2 and not node.kwargs and (t is not torch.mul or op != "call_function"):
            a, b = args
            # `c * x` (a Python number c, or a symbolic one) runs as x.mul(c), which takes c at the
            # computation's precision; torch.mul(c, x) makes c a tensor of x's dtype first, so in
            # fp16 and bf16 it multiplies by c rounded (HF gelu_new's 0.79788 * ..., one bf16 step off)
            if not is_tensor_node(a) and is_tensor_node(b):
                a, b = b, a
            rw.replace(node, torch.mul, (a, b))
        return
    if _method_or_function(node, {"div", "__truediv__", "true_divide"}, {operator.truediv, torch.div}):
        if len(args) != 2 or node.kwargs.get("rounding_mode") is not None:
            return
        x, s = args
        if not is_tensor_node(x):
            return
        # x * (1/s) can differ from x / s in the last bit: a site's op takes the scale as that
        # product anyway, but where no site takes it, `restore_spellings` puts the division back
        if isinstance(s, (int, float)) and not isinstance(s, bool) and s != 0:
            rw.replace(node, torch.mul, (x, 1.0 / s)).meta[DIVIDED_BY] = s
        elif is_tensor_node(s):
            recip = rw.emit(node, torch.reciprocal, (s,))
            rw.replace(node, torch.mul, (x, recip)).meta[DIVIDED_BY] = s
        elif isinstance(s, Node):  # a symbolic Python scalar (SymInt/SymFloat)
            recip = rw.emit(node, operator.truediv, (1.0, s))
            rw.replace(node, torch.mul, (x, recip)).meta[DIVIDED_BY] = s
        return
    if _method_or_function(node, {"neg", "__neg__", "negative"}, {operator.neg, torch.neg}):
        # only for floating tensors: an integer tensor times -1.0 would become floating
        dtype = dtype_of(args[0])
        if is_tensor_node(args[0]) and (dtype is None or dtype.is_floating_point):
            rw.replace(node, torch.mul, (args[0], -1.0))
        return

    # addition and subtraction (alpha would change the meaning: leave those alone)
    if _method_or_function(node, {"add", "__add__", "__radd__"}, {operator.add, torch.add}):
        if len(args) == 2 and "alpha" not in node.kwargs and (t is not torch.add or op != "call_function"):
            if is_tensor_node(args[0]) or is_tensor_node(args[1]):
                rw.replace(node, torch.add, (args[0], args[1]))
        return
    if _method_or_function(node, {"sub", "__sub__"}, {operator.sub, torch.sub}):
        if len(args) == 2 and "alpha" not in node.kwargs and (t is not torch.sub or op != "call_function"):
            if is_tensor_node(args[0]) or is_tensor_node(args[1]):
                rw.replace(node, torch.sub, (args[0], args[1]))
        return

    # softmax, with its optional dtype turned into a cast
    if _method_or_function(node, {"softmax"}, {F.softmax, torch.softmax}):
        x = args[0]
        dim = _arg(node, 1, "dim")
        dtype = node.kwargs.get("dtype")
        if op == "call_function" and t is F.softmax and len(args) > 3:
            dtype = args[3]
        if not isinstance(dim, int):
            return
        dim = _neg_dim(dim, rank_of(x))
        if dtype is not None:
            x = rw.emit(node, _to, (x, dtype))
        if (t, args, node.kwargs) != (torch.softmax, (x, dim), {}):
            new = rw.replace(node, torch.softmax, (x, dim))
            if dtype is not None:
                new.meta[RESPELLED] = ("dtype", dtype)
        return

    # dtype casts
    cast_dtype = None
    if op == "call_method" and t in ("float", "half", "bfloat16", "double") and len(args) == 1 and not node.kwargs:
        cast_dtype = {"float": torch.float32, "half": torch.float16,
                      "bfloat16": torch.bfloat16, "double": torch.float64}[t]
    elif op == "call_method" and t in ("to", "type") and set(node.kwargs) <= {"dtype"}:
        rest = list(args[1:]) + ([node.kwargs["dtype"]] if "dtype" in node.kwargs else [])
        if len(rest) == 1 and isinstance(rest[0], torch.dtype):
            cast_dtype = rest[0]
    elif op == "call_method" and t == "type_as" and len(args) == 2:
        cast_dtype = dtype_of(args[1])
    elif op == "call_function" and t is _to and len(args) == 2 and isinstance(args[1], torch.dtype):
        cast_dtype = args[1]
    if cast_dtype is not None:
        if dtype_of(args[0]) == cast_dtype:
            rw.bypass(node, args[0])
        elif not (op == "call_function" and t is _to):
            rw.replace(node, _to, (args[0], cast_dtype))
        return

    # dropout: only training-mode dropout with p > 0 does anything
    if (op == "call_function" and t in (F.dropout, torch.dropout)) or (op == "call_method" and t == "dropout"):
        x = args[0]
        p = _arg(node, 1, "p", 0.5)
        training = _arg(node, 2, "training" if t is F.dropout else "train", t is F.dropout)
        inplace = _arg(node, 3, "inplace", False) if t is F.dropout else False
        if inplace or isinstance(training, Node):
            return
        if training is False or (isinstance(p, (int, float)) and p == 0):
            rw.bypass(node, x)
        elif (t, args, node.kwargs) != (F.dropout, (x, p, True), {}):
            rw.replace(node, F.dropout, (x, p, True))
        return

    # masking by a fill value
    if _method_or_function(node, {"masked_fill"}, {torch.masked_fill}):
        # a fill `torch.tensor(number)` of the filled tensor's dtype is that number (as stored)
        value = _literal_of_dtype(args[2], args[0]) if len(args) == 3 else None
        if len(args) == 3 and (t is not torch.masked_fill or op != "call_function" or node.kwargs
                               or value is not args[2]):
            rw.replace(node, torch.masked_fill, (args[0], args[1], value))
        elif len(args) == 1 and set(node.kwargs) == {"mask", "value"}:
            rw.replace(node, torch.masked_fill, (args[0], node.kwargs["mask"], node.kwargs["value"]))
        return
    if op == "call_function" and t is torch.where and len(args) == 3 and not node.kwargs:
        cond, a, b = args
        a, b = _literal_of_dtype(a, b), _literal_of_dtype(b, a)
        # only where the result keeps the tensor's dtype (where promotes: an int64 tensor with 0.5
        # gives float32, masked_fill would not), with the number as that dtype stores it
        if is_tensor_node(a) and _is_number(b) and _same_dtype(a, node):
            keep_not = rw.emit(node, torch.logical_not, (cond,))
            rw.replace(node, torch.masked_fill, (a, keep_not, _as_stored(b, dtype_of(a)))).meta[RESPELLED] = \
                ("where", "filled where not")
        elif is_tensor_node(b) and _is_number(a) and _same_dtype(b, node):
            rw.replace(node, torch.masked_fill, (b, cond, _as_stored(a, dtype_of(b)))).meta[RESPELLED] = \
                ("where", "filled where")
        # where's result is laid out as its operands are (x.T's strides), masked_fill's contiguous, and
        # a sum over it adds in another order: `restore_spellings` puts it back where no site took it
        return

    # linear layers
    if op == "call_function" and t is F.linear:
        rw.replace(node, _linear, (args[0], args[1], _arg(node, 2, "bias")))
        return
    if op == "call_function" and t is _linear and (len(args) < 3 or node.kwargs):
        rw.replace(node, _linear, (args[0], args[1], _arg(node, 2, "bias")))
        return
    if _method_or_function(node, {"addmm"}, {torch.addmm}) and len(args) == 3 and not node.kwargs:
        bias, x, w = args
        if rank_of(bias) in (1, None) and rank_of(x) in (2, None):
            wt = rw.emit(node, torch.transpose, (w, -2, -1))
            rw.replace(node, _linear, (x, wt, bias))
        return
    # baddbmm(input, b1, b2, beta=, alpha=) is beta * input + alpha * (b1 @ b2): BLOOM adds its ALiBi
    # term to the scaled scores so, and Megatron-style code scales the scores with beta=0 (input
    # then ignored, NaN included)
    if _method_or_function(node, {"baddbmm"}, {torch.baddbmm}):
        bound = _bind(node, _BADDBMM_PARAMS, ("beta", "alpha"))
        added_value = example_value(bound[0]) if bound is not None else None
        # with beta=0 the input's gradient is zeros, not None: such an input stays where it is
        grad_through_zero = bound is not None and bound[3] == 0 and getattr(added_value, "requires_grad", False)
        if bound is not None and _is_number(bound[3]) and _is_number(bound[4]) and not grad_through_zero:
            added, batch1, batch2, beta, alpha = bound
            product = rw.emit(node, torch.matmul, (batch1, batch2))
            if alpha != 1:
                product = rw.emit(node, torch.mul, (product, float(alpha)))
            if beta == 0:  # the output has the product's shape whatever input broadcasts from
                rw.bypass(node, product)
                if alpha != 1:  # the product rounded before alpha scales it: see below
                    product.meta[RESPELLED] = ("baddbmm", 0.0, float(alpha))
            else:
                if beta != 1:
                    added = rw.emit(node, torch.mul, (added, float(beta)))
                want, added_dtype = dtype_of(node), dtype_of(bound[0])
                if want is not None and added_dtype is not None and added_dtype != want:
                    # torch.autocast: baddbmm casts its input too and returns bf16, where a bf16
                    # product plus an fp32 input is fp32; the sum is cast back to baddbmm's dtype
                    total = rw.emit(node, torch.add, (product, added))
                    new = rw.replace(node, _to, (total, want))
                else:
                    new = rw.replace(node, torch.add, (product, added))
                # in 16-bit floats (or under autocast) the product rounded before the sum can differ
                # from baddbmm's one rounding: put back where no site took it (`restore_spellings`)
                new.meta[RESPELLED] = ("baddbmm", float(beta), float(alpha))
        return
    if _method_or_function(node, {"mm"}, {torch.mm}) and len(args) == 2:
        rw.replace(node, torch.matmul, (args[0], args[1]))
        return

    # split into two halves by size (z.split(h, -1), torch.split(z, [h, h], -1) of a 2h-wide z): the
    # same two views as chunk(2), the spelling of the chunked gated feed-forward rules
    if _method_or_function(node, {"split"}, {torch.split}) and set(node.kwargs) <= {
            "split_size", "split_size_or_sections", "dim"}:
        sizes = _arg(node, 1, "split_size" if op == "call_method" else "split_size_or_sections")
        value, dim = example_value(args[0]), _neg_dim(_arg(node, 2, "dim", 0), rank_of(args[0]))
        if isinstance(value, torch.Tensor) and isinstance(dim, int) and -value.dim() <= dim < 0:
            size = value.shape[dim]

            def half(s: Any) -> bool:
                s = example_value(s) if isinstance(s, Node) else s
                return isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) and _same_size(2 * s, size)
            pieces = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes, sizes]
            if len(pieces) == 2 and all(half(s) for s in pieces):
                rw.replace(node, torch.chunk, (args[0], 2, dim))
        return

    # chunk, positional with a negative dim (a gated MLP's single projection is split this way)
    if _method_or_function(node, {"chunk"}, {torch.chunk}):
        chunks = _arg(node, 1, "chunks")
        dim = _neg_dim(_arg(node, 2, "dim", 0), rank_of(args[0]))
        if isinstance(chunks, int) and isinstance(dim, int) and \
                (t, op, args[1:], node.kwargs) != (torch.chunk, "call_function", (chunks, dim), {}):
            rw.replace(node, torch.chunk, (args[0], chunks, dim))
        return

    # x.reshape_as(y) with y's sizes known: reshape to those sizes, so that y's only use is not a
    # read of its shape (SAM adds its relative-position terms reshaped as the scores)
    if op == "call_method" and t == "reshape_as" and len(args) == 2 and not node.kwargs:
        target = example_value(args[1])
        if isinstance(target, torch.Tensor) and all(isinstance(d, int) for d in target.shape):
            rw.replace(node, torch.reshape, (args[0], tuple(target.shape)))
        return
    # x.expand_as(y) likewise, as the view expand(y's sizes) (XLM and FlauBERT expand their
    # padding mask as the scores they then fill)
    if op == "call_method" and t == "expand_as" and len(args) == 2 and not node.kwargs:
        target = example_value(args[1])
        if isinstance(target, torch.Tensor) and all(isinstance(d, int) for d in target.shape):
            rw.replace(node, torch.broadcast_to, (args[0], tuple(target.shape)))
        return

    # unsqueeze, including indexing with a single None (q[..., :, None, :])
    if _method_or_function(node, {"unsqueeze"}, {torch.unsqueeze}) and len(args) == 2:
        rank = rank_of(args[0])
        dim = args[1]
        if isinstance(dim, int) and rank is not None and dim >= 0:
            dim = dim - (rank + 1)
        if (t, op, args[1]) != (torch.unsqueeze, "call_function", dim):
            rw.replace(node, torch.unsqueeze, (args[0], dim))
        return
    if op == "call_function" and t is operator.getitem and len(args) == 2 and isinstance(args[1], tuple):
        dim = _single_none_index(args[1], rank_of(args[0]))
        if dim is not None:
            rw.replace(node, torch.unsqueeze, (args[0], dim))
        return

    # repeat_interleave by a number along one dim (grouped-query attention's K/V): positional,
    # negative dim
    if _method_or_function(node, {"repeat_interleave"}, {torch.repeat_interleave}) and \
            set(node.kwargs) <= {"repeats", "dim"} and 2 <= len(args) + len(node.kwargs) <= 3:
        reps, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
        if isinstance(dim, int) and (isinstance(reps, int) or (isinstance(reps, Node) and not is_tensor_node(reps))):
            dim = _neg_dim(dim, rank_of(args[0]))
            if (t, op, args[1:], node.kwargs) != (torch.repeat_interleave, "call_function", (reps, dim), {}):
                rw.replace(node, torch.repeat_interleave, (args[0], reps, dim))
        return

    # elementwise and reductions used by distance and feed-forward forms
    if _method_or_function(node, {"pow", "__pow__"}, {operator.pow, torch.pow}) and len(args) == 2:
        if is_tensor_node(args[0]):
            if (t, op) != (torch.pow, "call_function"):
                rw.replace(node, torch.pow, (args[0], args[1]))
        return
    if op == "call_method" and t == "square" or (op == "call_function" and t is torch.square):
        rw.replace(node, torch.pow, (args[0], 2))
        return
    if _method_or_function(node, {"sum"}, {torch.sum}):
        dim = _arg(node, 1, "dim")
        keepdim = _arg(node, 2, "keepdim", False)
        if isinstance(dim, (list, tuple)) and len(dim) == 1:
            dim = dim[0]
        if isinstance(dim, int) and "dtype" not in node.kwargs:
            dim = _neg_dim(dim, rank_of(args[0]))
            if (t, op, args[1:], node.kwargs) != (torch.sum, "call_function", (dim, bool(keepdim)), {}):
                rw.replace(node, torch.sum, (args[0], dim, bool(keepdim)))
        return
    simple = {"abs": torch.abs, "exp": torch.exp, "relu": torch.relu, "tanh": torch.tanh,
              "reciprocal": torch.reciprocal, "sigmoid": torch.sigmoid, "erf": torch.erf}
    if op == "call_method" and t in simple and len(args) == 1 and not node.kwargs:
        rw.replace(node, simple[t], (args[0],))
        return
    if op == "call_function" and t is F.relu:
        rw.replace(node, torch.relu, (args[0],))
        return
    if op == "call_function" and t in (F.silu,) and (len(args) > 1 or node.kwargs):
        rw.replace(node, F.silu, (args[0],))
        return
    if op == "call_function" and t is F.gelu:
        # approximate is keyword-only in F.gelu
        approx = _arg(node, 1, "approximate", "none")
        if (args[1:], node.kwargs) != ((), {"approximate": approx}):
            rw.replace(node, F.gelu, (args[0],), {"approximate": approx})
        return
    if _method_or_function(node, {"clamp", "clip"}, {torch.clamp, torch.clip}):
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        if (t, op, args[1:], node.kwargs) != (torch.clamp, "call_function", (lo, hi), {}):
            rw.replace(node, torch.clamp, (args[0], lo, hi))
        return
    if op == "call_function" and t is torch.cdist:
        p = float(_arg(node, 2, "p", 2.0))
        mode = _arg(node, 3, "compute_mode", None)
        # "donot_use_mm_for_euclid_dist" computes differently (more accurately) at any size: kept
        if mode in (None, "use_mm_for_euclid_dist_if_necessary") and (args[2:], node.kwargs) != ((p,), {}):
            rw.replace(node, torch.cdist, (args[0], args[1], p))
        return
    if op == "call_function" and t is F.normalize:
        p = float(_arg(node, 1, "p", 2.0))
        dim = _neg_dim(_arg(node, 2, "dim", 1), rank_of(args[0]))
        eps = _arg(node, 3, "eps", 1e-12)
        if _arg(node, 4, "out") is None and (args[1:], node.kwargs) != ((p, dim, eps), {}):
            rw.replace(node, F.normalize, (args[0], p, dim, eps))
        return
    if op == "call_function" and t is torch.cosine_similarity:  # F.cosine_similarity is this function
        out_rank = rank_of(node)  # the broadcast inputs' rank less the reduced dim
        dim = _neg_dim(_arg(node, 2, "dim", 1), out_rank + 1 if out_rank is not None else None)
        eps = _arg(node, 3, "eps", 1e-8)
        if isinstance(dim, int) and dim < 0 and (args[2:], node.kwargs) != ((dim, eps), {}):
            rw.replace(node, torch.cosine_similarity, (args[0], args[1], dim, eps))
        return

    # library attention calls: every argument positional with defaults filled in, so one pattern
    # matches however the call site spelled its keywords
    if op == "call_function" and t in _LIBRARY_SIGNATURES:
        params, keyword_only = _LIBRARY_SIGNATURES[t]
        full = _bind(node, params, keyword_only)
        if full is None:
            return
        n_pos = len(params) - len(keyword_only)
        kwargs = dict(zip(keyword_only, full[n_pos:]))
        if (tuple(full[:n_pos]), kwargs) != (tuple(args), dict(node.kwargs)):
            new = rw.replace(node, t, tuple(full[:n_pos]))
            new.kwargs = kwargs  # keyword-only parameters stay keywords, so the call still runs
        return
    # the aten forms SDPA lowers to, written or captured directly: aten.scaled_dot_product_attention
    # itself, and output [0] of the fused-kernel ops when nothing else of theirs is used
    if op == "call_function" and (t in _ATEN_SDPA or (t is operator.getitem and args[1:] == (0,)
                                                       and isinstance(args[0], Node)
                                                       and args[0].op == "call_function"
                                                       and args[0].target in _ATEN_SDPA)):
        call = node if t in _ATEN_SDPA else args[0]
        params, keyword_only, fixed = _ATEN_SDPA[call.target]
        if call is not node and any(u.target is not operator.getitem or u.args[1] != 0 for u in call.users):
            return
        if (call is node) != (call.target in _ATEN_SDPA_SINGLE):
            return
        full = _bind(call, params, keyword_only)
        if full is None:
            return
        bound = dict(zip((name for name, _ in params), full))
        if any(bound.get(name, value) != value for name, value in fixed.items()):
            return  # debug masks, caller-given dropout masks: not plain attention
        if call is not node and dtype_of(bound.get("attn_mask", bound.get("attn_bias"))) == torch.bool:
            return  # the kernel ops take additive biases; a bool there is not SDPA's "keep"
        sdpa_params, sdpa_kw = _LIBRARY_SIGNATURES[F.scaled_dot_product_attention]
        alias = {"attn_mask": ("attn_mask", "attn_bias")}
        values = []
        for name, default in sdpa_params:
            names = alias.get(name, (name,))
            values.append(next((bound[n] for n in names if n in bound), default))
        new = rw.replace(node, F.scaled_dot_product_attention, tuple(values[:6]))
        new.kwargs = dict(zip(sdpa_kw, values[6:]))
        return


_BADDBMM_PARAMS = (("input", _REQUIRED), ("batch1", _REQUIRED), ("batch2", _REQUIRED), ("beta", 1), ("alpha", 1))


def _bind(node: Node, params: tuple, keyword_only: tuple) -> Optional[list]:
    """The node's arguments in parameter order with defaults filled in, or None if they do not
    bind (too many positionals, unknown keywords, a required one missing)."""
    args = node.args
    if len(args) > len(params) - len(keyword_only) or set(node.kwargs) - {name for name, _ in params}:
        return None
    full = []
    for i, (name, default) in enumerate(params):
        if i < len(args):
            full.append(args[i])
        elif name in node.kwargs:
            full.append(node.kwargs[name])
        elif default is _REQUIRED:
            return None
        else:
            full.append(default)
    return full


def _aten_sdpa_signatures() -> dict:
    """aten ops with SDPA's meaning -> (params with defaults, keyword-only names, argument values
    they must have to be plain attention). Read from the schemas; both the packet and .default."""
    table = {}
    fixed = {"return_debug_mask": False, "dropout_mask": None}
    for name in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math"):
        packet = getattr(torch.ops.aten, name, None)
        if packet is None:
            continue
        schema = packet.default._schema
        params = tuple((a.name, _REQUIRED if not a.has_default_value() else a.default_value)
                       for a in schema.arguments)
        keyword_only = tuple(a.name for a in schema.arguments if a.kwarg_only)
        entry = (params, keyword_only, fixed)
        table[packet] = entry
        table[packet.default] = entry
    return table


_ATEN_SDPA = _aten_sdpa_signatures()
_ATEN_SDPA_SINGLE = {t for t in _ATEN_SDPA if "scaled_dot_product_attention" == getattr(t, "__name__", "").split(".")[0]}


# ----------------------------------------------------------------------------------------------
# Algebra on scales: fold constants so "x * a * b" and "-(lam * d)" become one multiplication
# ----------------------------------------------------------------------------------------------

def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _pattern_node(x: Any) -> bool:
    """A node of a traced pattern, which carries no example value: its canonical form is the one
    a floating tensor of the right dtype would get, so that it matches those targets."""
    return isinstance(x, Node) and example_value(x) is None and _fake_mode_of(x.graph) is None


def _floating(x: Any) -> bool:
    dtype = dtype_of(x)
    return (dtype is not None and dtype.is_floating_point) or _pattern_node(x)


def _same_dtype(a: Any, b: Any) -> bool:
    """Both nodes' recorded dtypes are known and equal (or both are a pattern's)."""
    da, db = dtype_of(a), dtype_of(b)
    return (da is not None and da == db) or (_pattern_node(a) and _pattern_node(b))


def _as_stored(value: Any, dtype: Optional[torch.dtype]) -> Any:
    """A Python number as a tensor of `dtype` holds it, for masked_fill, which refuses a number
    out of the dtype's range where torch.where rounds it (-1e9 in fp16 is -inf)."""
    if dtype is not None and dtype.is_floating_point and math.isfinite(value) and \
            abs(value) > torch.finfo(dtype).max:
        return math.copysign(math.inf, value)
    return value


def _literal_of_dtype(x: Any, other: Any) -> Any:
    """The number in x = torch.tensor(number, dtype=D) when `other` is a tensor of dtype D (GPT-Neo's
    `torch.where(causal, scores, torch.tensor(finfo.min, dtype=scores.dtype))`): there the 0-d
    tensor holds the number rounded to D, and so does the fill returned. Otherwise x itself."""
    if not (isinstance(x, Node) and x.op == "call_function" and x.target is torch.tensor and len(x.args) == 1
            and _is_number(x.args[0]) and set(x.kwargs) <= {"dtype", "device"}):
        return x
    value, dtype = example_value(x), dtype_of(other)
    if not (isinstance(value, torch.Tensor) and value.dim() == 0 and dtype is not None and value.dtype == dtype
            and is_tensor_node(other) and rank_of(other)):
        return x
    return torch.tensor(x.args[0], dtype=dtype).item()  # as stored: finfo(fp32).min in fp16 is -inf


def _power_of_two(f: Any) -> bool:
    return isinstance(f, (int, float)) and f != 0 and math.isfinite(f) and math.frexp(abs(f))[0] == 0.5


def _fold_scalar_products(rw: _Rewriter) -> None:
    """mul(mul(x, a), b) with Python numbers a, b becomes mul(x, a*b), where the dtype stays x's
    floating dtype and x * a cannot overflow where x * (a*b) does not (in 16-bit floats neither |a|
    nor |b| exceeds 1; in wider ones 2^-32 <= |a| <= 2^32). When the inner product
    has other users, or either product spells a division (`DIVIDED_BY`), it stays as it is."""
    for node in list(rw.graph.nodes):
        if node.op != "call_function" or node.target is not torch.mul or not _in_graph(node, rw.graph):
            continue
        x, b = node.args
        if _is_number(x) and isinstance(b, Node):
            x, b = b, x
        if not _is_number(b) or not isinstance(x, Node):
            continue
        if DIVIDED_BY in node.meta:  # a division stays one (`restore_spellings`)
            continue
        if x.op == "call_function" and x.target is torch.mul and len(x.users) == 1 and DIVIDED_BY not in x.meta:
            inner_x, a = x.args
            if _is_number(inner_x):
                inner_x, a = a, inner_x
            # the same dtype throughout (an int64 x times 2 times 0.5 is float32, x itself is not);
            # the inner product x * a could overflow or underflow where x * (a*b) does not: in 16
            # bits unless neither factor grows it, in 32 unless |a| is within 2^+-32 (then only an
            # |x| beyond 1e28 overflows there)
            dtype = dtype_of(node)
            exact = _pattern_node(node) or (
                dtype is not None and dtype.is_floating_point and dtype == dtype_of(inner_x) == dtype_of(x)
                and _is_number(a) and ((torch.finfo(dtype).bits > 16 and 2.0 ** -32 <= abs(a) <= 2.0 ** 32)
                                       or (abs(a) <= 1 and abs(b) <= 1)))
            if rw.writes_marked and _read_moved_across_a_write((inner_x,), None, node):
                # x written in place between the two products (`y = x * 0.5; x.add_(1); y * 0.25`):
                # the product stays as written rather than leave the whole graph unfused
                continue
            if _is_number(a) and exact:
                factors = x.meta.get(FOLDED, (a,)) + node.meta.get(FOLDED, (b,))
                new = rw.replace(node, torch.mul, (inner_x, a * b))
                rw.erase(x)
                # x * a * b can round otherwise than x * (a*b): where no site takes the product,
                # `restore_spellings` multiplies by the factors one by one again
                new.meta[FOLDED] = factors
                if new.args[1] == 1.0 and all(_power_of_two(f) for f in factors):
                    rw.bypass(new, inner_x)


# ----------------------------------------------------------------------------------------------
# Feed-forward forms: one linear vocabulary, and GELU's tanh approximation written out by hand
# ----------------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SQRT_HALF = math.sqrt(0.5)
_RESHAPES = ({"view", "reshape"}, {torch.reshape})


def _even_differences_query_first(rw: _Rewriter) -> None:
    """k[..., None, :, :] - q[..., :, None, :] (the key first) read only by ** 2 or abs() becomes
    q[..., :, None, :] - k[..., None, :, :]: a - b is -(b - a) exactly, and both functions are even,
    so the squares and absolute values are the same bit for bit, as are the gradients (pow's
    2 * diff and abs's sign change sign, and sub's backward sends them to the other operand
    negated). The spelling the broadcast L2 and L1 rules have: (k - q) ** 2 was kept unseen."""
    for node in list(rw.graph.nodes):
        if not (_call_to(node, torch.sub) and len(node.args) == 2) or node.meta.get(WITHOUT_GRAD):
            continue
        a, b = node.args
        if not (_call_to(a, torch.unsqueeze) and a.args[1:] == (-3,)
                and _call_to(b, torch.unsqueeze) and b.args[1:] == (-2,)):
            continue
        even = [u for u in node.users if (_call_to(u, torch.pow) and u.args[1:] == (2,))
                or (_call_to(u, torch.abs) and len(u.args) == 1)]
        if node.users and len(even) == len(node.users) and not node.meta.get(WRITTEN_IN_PLACE):
            rw.replace(node, torch.sub, (b, a))


def _sums_kept_as_unsqueezed(rw: _Rewriter) -> None:
    """x.sum(d).unsqueeze(d) (also x.sum(-1)[..., None]) becomes x.sum(d, keepdim=True): the same
    sums into a contiguous tensor of the same shape and strides, forward and backward. The
    spelling the expanded L2 rules have for |q|^2 as a column."""
    for node in list(rw.graph.nodes):
        if not (_call_to(node, torch.unsqueeze) and len(node.args) == 2):
            continue
        total, dim = node.args
        if not (_call_to(total, torch.sum) and len(total.args) == 3 and total.args[1:] == (dim, False)
                and isinstance(dim, int) and not isinstance(dim, bool) and dim < 0 and len(total.users) == 1):
            continue
        value = example_value(total)
        if isinstance(value, torch.Tensor) and not value.is_contiguous():
            continue  # strides of its own: unsqueeze's would follow them, keepdim's would not
        if any(n.meta.get(WITHOUT_GRAD) or n.meta.get(WRITTEN_IN_PLACE) for n in (node, total)) or \
                not _same_mode(node, total) or \
                (rw.writes_marked and _read_moved_across_a_write((total.args[0],), None, node)):
            continue
        rw.replace(node, torch.sum, (total.args[0], dim, True))
        rw.erase(total)


def _operand_scaled_after_product(rw: _Rewriter) -> None:
    """The 2 q.k that an expanded squared distance subtracts, written `2 * q @ k.mT` (Python reads
    (2 * q) @ k.mT), becomes (q @ k.mT) * 2, the spelling of the expanded L2 rules: matmul(x * 2, y)
    whose only use is as the subtrahend of a sub. Doubling is exact, so the product and its
    gradients are the same bit for bit short of overflow (an fp16 2 * x past 32752 is inf, which
    x @ y * 2 need not be): `restore_spellings` puts the doubled operand back where no site takes
    the product. Other products keep their operands: a scale moved behind one would stand between
    the scores and a mask added to them (`-2 * q @ k.mT + |k|^2`, dot-product attention with |k|^2
    as a bias), and a product with a weight is a Linear."""
    for node in list(rw.graph.nodes):
        if not (_call_to(node, torch.matmul) and len(node.args) == 2):
            continue
        scaled, y = node.args
        users = list(node.users)
        if not (len(users) == 1 and _call_to(users[0], torch.sub) and len(users[0].args) == 2
                and users[0].args[1] is node and users[0].args[0] is not node):
            continue
        if not (_call_to(scaled, torch.mul) and len(scaled.args) == 2 and len(scaled.users) == 1):
            continue
        x, c = scaled.args
        if not (isinstance(x, Node) and _floating(x) and _same_dtype(x, scaled) and _is_number(c) and c == 2):
            continue
        if _is_weight(y) or any(key in scaled.meta for key in (DIVIDED_BY, FOLDED, RESPELLED)):
            continue
        if any(n.meta.get(WITHOUT_GRAD) or n.meta.get(WRITTEN_IN_PLACE) for n in (node, scaled)) or \
                not _same_mode(node, scaled) or (rw.writes_marked and _read_moved_across_a_write((x,), None, node)):
            continue
        product = rw.emit(node, torch.matmul, (x, y), meta_from=node)
        rw.replace(node, torch.mul, (product, c)).meta[RESPELLED] = "operand scaled"
        rw.erase(scaled)


def _masks_before_the_scale(rw: _Rewriter) -> None:
    """`x.masked_fill(m, -inf) * c` (and `/ s`: `* (1/s)` here) with c a positive Python number is
    `(x * c).masked_fill(m, -inf)`, the order the attention patterns have (scores scaled, then
    masked): unmasked elements are the same product, masked ones -inf either way (-inf * c, and
    whatever x * c is, filled), and the gradients the same (x's is c times the kept ones). Code
    that masks the raw q.k and divides by sqrt(d) after was not found at all. Only -inf: a finite
    fill would be scaled too. Both orders compute the same, so the unfused graph keeps this one."""
    for node in list(rw.graph.nodes):
        if not _in_graph(node, rw.graph) or not (_call_to(node, torch.mul) and len(node.args) == 2):
            continue
        filled, c = node.args
        if not (_call_to(filled, torch.masked_fill) and len(filled.args) == 3 and len(filled.users) == 1):
            continue
        x, mask, fill = filled.args
        if not (_is_number(c) and math.isfinite(c) and c > 0 and _is_number(fill) and fill == -math.inf):
            continue
        if not (isinstance(x, Node) and _floating(x) and _same_dtype(x, filled) and _same_dtype(filled, node)):
            continue
        if any(n.meta.get(WITHOUT_GRAD) or n.meta.get(WRITTEN_IN_PLACE) for n in (node, filled)) or \
                not _same_mode(node, filled) or (rw.writes_marked and _read_moved_across_a_write((x,), None, node)):
            continue
        scaled = rw.emit(node, torch.mul, (x, c), meta_from=node)
        for key in (DIVIDED_BY, FOLDED):
            if key in node.meta:
                scaled.meta[key] = node.meta[key]
        rw.replace(node, torch.masked_fill, (scaled, mask, fill))
        rw.erase(filled)


def _same_size(a: Any, b: Any) -> bool:
    """a == b for every size the graph accepts (no guard is added)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 -- unsure means different
        return False


def _drop_identity_reshapes(rw: _Rewriter) -> None:
    """`x.view(shape)` / `x.reshape(shape)` / `torch.reshape(x, shape)` to the shape x already has
    is x itself (the same sizes and strides, the same memory), so consumers may read x: Falcon
    views its attention scores and probabilities to the shapes they have, which would otherwise
    sit between the product and the softmax. Reinterpreting views (`view(dtype)`) and views the
    graph returns are kept."""
    written = None  # every value an in-place write may reach, once a round trip needs it
    for node in list(rw.graph.nodes):
        if not _in_graph(node, rw.graph) or not _method_or_function(node, *_RESHAPES):
            continue
        x = node.args[0] if node.args else None
        if not isinstance(x, Node) or any(isinstance(a, torch.dtype) for a in node.args[1:]):
            continue
        if any(u.op == "output" for u in node.users):  # what the caller gets back stays as written
            continue
        xv, ov = example_value(x), example_value(node)
        if not (isinstance(xv, torch.Tensor) and isinstance(ov, torch.Tensor)) or xv.dtype != ov.dtype:
            continue
        if xv.dim() == ov.dim() and all(_same_size(a, b) for a, b in zip(xv.shape, ov.shape)):
            rw.bypass(node, x)
            continue
        # x.view(s).view(x's shape), the inner view kept for another use (SpeechT5 and other
        # BART-era attentions view their (B*H, N, S) probabilities to (B, H, N, S) to return them
        # with output_attentions=True, and back for the product with v): the outer view reads x.
        # Only where no in-place write may reach any of them: a reshape that copied does not share
        # x's memory, so a write to the outer view must not land in x (or in a graph input).
        inner = x.args[0] if _method_or_function(x, *_RESHAPES) and x.args else None
        iv = example_value(inner) if isinstance(inner, Node) else None
        if (isinstance(iv, torch.Tensor) and iv.dtype == ov.dtype and iv.dim() == ov.dim()
                and not any(isinstance(a, torch.dtype) for a in x.args[1:])
                and all(_same_size(a, b) for a, b in zip(iv.shape, ov.shape))):
            if written is None:
                peers = shared_storage_inputs(rw.graph)
                written = set().union(*(written_family(n, peers) for n in rw.graph.nodes if mutates(n)))
            if not ({node, x, inner} & written or _writers_behind(node) or _writers_behind(inner)):
                rw.bypass(node, inner)


def _shape_args(node: Node) -> Optional[list]:
    """The target shape of a view/reshape node as written: graph values, ints or -1."""
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return list(node.args[1])
    return list(node.args[1:]) if len(node.args) > 1 and not node.kwargs else None


def _sizes_equal(a, b) -> bool:
    return len(a) == len(b) and all(_same_size(x, y) for x, y in zip(a, b))


# What the 3-d scores may go through between their product and the view to (B, H, N, S).
_SCORE_STEPS = (torch.add, torch.mul, torch.sub, _to)


def _steps_reach_product(node: Any, shape, depth: int = 8) -> bool:
    """node is a product, or reaches one through score steps (each used once) on values of the
    scores' `shape`: the way up from the scores to their q.k, where both operands of a step have
    the scores' size."""
    if not (isinstance(node, Node) and node.op == "call_function" and len(node.users) == 1):
        return False
    if node.target is torch.matmul:
        return True
    if depth == 0 or node.target not in _SCORE_STEPS:
        return False
    return any(_steps_reach_product(a, shape, depth - 1) for a in node.args[:2]
               if isinstance(a, Node) and isinstance(example_value(a), torch.Tensor)
               and _sizes_equal(example_value(a).shape, shape))


def _unfold_heads_from_batch(rw: _Rewriter) -> None:
    """BLOOM's attention folds the heads into the batch: 3-d products give (B*H, N, S) scores,
    which are viewed to (B, H, N, S) for the 4-d mask and the softmax, and the probabilities back to
    (B*H, N, S) for the product with v. That becomes one 4-d attention: q, k (below its
    transpose), v and any (B*H, ...) term added to the scores are unflattened to (B, H, ...), the
    products are 4-d, and their output is flattened back. Where the probabilities stay 4-d for a
    4-d v (GPT-NeoX-Japanese scores with baddbmm on folded heads), only the scores are unfolded.
    The same products per (b, h) and the same elementwise steps, so value for value the same. Every step of the scores is used once;
    anything else, or a shape not proven from the recorded sizes, leaves the graph as it is."""
    for split in list(rw.graph.nodes):
        if not _in_graph(split, rw.graph) or not _method_or_function(split, *_RESHAPES) or not split.args:
            continue
        scores3, shape = split.args[0], _shape_args(split)
        s3, s4 = example_value(scores3), example_value(split)
        if not (isinstance(scores3, Node) and shape is not None and len(shape) == 4
                and isinstance(s3, torch.Tensor) and isinstance(s4, torch.Tensor) and s3.dim() == 3 and s4.dim() == 4
                and _sizes_equal(s4.shape[2:], s3.shape[1:]) and _same_size(s4.shape[0] * s4.shape[1], s3.shape[0])):
            continue
        heads = (shape[0], shape[1])
        if sum(1 for h in heads if h == -1) > 1:
            continue
        bh = s3.shape[0]
        # Up: the steps from a 3-d product to the scores, each used once.
        steps, node = [], scores3
        while (isinstance(node, Node) and node.op == "call_function" and len(node.users) == 1
               and node.target in _SCORE_STEPS):
            steps.append(node)
            full = [a for a in node.args[:2] if isinstance(a, Node) and isinstance(example_value(a), torch.Tensor)
                    and _sizes_equal(example_value(a).shape, s3.shape)]
            if len(full) == 2:  # a term of the scores' size (baddbmm's zeros): the other is the way up
                full = [a for a in full if a.op == "call_function" and a.target in _SCORE_STEPS + (torch.matmul,)]
            if len(full) == 2:
                # both computed (DeBERTa v2 adds its (B*H, N, S) relative-position terms, sums of
                # gathered products, to q.k): the way up is the one whose steps reach a product
                full = [a for a in full if _steps_reach_product(a, s3.shape)]
            node = full[0] if len(full) == 1 else None
        if not (isinstance(node, Node) and node.op == "call_function" and node.target is torch.matmul
                and len(node.users) == 1):
            continue
        product = node
        if not all(_same_mode(n, split) for n in [product] + steps):
            continue  # the 4-d product computes where the view is: under autocast, or not, as it is
        q3, kt3 = product.args
        qv, ktv = example_value(q3), example_value(kt3)
        if not (isinstance(qv, torch.Tensor) and isinstance(ktv, torch.Tensor) and qv.dim() == 3 and ktv.dim() == 3
                and _same_size(qv.shape[0], bh) and _same_size(ktv.shape[0], bh)):
            continue

        def folds(x):  # a term that the 4-d scores take as it is, or unflattened
            v = example_value(x)
            if not isinstance(x, Node) or not isinstance(v, torch.Tensor) or v.dim() < 3:
                return "as is"
            if v.dim() == 3 and _same_size(v.shape[0], bh):
                return "unflatten"
            return "as is" if v.dim() == 3 and _same_size(v.shape[0], 1) else None
        if any(folds(a) is None for step in steps for a in step.args[:2] if a not in steps and a is not product):
            continue
        # Down: through (B, H, N, S) values to the one view back to (B*H, N, S) that the product with
        # v reads. A value on the way may have other uses (probabilities returned, or a loss on
        # them, with output_attentions=True): those keep reading it as it is.
        merges, seen, frontier = [], {split}, [split]
        for _ in range(16):
            onward = []
            for node in frontier:
                for user in node.users:
                    uv = example_value(user)
                    if user in seen or not isinstance(uv, torch.Tensor):
                        continue
                    seen.add(user)
                    if _method_or_function(user, *_RESHAPES) and uv.dim() == 3 and _sizes_equal(uv.shape, s3.shape):
                        merges.append(user)
                    elif _sizes_equal(uv.shape, s4.shape):
                        onward.append(user)
            frontier = onward
        merge = merges[0] if len(merges) == 1 else None
        pv = None
        if merge is not None and len(merge.users) == 1:
            (pv,) = merge.users
            if not (pv.op == "call_function" and pv.target is torch.matmul and pv.args[0] is merge
                    and isinstance(example_value(pv.args[1]), torch.Tensor) and example_value(pv.args[1]).dim() == 3
                    and _same_size(example_value(pv.args[1]).shape[0], bh)):
                pv = None
        # With no view back (GPT-NeoX-Japanese: 4-d probabilities times a 4-d v), only the scores
        # are unfolded, where a softmax takes them as (B, H, N, S)
        if pv is None and (merges or not any(n.op == "call_function" and n.target is torch.softmax for n in seen)):
            continue

        # Emitted where the view to 4-d was: every value they read (the sizes of that view too,
        # which under dynamic shapes may be computed after the product) is defined by then.
        def unflatten(x, before):
            return rw.emit(before, torch.unflatten, (x, 0, heads))
        q4 = unflatten(q3, split)
        if kt3.op == "call_function" and kt3.target is torch.transpose and tuple(kt3.args[1:]) == (-2, -1):
            kt4 = rw.emit(split, torch.transpose, (unflatten(kt3.args[0], split), -2, -1))
        else:
            kt4 = unflatten(kt3, split)
        new = rw.emit(split, torch.matmul, (q4, kt4))
        old_to_new = {product: new}
        for step in reversed(steps):
            args = tuple(old_to_new.get(a, a) if not (isinstance(a, Node) and a not in old_to_new
                                                      and folds(a) == "unflatten") else unflatten(a, split)
                         for a in step.args)
            new = old_to_new[step] = rw.emit(split, step.target, args, kwargs=dict(step.kwargs))
        split.replace_all_uses_with(new)
        if pv is not None:
            v4 = unflatten(pv.args[1], pv)
            out4 = rw.emit(pv, torch.matmul, (merge.args[0], v4))
            rw.replace(pv, torch.flatten, (out4, 0, 1))
        for dead in ([merge] if pv is not None else []) + [split] + steps + [product]:
            if not dead.users:
                rw.erase(dead)
        rw.changed += 1


# What the scores may go through between their product and the softmax, in `_keys_as_transposed`.
_SCORES_TO_SOFTMAX = (torch.add, torch.mul, torch.sub, torch.masked_fill, torch.tanh, _to)


def _probabilities_times_v(product: Node) -> bool:
    """product's value reaches, each step used once, a softmax over the last dim (through the
    steps of the scores), whose probabilities (through casts and dropout) are the first operand
    of a product: attention scores."""
    node = product
    while len(node.users) == 1:
        (node,) = node.users
        if not (node.op == "call_function" and node.target in _SCORES_TO_SOFTMAX + (torch.softmax,)):
            return False
        if node.target is torch.softmax:
            if node.args[1:] != (-1,):
                return False
            while len(node.users) == 1:
                (user,) = node.users
                if user.op == "call_function" and user.target is torch.matmul and user.args[0] is node:
                    return True
                if not (is_cast(user) or _call_to(user, F.dropout)):
                    return False
                node = user
            return False
    return False


def _keys_as_transposed(rw: _Rewriter) -> None:
    """Scores whose product reads keys laid out as (..., D, S) already, not through a transpose:
    SqueezeBERT views its channels-first keys to (B, H, D, S), and a permute such as (0, 2, 3, 1)
    of (B, S, H, D) keys is no swap of two dims. The product reads them as the transpose of their
    transpose, the same view of the same memory, so that the rules see `k @ transpose(k)`'s k."""
    for node in list(rw.graph.nodes):
        if not (_call_to(node, torch.matmul) and len(node.args) == 2):
            continue
        a, b = node.args
        if a is b or (_call_to(b, torch.transpose) and tuple(b.args[1:]) == (-2, -1)):
            continue
        rank = rank_of(b)
        if rank is None or rank < 3 or rank_of(a) != rank or not _probabilities_times_v(node):
            continue
        if _writers_behind(b):  # keys a write may change stay as written (no site may take them in)
            continue
        k = rw.emit(node, torch.transpose, (b, -2, -1))
        node.replace_input_with(b, rw.emit(node, torch.transpose, (k, -2, -1)))
        rw.changed += 1


def _feeds_softmax(node: Node) -> bool:
    """node's only use, through casts, is a softmax: attention scores."""
    while len(node.users) == 1:
        (node,) = node.users
        if node.op == "call_function" and node.target is torch.softmax:
            return True
        if not is_cast(node):
            return False
    return False


def _terms_added_through_a_split_batch(rw: _Rewriter) -> None:
    """Scores whose batch dim is split in two for an add and merged back:
    - Swin V2 views its (B*nW, H, N, S) window scores to (B, nW, H, N, S), adds a (1, nW, 1, N, S)
      mask (twice, as HF writes it), and views the sum back;
    - LED views its (B*H, T, S) scores to (B, H, T, S), adds the (B, 1, T, S) mask, and views back.
    That is the scores plus one term: the added terms, summed and expanded to the two split dims,
    with those flattened into one, a copy the size of the mask per batch entry. Only where the sum
    goes to a softmax (attention scores), every step is used once and every size is proven from the
    recorded shapes; otherwise the graph stays as it is."""
    for split in list(rw.graph.nodes):
        if not _in_graph(split, rw.graph) or not _method_or_function(split, *_RESHAPES) or not split.args:
            continue
        x4, shape = split.args[0], _shape_args(split)
        xv, sv = example_value(x4), example_value(split)
        if not (isinstance(x4, Node) and shape is not None and isinstance(xv, torch.Tensor)
                and isinstance(sv, torch.Tensor) and xv.dim() >= 3 and sv.dim() == xv.dim() + 1
                and len(shape) == sv.dim() and -1 not in shape[:2]
                and _sizes_equal(sv.shape[2:], xv.shape[1:]) and _same_size(sv.shape[0] * sv.shape[1], xv.shape[0])
                and len(split.users) == 1):
            continue
        terms, chain, node = [], [], split
        while len(node.users) == 1:
            (user,) = node.users
            if not (user.op == "call_function" and user.target is torch.add and len(user.args) == 2
                    and not user.kwargs and node in user.args):
                break
            other = user.args[1] if user.args[0] is node else user.args[0]
            ov, uv = example_value(other), example_value(user)
            # terms of the scores' own floating dtype: summed first, they must round and overflow
            # as each add would (fp16 masks summed in fp16 overflow; bool terms would OR)
            if not (isinstance(other, Node) and other is not node and other not in chain
                    and isinstance(ov, torch.Tensor) and ov.dim() <= sv.dim() and ov.dtype == sv.dtype
                    and isinstance(uv, torch.Tensor) and uv.dtype == sv.dtype and _sizes_equal(uv.shape, sv.shape)):
                break
            terms.append(other)
            chain.append(user)
            node = user
        if not terms or len(node.users) != 1:
            continue
        (merge,) = node.users
        mv = example_value(merge)
        if not (_method_or_function(merge, *_RESHAPES) and isinstance(mv, torch.Tensor)
                and _sizes_equal(mv.shape, xv.shape) and _feeds_softmax(merge)):
            continue
        total = terms[0]
        for term in terms[1:]:
            total = rw.emit(merge, torch.add, (total, term))
        for _ in range(sv.dim() - example_value(total).dim()):
            total = rw.emit(merge, torch.unsqueeze, (total, 0))
        total = rw.emit(merge, torch.broadcast_to, (total, (shape[0], shape[1]) + (-1,) * (sv.dim() - 2)))
        total = rw.emit(merge, torch.flatten, (total, 0, 1))
        rw.replace(merge, torch.add, (x4, total))
        for dead in reversed([split] + chain):
            rw.erase(dead)


def _sink_column(node: Any, scores: torch.Tensor) -> Optional[Node]:
    """The (H,)-element tensor that `node` broadcasts as one column per head over (B, H, N, 1),
    written `sinks.reshape(1, -1, 1, 1).expand(B, -1, N, -1)` (or view, and sizes spelled out),
    or None."""
    if not (isinstance(node, Node) and _method_or_function(node, {"expand"}, {torch.Tensor.expand})):
        return None
    ev = example_value(node)
    B, H, N, _ = scores.shape
    if not (isinstance(ev, torch.Tensor) and ev.dim() == 4 and _sizes_equal(ev.shape, (B, H, N, 1))):
        return None
    col = node.args[0]
    if not (isinstance(col, Node) and _method_or_function(col, *_RESHAPES)):
        return None
    src, cv = col.args[0], example_value(col)
    sv = example_value(src)
    if not (isinstance(cv, torch.Tensor) and cv.dim() == 4 and _sizes_equal(cv.shape, (1, H, 1, 1))
            and isinstance(sv, torch.Tensor) and sv.dim() >= 1 and _same_size(sv.numel(), H)
            and all(_same_size(d, 1) for d in sv.shape[:-1])):
        return None
    return src


def _softmax_with_sinks(rw: _Rewriter) -> None:
    """`softmax(cat([scores, sinks column], -1) [- its row max] [cast], -1)[..., :-1]` becomes
    `softmax_with_sinks(scores, sinks, shifted, dtype)` (GPT-OSS's attention sinks), where every
    step is used only along that chain and every size is proven from the recorded shapes."""
    for sm in list(rw.graph.nodes):
        if not _in_graph(sm, rw.graph) or not (sm.op == "call_function" and sm.target is torch.softmax):
            continue
        smv = example_value(sm)
        if not (isinstance(smv, torch.Tensor) and smv.dim() == 4 and sm.args[1] in (-1, 3)
                and len(sm.users) == 1):
            continue
        (cut,) = sm.users
        index = cut.args[1] if (cut.op == "call_function" and cut.target is operator.getitem) else None
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis
                and index[1] == slice(None, -1, None)):
            continue
        x, dtype = sm.args[0], None
        if is_cast(x):
            dtype, x = x.args[1], x.args[0]
            if len(sm.args[0].users) != 1:
                continue
        shifted = False
        if (isinstance(x, Node) and x.op == "call_function" and x.target is torch.sub and len(x.args) == 2
                and len(x.users) == 1):
            cat, top = x.args
            if _row_max_of(top, cat):
                shifted, x = True, cat
        cat = x
        if not (isinstance(cat, Node) and cat.op == "call_function" and cat.target in (torch.cat, torch.concat)):
            continue
        parts = cat.args[0] if cat.args else None
        dim = cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0)
        if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (-1, 3)
                and len(cat.users) == (2 if shifted else 1)):
            continue
        scores, column = parts
        scv = example_value(scores)
        if not (isinstance(scv, torch.Tensor) and scv.dim() == 4 and scv.dtype.is_floating_point):
            continue
        sinks = _sink_column(column, scv)
        if sinks is None or len(column.users) != 1:
            continue
        # the call reads the scores and sinks where the probabilities are cut, not at the cat
        order = {n: i for i, n in enumerate(rw.graph.nodes)}
        if _writes_between(rw.graph, order, min(order[column.args[0]], order[cat]), order[cut]):
            continue
        new = rw.emit(cut, softmax_with_sinks, (scores, sinks, shifted, dtype), meta_from=cut)
        cut.replace_all_uses_with(new)
        for dead in (cut, sm, sm.args[0] if is_cast(sm.args[0]) else None):
            if dead is not None and not dead.users:
                rw.erase(dead)
        rw.changed += 1


def _row_max_of(top: Any, x: Node) -> bool:
    """`top` is x's max over the last dim with keepdim: `x.max(-1, keepdim=True)[0]` (the
    `.values` Dynamo records as getitem 0) or `torch.amax(x, -1, True)`."""
    if not isinstance(top, Node):
        return False
    if top.op == "call_function" and top.target is operator.getitem and top.args[1] == 0:
        mx = top.args[0]
        if not (isinstance(mx, Node) and _method_or_function(mx, {"max"}, {torch.max}) and len(mx.users) == 1):
            return False
    elif _method_or_function(top, {"amax"}, {torch.amax}):
        mx = top
    else:
        return False
    if mx.args[0] is not x or len(top.users) != 1:
        return False
    dim = _arg(mx, 1, "dim")
    keep = _arg(mx, 2, "keepdim", False)
    return dim in (-1, 3) and keep is True


def _is_weight(x: Any) -> bool:
    """A 2-D tensor the graph receives (a parameter or input) rather than computes."""
    return isinstance(x, Node) and x.op in ("placeholder", "get_attr") and rank_of(x) == 2


def _matmul_to_linear(rw: _Rewriter) -> None:
    """`x @ W` with W a 2-D parameter (or its transpose) becomes linear(x, W^T); a following
    `+ b` with b of shape (out,) becomes linear's bias. The same products, so one rule covers
    nn.Linear, F.linear, mm/matmul by a weight and `x @ W + b`. Activations times activations
    (attention's q @ k^T) are left alone: their right operand is computed, not a weight."""
    for node in list(rw.graph.nodes):
        if node.op != "call_function" or node.target is not torch.matmul or not _in_graph(node, rw.graph) or \
                node.kwargs:  # an out= stays where it is
            continue
        x, w = node.args
        if (rank_of(x) or 0) < 2 or rank_of(w) != 2:
            continue
        if _is_weight(w):
            wt = rw.emit(node, torch.transpose, (w, -2, -1))
        elif (isinstance(w, Node) and w.op == "call_function" and w.target is torch.transpose
              and w.args[1:] == (-2, -1) and _is_weight(w.args[0])):
            wt = w.args[0]
        else:
            continue
        respelled = node.meta.get(RESPELLED)
        new = rw.replace(node, _linear, (x, wt, None))
        if isinstance(respelled, tuple) and respelled[0] == "einsum":
            new.meta[RESPELLED] = respelled
    for node in list(rw.graph.nodes):
        if node.op != "call_function" or node.target is not torch.add or not _in_graph(node, rw.graph) or \
                node.kwargs or len(node.args) != 2:  # alpha scales the bias
            continue
        for lin, b in (node.args, node.args[::-1]):
            if not (isinstance(lin, Node) and lin.op == "call_function" and lin.target is _linear
                    and len(lin.args) == 3 and lin.args[2] is None and len(lin.users) == 1):
                continue
            if not _same_mode(lin, node):  # the linear would compute at the add, under the add's autocast
                continue
            out, bias, summed = example_value(lin), example_value(b), example_value(node)
            if not all(isinstance(v, torch.Tensor) for v in (out, bias, summed)):
                continue
            if bias.dim() != 1 or not _same_size(bias.shape[0], out.shape[-1]) or \
                    bias.dtype != out.dtype or summed.dtype != out.dtype or summed.dim() != out.dim() or \
                    not all(_same_size(s, t) for s, t in zip(summed.shape, out.shape)):
                continue
            # linear's bias is summed in its product's accumulation (addmm), which can differ from
            # the sum after it in the last bit: `restore_spellings` adds it after where no site took it
            rw.replace(node, _linear, (lin.args[0], lin.args[1], b)).meta[RESPELLED] = \
                ("bias added", node.args[0] is b)
            rw.erase(lin)
            break


def _same_mode(a: Node, b: Node) -> bool:
    """Whether two nodes run under the same grad mode, inference mode and autocast (MODE_REGION): a
    rewrite that computes `a`'s product at `b` computes it under `b`'s modes. A product under
    torch.autocast folded with the bias add or view after the block computed in fp32, not bf16."""
    return a.meta.get(MODE_REGION) == b.meta.get(MODE_REGION)


def _unflatten_linear(rw: _Rewriter) -> None:
    """HF Conv1D computes `addmm(b, x.view(-1, d), W).view(*x.shape[:-1], n)`: flatten, linear,
    restore. linear takes any leading dims, so that is linear(x, W^T, b) on x itself; removing
    the views lets a pattern see the Linear feed the next operation directly."""
    for node in list(rw.graph.nodes):
        if not _in_graph(node, rw.graph) or not _method_or_function(node, *_RESHAPES):
            continue
        lin = node.args[0]
        if not (isinstance(lin, Node) and lin.op == "call_function" and lin.target is _linear
                and len(lin.users) == 1):
            continue
        flat = lin.args[0]
        if not (isinstance(flat, Node) and _method_or_function(flat, *_RESHAPES)):
            continue
        if not _same_mode(lin, node):  # the linear would compute at the view, under the view's autocast
            continue
        x = flat.args[0]
        xv, fv, lv, ov = (example_value(n) for n in (x, flat, lin, node))
        if not all(isinstance(v, torch.Tensor) for v in (xv, fv, lv, ov)):
            continue
        if fv.dim() != 2 or xv.dim() < 2 or not _same_size(fv.shape[-1], xv.shape[-1]):
            continue
        want = list(xv.shape[:-1]) + [lv.shape[-1]]
        if ov.dim() != len(want) or not all(_same_size(a, b) for a, b in zip(ov.shape, want)):
            continue
        rw.replace(node, _linear, (x, lin.args[1], lin.args[2]))
        rw.erase(lin)


def _call_to(node: Any, target: Callable) -> bool:
    """A positional call of `target`. A keyword changes what the call computes (torch.add's alpha
    scales its second operand; canonicalization leaves such adds as they are), so a call with one
    is not that step."""
    return isinstance(node, Node) and node.op == "call_function" and node.target is target and not node.kwargs


def _scaled(node: Any, scale: float, tol: float = 0.0) -> Any:
    """The x of mul(x, scale) / mul(scale, x) with a Python-number scale (within tol), else None."""
    if not _call_to(node, torch.mul) or len(node.args) != 2:
        return None
    for x, s in (node.args, node.args[::-1]):
        if isinstance(x, Node) and _is_number(s) and abs(s - scale) <= tol:
            return x
    return None


def _tanh_gelu_input(node: Node) -> Optional[Node]:
    """x when `node` is 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3))) (HF's
    NewGELUActivation / gelu_new, GPT-2's MLP), or the same with the tanh's argument factored as
    x * sqrt(2/pi) * (1 + 0.044715 * x * x) (`_factored_tanh_argument`: HF's FastGELUActivation,
    gelu_fast; Megatron's bias_gelu), in any operand order; None otherwise."""
    if not _call_to(node, torch.mul) or len(node.args) != 2:
        return None
    for half_x, one_plus in (node.args, node.args[::-1]):
        x = _scaled(half_x, 0.5)
        if x is None or not _call_to(one_plus, torch.add):
            continue
        for one, t in (one_plus.args, one_plus.args[::-1]):
            if not (_is_number(one) and one == 1 and _call_to(t, torch.tanh)):
                continue
            factored = _factored_tanh_argument(t.args[0], x)
            if factored is not None and all(len(n.users) == 1 for n in (half_x, one_plus, t) + factored):
                return x
            inner = _scaled(t.args[0], _SQRT_2_OVER_PI, tol=1e-12)
            if not _call_to(inner, torch.add):
                continue
            for x2, cubic in (inner.args, inner.args[::-1]):
                cube = _scaled(cubic, 0.044715)
                if x2 is x and _call_to(cube, torch.pow) and cube.args[0] is x and \
                        _is_number(cube.args[1]) and cube.args[1] == 3:
                    chain = (half_x, one_plus, t, t.args[0], inner, cubic, cube)
                    if all(len(n.users) == 1 for n in chain):
                        return x
    return None


def _factored_tanh_argument(arg: Any, x: Node) -> Optional[tuple]:
    """The nodes of `arg` when it is sqrt(2/pi) * x * (1 + 0.044715 * x * x), the tanh GELU's
    argument as HF's FastGELUActivation (`x * 0.7978845608 * (1.0 + 0.044715 * x * x)`) and
    Megatron's bias_gelu (`0.79788456 * x * (1 + 0.044715 * x * x)`) write it, x * x also as
    x ** 2; None otherwise. Their sqrt(2/pi), rounded to 10 and 8 digits, is within 1e-8 of it:
    under fp32's resolution, so the function is F.gelu's tanh form, up to rounding."""
    if not (_call_to(arg, torch.mul) and len(arg.args) == 2):
        return None
    for scaled_x, poly in (arg.args, arg.args[::-1]):
        if _scaled(scaled_x, _SQRT_2_OVER_PI, tol=1e-8) is not x or not (_call_to(poly, torch.add)
                                                                        and len(poly.args) == 2):
            continue
        for one, quad in (poly.args, poly.args[::-1]):
            if not (_is_number(one) and one == 1 and _call_to(quad, torch.mul) and len(quad.args) == 2):
                continue
            for a, b in (quad.args, quad.args[::-1]):
                if b is x and _scaled(a, 0.044715) is x:  # (0.044715 * x) * x
                    return (arg, scaled_x, poly, quad, a)
                if _is_number(b) and b == 0.044715 and _call_to(a, torch.pow) and a.args == (x, 2):
                    return (arg, scaled_x, poly, quad, a)  # 0.044715 * x ** 2 (and x * x * 0.044715)
    return None


def _erf_gelu_input(node: Node) -> Optional[Node]:
    """x when `node` is 0.5 * x * (1 + erf(x / sqrt(2))) (the exact GELU written out: HF's
    GELUActivation(use_gelu_python=True), "gelu_python"), in any operand order, x / sqrt(2) also
    as x * sqrt(0.5); None otherwise."""
    if not _call_to(node, torch.mul) or len(node.args) != 2:
        return None
    for half_x, one_plus in (node.args, node.args[::-1]):
        x = _scaled(half_x, 0.5)
        if x is None or not _call_to(one_plus, torch.add) or len(one_plus.args) != 2:
            continue
        for one, e in (one_plus.args, one_plus.args[::-1]):
            if not (_is_number(one) and one == 1 and _call_to(e, torch.erf) and len(e.args) == 1):
                continue
            if _scaled(e.args[0], _SQRT_HALF, tol=1e-12) is x and \
                    all(len(n.users) == 1 for n in (half_x, one_plus, e, e.args[0])):
                return x
    return None


class _Step(int):
    """In a `_written_out` recipe: the value of an earlier step (-1: the recipe's input)."""


def _own_steps(x: Node, out: Node) -> set:
    """The nodes between x and `out` that compute `out` (`out` included, x not)."""
    own, stack = set(), [out]
    while stack:
        n = stack.pop()
        if n is x or n in own:
            continue
        own.add(n)
        stack.extend(n.all_input_nodes)
    return own


def _written_out(x: Node, out: Node) -> tuple:
    """The nodes that compute `out` from `x` (a written-out activation: each used once, so they are
    `out`'s own), in graph order, as a recipe of (op, target, args, kwargs, marks) steps whose
    arguments name earlier steps by `_Step`; marks are the canonical meta that `restore_spellings`
    reads (a division, folded factors, a respelling). Plain values, so that copies of the graph
    carry them as they are. `restore_spellings` rebuilds them where no fused site took the
    activation."""
    own = _own_steps(x, out)
    index = {x: _Step(-1)}
    steps = []
    for n in out.graph.nodes:
        if n in own:
            marks = {k: n.meta[k] for k in (DIVIDED_BY, FOLDED, RESPELLED) if k in n.meta}
            if isinstance(marks.get(DIVIDED_BY), Node):
                marks.pop(DIVIDED_BY)  # a tensor divisor is not a GELU's; the product stays
            steps.append((n.op, n.target, fx.node.map_arg(n.args, index.__getitem__),
                          fx.node.map_arg(n.kwargs, index.__getitem__), marks))
            index[n] = _Step(len(steps) - 1)
    return tuple(steps)


def _rebuilt(graph: fx.Graph, node: Node, steps: tuple, x: Node) -> Node:
    """The `_written_out` recipe's nodes from x, placed before `node` with its meta (trace, modes)
    and each step's marks; returns the last."""
    values: List[Node] = []

    def value(a: Any) -> Any:
        return (x if a == -1 else values[a]) if isinstance(a, _Step) else a

    for op, target, args, kwargs, marks in steps:
        args, kwargs = fx.node.map_aggregate(args, value), fx.node.map_aggregate(kwargs, value)
        with graph.inserting_before(node):
            new = graph.create_node(op, target, args, kwargs)
        new.meta.update({k: v for k, v in node.meta.items() if k not in ("example_value", "val", RESPELLED)})
        new.meta.update(marks)
        values.append(new)
    return values[-1]


def _fold_tanh_gelu(rw: _Rewriter) -> None:
    """The written-out tanh GELU becomes F.gelu(x, approximate="tanh"), and the written-out exact
    (erf) GELU F.gelu(x): the same functions. Their roundings differ in the last bit, and under
    CUDA autocast so do their dtypes (x ** 3 computes in fp32 there, F.gelu in bf16): the
    written-out nodes are kept in RESPELLED, to be put back where no site takes the GELU."""
    for node in list(rw.graph.nodes):
        if _in_graph(node, rw.graph):
            for find, approximate in ((_tanh_gelu_input, "tanh"), (_erf_gelu_input, "none")):
                x = find(node)
                # F.gelu reads x where the GELU's last product is: with x written in place (a
                # graph input updated after the GELU, say) that read would move across the write,
                # and the whole graph would go unfused; such a GELU stays as written
                if x is not None and is_tensor_node(x) and not (
                        rw.writes_marked and _read_moved_across_a_write((x,), None, node)):
                    if any(not _same_mode(n, node) or n.meta.get(WITHOUT_GRAD) for n in _own_steps(x, node)):
                        # a step under another grad mode or autocast than the last one: F.gelu
                        # computes all of it there (x ** 3 under no_grad() then sent x a
                        # gradient); and what no_grad() computes stays as written (a rewrite of
                        # it left the whole graph unfused)
                        break
                    written = _written_out(x, node)
                    rw.replace(node, F.gelu, (x,), {"approximate": approximate}).meta[RESPELLED] = \
                        ("written out", written)
                    break


def tanh_gelus_with_runtime_constant(graph: fx.Graph) -> list:
    """The tanh nodes of written-out tanh GELUs whose sqrt(2/pi) is a value the graph computes at
    run time, not a number. Under torch.compile(dynamic=True) Dynamo passes the global math.pi into
    the graph as an input, so `_fold_tanh_gelu` cannot read the constant, and no feed-forward rule
    sees an activation there: the caller says so instead of finding nothing."""
    found = []
    for node in graph.nodes:
        arg = node.args[0] if _call_to(node, torch.tanh) and node.args else None
        if not (_call_to(arg, torch.mul) and len(arg.args) == 2):
            continue
        for factor, inner in (arg.args, arg.args[::-1]):
            if isinstance(example_value(factor), torch.SymFloat) and _call_to(inner, torch.add) and \
                    any(_scaled(term, 0.044715) is not None for term in inner.args):
                found.append(node)
                break
    return found


WITHOUT_GRAD = "truthfuse_without_grad"
"""Node meta key: computed where the graph turned gradients off (`with torch.no_grad()`,
`set_grad_enabled(False)`, `inference_mode()`) while other parts of it record them. Such nodes are
not rewritten, and no site takes them in: a rewrite or a fused op would move their computation to
where gradients are recorded."""

MODE_REGION = "truthfuse_mode_region"
"""Node meta key: the grad mode, inference mode and autocast state the node runs under, as a value
that two nodes share only when they run under the same modes (a site whose nodes do not all share
it computes some of them under another mode than eager does, and is kept). A stretch between two
switches that returns to the modes before them (the no_grad() block of spectral_norm's power
iteration between the two Linears of a feed-forward block) is the same mode again."""

_GRAD_SWITCHES = (torch._C._set_grad_enabled, torch.autograd.grad_mode._enter_inference_mode,
                  torch.autograd.grad_mode._exit_inference_mode)
_AUTOCAST_SWITCHES = (torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast)
AUTOCAST_SETTERS = frozenset(getattr(torch, name) for name in dir(torch)
                             if name.startswith("set_autocast_") and "cache" not in name)
"""torch.set_autocast_enabled(...), set_autocast_dtype(...) and their per-device kin, called as
functions (not `with torch.autocast(...)`): each starts an autocast state of its own (MODE_REGION),
which replacements are not traced under (`site_timing.autocast_around` knows the blocks only)."""


def _mark_without_grad(graph: fx.Graph) -> None:
    """Mark WITHOUT_GRAD on the nodes that run with gradients off (between a graph's switches of
    grad mode that turn them off; after an argument that is not a constant, everything), where
    another part of the graph records them, and MODE_REGION on every node.

    Dynamo calls the backend under the grad mode the graph starts in (and guards on it). A graph
    that starts without gradients (the caller's torch.no_grad()) and turns them on in a block
    (`with torch.enable_grad():`) has its nodes outside that block marked: folding `(w * 2) * 3`,
    whose `w * 2` ran without gradients, into `w * 6` inside the block sent w a gradient eager's
    did not (a tenth fuzz round). A graph called without gradients that records them nowhere has
    nothing to mark."""
    enabled, inference, unknown = torch.is_grad_enabled(), 0, False
    without: List[Node] = []
    records = enabled  # a graph that starts with gradients on marks its no_grad() blocks, as always
    # The modes as MODE_REGION records them; a flag that is not a constant is a mode of its own
    # (its node). An inference_mode() or autocast block is its entering node, until the exit that
    # names it.
    grad_mode: Any = enabled
    inference_blocks: List[Node] = []
    autocast_blocks: List[Node] = []

    def close(blocks: List[Node], node: Node) -> None:
        if blocks and node.args and node.args[0] is blocks[-1]:
            blocks.pop()
        else:  # an exit this graph did not enter: a mode of its own from here on
            blocks.append(node)

    for node in graph.nodes:
        if node.op == "call_function" and node.target in AUTOCAST_SETTERS:
            autocast_blocks.append(node)  # a mode of its own from here on
            continue
        if node.op == "call_function" and node.target in _AUTOCAST_SWITCHES:
            if node.target is torch.amp.autocast_mode._enter_autocast:
                autocast_blocks.append(node)
            else:
                close(autocast_blocks, node)
            continue
        node.meta[MODE_REGION] = (grad_mode, tuple(inference_blocks), tuple(autocast_blocks))
        if node.op == "call_function" and node.target in _GRAD_SWITCHES:
            if node.target is torch._C._set_grad_enabled:
                flag = node.args[0] if node.args else None
                if isinstance(flag, bool):
                    enabled = flag
                    grad_mode = flag
                else:
                    unknown = True
                    grad_mode = node
            elif node.target is torch.autograd.grad_mode._enter_inference_mode:
                inference += 1
                inference_blocks.append(node)
            else:
                inference = max(0, inference - 1)
                close(inference_blocks, node)
            continue
        if node.op in ("call_function", "call_method", "call_module"):
            if not enabled or inference or unknown:
                without.append(node)
            else:
                records = True
    if records or unknown:
        for node in without:
            node.meta[WITHOUT_GRAD] = True


def _not_without_grad(node: Node) -> None:
    if node.meta.get(WITHOUT_GRAD):
        raise UnsafeRewrite(f"a rewrite would move {node.name}, computed without gradients, to where they are "
                            "recorded")


DIVIDED_BY = "truthfuse_divided_by"
"""Node meta key: on a canonical `torch.mul(x, 1/s)`, the divisor s of the `x / s` it spells."""

FOLDED = "truthfuse_folded"
"""Node meta key: on a canonical `torch.mul(x, a*b*...)` folded from `x * a * b * ...`, the factors
(a, b, ...) in the order the user multiplied by them."""

RESPELLED = "truthfuse_respelled"
"""Node meta key: on a canonical node that the user spelled otherwise, how: "x * x" on
`torch.pow(x, 2)`, ("dtype", d) on the `torch.softmax` of a `softmax(x, dim, dtype=d)`,
("baddbmm", beta, alpha) on the sum a baddbmm became (its rounding in 16-bit floats), ("written
out", recipe) on the `F.gelu` of a GELU written out (`_written_out`: its rounding, and pow's fp32
under CUDA autocast), "operand scaled" on the (x @ y) * 2 of a (2 * x) @ y (its overflow). CUDA
autocast treats the spellings apart (pow and a softmax without dtype= compute in fp32, x * x and
softmax(x, dtype=bf16) in bf16), so outside the fused sites they are put back
(`restore_spellings`)."""


def _baddbmm_operands(node: Node, beta: float, alpha: float) -> Optional[tuple]:
    """(input, batch1, batch2) of the baddbmm whose canonical sum is `node` ([to](matmul(b1, b2)
    [* alpha] + input [* beta])), or None where the graph no longer has that form."""
    def call(n: Any, target: Callable, nargs: int) -> bool:
        return isinstance(n, Node) and n.op == "call_function" and n.target is target and \
            len(n.args) == nargs and not n.kwargs

    if beta == 0:  # baddbmm(input, b1, b2, beta=0) ignores input: b1.new_zeros(()) stands for it
        product, added = node, None
    else:
        total = node.args[0] if call(node, _to, 2) else node
        if not call(total, torch.add, 2):
            return None
        product, added = total.args
    if beta not in (0, 1):
        if not (call(added, torch.mul, 2) and added.args[1] == beta):
            return None
        added = added.args[0]
    if alpha != 1:
        if not (call(product, torch.mul, 2) and product.args[1] == alpha):
            return None
        product = product.args[0]
    if not (call(product, torch.matmul, 2) and all(rank_of(b) == 3 for b in product.args)):
        return None
    return (added,) + tuple(product.args)


def _einsum_operands(node: Node, transposed_a: bool, transposed_b: bool) -> Optional[tuple]:
    """The two operands of the einsum that the canonical `matmul(a, b)` at `node` spells, each
    without the transpose of its last two dims that the rewrite added; None where the graph no
    longer has that form."""
    args = node.args
    if node.target is _linear:  # a product by a weight: linear(a, b^T) (`_matmul_to_linear`)
        if len(args) != 3 or args[2] is not None:
            return None
        args, transposed_b = args[:2], not transposed_b
    operands = []
    for operand, transposed in zip(args, (transposed_a, transposed_b)):
        if transposed:
            rank = rank_of(operand)
            if not (isinstance(operand, Node) and operand.op == "call_function" and operand.target is torch.transpose
                    and len(operand.args) == 3 and not operand.kwargs and rank is not None
                    and {_neg_dim(d, rank) for d in operand.args[1:]} == {-2, -1}):
                return None
            operand = operand.args[0]
        operands.append(operand)
    return tuple(operands) if len(args) == 2 and not node.kwargs else None


def _divisor(node: Node) -> Any:
    """The s of the `x / s` that the canonical `x * (1/s)` at `node` spells, as the graph has it now:
    a later rewrite (a scalar fold, `restore_spellings` itself) may have replaced the node s that
    `DIVIDED_BY` names; the reciprocal's operand is the one that stands for it. None where the
    graph no longer has that form."""
    s, recip = node.meta[DIVIDED_BY], node.args[1] if len(node.args) == 2 else None
    if not isinstance(s, Node):
        return s
    if isinstance(recip, Node) and recip.op == "call_function":
        if recip.target is torch.reciprocal and len(recip.args) == 1 and not recip.kwargs:
            return recip.args[0]
        if recip.target is operator.truediv and len(recip.args) == 2 and recip.args[0] == 1.0:
            return recip.args[1]
    return None


def restore_spellings(graph: fx.Graph) -> int:
    """Put back what the user wrote wherever no fused site took the canonical node: `x / s` for
    `x * (1/s)` (they may differ in the last bit, which a floor or a comparison after them can
    show), `x * x` for `x ** 2` and softmax's dtype= (result dtypes under CUDA autocast), and the
    others `RESPELLED` lists. Returns how many."""
    restored = 0
    rebuilt = False
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        respelled = node.meta.get(RESPELLED)
        if DIVIDED_BY in node.meta and node.target is torch.mul and _divisor(node) is not None:
            target, args, kwargs = torch.div, (node.args[0], _divisor(node)), {}
        elif FOLDED in node.meta and node.target is torch.mul and len(node.args) == 2 and \
                not node.kwargs and isinstance(node.args[0], Node) and _is_number(node.args[1]):
            x, *factors = node.args[0], *node.meta[FOLDED]
            for factor in factors[:-1]:
                with graph.inserting_before(node):
                    x = graph.call_function(torch.mul, (x, factor))
                x.meta.update({k: v for k, v in node.meta.items() if k not in ("example_value", "val", FOLDED)})
                if "example_value" in node.meta:
                    x.meta["example_value"] = node.meta["example_value"]
            target, args, kwargs = torch.mul, (x, factors[-1]), {}
        elif respelled == "operand scaled" and node.target is torch.mul and len(node.args) == 2 and \
                _call_to(node.args[0], torch.matmul) and len(node.args[0].args) == 2 and len(node.args[0].users) == 1:
            product, factor = node.args  # (x @ y) * c back to (x * c) @ y (`_operand_scaled_after_product`)
            x, y = product.args
            with graph.inserting_before(product):
                scaled = graph.call_function(torch.mul, (x, factor))
            scaled.meta.update({k: v for k, v in product.meta.items() if k not in ("example_value", "val", RESPELLED)})
            if isinstance(x, Node) and "example_value" in x.meta:
                scaled.meta["example_value"] = x.meta["example_value"]
            product.args = (scaled, y)
            node.replace_all_uses_with(product)
            graph.erase_node(node)
            restored += 1
            continue
        elif respelled == "x * x" and node.target is torch.pow and node.args[1:] == (2,):
            target, args, kwargs = torch.mul, (node.args[0], node.args[0]), {}
        elif isinstance(respelled, tuple) and respelled[0] == "dtype" and node.target is torch.softmax \
                and len(node.args) == 2:
            target, args, kwargs = torch.softmax, node.args, {"dtype": respelled[1]}
        elif isinstance(respelled, tuple) and respelled[0] == "where" and node.target is torch.masked_fill and \
                len(node.args) == 3 and not node.kwargs and _is_number(node.args[2]) and \
                (respelled[1] == "filled where" or _call_to(node.args[1], torch.logical_not)):
            x, mask, value = node.args
            target, kwargs = torch.where, {}
            args = (mask, value, x) if respelled[1] == "filled where" else (mask.args[0], x, value)
        elif isinstance(respelled, tuple) and respelled[0] == "bias added" and node.target is _linear and \
                len(node.args) == 3 and not node.kwargs:
            with graph.inserting_before(node):
                product = graph.call_function(_linear, node.args[:2] + (None,))
            product.meta.update({k: v for k, v in node.meta.items() if k != RESPELLED})
            target, kwargs = torch.add, {}
            args = (node.args[2], product) if respelled[1] else (product, node.args[2])
        elif isinstance(respelled, tuple) and respelled[0] == "einsum" and node.target in (torch.matmul, _linear) and \
                _einsum_operands(node, *respelled[2:]) is not None:
            target, args, kwargs = torch.einsum, (respelled[1],) + _einsum_operands(node, *respelled[2:]), {}
        elif isinstance(respelled, tuple) and respelled[0] == "baddbmm" and \
                _baddbmm_operands(node, *respelled[1:]) is not None:
            target, args = torch.baddbmm, _baddbmm_operands(node, *respelled[1:])
            kwargs = {"beta": respelled[1], "alpha": respelled[2]}
            if args[0] is None:
                with graph.inserting_before(node):
                    args = (graph.call_method("new_zeros", (args[1], ())),) + args[1:]
                args[0].meta.update({k: v for k, v in node.meta.items() if k not in ("example_value", "val", RESPELLED)})
                batch1 = example_value(args[1])
                if isinstance(batch1, torch.Tensor):
                    args[0].meta["example_value"] = batch1.new_zeros(())
        elif isinstance(respelled, tuple) and respelled[0] == "written out" and node.target is F.gelu and \
                node.args and isinstance(node.args[0], Node):
            node.replace_all_uses_with(_rebuilt(graph, node, respelled[1], node.args[0]))
            graph.erase_node(node)
            restored += 1
            rebuilt = True  # its nodes may carry spellings of their own: a second pass puts them back
            continue
        else:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(target, args, kwargs)
        new.meta.update({k: v for k, v in node.meta.items() if k not in (DIVIDED_BY, RESPELLED, FOLDED)})
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        restored += 1
    if rebuilt:
        restored += restore_spellings(graph)
    return restored  # the reciprocals left unused go with the caller's dead-code pass


WRITTEN_IN_PLACE = "truthfuse_written_in_place"
"""Node meta key: the in-place writes (nodes) that canonicalization leaves in place and that may
change this value while the graph also reads it elsewhere (BatchNorm's counter, read nowhere else,
is not marked)."""


# torch.func's and autograd's transform machinery, as Dynamo inlines it: torch.vmap becomes
# _vmap_increment_nesting ... _vmap_decrement_nesting, torch.func.grad _grad_increment_nesting,
# _set_tensor_requires_grad, _saved_tensors_hooks_disable ... Several of these calls set state and
# return nothing the graph reads; FX does not count them impure, and dropping one leaves a
# transform open or its gradients zero (Jamba's and Zamba's Mamba scan has a vmap). None is part
# of a pattern, so every call into these modules is kept.
_TRANSFORM_MODULES = ("torch._functorch", "torch._C._functorch", "torch._C._autograd")


def _transform_call(node: Node) -> bool:
    return node.op == "call_function" and (getattr(node.target, "__module__", None) or "").startswith(_TRANSFORM_MODULES)


def dynamo_effect(node: Node) -> bool:
    """A call into Dynamo's own helpers. With compiled autograd on
    (`torch._dynamo.config.compiled_autograd`), `t.register_hook(fn)` on an intermediate is traced
    as `_register_hook_trampoline(t, backward_state)`, a call whose result nothing reads: dropped,
    the hook is gone and the backward computes other gradients than eager."""
    return node.op == "call_function" and (getattr(node.target, "__module__", None) or "").startswith("torch._dynamo")


def is_impure(node: Node) -> bool:
    """Nodes dead-code elimination must keep: FX's notion of impure, the calls of torch.func's
    transforms (`_transform_call`) and Dynamo's own (`dynamo_effect`: a traced backward hook),
    plus anything that mutates its arguments (`mutates`)."""
    if node.op == "placeholder" or node.is_impure() or _transform_call(node) or dynamo_effect(node):
        return True
    return mutates(node)


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Erase the nodes of `graph` that nothing uses and that are not `is_impure`, in this graph
    only. torch.fx's Graph.eliminate_dead_code goes on into the graphs of the submodules the graph
    reads (a checkpoint body, a cond branch) with FX's default notion of impure, which does not
    keep an in-place method call whose result is unused (`y.mul_(2)`): a canonical copy shares
    those submodules with Dynamo's graph, so a checkpointed body lost its in-place writes even
    where nothing was fused. A body that truthfuse looks into goes through its own pipeline."""
    graph.lint()
    for node in reversed(graph.nodes):
        if not node.users and not is_impure(node):
            graph.erase_node(node)


def _repeat_kv_as_repeat_interleave(rw: _Rewriter) -> None:
    """HF's repeat_kv, x[:, :, None].expand(B, H, n, S, D).reshape(B, H * n, S, D), is
    repeat_interleave(x, n, -3) value for value (each head copied n times in a row); one spelling
    lets grouped-query rules see the un-repeated K/V. Proven from the recorded shapes: x is
    (B, H, S, D), the expand only grows the new dim, the reshape merges H and n."""
    for node in list(rw.graph.nodes):
        if not (_method_or_function(node, *_RESHAPES) and node.args):
            continue
        expand = node.args[0]
        if not (isinstance(expand, Node) and expand.op == "call_method" and expand.target == "expand"
                and len(expand.users) == 1):
            continue
        unsq = expand.args[0]
        if not (isinstance(unsq, Node) and unsq.op == "call_function" and unsq.target is torch.unsqueeze
                and unsq.args[1] == -3 and len(unsq.users) == 1):
            continue
        x, mid, out = (example_value(n) for n in (unsq.args[0], expand, node))
        if not all(isinstance(v, torch.Tensor) for v in (x, mid, out)) or x.dim() != 4 or mid.dim() != 5 or out.dim() != 4:
            continue
        B, H, S, D = x.shape
        n = mid.shape[2]
        same = [_same_size(a, b) for a, b in zip(mid.shape, (B, H, n, S, D))]
        same += [_same_size(a, b) for a, b in zip(out.shape, (B, H * n, S, D))]
        if not all(same) or not isinstance(n, int):
            continue
        new = rw.replace(node, torch.repeat_interleave, (unsq.args[0], n, -3))
        rw.erase(expand)
        rw.erase(unsq)
        new.meta["example_value"] = out


def canonicalize(graph: fx.Graph) -> int:
    """Rewrite `graph` in place into the canonical vocabulary. Returns the number of rewrites.
    An in-place write that stays (its target may be an input or share memory with another value)
    and whose memory the graph also reads marks the values it may write `WRITTEN_IN_PLACE`: they
    are not rewritten here, and no site may take them in (`match.sites`)."""
    _keywords_to_positions(graph)
    for node in graph.nodes:
        if changes_metadata(node):
            raise UnsafeRewrite(f"{node.name} changes a tensor's shape or storage in place")
    _mark_without_grad(graph)
    rw = _Rewriter(graph)
    _assembled_by_slice_copies(rw)
    _functionalize_inplace(rw)
    peers = shared_storage_inputs(graph)
    for node in list(graph.nodes):
        if mutates(node):
            family = written_family(node, peers)
            if any(u is not node and u not in family for n in family for u in n.users):
                for n in family:  # read elsewhere: no rewrite may move those reads across the write
                    n.meta.setdefault(WRITTEN_IN_PLACE, []).append(node)
                rw.writes_marked = True
    for node in list(graph.nodes):
        if _in_graph(node, graph):
            _canonical_node(rw, node)
    _masks_before_the_scale(rw)
    _fold_scalar_products(rw)
    _even_differences_query_first(rw)
    _sums_kept_as_unsqueezed(rw)
    _operand_scaled_after_product(rw)
    _drop_identity_reshapes(rw)
    _unfold_heads_from_batch(rw)
    _terms_added_through_a_split_batch(rw)
    _keys_as_transposed(rw)
    _repeat_kv_as_repeat_interleave(rw)
    _softmax_with_sinks(rw)
    _matmul_to_linear(rw)
    _unflatten_linear(rw)
    _fold_tanh_gelu(rw)
    eliminate_dead_code(graph)
    graph.lint()
    return rw.changed


def canonical_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A canonicalized copy of a GraphModule (`canonicalize`); the original is left untouched so
    that a graph in which nothing is fused can be handed on exactly as Dynamo produced it."""
    graph = fx.Graph()
    value_map: dict = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    copy_gm = fx.GraphModule(gm, graph)
    canonicalize(copy_gm.graph)
    copy_gm.recompile()
    return copy_gm

