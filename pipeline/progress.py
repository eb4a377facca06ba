"""Progress of a run, on every backend: a `Progress` given to `pipeline.run(..., progress=)`
(the CLI's `run` gives one unless `--quiet`) is told the job and its item count as the
run starts (`start`), then called after each partition.

On a terminal it is a live line, redrawn in place:

    thumbnails [########------------]  412/1000  41%  failed 3  52.1 items/s  ETA 0:11

When stderr is not a TTY (cron, CI, a pipe) it is instead a plain log line
every `interval` seconds, so logs and mails stay short. On `distributed` the
line ends with the Dask dashboard's address.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from pipeline.logs import fields, logger
from pipeline.state.results import RunStats

BAR_WIDTH = 20
REDRAW_SECONDS = 0.1


@dataclass(frozen=True)
class Snapshot:
    """The numbers a progress line shows."""

    done: int
    failed: int
    total: int | None
    rate: float
    elapsed: float

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, when the total is known."""
        if self.total is None or self.rate <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate


def snapshot(stats: RunStats, total: int | None) -> Snapshot:
    """Where the run is: its records so far, with those waiting for their shards."""
    elapsed = stats.wall_seconds
    done = stats.items + stats.waiting
    rate = done / elapsed if elapsed > 0 else 0.0
    return Snapshot(done, stats.statuses["failed"], total, rate, elapsed)


def clock(seconds: float) -> str:
    """75 -> '1:15', 3725 -> '1:02:05'."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render_line(job: str, snap: Snapshot, link: str | None = None) -> str:
    """The live line: bar (when the total is known), counts, rate, ETA, dashboard."""
    parts = [job]
    if snap.total:
        filled = min(BAR_WIDTH, BAR_WIDTH * snap.done // snap.total)
        parts.append(f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}]")
        parts.append(f"{snap.done}/{snap.total}  {100 * snap.done // snap.total}%")
    else:
        parts.append(f"{snap.done} items")
    parts.append(f"failed {snap.failed}")
    parts.append(f"{snap.rate:.1f} items/s")
    if snap.eta is not None:
        parts.append(f"ETA {clock(snap.eta)}")
    if link:
        parts.append(f"dashboard {link}")
    return "  ".join(parts)


def dask_dashboard_link() -> str | None:
    """The dashboard of the current dask.distributed client, if there is one."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client().dashboard_link
    except ValueError:  # no client
        return None


class Progress:
    """Callable given to `pipeline.run(plan, progress=...)`; call `close()` at the end.

    `job` and `total` may be left out: the run gives them to `start` before its first
    partition, e.g. `pipeline.run(plan, progress=Progress())`."""

    def __init__(
        self,
        job: str = "",
        total: int | None = None,
        stream: TextIO | None = None,
        live: bool | None = None,
        interval: float = 10.0,
        dashboard: Callable[[], str | None] = dask_dashboard_link,
    ):
        self.job = job
        self.total = total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.interval = interval
        self._dashboard = dashboard
        self._link: str | None = None
        self._last = time.monotonic()
        self._drawn = False
        self._log = logger("progress")

    def start(self, job: str, total: int | None) -> None:
        """The run begins: its job's name and item count (None when not cheap to know)."""
        self.job = self.job or job
        self.total = total
        self._last = time.monotonic()

    def __call__(self, stats: RunStats) -> None:
        now = time.monotonic()
        finished = self.total is not None and stats.items >= self.total
        wait = REDRAW_SECONDS if self.live else self.interval
        if now - self._last < wait and not (finished and self.live):
            return
        self._last = now
        snap = snapshot(stats, self.total)
        self._link = self._link or self._dashboard()
        if self.live:
            self.stream.write(f"\r{render_line(self.job, snap, self._link)}\x1b[K")
            self.stream.flush()
            self._drawn = True
        else:
            self._log.info("progress %s", self.log_fields(snap))

    def log_fields(self, snap: Snapshot) -> str:
        return fields(
            job=self.job,
            done=snap.done,
            total=snap.total,
            failed=snap.failed,
            rate=f"{snap.rate:.1f}/s",
            eta=clock(snap.eta) if snap.eta is not None else None,
            dashboard=self._link,
        )

    def close(self) -> None:
        """End the live line, so what follows starts on a fresh line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
