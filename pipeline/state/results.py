"""Result records and the run report, written into the run directory."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pipeline.records import Record
from pipeline.storage import TEMP_PREFIX, TEMP_SUFFIX, atomic_write, fsync_path

RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.json"


class ResultsWriter:
    """Appends records as JSON lines to a temp file, flushed after every partition
    (`.tmp-results.jsonl.part`, to follow a run live), and renames it into place as
    `results.jsonl` when the run ends, however it ends: the file is always whole and
    belongs to the latest run. A run that recorded nothing leaves no results file."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / RESULTS_FILE
        self.temp = self.path.with_name(f"{TEMP_PREFIX}{RESULTS_FILE}{TEMP_SUFFIX}")
        self._file: IO[str] | None = None
        self.written = 0

    def __enter__(self) -> ResultsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.temp.open("w", encoding="utf-8")  # a killed run's temp is replaced
        return self

    def write(self, records: list[Record]) -> None:
        assert self._file is not None, "use ResultsWriter as a context manager"
        lines = (json.dumps(record, sort_keys=True, default=str) + "\n" for record in records)
        self._file.writelines(lines)
        self._file.flush()
        self.written += len(records)

    def __exit__(self, *exc_info: object) -> None:
        if self._file is None:
            return
        with self._file:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self.written:
            os.replace(self.temp, self.path)
        else:
            self.temp.unlink()
            self.path.unlink(missing_ok=True)  # an earlier run's records are not this run's
        fsync_path(str(self.path.parent))


@dataclass
class RunStats:
    """Running totals over the records of one run."""

    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.perf_counter)
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    skip_reasons: Counter[str] = field(default_factory=Counter)
    stage_seconds: Counter[str] = field(default_factory=Counter)

    def add(self, records: list[Record]) -> None:
        for record in records:
            self.statuses[record["status"]] += 1
            if record["reason"] and record["status"] == "failed":
                self.reasons[record["reason"]] += 1
            if record["reason"] and record["status"] == "skipped":
                self.skip_reasons[record["reason"]] += 1
            self.stage_seconds.update(record["timings"])

    @property
    def items(self) -> int:
        return sum(self.statuses.values())

    @property
    def wall_seconds(self) -> float:
        return time.perf_counter() - self.clock

    def report(self, **context: Any) -> dict[str, Any]:
        wall = self.wall_seconds
        processed = self.items - self.statuses["skipped"]
        return {
            **context,
            "started_at": iso_time(self.started),
            "finished_at": iso_time(time.time()),
            "wall_seconds": round(wall, 3),
            "items": self.items,
            "counts": {status: self.statuses[status] for status in ("ok", "failed", "skipped")},
            "failures_by_reason": dict(self.reasons.most_common()),
            "skipped_by_reason": dict(self.skip_reasons.most_common()),
            "items_per_second": round(processed / wall, 2) if wall > 0 else None,
            "stage_seconds": {name: round(s, 3) for name, s in self.stage_seconds.items()},
        }


def items_exit_code(
    counts: dict[str, int], max_failed: int | None, max_failed_fraction: float | None
) -> tuple[int, bool]:
    """(exit code, failures tolerated): 1 if items failed beyond the thresholds, else 0.

    Without thresholds any failure fails the run. The fraction is of the items
    processed in this run (ok + failed), not of those skipped.
    """
    failed = counts["failed"]
    if failed == 0:
        return 0, False
    if max_failed is None and max_failed_fraction is None:
        return 1, False
    processed = counts["ok"] + failed
    within = (max_failed is None or failed <= max_failed) and (
        max_failed_fraction is None or failed <= max_failed_fraction * processed
    )
    return (0, True) if within else (1, False)


def write_report(run_dir: str | Path, report: dict[str, Any]) -> Path:
    path = Path(run_dir) / REPORT_FILE
    atomic_write(str(path), (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    return path


def iso_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(timestamp))
