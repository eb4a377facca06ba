"""`python -m pipeline`: run and validate image pipeline jobs.

Every error a user can cause ends in a short message and the exit code its
exception class carries (see `pipeline.errors`); `--verbose` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import EXIT_OK, ItemsFailedError, PipelineError
from pipeline.execution.runner import RunRequest, prepare, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Run image pipeline jobs described in YAML."
    )
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run_parser = commands.add_parser("run", help="run a job")
    _add_config_arguments(run_parser)
    run_parser.add_argument(
        "--backend", "-b", help="sync | threads | processes | distributed (overrides the config)"
    )
    run_parser.add_argument("--workers", "-w", type=int, help="worker threads or processes")
    run_parser.add_argument("--scheduler", help="dask scheduler address, e.g. tcp://host:8786")
    run_parser.set_defaults(handler=command_run)

    validate_parser = commands.add_parser("validate", help="check a config and report all errors")
    _add_config_arguments(validate_parser)
    validate_parser.set_defaults(handler=command_validate)
    return parser


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
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks")


def _request(args: argparse.Namespace) -> RunRequest:
    return RunRequest(
        config=args.config,
        overrides=tuple(args.overrides),
        backend=getattr(args, "backend", None),
        workers=getattr(args, "workers", None),
        scheduler=getattr(args, "scheduler", None),
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
    lines.append(f"  results: {_results(report)}, report: {report['run_dir']}/report.json")
    return "\n".join(lines)


def _results(report: dict[str, Any]) -> str:
    return f"{report['run_dir']}/results.jsonl"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PipelineError as error:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
