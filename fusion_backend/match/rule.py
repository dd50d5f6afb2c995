"""The public rule-authoring API: a rule is a pattern (ordinary PyTorch code), a replacement, and
constraints. See docs/authoring-rules.md for a worked example."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ..canonicalize.passes import example_value
from .pattern import PatternGraph, trace_pattern

Node = fx.Node
Constraint = Callable[["Match"], Optional[str]]


class Match:
    """What a rule sees of one matched site: the bound values and their static facts.

    `values[name]` is the example value of each wildcard (a fake tensor with possibly symbolic
    sizes, a Python number, or None for a wildcard that only an absent optional step used);
    `nodes[name]` is the FX node it came from (None for constants).
    """

    def __init__(self, rule: "Rule", bindings: Dict[str, Any], anchor: Node, covered: Sequence[Node]):
        self.rule = rule
        self.anchor = anchor
        self.covered = list(covered)
        self.nodes: Dict[str, Optional[Node]] = {
            k: (v if isinstance(v, Node) else None) for k, v in bindings.items()
        }
        self.values: Dict[str, Any] = {k: example_value(v) for k, v in bindings.items()}
        self.bindings = bindings

    @property
    def output(self) -> Any:
        """The example value of the matched subgraph's result."""
        return example_value(self.anchor)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    @staticmethod
    def value_of(node: Node) -> Any:
        """The example value of any node of the graph (a covered one, say): its fake tensor, whose
        dtype shows what the op computed in (under torch.autocast, a product's is autocast's)."""
        return example_value(node)

    def is_tensor(self, name: str) -> bool:
        return isinstance(self.values.get(name), torch.Tensor)

    def present(self, name: str) -> bool:
        """Whether the wildcard was bound (False when only an absent optional step used it)."""
        return self.bindings.get(name) is not None

    def covers(self, predicate: Callable[[Node], bool]) -> bool:
        """Whether any matched node satisfies `predicate` (e.g. the site includes a dropout)."""
        return any(predicate(n) for n in self.covered)


