"""The run directory's layout, and housekeeping a run does in it before it starts."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.plan import Plan
from pipeline.stages.outputs import TEMP_PREFIX, TEMP_SUFFIX

MANIFEST_FILE = "manifest.sqlite"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
LOG_FILE = "pipeline.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

log = logging.getLogger("pipeline.state")


def sink_folders(plan: Plan) -> list[Path]:
    """The local folders sinks write into (their `path` option, relative to the run dir)."""
    run_dir = Path(plan.config.output)
    folders = []
    for node in plan.nodes:
        path = getattr(node.options, "path", None)
        if node.role == "sink" and isinstance(path, str) and "://" not in path:
            folders.append(run_dir / path)
    return folders


def remove_stale_temp_files(folders: list[Path]) -> int:
    """Delete temp files a killed run left behind; call only while holding the lock."""
    removed = 0
    for folder in folders:
        for path in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("removed %d temp files left by an interrupted run", removed)
    return removed


@contextmanager
def log_file(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """While inside, also append the `pipeline` loggers' lines to `RUN_DIR/pipeline.log`.

    INFO and above go to the file; what reaches stderr is the CLI's business.
    """
    if not enabled:
        yield
        return
    logger = logging.getLogger("pipeline")
    handler = logging.FileHandler(Path(run_dir) / LOG_FILE, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%dT%H:%M:%S%z"))
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
