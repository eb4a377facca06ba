"""`run` and `validate`: the commands that execute or check a job."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.errors import EXIT_OK, ItemsFailedError
from pipeline.execution.runner import RunRequest, prepare, run


def add_commands(commands: argparse._SubParsersAction) -> None:
    run_parser = commands.add_parser("run", help="run a job")
    _add_config_arguments(run_parser)
    run_parser.add_argument(
        "--backend", "-b", help="sync | threads | processes | distributed (overrides the config)"
    )
    run_parser.add_argument("--workers", "-w", type=int, help="worker threads or processes")
    run_parser.add_argument("--scheduler", help="dask scheduler address, e.g. tcp://host:8786")
    run_parser.add_argument(
        "--retry-failed", action="store_true", help="retry every failed item, not only retryable"
    )
    run_parser.add_argument(
        "--full", action="store_true", help="ignore the manifest: redo every item"
    )
    run_parser.set_defaults(handler=command_run)

    validate_parser = commands.add_parser("validate", help="check a config and report all errors")
    _add_config_arguments(validate_parser)
    validate_parser.set_defaults(handler=command_validate)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the job's YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set stages.thumb.size=[128,128] (repeatable)",
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )


def _request(args: argparse.Namespace) -> RunRequest:
    return RunRequest(
        config=args.config,
        overrides=tuple(args.overrides),
        backend=getattr(args, "backend", None),
        workers=getattr(args, "workers", None),
        scheduler=getattr(args, "scheduler", None),
        retry_failed=getattr(args, "retry_failed", False),
        full=getattr(args, "full", False),
    )


def command_run(args: argparse.Namespace) -> int:
    report = run(_request(args))
    print(summary(report))
    if report["exit_code"] != EXIT_OK:
        raise ItemsFailedError(f"{report['counts']['failed']} items failed; see {_results(report)}")
    return EXIT_OK


def command_validate(args: argparse.Namespace) -> int:
    plan, backend = prepare(_request(args))
    stages = ", ".join(f"{node.name} ({node.kind})" for node in plan.nodes)
    print(f"{args.config}: ok: {len(plan.nodes)} stages: {stages}; backend {backend.describe()}")
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
