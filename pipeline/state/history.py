"""Run history: one JSON line when a run starts and one when it ends, in the run directory.

A start line without an end line is a run that is still going or was killed.
Lines are appended and fsynced; a line cut short by a crash is ignored on reading.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.state.rundir import HISTORY_FILE

COLUMNS = ("run", "started", "wall s", "exit", "ok", "failed", "skipped", "items/s", "config")


def new_run_id() -> str:
    """Sortable by start time, and unique: runs may start in the same second."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def append_history(run_dir: str | Path, entry: dict[str, Any]) -> None:
    path = Path(run_dir) / HISTORY_FILE
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every run, oldest first: its end report, or its start line if it never ended."""
    path = Path(run_dir) / HISTORY_FILE
    runs: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            runs[entry["run_id"]] = {**runs.get(entry["run_id"], {}), **entry}
    return list(runs.values())


def runs_table(runs: list[dict[str, Any]]) -> str:
    """Runs as an aligned text table; a run without an exit code is running or was killed."""
    rows = [COLUMNS]
    for run in runs:
        counts = run.get("counts", {})
        rows.append(
            (
                run["run_id"],
                run.get("started_at", ""),
                _text(run.get("wall_seconds")),
                _text(run["exit_code"]) if "exit_code" in run else "killed?",
                _text(counts.get("ok")),
                _text(counts.get("failed")),
                _text(counts.get("skipped")),
                _text(run.get("items_per_second")),
                run.get("config_hash", ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _text(value: Any) -> str:
    return "" if value is None else str(value)
