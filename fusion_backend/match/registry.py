"""The rule registry: the built-in library, rules registered in code, and rules that third-party
packages declare under the `truthfuse.rules` entry-point group."""
from __future__ import annotations

import logging
import sys
import warnings
from importlib.metadata import entry_points
from typing import Dict, Iterable, List

from .rule import Rule

ENTRY_POINT_GROUP = "truthfuse.rules"
log = logging.getLogger("truthfuse")

_rules: Dict[str, Rule] = {}
_loaded = False


def register_rule(rule: Rule, *, replace: bool = False) -> Rule:
    """Add a rule to the registry. A second rule with the same name is an error unless
    `replace=True` (useful while iterating on a rule in a notebook)."""
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule expects a fusion_backend.Rule, got {type(rule).__name__}")
    # The built-in and plugin rules first, so that a name of theirs is taken whenever a program
    # registers: loaded later (at the first compile), they silently replaced a rule registered
    # under one of their names, even with replace=True. Not while the built-in library itself is
    # being imported (a program that imports truthfuse_patterns first): plugins would load in the
    # middle of it, before the built-ins they may replace or import from.
    if not _builtins_importing():
        _load_builtin_and_plugins()
    if rule.name in _rules and not replace and _rules[rule.name] is not rule:
        raise ValueError(f"a rule named {rule.name!r} is already registered; pass replace=True")
    _rules[rule.name] = rule
    return rule


def _builtins_importing() -> bool:
    """Whether the built-in library's package is being imported right now (its registrations)."""
    module = sys.modules.get("truthfuse_patterns")
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def unregister_rule(name: str) -> None:
    """Remove a rule by name (no error if absent)."""
    _rules.pop(name, None)


def _load_builtin_and_plugins() -> None:
    """Import the built-in library and every entry point of the group once. An entry point names
    a module (importing it registers its rules), a Rule, or a function returning rules."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import truthfuse_patterns  # noqa: F401 -- registers the built-in rules

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, Rule):
                register_rule(obj, replace=True)
            elif callable(obj) and not isinstance(obj, type):
                produced = obj()
                for r in (produced if isinstance(produced, Iterable) else [produced]):
                    if isinstance(r, Rule):
                        register_rule(r, replace=True)
        except Exception as exc:  # noqa: BLE001 -- one broken plugin must not stop compilation
            warnings.warn(f"truthfuse: rules from entry point {ep.name!r} could not be loaded: {exc}")


def all_rules() -> List[Rule]:
    """Every registered rule, highest priority first (name breaks ties, for determinism)."""
    _load_builtin_and_plugins()
    return sorted(_rules.values(), key=lambda r: (-r.priority, r.name))


def get_rule(name: str) -> Rule:
    _load_builtin_and_plugins()
    if name not in _rules:
        raise KeyError(f"no rule named {name!r}; registered: {sorted(_rules)}")
    return _rules[name]
