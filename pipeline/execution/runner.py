"""Run a job end to end: config -> plan -> lock -> manifest -> backend -> run directory.

`load_plan` turns a config file (or a mapping) into a validated plan; `run` runs a
plan. A run holds the run directory's lock throughout, logs what it is about to do
(with the plan's warnings), asks the manifest what is left to do, runs only that,
and records each finished partition in the manifest after its outputs were
written. Whatever happens, it appends its report to the history; the exit code it
carries follows `pipeline.errors`. `pipeline.load` and `pipeline.run` are the
public face of this module; the command line is a thin layer over them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import (
    BackendConfig,
    ConfigDocument,
    load_document,
    mapping_document,
    validate_job,
)
from pipeline.config.model import validate_model
from pipeline.errors import ConfigError, PipelineError, RunIncompleteError
from pipeline.execution.assembly import ShardAssembler, remove_garbage
from pipeline.execution.backends import Backend, DistributedBackend, backend_class
from pipeline.execution.engine import OnRecords, SideTasks, execute, plan_partitions
from pipeline.execution.reduction import After, Reductions
from pipeline.logs import fields, logger
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
from pipeline.state.rundir import MANIFEST_FILE, log_file, remove_stale_temp_files

log = logger("run")

OnProgress = Callable[[RunStats], None]
ConfigSource = str | os.PathLike[str] | Mapping[str, Any]

LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1"}
# The backend settings the command line and `pipeline.run` have their own arguments for.
BACKEND_FLAGS = {"backend": "kind", "workers": "workers", "scheduler": "address"}


def load_plan(source: ConfigSource, overrides: Iterable[str] = ()) -> Plan:
    """A config file, or a mapping of the same keys, with `key=value` overrides
    applied, as a validated plan; one ConfigError naming every problem otherwise."""
    return plan_of(config_document(source, overrides))


def config_document(source: ConfigSource, overrides: Iterable[str] = ()) -> ConfigDocument:
    """`source` parsed, `${VAR}` interpolated, overrides applied. A file's problems say
    `file:line: key`; a mapping has no lines, so its problems say `<dict>: key`."""
    if isinstance(source, Mapping):
        return mapping_document(source, overrides)
    return load_document(Path(source), overrides)


def plan_of(doc: ConfigDocument) -> Plan:
    """Validate the job (its backend's kind among it) and its stages; plan it."""
    job, problems = validate_job(doc)
    if job is None or problems:
        raise ConfigError(problems + stage_problems(doc))
    return build_plan(job, doc)


def backend_overrides(
    backend: str | None = None, workers: int | None = None, scheduler: str | None = None
) -> list[str]:
    """`--backend`, `--workers` and `--scheduler` as the `backend.*=value` overrides they
    stand for; a scheduler alone means the distributed backend."""
    values = {"backend": backend, "workers": workers, "scheduler": scheduler}
    found = [f"backend.{BACKEND_FLAGS[k]}={v}" for k, v in values.items() if v is not None]
    if scheduler and not backend:
        found.append("backend.kind=distributed")
    return found


def with_backend(
    plan: Plan,
    backend: str | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
) -> Plan:
    """`plan` on another backend: the arguments that are not None replace its
    `backend.kind`, `backend.workers` and `backend.address` (a scheduler alone means
    the distributed backend). A problem names the argument: `run(workers=0): ...`."""
    given = {"backend": backend, "workers": workers, "scheduler": scheduler}
    given = {name: value for name, value in given.items() if value is not None}
    if not given:
        return plan
    if scheduler and not backend:
        given["backend"] = "distributed"
    doc = ConfigDocument(path=Path("run()"), data={})
    settings = plan.config.backend.model_dump(exclude_defaults=True)
    for name, value in given.items():
        settings[BACKEND_FLAGS[name]] = value
        doc.overrides[("backend", BACKEND_FLAGS[name])] = f"run({name}={value!r})"
    config, problems = validate_model(doc, BackendConfig, settings, ("backend",))
    if config is None or problems:
        raise ConfigError(problems)
    return replace(plan, config=plan.config.model_copy(update={"backend": config}))


def backend_for(plan: Plan) -> Backend:
    """The backend the plan's config asks for (not started yet)."""
    return backend_class(plan.config.backend.kind)(plan.config.backend)


def plan_warnings(plan: Plan, backend: Backend, total: int | None) -> list[str]:
    """Things that are valid but probably not what the user wants (`total`: the item
    count, when known). `pipeline plan` shows them; a run logs them as it starts."""
    found = []
    output = plan.config.output
    if isinstance(backend, DistributedBackend) and backend.address:
        host = urlsplit(backend.address if "://" in backend.address else f"//{backend.address}")
        if host.hostname not in LOCAL_HOSTS and urlsplit(output).scheme in ("", "file"):
            found.append(
                f"output {output} is a local path but the scheduler is {backend.address}: "
                "each worker writes to its own disk; use a shared path or URL"
            )
    for node in plan.nodes:
        if not plan.sinks_below(node.name):
            found.append(
                f"stage {node.name} feeds no sink: it will not run "
                "(add a sink below it, or remove it)"
            )
    found += unchecked_hash_columns(plan)
    if total == 0:
        found.append("the sources hold no items: the run will do nothing")
    elif total is not None:
        partitions = -(-total // plan.config.partition_size)
        if partitions < backend.workers:
            found.append(
                f"{partitions} partition(s) for {backend.workers} workers: some stay idle; "
                "lower partition_size"
            )
    return found


def unchecked_hash_columns(plan: Plan) -> list[str]:
    """A `verify_hash` column that a source above it does not carry into `fields`:
    its items would be checked against nothing."""
    found = []
    for node in plan.nodes:
        column = getattr(node.options, "verify_hash", None)
        if column is None:
            continue
        for source in plan.upstream([node.name]).nodes:
            carried = getattr(source.options, "fields", None)
            if source.role == "source" and carried is not None and column not in carried:
                found.append(
                    f"stage {node.name} verifies hashes from the column '{column}', which "
                    f"{source.name} does not carry: add it to {source.name}'s fields"
                )
    return found


@dataclass(frozen=True)
class RunRequest:
    """A config file plus command-line style overrides and flags: what `run` accepted
    before it took a plan, still accepted (`prepare` turns it into a plan and backend)."""

    config: Path
    overrides: Sequence[str] = ()
    backend: str | None = None
    workers: int | None = None
    scheduler: str | None = None
    retry_failed: bool = False
    full: bool = False

    def all_overrides(self) -> list[str]:
        """`--set` overrides, with the dedicated flags turned into the same form."""
        return [*self.overrides, *backend_overrides(self.backend, self.workers, self.scheduler)]

    @property
    def policy(self) -> Policy:
        return Policy(retry_failed=self.retry_failed, full=self.full)


def prepare(request: RunRequest) -> tuple[Plan, Backend]:
    """Load, validate and plan; raise one ConfigError naming every problem."""
    plan = load_plan(request.config, request.all_overrides())
    return plan, backend_for(plan)


def run(
    job: Plan | RunRequest,
    on_progress: OnProgress | None = None,
    *,
    backend: Backend | None = None,
    policy: Policy | None = None,
) -> dict[str, Any]:
    """Run a plan (on `backend`, default the one its config names); return its report,
    also written to the run directory and its history.

    `on_progress(stats)` is called after every partition; if it has a `start(job,
    total)` method, that is called once first with the job's name and its item count
    (None when not cheap to know). Raises LockHeldError (touching nothing) if another
    run holds the lock, and RunIncompleteError if the run could not complete; a run
    whose items failed returns its report, with exit code 1 when over the tolerance.
    """
    if isinstance(job, RunRequest):
        policy = policy or job.policy
        job = load_plan(job.config, job.all_overrides())
    plan = job
    backend = backend or backend_for(plan)
    run_dir = Path(plan.config.output)
    with (
        RunLock(run_dir),
        log_file(run_dir, plan.config.log_file),
        Manifest(run_dir / MANIFEST_FILE) as manifest,
    ):
        _announce(plan, backend, on_progress)  # counting items is not the run's wall time
        return RunContext(plan, backend, manifest, policy or Policy(), on_progress).run()


def _announce(plan: Plan, backend: Backend, on_progress: OnProgress | None) -> None:
    """Log the job, its item count and the plan's warnings; start the progress display."""
    total = plan.count_items()
    logger().info("run %s", fields(job=plan.config.name, items=total, backend=backend.describe()))
    for warning in plan_warnings(plan, backend, total):
        logger().warning(warning)
    start = getattr(on_progress, "start", None)
    if callable(start):
        start(plan.config.name, total)


@dataclass
class _Recorder:
    """Where a run's records go: results.jsonl, the totals, the reducers and the progress
    display (`show`), then the manifest (`commit`). A sharded sink's records arrive before
    their shards are assembled (`arrived`: counted as waiting) and are committed once every
    shard they are in is (`released`)."""

    results: ResultsWriter
    stats: RunStats
    reductions: Reductions
    on_progress: OnProgress | None
    incremental: Incremental = field(init=False)
    shards: ShardAssembler = field(init=False)

    def show(self, records: list[Record]) -> None:
        self.results.write(records)
        self.stats.add(records)
        self.reductions.add(records)
        self._progress()

    def commit(self, records: list[Record]) -> None:
        self.show(records)
        self.incremental.commit(records)

    def arrived(self, records: list[Record]) -> None:
        self.stats.waiting += len(records)  # shown as progress meanwhile
        self.shards.add(records)
        self._progress()

    def released(self, records: list[Record]) -> None:
        self.stats.waiting -= len(records)
        self.commit(records)

    def _progress(self) -> None:
        if self.on_progress:
            self.on_progress(self.stats)


@dataclass
class RunContext:
    """One run of a plan, inside its run directory's lock: what it runs, where, how
    much of the manifest it trusts, and its running totals."""

    plan: Plan
    backend: Backend
    manifest: Manifest
    policy: Policy
    on_progress: OnProgress | None = None
    run_id: str = field(default_factory=new_run_id)
    stats: RunStats = field(default_factory=RunStats)

    @property
    def run_dir(self) -> Path:
        return Path(self.plan.config.output)

    @property
    def mode(self) -> str:
        if self.policy.full:
            return "full"
        return "retry-failed" if self.policy.retry_failed else "incremental"

    def run(self) -> dict[str, Any]:
        """Start, process, finish: the report, also when the run stops half-way."""
        context = self._started()
        remove_stale_temp_files(self.plan.sink_folders())
        remove_garbage(self.plan, self.manifest)
        try:
            reduced = self.process()
        except PipelineError as error:
            self._finish(context, error.exit_code, error=str(error))
            raise
        except Exception as exc:  # the backend broke: the run could not complete
            stopped = RunIncompleteError(f"the run stopped: {type(exc).__name__}: {exc}")
            self._finish(context, stopped.exit_code, error=str(stopped))
            raise stopped from exc
        # the backend is down: a temp file left now is a dead worker's (killed mid-write),
        # a shard not committed one that failed
        remove_stale_temp_files(self.plan.sink_folders())
        remove_garbage(self.plan, self.manifest)
        config = self.plan.config
        statuses = self.stats.statuses
        code, tolerated = items_exit_code(statuses, config.max_failed, config.max_failed_fraction)
        extra = {"reductions": reduced} if reduced else {}
        return self._finish(context, code, failures_tolerated=tolerated, **extra)

    def _started(self) -> dict[str, Any]:
        """This run's context for its reports; its start goes into the history and the log."""
        context = {
            "job": self.plan.config.name,
            "run_id": self.run_id,
            "config_hash": self.plan.fingerprint,
            "backend": self.backend.describe(),
            "run_dir": self.plan.config.output,
            "mode": self.mode,
        }
        start = {"event": "start", "started_at": iso_time(self.stats.started), "pid": os.getpid()}
        append_history(self.run_dir, {**context, **start})
        log.info("run %(run_id)s of %(job)s started (%(mode)s, %(backend)s)", context)
        return context

    def process(self) -> dict[str, Any]:
        """Skip what is done, run the rest; record every item, commit finished partitions.
        Returns the results of the plan's reducing stages (see `execution.reduction`)."""
        # indexed reducers keep values in the manifest; --full computes every one again
        reductions = Reductions(self.plan, self.manifest, trust_index=not self.policy.full)
        plan = reductions.first_pass(self.backend)  # when a reducer acts before any write
        with ResultsWriter(plan.config.output) as results:
            records = _Recorder(results, self.stats, reductions, self.on_progress)
            records.incremental = Incremental(
                self.manifest,
                sink_fingerprints(plan),
                {source: plan.sinks_below(source) for source in plan.sources},
                self.policy,
                plan.config.partition_size,
                on_skipped=records.show,
                run_id=self.run_id,
            )
            # a sharded sink's records wait for their shards (`execution.assembly`)
            shards = ShardAssembler(plan, self.manifest, self.run_id, release=records.released)
            records.shards = shards
            pending = records.incremental.pending(plan_partitions(plan))
            if shards:
                pending = shards.track(pending)
            on_records = records.arrived if shards else records.commit
            self._execute_pending(plan, pending, on_records, reductions.run, shards or None)
        return reductions.results

    def _execute_pending(
        self,
        plan: Plan,
        pending: Iterator[Partition],
        on_records: OnRecords,
        after: After,
        side: SideTasks | None = None,
    ) -> None:
        """Start the backend only if there is work: an unchanged batch never starts one
        (reductions then run in this process)."""
        first = next(pending, None)
        if first is not None:
            parts = chain([first], pending)
            execute(plan, self.backend, parts, on_records, after=after, side=side)
        else:
            after(None)

    def _finish(self, context: dict[str, Any], exit_code: int, **extra: Any) -> dict[str, Any]:
        report = {**self.stats.report(**context), **extra, "exit_code": exit_code}
        write_report(self.run_dir, report)
        append_history(self.run_dir, {**report, "event": "end"})
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
