"""A data-parallel batch pipeline for images: a YAML stage DAG run on Dask.

The Python API, for notebooks and other tools (the command line is a thin layer over it):

    import pipeline

    plan = pipeline.load("configs/thumbnails.yaml", overrides=["output=/tmp/thumbs"])
    report = pipeline.run(plan, backend="threads", workers=4)
    print(report["counts"])          # {'ok': 24, 'failed': 0, 'skipped': 0}

`load(config, overrides=())` reads a YAML file, or takes a dict of the same keys
(`{"name": ..., "output": ..., "stages": {...}}`), applies `key=value` overrides
(values are YAML, as with `--set`), and returns the validated plan. Every problem
found is in one `pipeline.errors.ConfigError`: a file's say `file:line: key`, a
dict's `<dict>: key`.

`run(plan_or_config, backend=None, *, workers=None, scheduler=None,
retry_failed=False, full=False, progress=None)` runs a plan (or loads a path or
dict first) and returns its report: the dict written to the run directory as
`report.json`. The arguments are the command line's: `backend`, `workers` and
`scheduler` replace `backend.kind`, `backend.workers` and `backend.address`;
`retry_failed` and `full` trust less of the manifest; `progress(stats)` is called
after every partition (a `pipeline.progress.Progress`, or any callable taking a
`RunStats`). A run whose items failed returns its report with `exit_code` 1; it
raises `LockHeldError` if another run holds the run directory,
`RunIncompleteError` if it could not complete, and `ConfigError` for a bad config.
Log lines (the plan's warnings among them) go to the `pipeline` logger;
`pipeline.logs.configure()` shows them on stderr as the command line does.

`import pipeline` stays cheap: these functions import the rest when called.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing`'s: importing it costs more than the rest of this module
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from pipeline.execution.runner import ConfigSource, OnProgress
    from pipeline.plan import Plan

__version__ = "0.1.0"
__all__ = ["__version__", "load", "run"]


def load(config: ConfigSource, overrides: Iterable[str] = ()) -> Plan:
    """The validated plan of a config file or dict, with `key=value` overrides applied."""
    from pipeline.execution.runner import load_plan

    return load_plan(config, overrides)


def run(
    job: Plan | ConfigSource,
    backend: str | None = None,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    retry_failed: bool = False,
    full: bool = False,
    progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Run a plan (or a config file or dict, loaded first); return its report."""
    from pipeline.execution import runner
    from pipeline.plan import Plan
    from pipeline.state.incremental import Policy

    plan = job if isinstance(job, Plan) else runner.load_plan(job)
    plan = runner.with_backend(plan, backend, workers, scheduler)
    policy = Policy(retry_failed=retry_failed, full=full)
    return runner.run(plan, progress, policy=policy)
