"""The run directory's layout, and housekeeping a run does in it before it starts."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.plan import Plan
from pipeline.stages.outputs import TEMP_PREFIX, TEMP_SUFFIX

MANIFEST_FILE = "manifest.sqlite"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
LOG_FILE = "pipeline.log"

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


def attach_log_file(run_dir: str | Path, level: int = logging.INFO) -> logging.Handler:
    """Also write the `pipeline` loggers' lines to `RUN_DIR/pipeline.log` (appending)."""
    os.makedirs(run_dir, exist_ok=True)
    handler = logging.FileHandler(Path(run_dir) / LOG_FILE, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    )
    logging.getLogger("pipeline").addHandler(handler)
    return handler
