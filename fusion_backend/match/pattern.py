"""Patterns: ordinary PyTorch functions traced into canonical FX graphs.

A pattern's parameters are wildcards: each binds to one value of the target graph (a tensor, a
Python scalar, or a symbolic size). `maybe(fn)(x, *rest)` marks an optional step: the target may
apply `fn` there, or skip it, in which case the wildcards only `fn` used bind to None.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, List

import torch.fx as fx

from ..canonicalize import canonicalize

OPTIONAL = "truthfuse_optional"
_CALLS = ("call_function", "call_method")  # what a site may end at: torch.flip(x, [-1]) or x.flip(-1)


class maybe:  # noqa: N801 -- reads as a verb inside pattern code: maybe(F.dropout)(a, p)
    """Mark one call in a pattern as optional.

    Example::

        def pattern(q, k, v, mask, p):
            s = maybe(torch.add)(q @ k.transpose(-2, -1), mask)
            return maybe(F.dropout)(torch.softmax(s, -1), p) @ v

    matches with or without the mask add and with or without dropout. The first argument is the
    value that passes through when the step is absent.
    """

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        if isinstance(out, fx.Proxy):
            out.node.meta[OPTIONAL] = True
        return out


@dataclass
class PatternGraph:
    """A traced, canonicalized pattern: its graph, wildcard names in order, and the output node."""

    fn: Callable
    graph: fx.Graph
    wildcards: List[str]
    output: fx.Node

    @property
    def anchor_target(self):
        return self.output.target

    @property
    def anchor_chain(self) -> list:
        """The pattern nodes a site may end at: the output and, while the output is an optional
        step, the step it falls back to (`maybe(F.dropout)(linear(...))` ends at a dropout or,
        without one, at the linear)."""
        chain, node = [], self.output
        while isinstance(node, fx.Node) and node.op in _CALLS:
            chain.append(node)
            if not node.meta.get(OPTIONAL):
                break
            node = node.args[0]
        return chain

    @property
    def anchor_targets(self) -> list:
        """The targets of `anchor_chain`."""
        return [n.target for n in self.anchor_chain]


def trace_pattern(fn: Callable) -> PatternGraph:
    """Trace a pattern function symbolically and canonicalize it like a target graph.

    Raises ValueError when the function cannot be traced (data-dependent Python control flow, or
    a call on a Python number derived from a wildcard).
    """
    params = [p.name for p in inspect.signature(fn).parameters.values()]
    try:
        gm = fx.symbolic_trace(fn)
    except Exception as exc:  # noqa: BLE001 -- re-raised with the rule author's context
        raise ValueError(
            f"pattern {fn.__qualname__} could not be traced: {exc}. Patterns are straight-line "
            "PyTorch code over their parameters; write dims as negative indices."
        ) from exc
    canonicalize(gm.graph)
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    out = outputs[0].args[0]
    if isinstance(out, fx.Node) and out.op == "placeholder":
        # neg(neg(x)), x * 2 * 0.5: nothing is left to find once canonicalized
        raise ValueError(f"pattern {fn.__qualname__} canonicalizes to its wildcard {out.target} itself, with no "
                         "operation left to match")
    if not isinstance(out, fx.Node) or out.op not in _CALLS:
        # (a tuple of results, a number; a method such as x.flip(-1) is one operation, and was
        # refused with this message as well)
        raise ValueError(f"pattern {fn.__qualname__} must return the result of one operation")
    # A trailing maybe(...) is allowed as long as some operation is always left to anchor on.
    node = out
    while node.meta.get(OPTIONAL):
        node = node.args[0]
        if not isinstance(node, fx.Node) or node.op not in _CALLS:
            raise ValueError(f"pattern {fn.__qualname__}: without its optional steps nothing is left "
                             "to match; at least one operation must not be maybe(...)")
    # A skipped optional step tells the replacement so only through its own wildcards, passed as
    # None: one with none (`x * s + maybe(torch.mul)(y, s)`, s bound by the other product, or
    # `maybe(torch.relu)(x)`) matched with and without the step alike, and a replacement could
    # not tell which (tanh(x * 0.5 + y) computed as tanh(x * 0.5 + y * 0.5), 0.23 off)
    for node in gm.graph.nodes:
        if not node.meta.get(OPTIONAL):
            continue
        rest = list(node.args[1:]) + list(node.kwargs.values())
        own = [a for a in rest if isinstance(a, fx.Node) and a.op == "placeholder" and set(a.users) == {node}]
        if not own:
            name = getattr(node.target, "__name__", str(node.target))
            raise ValueError(f"pattern {fn.__qualname__}: the optional step maybe({name}) has no wildcard of its own "
                             "(an argument no other step uses), so a replacement could not tell whether the model "
                             "had it; give it one, which is None where the model skipped the step, or write two rules")
    return PatternGraph(fn=fn, graph=gm.graph, wildcards=params, output=out)
