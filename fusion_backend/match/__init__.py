"""Matching: the public rule-authoring API, the registry, and finding sites in a canonical graph."""
from .constraints import dims_equal, dtype_in, is_scalar_like, guard_equal, known_equal, plain_tensors, rank_is, same_device
from .pattern import maybe
from .registry import ENTRY_POINT_GROUP, all_rules, get_rule, register_rule, unregister_rule
from .rule import Match, Rule, rule
from .sites import Site, find_sites

__all__ = [
    "Match", "Rule", "rule", "maybe", "register_rule", "unregister_rule", "all_rules", "get_rule",
    "ENTRY_POINT_GROUP", "Site", "find_sites", "dims_equal", "dtype_in", "is_scalar_like",
    "guard_equal", "known_equal", "rank_is", "same_device",
]
