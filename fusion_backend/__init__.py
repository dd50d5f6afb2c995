"""truthfuse: a torch.compile backend that fuses attention and feed-forward blocks.

    torch.compile(model, backend="truthfuse")                   # registered by entry point
    torch.compile(model, backend=fusion_backend.backend(strategy="aggressive"))
    print(fusion_backend.explain(model, x))                     # what was fused, and why not

The rule-authoring API (Rule, rule, maybe, register_rule, constraint helpers) is public: see
docs/authoring-rules.md. The built-in rules live in the `truthfuse_patterns` package.
"""
__version__ = "0.1.0"

from . import logging_setup  # noqa: F401  -- TRUTHFUSE_LOG=info|debug, read once at import
from . import ops  # noqa: F401  -- fusion_backend.ops.attention, fusion_backend.ops.feedforward
from .backend import FusionWarning, TruthfuseBackend, backend, truthfuse
from .explain import Report, explain
from .match import (
    ENTRY_POINT_GROUP,
    Match,
    Rule,
    all_rules,
    dims_equal,
    dtype_in,
    get_rule,
    guard_equal,
    is_scalar_like,
    known_equal,
    maybe,
    plain_tensors,
    rank_is,
    register_rule,
    rule,
    same_device,
    unregister_rule,
)
from .monitor import metrics, reset_metrics
from .options import STRATEGIES, OptionError, Options, parse_options
from .tune import load_state, save_state

__all__ = [
    "__version__", "backend", "truthfuse", "TruthfuseBackend", "FusionWarning", "explain", "Report",
    "Rule", "rule", "Match", "maybe", "register_rule", "unregister_rule", "all_rules", "get_rule",
    "ENTRY_POINT_GROUP", "dims_equal", "dtype_in", "guard_equal", "is_scalar_like", "known_equal", "plain_tensors", "rank_is",
    "same_device", "Options", "OptionError", "parse_options", "STRATEGIES", "save_state",
    "load_state", "ops",
    "metrics", "reset_metrics",
]

logging_setup.configure()
