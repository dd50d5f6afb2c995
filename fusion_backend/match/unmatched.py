"""Attention that no rule lined up with: a softmax whose probabilities meet v in a product, fed by
scores that come from a product of two computed tensors (q @ k^T) or into the graph as an input,
which no attention site (fused or kept) covers. explain() listed no site at all for such blocks
(XGLM's clamp of the scores with torch.max, Funnel's einsums, DeBERTa's scores cut off by a graph
break); `unmatched_attention` says, for each, what stands between the scores and the softmax.

Only a reason is computed here: nothing is matched or fused, and the rules' bar is unchanged. The
walks are bounded and start only at uncovered softmaxes, so a graph whose attention matched pays
one pass over its nodes.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..canonicalize import is_cast
from ..canonicalize.passes import WITHOUT_GRAD, example_value
from .sites import describe

Node = fx.Node

_PRODUCTS = (torch.matmul, torch.bmm, torch.baddbmm, torch.einsum)
# the steps the attention rules take between the scores and the softmax (canonical forms)
_TAIL_STEPS = (torch.add, torch.mul, torch.masked_fill, torch.tanh)
_VIEWS = {"view", "reshape", "contiguous", "expand", "flatten", "unflatten"}
_CLAMPS = {"max": "torch.max", "maximum": "torch.maximum", "clamp": "clamp", "clamp_min": "clamp_min",
           "clamp_max": "clamp_max", "clip": "clip", "min": "torch.min", "minimum": "torch.minimum"}
_DEPTH = 12


def _name(node: Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _tensor(x: Any) -> Optional[torch.Tensor]:
    value = example_value(x) if isinstance(x, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _operands(node: Node) -> List[Node]:
    args = list(node.args)
    if node.target is torch.einsum and args and isinstance(args[0], str):
        args = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
    return [a for a in args if isinstance(a, Node)]


def _is_product_of_activations(node: Any) -> bool:
    """A batched product of two computed tensors of rank >= 3 (q and k; a weight is a Linear)."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in _PRODUCTS):
        return False
    operands = [a for a in _operands(node) if _tensor(a) is not None]
    if node.target is torch.baddbmm:
        operands = operands[-2:]
    return (len(operands) == 2 and all(_tensor(a).dim() >= 3 for a in operands)
            and not any(a.op == "get_attr" for a in operands))


def _reaches_product(node: Any, depth: int) -> bool:
    """node leads, within `depth` steps up through computed values, to a product of activations
    (breadth first, each node once: bounded however the graph branches)."""
    frontier, seen = [node], set()
    for _ in range(depth + 1):
        onward = []
        for n in frontier:
            if not isinstance(n, Node) or n in seen:
                continue
            seen.add(n)
            if _is_product_of_activations(n):
                return True
            if n.op in ("call_function", "call_method"):
                onward.extend(a for a in n.all_input_nodes if _tensor(a) is not None)
        frontier = onward
    return False


def _meets_v(softmax: Node) -> Optional[Node]:
    """The product that takes the probabilities as its first operand, through casts, dropout and
    views; None if there is none (a router's top-k, a loss)."""
    node = softmax
    for _ in range(_DEPTH):
        for user in node.users:
            if user.op == "call_function" and user.target in _PRODUCTS and _operands(user)[:1] == [node] \
                    and _tensor(user) is not None and _tensor(user).dim() >= 3:
                return user
        onward = [u for u in node.users if is_cast(u) or (u.op == "call_function" and u.target is F.dropout)
                  or (u.op == "call_method" and u.target in _VIEWS)]
        if len(onward) != 1:
            return None
        node = onward[0]
    return None


def _obstacles(softmax: Node) -> Tuple[List[Node], Optional[Node], Optional[Node]]:
    """Walk from the softmax up the scores: (the steps on the way that no rule takes, the product
    reached or None, the graph input reached or None)."""
    obstacles: List[Node] = []
    node = softmax.args[0] if softmax.args else None
    for _ in range(_DEPTH):
        if not isinstance(node, Node):
            return obstacles, None, None
        if node.op == "placeholder":
            return obstacles, None, node if (_tensor(node) is not None and _tensor(node).dim() >= 3) else None
        if _is_product_of_activations(node):
            return obstacles, node, None
        tensors = [a for a in node.all_input_nodes if _tensor(a) is not None]
        if not tensors:
            return obstacles, None, None
        known = is_cast(node) or (node.op == "call_function" and node.target in _TAIL_STEPS) or \
            (node.op == "call_method" and node.target in _VIEWS)
        if not known:
            obstacles.append(node)
        # the way up: the operand that leads to the product (else to a graph input of the scores' rank)
        up = [a for a in tensors if _reaches_product(a, _DEPTH)]
        if not up:  # else along the scores' own shape, toward a graph input
            scores = _tensor(node)
            up = [a for a in tensors if scores is not None and _tensor(a).is_floating_point()
                  and tuple(_tensor(a).shape) == tuple(scores.shape)]
        if not up:
            return obstacles, None, None
        node = up[0]
    return obstacles, None, None


def _say(step: Node) -> str:
    name = _name(step)
    where = describe(step)
    if name in _CLAMPS:
        return (f"the scores are clamped with {_CLAMPS[name]} ({where}) before the softmax (a clamp changes what "
                "a row masked whole gives, and its gradients)")
    if name == "sub":
        return f"a term is subtracted from the scores ({where}; the rules take masks that are added)"
    if step.target is torch.einsum:
        return (f"the scores are an einsum {step.args[0]!r} ({where}), not a batched matmul over the last two "
                "dims (q @ k^T with the heads leading)")
    return f"{name} ({where}) stands between the scores and the softmax"


def unmatched_attention(graph: fx.Graph, covered: Iterable[Node]) -> List[Tuple[Node, str]]:
    """(softmax, reason) for each attention-shaped softmax of `graph` (canonical) outside `covered`
    (the nodes of the attention sites found): why no rule lined up with it."""
    covered = set(covered)
    found = []
    for node in graph.nodes:
        if not (node.op == "call_function" and node.target is torch.softmax) or node in covered:
            continue
        if node.meta.get(WITHOUT_GRAD):  # left as written under a no_grad() block: a note says so
            continue
        pv = _meets_v(node)
        if pv is None:
            continue
        obstacles, product, graph_input = _obstacles(node)
        if product is None and graph_input is None:
            continue  # scores from a Linear or a constant: not q.k attention
        if product is not None and product.target is not torch.matmul:
            obstacles.append(product)  # canonical batched products are matmuls: this one is not
        reasons = [_say(step) for step in obstacles[:3]]
        if pv.target is torch.einsum:
            reasons.append(f"the probabilities meet v in an einsum {pv.args[0]!r} ({describe(pv)}) that is not a "
                           "batched matmul over the last two dims")
        if graph_input is not None:
            reasons.append(f"the scores come into this graph as an input ({describe(graph_input)}): a graph break "
                           "cut the attention between its product q @ k^T and the softmax (TORCH_LOGS=graph_breaks "
                           "shows where)")
        if not reasons:
            reasons.append(f"no rule lines up with the steps from the product {describe(product)} to the softmax")
        found.append((node, "attention found by its softmax, but no rule matched it: " + "; ".join(reasons)))
    return found
