"""The backend's options: what `torch.compile(..., options={...})` and `backend(**options)` take."""
from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

STRATEGIES = ("conservative", "moderate", "aggressive")
INNER_COMPILERS = ("inductor", "eager", "aot_eager")
CONFIG_CHOICES = ("auto", "default", "search")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# mode="max-autotune" multiplies the tuning budget by this much.
MAX_AUTOTUNE_BUDGET_FACTOR = 4


class OptionError(ValueError):
    """A bad option name or value; the message names the valid choices."""


@dataclass(frozen=True)
class Options:
    """Validated backend options.

    strategy: "conservative" (only exact rewrites, fused only on a measured win), "moderate"
        (default; the tuner decides per site), "aggressive" (fuse every valid match; the tuner
        picks only launch configs).
    inner: the compiler for the rewritten graph: "inductor" (default), "eager", "aot_eager".
    simulations: the tuner's budget of timed plans (the seed's 30 by default).
    tuning_seconds: a wall-clock cap on tuning per graph (None, or math.inf: no cap).
    cache: read and write the persistent tuning cache.
    monitor: record calls, device time and peak memory of each fused site (fusion_backend.metrics()).
    disable: rule names (or kinds) not to use.
    seed: the tuner's random seed.
    configs: which launch configs the tuner may try per site: "default" (each op's default for
        the device), "search" (the op's declared config space), or "auto" (default; "search"
        under mode="max-autotune", else "default"). Each config tried costs a Triton compile.
    mode: torch.compile's mode, passed to Inductor; "max-autotune" raises the tuning budget.
    inductor_options: extra Inductor config patches.
    """

    strategy: str = "moderate"
    inner: str = "inductor"
    simulations: int = 30
    tuning_seconds: Optional[float] = None
    cache: bool = True
    monitor: bool = False
    disable: Tuple[str, ...] = ()
    seed: int = 0
    configs: str = "auto"
    mode: str = "default"
    inductor_options: Dict[str, Any] = field(default_factory=dict)

    @property
    def search_configs(self) -> bool:
        """Whether the tuner tries launch configs beyond each op's default."""
        if self.configs == "auto":
            return self.mode.startswith("max-autotune")
        return self.configs == "search"

    @property
    def budget(self) -> int:
        """Timed plans allowed per graph, after the mode's multiplier."""
        if self.mode.startswith("max-autotune"):
            return self.simulations * MAX_AUTOTUNE_BUDGET_FACTOR
        return self.simulations


def _choice(name: str, value: Any, valid: Tuple[str, ...]) -> str:
    if value not in valid:
        raise OptionError(f"truthfuse option {name}={value!r} is not valid; choose one of "
                          + ", ".join(repr(v) for v in valid))
    return value


