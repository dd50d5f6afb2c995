"""Finding sites: every place in a canonical graph where a rule's pattern lines up.

A site is either valid (its constraints hold: the tuner may fuse it) or a near-miss (the pattern
matched structurally, but a constraint failed or an intermediate is used elsewhere); near-misses
are kept and explained.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.fx as fx

from ..canonicalize import is_cast
from ..canonicalize.passes import AUTOCAST_SETTERS, MODE_REGION, WITHOUT_GRAD, WRITTEN_IN_PLACE, dynamo_effect, example_value

from .matcher import Matcher, escaping_nodes
from .rule import Match, Rule

Node = fx.Node
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def source_location(node: Node) -> str:
    """The user's file:line for a node, from the innermost frame of Dynamo's recorded trace."""
    trace = node.meta.get("stack_trace") or ""
    frames = _FRAME.findall(trace)
    if not frames:
        return "<unknown>"
    path, line = frames[-1]
    return f"{path}:{line}"


_TRACED_ROOT = re.compile(r"^L\['[^']*'\]\.?")
_SOURCE_ROOT = re.compile(r"^[LG]\['([^']*)'\]")
_SOURCE_MEMBER = re.compile(r"\._(?:buffers|parameters|modules)\['([^']*)'\]")


def describe(node: Node) -> str:
    """A node as a reason names it for the user: a graph input by the expression Dynamo read it
    from (`self.k_cache` for the placeholder `l_self_buffers_k_cache_`), another node by its name
    and the line of the user's code that made it (`transpose_1 (model.py:12)`)."""
    if node.op == "placeholder":
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
        if isinstance(name, str) and name:
            return _SOURCE_MEMBER.sub(r".\1", _SOURCE_ROOT.sub(r"\1", name))
        return node.name
    location = source_location(node)
    if location == "<unknown>":
        return node.name
    path, _, line = location.rpartition(":")
    return f"{node.name} ({'/'.join(path.split('/')[-2:])}:{line})"


