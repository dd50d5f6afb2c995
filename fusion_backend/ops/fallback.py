"""One warning per op and reason when a kernel cannot run and the PyTorch reference takes over."""
import contextlib
import warnings
from typing import Iterator, List

_warned: set = set()
# the lists of `fallbacks_recorded` blocks now open, each receiving every fallback, warned or not
_recorders: List[List[str]] = []


class FusionFallbackWarning(UserWarning):
    """A fused kernel could not run; truthfuse computed the site with the original PyTorch math."""


def warn_fallback_once(op_name: str, reason: str) -> None:
    """Warn the first time `op_name` falls back for `reason`; later identical fallbacks are silent."""
    for fallbacks in _recorders:
        fallbacks.append(f"{op_name} fell back to the PyTorch reference: {reason}")
    key = (op_name, reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"truthfuse: {op_name} fell back to the PyTorch reference: {reason}",
        FusionFallbackWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def fallbacks_recorded() -> Iterator[List[str]]:
    """A list that receives every fallback inside the block, repeated ones included. The tuner
    times options inside one: an option whose kernels fell back was timing the reference. Fallbacks
    first seen inside the block are warned about again the next time they happen outside it, since
    the tuner drops the warnings of its timing runs."""
    fallbacks: List[str] = []
    warned_before = set(_warned)
    _recorders.append(fallbacks)
    try:
        yield fallbacks
    finally:
        _recorders.remove(fallbacks)
        _warned.intersection_update(warned_before)


def reset_fallback_warnings() -> None:
    """Forget which fallbacks were already reported (tests use this)."""
    _warned.clear()