def parse_options(options: Optional[Dict[str, Any]] = None, mode: Optional[str] = None) -> Options:
    """Validate a user's options dict (and torch.compile's mode) into Options.

    Unknown names and bad values raise OptionError naming the valid ones. An Options (parsed
    already) is taken as the dict of its fields.
    """
    if isinstance(options, Options):
        options = {f.name: getattr(options, f.name) for f in fields(Options)}
    elif options is not None and not isinstance(options, Mapping):
        # options="aggressive" (or a list) failed in dict() with "dictionary update sequence element
        # #0 has length 1; 2 is required", which names neither truthfuse nor the fix
        hint = f"; did you mean {{'strategy': {options!r}}}?" if isinstance(options, str) and options in STRATEGIES else ""
        raise OptionError(f"truthfuse options must be a dict of option names to values, e.g. "
                          f"{{'strategy': 'aggressive'}}; got {type(options).__name__} {options!r}{hint}")
    options = dict(options or {})
    known = {f.name for f in fields(Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise OptionError(f"unknown truthfuse option(s) {unknown}; valid options: {sorted(known)}")
    if mode is not None:
        if "mode" in options and options["mode"] != mode:
            raise OptionError(f"mode given twice: {mode!r} and options['mode']={options['mode']!r}")
        options["mode"] = mode
    result: Dict[str, Any] = {}
    if "strategy" in options:
        result["strategy"] = _choice("strategy", options["strategy"], STRATEGIES)
    if "inner" in options:
        result["inner"] = _choice("inner", options["inner"], INNER_COMPILERS)
    if "configs" in options:
        result["configs"] = _choice("configs", options["configs"], CONFIG_CHOICES)
    if "mode" in options:
        # None is torch.compile's own spelling of the default mode; torch.compile never passes "",
        # so an empty mode is a mistake, not another "default".
        mode_value = options["mode"]
        result["mode"] = _choice("mode", "default" if mode_value is None else mode_value, MODES)
    if "simulations" in options:
        v = options["simulations"]
        if not _is_integer(v) or v < 1:
            raise OptionError(f"truthfuse option simulations={v!r} must be an integer >= 1")
        result["simulations"] = int(v)
    if "tuning_seconds" in options:
        v = options["tuning_seconds"]
        # `not v > 0` rather than `v <= 0`: nan compares false both ways and must be rejected here,
        # not deep in the tuner. An infinite cap is no cap, stored as None so both spell it alike.
        if v is not None and (not isinstance(v, numbers.Real) or isinstance(v, bool) or not v > 0):
            raise OptionError(f"truthfuse option tuning_seconds={v!r} must be a positive number of seconds, "
                              "or None (or math.inf) for no cap")
        result["tuning_seconds"] = None if v is None or math.isinf(v) else float(v)
    for flag in ("cache", "monitor"):
        if flag in options:
            if not isinstance(options[flag], bool):
                raise OptionError(f"truthfuse option {flag}={options[flag]!r} must be True or False")
            result[flag] = options[flag]
    if "disable" in options:
        result["disable"] = _checked_disable(options["disable"])
    if "seed" in options:
        if not _is_integer(options["seed"]):
            raise OptionError(f"truthfuse option seed={options['seed']!r} must be an integer")
        result["seed"] = int(options["seed"])
    if "inductor_options" in options:
        if not isinstance(options["inductor_options"], dict):
            raise OptionError("truthfuse option inductor_options must be a dict of Inductor config patches")
        result["inductor_options"] = _checked_inductor_options(options["inductor_options"])
    return Options(**result)


def _is_integer(value: Any) -> bool:
    """An int, or another integer type (numpy's np.int64 from a config file or an array was refused
    as "simulations=np.int64(5) must be an integer"); not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked_disable(value: Any) -> Tuple[str, ...]:
    """The names to disable, once each is a registered rule's name or kind. A misspelt name would
    otherwise disable nothing, silently. Rules a program registers count, so they must be
    registered before the options naming them are parsed."""
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(x, str) for x in value):
        raise OptionError(f"truthfuse option disable={value!r} must be a list of rule names or kinds")
    from .match import all_rules

    rules = all_rules()
    names = sorted(r.name for r in rules)
    kinds = sorted({r.kind for r in rules})
    unknown = [x for x in value if x not in names and x not in kinds]
    if unknown:
        close = difflib.get_close_matches(unknown[0], kinds + names, n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise OptionError(f"truthfuse option disable has {', '.join(repr(x) for x in unknown)}, neither a rule "
                          f"name nor a kind{hint}. Kinds: {', '.join(kinds)}. Rules: {', '.join(names)}")
    return tuple(value)


def _checked_inductor_options(patches: Dict[str, Any]) -> Dict[str, Any]:
    """The patches, once every key is an Inductor config name. Inductor itself only rejects an
    unknown key when it compiles, after analysis and tuning have run (and every timing of the
    tuner has failed on it), so a typo is caught here."""
    if not patches:
        return {}
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    for key in patches:
        if not isinstance(key, str) or key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise OptionError(f"truthfuse option inductor_options has {key!r}, which is not an Inductor config "
                              f"name (see torch._inductor.list_options()){hint}")
    return dict(patches)
