"""`run` and `validate`: the commands that execute or check a job."""

from __future__ import annotations

import argparse
from typing import Any

import pipeline
from pipeline.cli.arguments import add_backend_arguments, add_config_arguments, plan_from
from pipeline.cli.inspect import describe_plan
from pipeline.errors import EXIT_OK, ItemsFailedError
from pipeline.execution.runner import backend_for
from pipeline.progress import Progress


def add_commands(commands: argparse._SubParsersAction) -> None:
    run_parser = commands.add_parser("run", help="run a job")
    add_config_arguments(run_parser)
    add_backend_arguments(run_parser)
    run_parser.add_argument(
        "--dry-run", "-n", action="store_true", help="print the plan and stop; write nothing"
    )
    run_parser.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="when stderr is not a terminal, log progress this often (default 10)",
    )
    run_parser.add_argument(
        "--retry-failed", action="store_true", help="retry every failed item, not only retryable"
    )
    run_parser.add_argument(
        "--full", action="store_true", help="ignore the manifest: redo every item"
    )
    run_parser.set_defaults(handler=command_run)

    validate_parser = commands.add_parser("validate", help="check a config and report all errors")
    add_config_arguments(validate_parser)
    validate_parser.set_defaults(handler=command_validate)


def command_run(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    if args.dry_run:
        print(describe_plan(args.config, plan, backend_for(plan)))
        return EXIT_OK
    progress = None
    if args.verbosity != "quiet":  # the run tells it the job's item count as it starts
        progress = Progress(plan.config.name, interval=args.progress_interval)
    try:
        report = pipeline.run(
            plan, retry_failed=args.retry_failed, full=args.full, progress=progress
        )
    finally:
        if progress:
            progress.close()
    print(summary(report))
    if report["exit_code"] != EXIT_OK:
        raise ItemsFailedError(f"{report['counts']['failed']} items failed; see {_results(report)}")
    return EXIT_OK


def command_validate(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    stages = ", ".join(f"{node.name} ({node.kind})" for node in plan.nodes)
    backend = backend_for(plan).describe()
    print(f"{args.config}: ok: {len(plan.nodes)} stages: {stages}; backend {backend}")
    return EXIT_OK


def summary(report: dict[str, Any]) -> str:
    """A few human lines about a finished run."""
    counts = report["counts"]
    lines = [
        f"{report['job']}: {report['items']} items in {report['wall_seconds']:.1f}s "
        f"({report['items_per_second']} items/s) on {report['backend']}",
        f"  ok {counts['ok']}, failed {counts['failed']}, skipped {counts['skipped']}",
    ]
    for reason, count in report["failures_by_reason"].items():
        lines.append(f"  failed: {reason} x{count}")
    for reason, count in report["skipped_by_reason"].items():
        lines.append(f"  skipped: {reason} x{count}")
    if report.get("failures_tolerated"):
        lines.append("  failures are within max_failed / max_failed_fraction: exit 0")
    lines.append(f"  results: {_results(report)}, report: {report['run_dir']}/report.json")
    return "\n".join(lines)


def _results(report: dict[str, Any]) -> str:
    return f"{report['run_dir']}/results.jsonl"