@dataclass
class Rule:
    """A fusion rule.

    name: unique, dotted by convention ("attention.dot").
    kind: what the site is ("attention", "feedforward", or a kind of your own).
    pattern: a function whose body is the PyTorch code to find; its parameters are wildcards.
    replacement: a function called with the wildcards' values as keyword arguments (fake tensors
        while tracing) that computes the same result, normally through a truthfuse op. If it
        takes a `config` keyword, the tuner passes the chosen launch config there.
    constraints: functions of a Match returning None when the site is acceptable, or a reason
        string when it is not (shown in explain() as a near-miss).
    priority: higher rules are tried first and win overlapping sites.
    variant: a label for explain() ("dot", "l2", ...), or a function of the Match giving one.
    exact: the replacement computes the pattern's math exactly, up to rounding order (the
        "conservative" strategy only fuses exact sites). A bool, or a function of the Match (a
        site with dropout is not exact: the fused kernel draws its own random stream).
    configs: a function of the Match returning the launch configs the tuner may try for the site
        (a list of strings, None standing for the op's default). The first is the site's
        default: the only one used unless configs are searched (options configs="search").
    replacement_args: a function of the Match returning extra keyword arguments for the
        replacement: facts of the matched graph that the wildcards' values do not show (the dtype
        an addition inside the site computes in, say). Python values only, fixed per site.
    look_through_upcasts: wildcards that may bind to the input of a lossless floating upcast
        (`q.float()` on a bf16 q binds q itself) when the replacement computes in at least the
        wider precision anyway; saves the copy and lets half-precision kernels run.
    keeps_result_for_backward: the replacement's op saves its own result for the backward, as
        flash-style attention does (the row sums of dO * O). A result the graph returns then
        reaches the caller as a copy, so that an in-place write there cannot break the backward.
        False for an op that does not (the feed-forward op) saves that copy; a result that the
        replacement's trace saves for the backward is copied all the same.
    """

    name: str
    kind: str
    pattern: Callable
    replacement: Callable
    constraints: Sequence[Constraint] = ()
    priority: int = 0
    variant: Union[str, Callable[[Match], str], None] = None
    exact: Union[bool, Callable[[Match], bool]] = True
    configs: Optional[Callable[[Match], List[Optional[str]]]] = None
    look_through_upcasts: Sequence[str] = ()
    replacement_args: Optional[Callable[[Match], Dict[str, Any]]] = None
    keeps_result_for_backward: bool = True
    _traced: Optional[PatternGraph] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a rule needs a non-empty name")
        if not callable(self.pattern) or not callable(self.replacement):
            raise ValueError(f"rule {self.name}: pattern and replacement must be functions")
        pattern_params = inspect.signature(self.pattern).parameters
        varying = [f"{'*' if p.kind is p.VAR_POSITIONAL else '**'}{p.name}" for p in pattern_params.values()
                   if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if varying:
            # fx traces *args (**kwargs) as one placeholder bound to a tuple (dict) that no value of a
            # model's graph is, so such a rule was accepted and never matched anything
            raise ValueError(f"rule {self.name}: the pattern's parameter {varying[0]} is not supported; a pattern's "
                             "wildcards are named parameters, one per value (def pattern(q, k, v, mask)), "
                             "positional or keyword-only")
        params = set(pattern_params)
        repl = inspect.signature(self.replacement).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in repl.values())
        missing = [p for p in params if p not in repl and not takes_kwargs]
        if missing:
            raise ValueError(f"rule {self.name}: the replacement lacks parameters {missing} "
                             "that the pattern binds")
        self._check_fields(params)

    def _check_fields(self, params: set) -> None:
        """The other fields' types, checked here: read only when the rules are sorted or a site
        matches, a priority of "high" failed the analysis of every graph of every model and a kind
        of 5 failed options={"disable": ...} for every rule, far from the rule that caused it."""
        def bad(field_name: str, what: str):
            raise TypeError(f"rule {self.name}: {field_name}={getattr(self, field_name)!r} must be {what}")

        if not isinstance(self.kind, str) or not self.kind:
            bad("kind", 'a non-empty string ("attention", "feedforward" or a kind of your own)')
        if isinstance(self.priority, bool) or not isinstance(self.priority, (int, float)) or self.priority != self.priority:
            bad("priority", "a number (higher is tried first)")
        if callable(self.constraints) or not isinstance(self.constraints, (list, tuple)) or not all(
                callable(c) for c in self.constraints):
            bad("constraints", "a list of functions of a Match (a single function goes in a list)")
        for c in self.constraints:
            # a helper's constraint (dtype_in, rank_is, dims_equal, same_device) naming a wildcard
            # the pattern lacks read it as absent and passed every site: a typo'd dtype_in("X", ...)
            # let an fp64 site through to a replacement that computes in fp32
            unknown = [n for n in getattr(c, "wildcards", ()) if n not in params]
            if unknown:
                raise ValueError(f"rule {self.name}: constraint {getattr(c, '__name__', c)} reads wildcard "
                                 f"{unknown[0]!r}, which the pattern does not have; its wildcards are "
                                 f"{', '.join(sorted(params))}")
        if self.variant is not None and not isinstance(self.variant, str) and not callable(self.variant):
            bad("variant", "None, a string or a function of a Match")
        if not isinstance(self.exact, bool) and not callable(self.exact):
            bad("exact", "True, False or a function of a Match")
        for field_name in ("configs", "replacement_args"):
            if getattr(self, field_name) is not None and not callable(getattr(self, field_name)):
                bad(field_name, "None or a function of a Match")
        if not isinstance(self.keeps_result_for_backward, bool):
            bad("keeps_result_for_backward", "True or False")
        names = self.look_through_upcasts
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(n in params for n in names):
            bad("look_through_upcasts", f"a list of the pattern's parameters ({', '.join(sorted(params))})")

    @property
    def traced(self) -> PatternGraph:
        """The canonical pattern graph, traced once on first use."""
        if self._traced is None:
            self._traced = trace_pattern(self.pattern)
        return self._traced

    def variant_of(self, match: Match) -> Optional[str]:
        variant = self.variant(match) if callable(self.variant) else self.variant
        # a label: a function's 5 or {"heads": 8} as a string (as they were, str(explain(...)) raised
        # TypeError for every report listing the site)
        return variant if variant is None or isinstance(variant, str) else str(variant)

    def exact_for(self, match: Match) -> bool:
        return bool(self.exact(match)) if callable(self.exact) else bool(self.exact)

    def check(self, match: Match) -> Optional[str]:
        """The first failing constraint's reason, or None."""
        for constraint in self.constraints:
            try:
                reason = constraint(match)
            except Exception as exc:  # noqa: BLE001 -- an unsure rule does not match
                reason = f"constraint {getattr(constraint, '__name__', constraint)} failed: {exc}"
                if isinstance(exc, GuardOnDataDependentSymNode):
                    # torch's message, many lines of hints, read as if truthfuse had failed
                    reason = (f"constraint {getattr(constraint, '__name__', constraint)} cannot decide on a size or "
                              "number known only while the graph runs (data-dependent: nonzero(), boolean indexing "
                              "or .item() under capture_dynamic_output_shape_ops / capture_scalar_outputs): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            if reason is not None and not isinstance(reason, str):
                # True or False from a predicate: which one means "fine" is the author's guess, and
                # False read as fine fused exactly the sites such a constraint was written to keep
                reason = (f"constraint {getattr(constraint, '__name__', constraint)} returned {reason!r}, not None "
                          "(the site is fine) or a string (why not)")
            if reason:
                return reason
        return None

    def config_choices(self, match: Match) -> List[Optional[str]]:
        if self.configs is None:
            return [None]
        found = self.configs(match)
        if isinstance(found, (str, bytes)) or not isinstance(found, Iterable):
            raise TypeError(f"configs returned {found!r}, not a list of launch configs (strings, None for the default)")
        found = list(found)
        bad = [c for c in found if c is not None and not isinstance(c, str)]
        if bad:
            raise TypeError(f"configs returned {bad[0]!r} among its launch configs, which are strings (None for the "
                            "default)")
        return found or [None]

    def accepts_config(self) -> bool:
        params = inspect.signature(self.replacement).parameters
        return "config" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def rule(name: str, kind: str, *, replacement: Callable, constraints: Sequence[Constraint] = (),
         priority: int = 0, variant=None, exact: bool = True, configs=None,
         register: bool = True) -> Callable[[Callable], Rule]:
    """Decorator form: `@rule("my.attention", "attention", replacement=fn)` over a pattern
    function builds the Rule and (by default) registers it."""
    def wrap(pattern: Callable) -> Rule:
        r = Rule(name=name, kind=kind, pattern=pattern, replacement=replacement,
                 constraints=constraints, priority=priority, variant=variant, exact=exact,
                 configs=configs)
        if register:
            from .registry import register_rule
            register_rule(r)
        return r
    return wrap
