"""The tuner: which matched sites to fuse, and how, decided by measurement.

    space.py     the decision space (sites, options, conflicts) and the three strategies
    mcts.py      Monte Carlo tree search, exhaustive and random search, and the guard (choose_plan)
    timing.py    on-device timing of one candidate
    cache.py     the persistent JSON cache, save_state / load_state
    progress.py  the progress bar

See docs/tuning.md.
"""
from .cache import (
    TuningCache,
    TuningCacheWarning,
    TuningStateError,
    cache_key,
    default_cache_dir,
    load_state,
    save_state,
)
from .mcts import (
    Measurement,
    SearchResult,
    TuningDecision,
    choose_plan,
    exhaustive_search,
    greedy_plan,
    mcts_search,
    random_search,
)
from .space import KEEP, STRATEGIES, DecisionSpace, Option, Plan, SiteChoices, restrict
from .timing import Timing, l2_rotation_count, measure, measure_timing, rotated_input_sets, tensor_bytes

__all__ = [
    "KEEP",
    "STRATEGIES",
    "DecisionSpace",
    "Measurement",
    "Option",
    "Plan",
    "SearchResult",
    "SiteChoices",
    "TuningCache",
    "TuningCacheWarning",
    "TuningDecision",
    "TuningStateError",
    "Timing",
    "cache_key",
    "choose_plan",
    "default_cache_dir",
    "exhaustive_search",
    "greedy_plan",
    "l2_rotation_count",
    "load_state",
    "mcts_search",
    "measure",
    "measure_timing",
    "random_search",
    "restrict",
    "rotated_input_sets",
    "save_state",
    "tensor_bytes",
]