def module_location(node: Node) -> Optional[str]:
    """The module that computed a node, as `module 1 (GELU)` (its path under the compiled model,
    and its class), from Dynamo's nn_module_stack; None without one. For a node whose trace holds
    no line of the user's code: a model made only of torch.nn modules, such as an nn.Sequential
    compiled as it is, which explain() listed at `<unknown>`."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    name = (cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))).rsplit(".", 1)[-1]
    path = _TRACED_ROOT.sub("", str(path))
    return f"module {path} ({name})" if path else f"module ({name})"


def _site_location(anchor: Node, al) -> str:
    """The anchor's user-code location, else the first matched node's that has one (a rewritten
    call can lose Dynamo's trace), else the module that computed the anchor (or a matched node)."""
    location = source_location(anchor)
    if location != "<unknown>":
        return location
    for node in al.covered:
        location = source_location(node)
        if location != "<unknown>":
            return location
    for node in [anchor, *al.covered]:
        location = module_location(node)
        if location:
            return location
    return "<unknown>"


@dataclass
class Site:
    """One matched place in a graph."""

    id: str
    rule: Rule
    match: Match
    variant: Optional[str]
    location: str
    near_miss: Optional[str] = None           # why it cannot be fused, if it cannot
    configs: List[Optional[str]] = field(default_factory=lambda: [None])
    exact: bool = True                        # the rule's `exact` for this match
    # For a near-miss: whether the rule's constraints hold, so that only the near-miss reason
    # (a value used elsewhere, or written in place) stands in the way
    constraints_hold: bool = False

    @property
    def kind(self) -> str:
        return self.rule.kind

    @property
    def anchor(self) -> Node:
        return self.match.anchor

    @property
    def nodes(self) -> set:
        return set(self.match.covered)


_PRECISION = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _lossless_upcast_source(node) -> Optional[Node]:
    """For a canonical cast that only widens a floating dtype up to fp32 (bf16 -> fp32), its input:
    the kernels compute in fp32, so a cast to float64 asks for more than they give."""
    if not is_cast(node):
        return None
    src, dst = example_value(node.args[0]), node.args[1]
    if isinstance(src, torch.Tensor) and _PRECISION.get(src.dtype, 99) < _PRECISION.get(dst, 0) <= 2:
        return node.args[0]
    return None


def _alignment_to_match(rule: Rule, al, anchor: Node) -> Match:
    bindings = dict(al.bindings)
    covered = list(al.covered)
    for name in rule.look_through_upcasts:
        source = _lossless_upcast_source(bindings.get(name))
        if source is not None:
            cast = bindings[name]
            bindings[name] = source
            if all(u in al.covered for u in cast.users):
                covered.append(cast)
    return Match(rule, bindings, anchor, covered)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _cast_changing_precision(al, anchor: Node) -> Optional[str]:
    """A reason where the matcher looked through a cast that narrows to a dtype narrower than the
    site's result (an fp32 model's `.half()` or bf16 round trip of its scores or hidden values):
    the fused op never rounds there, so it would not lose the precision, or overflow to inf, where
    eager does. A cast narrowing to the result's dtype is the op's own rounding (half-precision
    models' `softmax(s, dtype=torch.float32).to(q.dtype)`). Likewise a cast to float64 in a site
    whose result is not float64, or a step that a float64 operand promotes to float64 there (an
    fp32 model's float64 mask or per-head scale): the kernels compute in fp32, less precisely than
    eager there."""
    out = example_value(anchor)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return None
    for node, pattern in al.covered.items():
        if pattern is not node or not is_cast(node):  # only the casts the matcher looked through
            continue
        src, dst = example_value(node.args[0]), node.args[1]
        if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.dtype):
            continue
        if torch.promote_types(src.dtype, dst) != dst and torch.promote_types(dst, out.dtype) != dst:
            return (f"a cast from {_dtype_name(src.dtype)} to {_dtype_name(dst)} inside a site whose result is "
                    f"{_dtype_name(out.dtype)}: the fused op would not round (or overflow) there as eager does")
        if dst == torch.float64 and out.dtype != torch.float64:
            return (f"a cast from {_dtype_name(src.dtype)} to float64 inside a site whose result is "
                    f"{_dtype_name(out.dtype)}: the fused kernels compute in fp32, less precisely than eager there")
    if out.dtype != torch.float64:
        # no cast, but type promotion: a float64 operand (a mask or bias built with numpy, a
        # per-head scale) makes eager compute the scores from there on in float64
        wide = {n for n in al.covered if isinstance(example_value(n), torch.Tensor)
                and example_value(n).dtype == torch.float64}
        if wide:
            node = next(n for n in anchor.graph.nodes if n in wide)  # the first, in graph order
            return (f"{node.name} is computed in float64 (promoted by a float64 operand) inside a site whose "
                    f"result is {_dtype_name(out.dtype)}: the fused kernels compute in fp32, less precisely "
                    "than eager there")
    return None


