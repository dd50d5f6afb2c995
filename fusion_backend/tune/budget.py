"""Reading the tuner's settings from torch.compile's `options` and `mode`.

    torch.compile(model, backend="truthfuse", mode="max-autotune",
                  options={"strategy": "moderate", "simulations": 30, "tuning_seconds": 60})

mode="max-autotune" (and "max-autotune-no-cudagraphs") multiplies every budget the user did not
set explicitly by MAX_AUTOTUNE_FACTOR: that mode already tells Inductor to spend longer compiling
for a faster model, and the user asked for no particular number. An explicit number is kept as is.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .space import DEFAULT_STRATEGY, _check_strategy

DEFAULT_SIMULATIONS = 30
MAX_AUTOTUNE_FACTOR = 4
_MAX_AUTOTUNE_MODES = ("max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class TuningBudget:
    """How the tuner decides: which strategy, how many measurements, how many seconds at most."""

    strategy: str = DEFAULT_STRATEGY
    simulations: int = DEFAULT_SIMULATIONS
    tuning_seconds: float | None = None


def budget_from_options(options: Mapping[str, Any] | None = None,
                        mode: str | None = None) -> TuningBudget:
    """The TuningBudget for torch.compile's `options` dict and `mode` string.

    Reads "strategy" (default "moderate"), "simulations" (default 30, a positive int) and
    "tuning_seconds" (default none, a positive number). Other keys are ignored here. Bad values
    raise ValueError naming the option.
    """
    options = dict(options or {})
    strategy = _check_strategy(options.get("strategy", DEFAULT_STRATEGY))
    factor = MAX_AUTOTUNE_FACTOR if mode in _MAX_AUTOTUNE_MODES else 1

    if "simulations" in options:
        simulations = options["simulations"]
        if isinstance(simulations, bool) or not isinstance(simulations, int) or simulations < 1:
            raise ValueError(f'option "simulations" must be a positive int, got {simulations!r}')
    else:
        simulations = DEFAULT_SIMULATIONS * factor

    seconds = options.get("tuning_seconds")
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ValueError(f'option "tuning_seconds" must be a positive number, got {seconds!r}')
        seconds = float(seconds)
    return TuningBudget(strategy, simulations, seconds)
