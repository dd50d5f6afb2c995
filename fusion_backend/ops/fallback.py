"""One warning per op and reason when a kernel cannot run and the PyTorch reference takes over."""
import warnings

_warned: set = set()


class FusionFallbackWarning(UserWarning):
    """A fused kernel could not run; truthfuse computed the site with the original PyTorch math."""


def warn_fallback_once(op_name: str, reason: str) -> None:
    """Warn the first time `op_name` falls back for `reason`; later identical fallbacks are silent."""
    key = (op_name, reason)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"truthfuse: {op_name} fell back to the PyTorch reference: {reason}",
        FusionFallbackWarning,
        stacklevel=3,
    )


def reset_fallback_warnings() -> None:
    """Forget which fallbacks were already reported (tests use this)."""
    _warned.clear()