def _data_dependent_number(match: Match) -> Optional[str]:
    """Why a wildcard bound to a number the graph reads from a tensor while it runs (`t.item()`
    under torch._dynamo.config.capture_scalar_outputs, an unbacked symbol) keeps the site: a
    replacement takes its numbers as constants of the traced graph, and such a number has no value
    to take until the graph runs (guarding on it failed the whole compile)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for name, value in match.values.items():
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) and free_unbacked_symbols(value):
            node = match.nodes.get(name)
            what = describe(node) if isinstance(node, Node) else name
            return (f"the number {what} is read from a tensor while the graph runs (.item() with "
                    "capture_scalar_outputs), and the fused op would need it as a constant; pass it as a tensor")
    return None


def _computed_without_grad(al) -> Optional[str]:
    """A reason where the site covers a node computed with gradients turned off
    (`canonicalize.passes.WITHOUT_GRAD`): the fused op would record gradients through it; or nodes
    on both sides of a switch of grad mode or autocast (`MODE_REGION`)."""
    names = sorted(describe(n) for n in al.covered if n.meta.get(WITHOUT_GRAD))
    if names:
        return (f"{', '.join(names[:3])} computed under torch.no_grad() or inference_mode(), which the fused op "
                "would differentiate")
    regions = {n.meta[MODE_REGION] for n in al.covered if MODE_REGION in n.meta}
    if len(regions) > 1:
        return "grad mode or autocast switches inside the site: the fused op would compute it all under one mode"
    setters = [b for region in regions for b in region[2] if b.target in AUTOCAST_SETTERS]
    if setters:
        # the replacement is traced under the caller's autocast and the model's autocast blocks
        # only: an nn.MultiheadAttention after set_autocast_enabled(False) computed in bf16
        return (f"torch.{setters[-1].target.__name__}() before the site changes autocast outside a "
                "`with torch.autocast(...)` block, which the fused op would not be built under; use the block")
    return None


def _written_in_place(al, match) -> Optional[str]:
    """A reason where the site takes in a value that an in-place write left in place may change
    (`canonicalize.passes.WRITTEN_IN_PLACE`) at or after the site's first node: the fused op reads
    its inputs where the site ends, and the nodes it replaces are gone, so it could see the value
    from the other side of the write. Writes that all come before the site (a KV cache filled in
    place, then read) leave eager's reads and the fused op's on the same side."""
    nodes = list(al.covered) + [b for b in match.bindings.values() if isinstance(b, fx.Node)]
    marked = [n for n in nodes if n.meta.get(WRITTEN_IN_PLACE)]
    if not marked:
        return None
    order = {n: i for i, n in enumerate(match.anchor.graph.nodes)}
    first_read = min(order[n] for n in al.covered)
    written = sorted({describe(n) for n in marked
                      if any(order.get(w, first_read) >= first_read for w in n.meta[WRITTEN_IN_PLACE])})
    if not written:
        return None
    return (f"{', '.join(written)} may be written in place elsewhere in the graph (directly or through a view), "
            "so the fused op could read it before or after that write where eager does not")


_TRANSFORM_LEVELS = ("_vmap_increment_nesting", "_grad_increment_nesting", "_jvp_increment_nesting")


def _inside_transforms(graph: fx.Graph) -> set:
    """The nodes between a torch.func transform's opening and closing calls (vmap, grad, jvp, as
    Dynamo inlines them): their values are the transform's wrapped tensors, which an op of ours
    cannot take."""
    inside, depth = set(), 0
    for node in graph.nodes:
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name in _TRANSFORM_LEVELS:
            depth += 1
        elif name.endswith("_decrement_nesting") and depth:
            depth -= 1
        elif depth:
            inside.add(node)
    return inside


def find_sites(graph: fx.Graph, rules: Sequence[Rule], graph_id: str = "g0") -> List[Site]:
    """All valid sites and near-misses of `rules` in `graph` (a canonical graph).

    For each anchor node and rule, the first alignment that satisfies the rule's constraints
    becomes a valid site; if none does, the first structural alignment becomes a near-miss with
    its reason. Overlaps between sites are left for the caller (the tuner treats them as
    mutually exclusive choices).
    """
    sites: List[Site] = []
    nodes = list(graph.nodes)
    in_transform = _inside_transforms(graph)
    for rule in rules:
        try:
            pattern = rule.traced
        except ValueError as exc:
            import warnings
            warnings.warn(f"truthfuse: rule {rule.name} is skipped: {exc}")
            continue
        matcher = Matcher(pattern)
        targets = pattern.anchor_targets
        chain = set(pattern.anchor_chain)
        # With a trailing maybe(...), a site's own optional tail steps are anchors at which the
        # same rule would match a shorter prefix of it; anchors are visited last-first, so the
        # longest match comes first and its prefixes are not reported again. (Other sites that
        # merely overlap it are kept: the tuner chooses between them.)
        claimed: set = set()
        # A near-miss's own optional tail steps, with its reason: a shorter prefix there that fails
        # for the same reason is the same place kept for the same cause, and is not listed again.
        missed: dict = {}
        for anchor in reversed(nodes):
            if anchor.op not in ("call_function", "call_method") or anchor.target not in targets or anchor in claimed:
                continue
            first_failure: Optional[Site] = None
            chosen: Optional[Site] = None
            chosen_al = None
            for al in matcher.alignments(anchor):
                match = _alignment_to_match(rule, al, anchor)
                site = Site(id="", rule=rule, match=match, variant=None, location=_site_location(anchor, al))
                escaping = escaping_nodes(al, anchor)
                reason = None
                hooked = sorted(n.name for n in escaping if any(dynamo_effect(u) for u in n.users))
                if hooked:
                    reason = (f"a backward hook is registered on intermediate value {', '.join(hooked)} "
                              "(tensor.register_hook, traced under compiled autograd); the fused op would never call it")
                elif escaping:
                    example = ("attention weights returned to the caller" if rule.kind == "attention"
                               else "a hidden value kept for an auxiliary loss")
                    reason = ("intermediate value " + ", ".join(sorted(describe(n) for n in escaping)) +
                              f" is also used outside the pattern (for example {example}), so fusing "
                              "would not remove it")
                    if any(u.op == "output" for n in escaping for u in n.users):
                        # a graph break after the block (I-BERT's QuantAct asserts in training)
                        # makes Dynamo return every value the code reads later, though the model
                        # returns none of them: the reason alone pointed at the user's outputs
                        reason += ("; this graph returns it, to the caller or to the code after a graph break "
                                   "that reads it (TORCH_LOGS=graph_breaks shows the breaks)")
                if reason is None:
                    reason = _written_in_place(al, match)
                if reason is None:
                    reason = _computed_without_grad(al)
                if reason is None:
                    reason = _cast_changing_precision(al, anchor)
                if reason is None:
                    reason = _data_dependent_number(match)
                if reason is None and anchor in in_transform:
                    reason = "inside a torch.func transform (vmap, grad, jvp), whose wrapped tensors the op cannot take"
                if reason is None:
                    reason = rule.check(match)
                else:
                    site.constraints_hold = rule.check(match) is None
                try:
                    site.variant = rule.variant_of(match)
                except Exception:  # noqa: BLE001
                    site.variant = None
                if reason is None:
                    # a rule's own functions of the match: one that raises or answers out of type
                    # leaves the rule unsure of the site, which it then keeps (it failed the compile,
                    # or the analysis of the whole graph)
                    try:
                        site.configs = rule.config_choices(match)
                        site.exact = rule.exact_for(match)
                    except Exception as exc:  # noqa: BLE001
                        reason = f"rule {rule.name} could not describe the site: {type(exc).__name__}: {exc}"
                if reason is None:
                    chosen, chosen_al = site, al
                    break
                if first_failure is None:
                    site.near_miss = reason
                    first_failure, first_failure_al = site, al
            found = chosen or first_failure
            if chosen_al is not None and len(chain) > 1:
                claimed.update(t for t, p in chosen_al.covered.items() if p in chain)
            if chosen is None and first_failure is not None and len(chain) > 1:
                if missed.get(anchor) == first_failure.near_miss:
                    continue
                missed.update((t, first_failure.near_miss) for t, p in first_failure_al.covered.items()
                              if p in chain and t is not anchor)
            if found is not None:
                found.id = f"{graph_id}.{rule.name}@{anchor.name}"
                sites.append(found)
    # A near-miss at an anchor where another rule of the same kind has a valid site says only
    # that a more specific rule (say, causal attention) did not apply where a general one does:
    # not worth reporting, and it would read as if the site were kept.
    valid = {(s.anchor, s.kind) for s in sites if s.near_miss is None}
    sites = [s for s in sites if s.near_miss is None or (s.anchor, s.kind) not in valid]
    groups: dict = {}
    for s in sites:
        if s.near_miss is not None:
            groups.setdefault((s.anchor, s.kind), []).append(s)
    reported = {id(_reported_near_miss(group)) for group in groups.values()}
    return [s for s in sites if s.near_miss is None or id(s) in reported]


def _reported_near_miss(group: List[Site]) -> Site:
    """One near-miss per place that several rules matched: the most specific rule (highest
    priority) whose constraints hold, so that the reason is what alone stands in the way; else the
    most general rule's, whose failed constraint is the place's own (a refinement's, say "the mask
    is not the causal triangle", would describe a rule that does not apply)."""
    holding = [s for s in group if s.constraints_hold]
    if holding:
        return max(holding, key=lambda s: s.rule.priority)
    return min(group, key=lambda s: s.rule.priority)
