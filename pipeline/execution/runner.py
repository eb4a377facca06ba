"""Run a job end to end: config -> plan -> backend -> engine -> run directory."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import load_document, validate_job
from pipeline.errors import ConfigError
from pipeline.execution.backends import Backend, backend_class
from pipeline.execution.engine import execute, plan_partitions
from pipeline.execution.reduction import Reductions
from pipeline.plan import Plan, build_plan, stage_problems
from pipeline.stages.base import Record
from pipeline.state.results import ResultsWriter, RunStats, write_report


@dataclass(frozen=True)
class RunRequest:
    """What the user asked for: a config file plus command-line overrides."""

    config: Path
    overrides: Sequence[str] = ()
    backend: str | None = None
    workers: int | None = None
    scheduler: str | None = None

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
    """Run the job; return its report (also written to the run directory)."""
    plan, backend = prepare(request)
    run_dir = Path(plan.config.output)
    stats = RunStats()
    reductions = Reductions(plan)
    reductions.first_pass(backend)  # only when a reducer acts before outputs are written
    with ResultsWriter(run_dir) as results:

        def on_records(records: list[Record]) -> None:
            results.write(records)
            stats.add(records)
            reductions.add(records)
            if on_progress:
                on_progress(stats)

        execute(plan, backend, plan_partitions(plan), on_records, after=reductions.run)
    report = stats.report(
        job=plan.config.name,
        config_hash=plan.fingerprint,
        backend=backend.describe(),
        run_dir=str(run_dir),
    )
    if reductions.results:
        report["reductions"] = reductions.results
    report["exit_code"] = 0 if stats.statuses["failed"] == 0 else 1
    write_report(run_dir, report)
    return report
