"""Run a job end to end: config -> plan -> lock -> manifest -> backend -> run directory.

A run holds the run directory's lock throughout, asks the manifest what is left
to do, runs only that, and records each finished partition in the manifest
after its outputs were written. Whatever happens, it appends its report to the
history; the exit code it carries follows `pipeline.errors`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from pipeline.config import load_document, validate_job
from pipeline.errors import ConfigError, PipelineError, RunIncompleteError
from pipeline.execution.backends import Backend, backend_class
from pipeline.execution.engine import OnRecords, execute, plan_partitions
from pipeline.execution.reduction import After, Reductions
from pipeline.logs import logger
from pipeline.plan import Plan, build_plan, stage_problems
from pipeline.records import Partition, Record
from pipeline.state.history import append_history, new_run_id
from pipeline.state.incremental import Incremental, Policy
from pipeline.state.lineage import sink_fingerprints
from pipeline.state.lock import RunLock
from pipeline.state.manifest import Manifest
from pipeline.state.results import (
    ResultsWriter,
    RunStats,
    iso_time,
    items_exit_code,
    write_report,
)
from pipeline.state.rundir import MANIFEST_FILE, log_file, remove_stale_temp_files, sink_folders

log = logger("run")


@dataclass(frozen=True)
class RunRequest:
    """What the user asked for: a config file plus command-line overrides."""

    config: Path
    overrides: Sequence[str] = ()
    backend: str | None = None
    workers: int | None = None
    scheduler: str | None = None
    retry_failed: bool = False
    full: bool = False

    def all_overrides(self) -> list[str]:
        """`--set` overrides, with the dedicated flags turned into the same form."""
        flags = {
            "backend.kind": self.backend,
            "backend.workers": self.workers,
            "backend.address": self.scheduler,
        }
        extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
        if self.scheduler and not self.backend:
            extra.append("backend.kind=distributed")
        return [*self.overrides, *extra]

    @property
    def policy(self) -> Policy:
        return Policy(retry_failed=self.retry_failed, full=self.full)


def prepare(request: RunRequest) -> tuple[Plan, Backend]:
    """Load, validate and plan; raise one ConfigError naming every problem."""
    doc = load_document(request.config, request.all_overrides())
    job, problems = validate_job(doc)
    cls = None
    if job is not None:
        try:
            cls = backend_class(job.backend.kind)
        except ConfigError as exc:
            problems.append(doc.problem(("backend", "kind"), str(exc)))
    if job is None or cls is None:
        raise ConfigError(problems + stage_problems(doc))
    return build_plan(job, doc), cls(job.backend)


def run(
    request: RunRequest, on_progress: Callable[[RunStats], None] | None = None
) -> dict[str, Any]:
    """Run the job; return its report (also written to the run directory and its history).

    Raises LockHeldError (touching nothing) if another run holds the lock, and
    RunIncompleteError if the run could not complete.
    """
    plan, backend = prepare(request)
    run_dir = Path(plan.config.output)
    with (
        RunLock(run_dir),
        log_file(run_dir, plan.config.log_file),
        Manifest(run_dir / MANIFEST_FILE) as manifest,
    ):
        return _run_locked(plan, backend, manifest, request.policy, on_progress)


def _run_locked(
    plan: Plan,
    backend: Backend,
    manifest: Manifest,
    policy: Policy,
    on_progress: Callable[[RunStats], None] | None,
) -> dict[str, Any]:
    run_dir = Path(plan.config.output)
    stats = RunStats()
    context = _started(plan, backend, policy, stats)
    remove_stale_temp_files(sink_folders(plan))
    try:
        reduced = _process(plan, backend, manifest, policy, context["run_id"], stats, on_progress)
    except PipelineError as error:
        _finish(run_dir, stats.report(**context), error.exit_code, error=str(error))
        raise
    except Exception as exc:  # the backend broke: the run could not complete
        error = RunIncompleteError(f"the run stopped: {type(exc).__name__}: {exc}")
        _finish(run_dir, stats.report(**context), error.exit_code, error=str(error))
        raise error from exc
    config = plan.config
    code, tolerated = items_exit_code(stats.statuses, config.max_failed, config.max_failed_fraction)
    extra = {"reductions": reduced} if reduced else {}
    return _finish(run_dir, stats.report(**context), code, failures_tolerated=tolerated, **extra)


def _started(plan: Plan, backend: Backend, policy: Policy, stats: RunStats) -> dict[str, Any]:
    """A new run's context for its reports; its start goes into the history and the log."""
    context = {
        "job": plan.config.name,
        "run_id": new_run_id(),
        "config_hash": plan.fingerprint,
        "backend": backend.describe(),
        "run_dir": plan.config.output,
        "mode": "full" if policy.full else "retry-failed" if policy.retry_failed else "incremental",
    }
    start = {"event": "start", "started_at": iso_time(stats.started), "pid": os.getpid()}
    append_history(plan.config.output, {**context, **start})
    log.info("run %(run_id)s of %(job)s started (%(mode)s, %(backend)s)", context)
    return context


def _process(
    plan: Plan,
    backend: Backend,
    manifest: Manifest,
    policy: Policy,
    run_id: str,
    stats: RunStats,
    on_progress: Callable[[RunStats], None] | None,
) -> dict[str, Any]:
    """Skip what is done, run the rest; record every item, commit finished partitions.
    Returns the results of the plan's reducing stages (see `execution.reduction`)."""
    reductions = Reductions(plan)
    reductions.first_pass(backend)  # only when a reducer acts before outputs are written
    with ResultsWriter(plan.config.output) as results:

        def add(records: list[Record]) -> None:
            results.write(records)
            stats.add(records)
            reductions.add(records)
            if on_progress:
                on_progress(stats)

        incremental = Incremental(
            manifest,
            sink_fingerprints(plan),
            {source: plan.sinks_below(source) for source in plan.sources},
            policy,
            plan.config.partition_size,
            on_skipped=add,
        )

        def on_records(records: list[Record]) -> None:
            add(records)
            incremental.commit(records, run_id)

        pending = incremental.pending(plan_partitions(plan))
        _execute_pending(plan, backend, pending, on_records, reductions.run)
    return reductions.results


def _execute_pending(
    plan: Plan,
    backend: Backend,
    pending: Iterator[Partition],
    on_records: OnRecords,
    after: After,
) -> None:
    """Start the backend only if there is work: an unchanged batch never starts one
    (reductions then run in this process)."""
    first = next(pending, None)
    if first is not None:
        execute(plan, backend, chain([first], pending), on_records, after=after)
    else:
        after(None)


def _finish(run_dir: Path, report: dict[str, Any], exit_code: int, **extra: Any) -> dict[str, Any]:
    report = {**report, **extra, "exit_code": exit_code}
    write_report(run_dir, report)
    append_history(run_dir, {**report, "event": "end"})
    counts = report["counts"]
    log.info(  # INFO: the CLI prints the error itself; this line is for the run's log file
        "run %s ended with exit %d: ok %d, failed %d, skipped %d in %.1fs%s",
        report["run_id"],
        exit_code,
        counts["ok"],
        counts["failed"],
        counts["skipped"],
        report["wall_seconds"],
        f": {report['error']}" if "error" in report else "",
    )
    return report
