"""The progress bar shown while the tuner measures plans.

Tuning can take tens of seconds per graph, so a terminal user gets a tqdm bar. It stays silent
whenever drawing one would be noise: output is not a terminal (CI logs, pipes), the user turned
logging down, or the caller passed progress=False.
"""
from __future__ import annotations

import logging
import sys

LOGGER_NAME = "truthfuse"


def _stream():
    """Where the bar goes: stderr as it is now (looked up per call, not bound at import)."""
    return sys.stderr


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to draw a bar.

    progress=True or False decides outright. None (the default) draws one only when stderr is a
    terminal and logging is on: not disabled with logging.disable(INFO or higher), and the
    "truthfuse" logger not set above INFO or disabled. The logger's level is read only where it was
    set explicitly (on it or an ancestor other than the root), because Python's root default of
    WARNING would otherwise mute every user who never configured logging.
    """
    if progress is not None:
        return bool(progress)
    stream = _stream()
    if stream is None or not getattr(stream, "isatty", lambda: False)():
        return False
    return _logging_on()


def _logging_on() -> bool:
    logger = logging.getLogger(LOGGER_NAME)
    if logging.root.manager.disable >= logging.INFO:
        return False
    node: logging.Logger | None = logger
    while node is not None and node is not logging.root:
        if node.disabled:
            return False
        if node.level != logging.NOTSET:
            return node.level <= logging.INFO
        node = node.parent
    return True


class TuningProgress:
    """A thin wrapper over tqdm that does nothing when disabled.

    Use as a context manager; call `update(best_ms)` after each new measurement.
    """

    def __init__(self, total: int | None, description: str = "truthfuse tuning",
                 progress: bool | None = None):
        self._bar = None
        if progress_enabled(progress):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit="plan", leave=False,
                             file=_stream(), dynamic_ncols=True)

    @property
    def active(self) -> bool:
        """Whether a bar is actually being drawn."""
        return self._bar is not None

    def update(self, best_ms: float | None = None) -> None:
        """Count one measurement and show the best time so far."""
        if self._bar is None:
            return
        if best_ms is not None:
            self._bar.set_postfix_str(f"best {best_ms:.3f} ms", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Remove the bar (it is not left behind on the terminal)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TuningProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
