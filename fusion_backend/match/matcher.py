"""Structural matching of a canonical pattern graph against a canonical target graph.

The matcher walks from the pattern's output back through its inputs, trying every consistent way
to line the pattern up with the target (argument order of + and *, optional steps present or
absent, floating-point casts in the target looked through). It yields each complete alignment;
the caller checks the rule's constraints on them in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from ..canonicalize import is_cast
from ..canonicalize.passes import CANONICAL_TARGETS, example_value
from .pattern import OPTIONAL, PatternGraph

Node = fx.Node

_COMMUTATIVE = {torch.mul, torch.add}
_FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


@dataclass
class Alignment:
    """One way the pattern lines up with the target.

    bindings: wildcard name -> target value (a Node, a Python constant, or None for a wildcard
    that only an absent optional step used). covered: the target nodes the pattern's operations
    (and the casts looked through) correspond to.
    """

    bindings: Dict[str, Any] = field(default_factory=dict)
    covered: Dict[Node, Node] = field(default_factory=dict)  # target node -> pattern node (or itself for casts)

    def extend(self, name: Optional[str] = None, value: Any = None,
               target: Optional[Node] = None, pattern: Optional[Node] = None) -> "Alignment":
        new = Alignment(dict(self.bindings), dict(self.covered))
        if name is not None:
            new.bindings[name] = value
        if target is not None:
            new.covered[target] = pattern
        return new


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Node) or isinstance(b, Node):
        return a is b
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and
                                              isinstance(b, (int, float)) and
                                              not isinstance(a, bool) and not isinstance(b, bool)
                                              and a == b)


def _floating_cast(node: Node) -> bool:
    """A cast between floating dtypes: the fused kernels compute in fp32 and cast their output to
    the target's dtype, so such casts inside a matched region change nothing but rounding."""
    if not is_cast(node):
        return False
    src = example_value(node.args[0])
    return node.args[1] in _FLOAT_DTYPES and (not isinstance(src, torch.Tensor) or src.dtype in _FLOAT_DTYPES)


def _by_parameter(node: Node) -> Optional[Dict[str, Any]]:
    """A call outside the canonical vocabulary as {parameter: argument}, defaults filled in, or None
    when its signature cannot be read. Such calls reach the matcher as they were written, and the
    two sides write them differently: F.layer_norm traced in a pattern passes weight, bias and eps
    by keyword (its __torch_function__ dispatch does), while Dynamo records nn.LayerNorm's call
    positionally, so no pattern could match it."""
    if node.op != "call_function" or node.target in CANONICAL_TARGETS:
        return None
    try:
        pair = normalize_function(node.target, tuple(node.args), dict(node.kwargs),
                                  normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 -- an unreadable signature: compare as written
        return None
    return None if pair is None else dict(pair.kwargs)


class Matcher:
    """Finds alignments of one pattern graph at a given anchor node of a target graph."""

    def __init__(self, pattern: PatternGraph):
        self.pattern = pattern

    def alignments(self, anchor: Node) -> Iterator[Alignment]:
        yield from self._node(self.pattern.output, anchor, Alignment())

    # -- recursion ---------------------------------------------------------------------------

    def _node(self, pn: Any, tv: Any, al: Alignment) -> Iterator[Alignment]:
        if not isinstance(pn, Node):
            if isinstance(pn, (list, tuple)):
                yield from self._sequence(list(pn), tv, al)
            elif _same_value(pn, tv):
                yield al
            return
        if pn.op == "placeholder":
            name = pn.target
            if name in al.bindings:
                if _same_value(al.bindings[name], tv):
                    yield al
            else:
                yield al.extend(name, tv)
            return
        if isinstance(tv, Node) and tv.op in ("call_function", "call_method", "get_attr"):
            if tv not in al.covered or al.covered[tv] is pn:
                yield from self._call(pn, tv, al)
            if _floating_cast(tv) and tv not in al.covered:
                yield from self._node(pn, tv.args[0], al.extend(target=tv, pattern=tv))
        if pn.meta.get(OPTIONAL) and pn.args:
            skipped = al
            for arg in list(pn.args[1:]) + list(pn.kwargs.values()):
                if isinstance(arg, Node) and arg.op == "placeholder" and arg.target not in skipped.bindings:
                    skipped = skipped.extend(arg.target, None)
            yield from self._node(pn.args[0], tv, skipped)

    def _call(self, pn: Node, tn: Node, al: Alignment) -> Iterator[Alignment]:
        if pn.op != tn.op or pn.target != tn.target:
            return
        if set(pn.kwargs) != set(tn.kwargs) or len(pn.args) != len(tn.args):
            # one call spelled with other keywords than the other: compare them by parameter
            p_kw, t_kw = _by_parameter(pn), _by_parameter(tn)
            if p_kw is None or t_kw is None or set(p_kw) != set(t_kw):
                return
            yield from self._sequence([p_kw[k] for k in sorted(p_kw)], [t_kw[k] for k in sorted(t_kw)],
                                      al.extend(target=tn, pattern=pn))
            return
        al = al.extend(target=tn, pattern=pn)
        t_args = list(tn.args)
        orders = [t_args]
        if pn.target in _COMMUTATIVE and len(t_args) == 2:
            orders.append(t_args[::-1])
        for order in orders:
            p_items = list(pn.args) + [pn.kwargs[k] for k in sorted(pn.kwargs)]
            t_items = order + [tn.kwargs[k] for k in sorted(tn.kwargs)]
            yield from self._sequence(p_items, t_items, al)

    def _sequence(self, p_items: list, t_items: Any, al: Alignment) -> Iterator[Alignment]:
        if not isinstance(t_items, (list, tuple)) or len(p_items) != len(t_items):
            return
        if not p_items:
            yield al
            return
        for head in self._node(p_items[0], t_items[0], al):
            yield from self._sequence(p_items[1:], list(t_items[1:]), head)


def escaping_nodes(al: Alignment, anchor: Node) -> list:
    """Covered nodes other than the anchor whose values are also used outside the match: fusing
    would have to recompute or expose them, so such an alignment is not taken."""
    inside = set(al.covered)
    return [n for n in al.covered if n is not anchor and any(u not in inside for u in n.users)]
