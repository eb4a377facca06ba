"""Logging: one line per event, `key=value` fields, on stderr; quiet enough for cron mail.

    configure("quiet")      errors only (the CLI still prints the final summary)
    configure("normal")     plus start and periodic progress lines (when not on a TTY)
    configure("verbose")    plus debug detail

`add_handler` sends the same lines somewhere else too, e.g. a log file in the
run directory: `add_handler(logging.FileHandler(run_dir / "run.log"))`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

LOGGER_NAME = "pipeline"
LEVELS = {"quiet": logging.ERROR, "normal": logging.INFO, "verbose": logging.DEBUG}


class _UtcFormatter(logging.Formatter):
    converter = time.gmtime

    def __init__(self) -> None:
        super().__init__("%(asctime)sZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")


def logger(name: str = "") -> logging.Logger:
    """The `pipeline` logger, or one of its children (`logger("progress")`)."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def configure(verbosity: str = "normal", stream: TextIO | None = None) -> logging.Logger:
    """Log `pipeline.*` at the level `verbosity` names to `stream` (stderr); idempotent."""
    root = logger()
    for handler in [h for h in root.handlers if getattr(h, "_pipeline_console", False)]:
        root.removeHandler(handler)
    console = logging.StreamHandler(stream or sys.stderr)
    console._pipeline_console = True  # type: ignore[attr-defined]  # our mark on a stdlib handler
    add_handler(console)
    root.setLevel(LEVELS[verbosity])
    root.propagate = False
    return root


def add_handler(handler: logging.Handler, level: int = logging.NOTSET) -> logging.Handler:
    """Send pipeline log lines to `handler` too, in the same format."""
    handler.setFormatter(_UtcFormatter())
    handler.setLevel(level)
    logger().addHandler(handler)
    return handler


def fields(**values: Any) -> str:
    """`key=value` pairs for a log line; values with spaces are quoted, None is skipped."""
    parts = []
    for key, value in values.items():
        if value is None:
            continue
        text = str(value)
        parts.append(f"{key}={text!r}" if " " in text or not text else f"{key}={text}")
    return " ".join(parts)
