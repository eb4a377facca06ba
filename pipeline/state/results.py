"""Result records and the run report, written into the run directory."""

from __future__ import annotations

import json
import math
import os
import time
from bisect import bisect_right
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


# Histogram buckets of the summary, by their lower edges: a bucket holds its lower edge
# and not its upper one (the next edge); the last has no upper edge.
SIZE_EDGES = (0, 64, 128, 256, 512, 1024, 2048, 4096)  # width and height, pixels
KIB, MIB = 1024, 1024 * 1024
BYTES_EDGES = (0, KIB, 4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB)
HISTOGRAMS = {"width": SIZE_EDGES, "height": SIZE_EDGES, "bytes": BYTES_EDGES}
# Formats come from decode's allow-list; names past this many distinct ones count as `other`.
MAX_FORMATS = 32


@dataclass
class Histogram:
    """Counts in fixed buckets: O(1) memory whatever the number of values."""

    edges: tuple[int, ...]
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * len(self.edges)

    def add(self, value: float) -> None:
        bucket = bisect_right(self.edges, value) - 1
        if bucket >= 0:  # below the first edge (negative): not a size
            self.counts[bucket] += 1

    def report(self) -> dict[str, list[int]]:
        return {"edges": list(self.edges), "counts": list(self.counts)}


@dataclass
class Mean:
    total: float = 0.0
    items: int = 0

    def add(self, value: float) -> None:
        self.total += value
        self.items += 1

    def report(self) -> dict[str, float | int]:
        return {"mean": round(self.total / self.items, 3), "items": self.items}


@dataclass
class BatchSummary:
    """What the images this run processed were like, from the ok records as they arrive.

    `ok_items` counts them; `formats` counts them by `format` (decode's; at most
    MAX_FORMATS names, then `other`); `width`, `height` and `bytes` are histograms over
    the records that have the value, in the fixed buckets above; `brightness` is the mean
    of the `brightness` of every stage's results that has one (the `stats` stage's), by
    stage name, absent without such a stage. Failed and skipped records are left out: a
    skipped `unchanged` item was not processed by this run and carries no sizes (its sizes
    are in an earlier run's report). Memory is fixed: counters, never a list of values.
    """

    ok_items: int = 0
    formats: Counter[str] = field(default_factory=Counter)
    histograms: dict[str, Histogram] = field(
        default_factory=lambda: {name: Histogram(edges) for name, edges in HISTOGRAMS.items()}
    )
    brightness: dict[str, Mean] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        if record.get("status") != "ok":
            return
        self.ok_items += 1
        name = record.get("format")
        if isinstance(name, str):
            known = name in self.formats or len(self.formats) < MAX_FORMATS
            self.formats[name if known else "other"] += 1
        for name, histogram in self.histograms.items():
            if _number(record.get(name)):
                histogram.add(record[name])
        results = record.get("results")
        for stage, values in results.items() if isinstance(results, dict) else ():
            if isinstance(values, dict) and _number(values.get("brightness")):
                self.brightness.setdefault(stage, Mean()).add(values["brightness"])

    def report(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "ok_items": self.ok_items,
            "formats": dict(sorted(self.formats.items(), key=lambda kv: (-kv[1], kv[0]))),
            **{name: histogram.report() for name, histogram in self.histograms.items()},
        }
        if self.brightness:
            summary["brightness"] = {s: m.report() for s, m in sorted(self.brightness.items())}
        return summary


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def bucket_label(edges: list[int], index: int, unit: str = "") -> str:
    """`64-128` for a bucket of `edges` (holding 64, not 128), `<64` for the first,
    `4096+` for the last; with unit `B` sizes read `4K-16K`, `256K-1M`, `64M+`."""
    text = _bytes_text if unit == "B" else str
    if index == len(edges) - 1:
        return f"{text(edges[index])}+"
    if index == 0 and edges[0] == 0:
        return f"<{text(edges[1])}"
    return f"{text(edges[index])}-{text(edges[index + 1])}"


def _bytes_text(size: int) -> str:
    for unit, scale in (("G", 1024**3), ("M", MIB), ("K", KIB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The report's `summary` as a few lines of text: formats, the histograms' non-empty
    buckets (`64-128: 3` holds widths from 64 to 127) and the mean brightness."""
    by_count = sorted(summary.get("formats", {}).items(), key=lambda kv: (-kv[1], kv[0]))
    formats = ", ".join(f"{name} {count}" for name, count in by_count)
    lines = [f"formats     {formats or '-'}"]
    for name in HISTOGRAMS:
        histogram = summary.get(name)
        if not histogram:
            continue
        edges, counts = histogram["edges"], histogram["counts"]
        unit = "B" if name == "bytes" else ""
        buckets = [
            f"{bucket_label(edges, i, unit)}: {count}" for i, count in enumerate(counts) if count
        ]
        lines.append(f"{name:<11} {', '.join(buckets) or '-'}")
    for stage, mean in summary.get("brightness", {}).items():
        lines.append(f"brightness  {mean['mean']:.1f} mean of {mean['items']} ({stage})")
    return lines


@dataclass
class RunStats:
    """Running totals over the records of one run, and the summary of its images."""

    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.perf_counter)
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    skip_reasons: Counter[str] = field(default_factory=Counter)
    stage_seconds: Counter[str] = field(default_factory=Counter)
    summary: BatchSummary = field(default_factory=BatchSummary)
    # records their tasks finished that wait for their shards (not counted yet)
    waiting: int = 0

    def add(self, records: list[Record]) -> None:
        for record in records:
            self.summary.add(record)
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
            "summary": self.summary.report(),
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
