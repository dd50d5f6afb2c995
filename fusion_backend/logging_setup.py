"""TRUTHFUSE_LOG: turn on truthfuse's logs from the environment, as TORCH_LOGS does for torch's.

    TRUTHFUSE_LOG=info    one line per compiled graph: sites found, fused, how the tuner decided
    TRUTHFUSE_LOG=debug   also every site's decision and reason, the monitor's instrumentation
    TRUTHFUSE_LOG=warning (or error) only problems; unset: logging is left as the program set it

Everything truthfuse logs goes through the standard `logging` module, to the logger named
"truthfuse". Following torch's own logs (torch/_logging), when the variable is set that logger gets
its own stderr handler, with torch's line format, and stops propagating to the root logger so a
program's logging.basicConfig does not print each line twice. Nothing is done to other loggers,
and nothing at all when the variable is unset: then configure the "truthfuse" logger like any
other (logging.getLogger("truthfuse").setLevel(logging.DEBUG)).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Optional

ENV_VAR = "TRUTHFUSE_LOG"
LOGGER_NAME = "truthfuse"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class TorchStyleFormatter(logging.Formatter):
    """torch's log line: `I1126 06:50:33.242000 23652 fusion_backend/backend.py:330] [truthfuse] msg`
    (level letter, month and day, time with microseconds, process id, file:line)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%m%d %H:%M:%S", time.localtime(record.created))
        micros = int((record.created - int(record.created)) * 1e6)
        path = record.pathname
        marker = os.sep + "fusion_backend" + os.sep
        if marker in path:
            path = "fusion_backend" + os.sep + path.split(marker, 1)[1]
        prefix = f"{record.levelname[:1]}{stamp}.{micros:06d} {record.process} {path}:{record.lineno}] [truthfuse] "
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class _Handler(logging.StreamHandler):
    """Our handler, recognisable so that configuring twice does not add a second one. Writes to
    the sys.stderr of the moment (so pytest's capture and redirect_stderr see it)."""

    def __init__(self):
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure(value: Optional[str] = None) -> Optional[int]:
    """Apply TRUTHFUSE_LOG (or `value`): set the "truthfuse" logger's level and give it a stderr
    handler. Returns the level set, or None when the variable is unset or empty. An unknown value
    warns once, naming the valid ones, and changes nothing."""
    if value is None:
        value = os.environ.get(ENV_VAR, "")
    value = value.strip().lower()
    if not value:
        return None
    level = LEVELS.get(value)
    if level is None:
        warnings.warn(f"{ENV_VAR}={value!r} is not a log level; use one of {', '.join(LEVELS)}", stacklevel=2)
        return None
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(isinstance(h, _Handler) for h in logger.handlers):
        handler = _Handler()
        handler.setFormatter(TorchStyleFormatter())
        logger.addHandler(handler)
    logger.propagate = False
    return level
