"""The rule registry: the built-in library, rules registered in code, and rules that third-party
packages declare under the `truthfuse.rules` entry-point group."""
from __future__ import annotations

import logging
import sys
import types
import warnings
from importlib.metadata import entry_points
from typing import Dict, Iterable, List, Mapping

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
            elif isinstance(obj, types.ModuleType):
                pass  # importing it registered its rules
            elif callable(obj) and not isinstance(obj, type):
                produced = obj()  # None: a function that registers its rules itself
                if produced is None or isinstance(produced, Rule):
                    produced = [] if produced is None else [produced]
                elif isinstance(produced, (str, bytes, Mapping)) or not isinstance(produced, Iterable):
                    produced = [produced]
                for r in produced:
                    if isinstance(r, Rule):
                        register_rule(r, replace=True)
                    else:  # dropped in silence before: a factory returning {name: rule} loaded no rule
                        warnings.warn(f"truthfuse: entry point {ep.name!r} ({ep.value}) returned {_shown(r)}, "
                                      "not a fusion_backend.Rule: skipped")
            else:
                # a list or dict of rules named by the entry point loaded nothing, without a word
                raise TypeError(f"{ep.value} is {_shown(obj)}; an entry point names a fusion_backend.Rule, a "
                                "module whose import registers its rules, or a function returning rules")
        except Exception as exc:  # noqa: BLE001 -- one broken plugin must not stop compilation
            warnings.warn(f"truthfuse: rules from entry point {ep.name!r} could not be loaded: {exc}")


def _shown(obj) -> str:
    """A value as a warning names it: its type, and a short repr."""
    text = repr(obj)
    return f"a {type(obj).__name__} ({text if len(text) <= 80 else text[:77] + '...'})"


def all_rules() -> List[Rule]:
    """Every registered rule, highest priority first (name breaks ties, for determinism)."""
    _load_builtin_and_plugins()
    return sorted(_rules.values(), key=lambda r: (-r.priority, r.name))


def get_rule(name: str) -> Rule:
    _load_builtin_and_plugins()
    if name not in _rules:
        raise KeyError(f"no rule named {name!r}; registered: {sorted(_rules)}")
    return _rules[name]
