"""The run directory's layout, and housekeeping a run does in it before it starts."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline import logs
from pipeline.storage import TEMP_PREFIX, TEMP_SUFFIX

MANIFEST_FILE = "manifest.sqlite"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
LOG_FILE = "pipeline.log"

log = logs.logger("state")


def remove_stale_temp_files(folders: list[Path]) -> int:
    """Delete temp files a killed run or a dead worker left behind; call only while holding
    the lock, with no task running."""
    removed = 0
    for folder in folders:
        for path in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d temp files left by an interrupted run or worker", removed)
    return removed


@contextmanager
def log_file(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """While inside, also append the `pipeline` log lines (INFO and up) to RUN_DIR/pipeline.log.

    The console keeps the verbosity the CLI chose: its handlers get the logger's old level.
    """
    if not enabled:
        yield
        return
    root = logs.logger()
    level = root.getEffectiveLevel()
    quieter = [h for h in root.handlers if h.level == logging.NOTSET]
    for handler in quieter:
        handler.setLevel(level)
    file_handler = logs.add_handler(
        logging.FileHandler(Path(run_dir) / LOG_FILE, encoding="utf-8"), logging.INFO
    )
    root.setLevel(min(level, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(file_handler)
        file_handler.close()
        root.setLevel(level)
        for handler in quieter:
            handler.setLevel(logging.NOTSET)
