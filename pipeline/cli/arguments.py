"""Arguments shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import pipeline
from pipeline.execution.runner import backend_overrides
from pipeline.plan import Plan


def add_verbosity_flags(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """`--quiet` / `--verbose`; subcommands pass no default so the top level's stands."""
    kwargs = {"default": default} if default else {"default": argparse.SUPPRESS}
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quiet",
        "-q",
        dest="verbosity",
        action="store_const",
        const="quiet",
        help="only errors and the final summary",
        **kwargs,
    )
    group.add_argument(
        "--verbose",
        "-v",
        dest="verbosity",
        action="store_const",
        const="verbose",
        help="debug logging, and tracebacks with errors",
        **kwargs,
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG, `--set key=value` (repeatable) and the verbosity flags."""
    parser.add_argument("config", type=Path, help="the job's YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key; the value is YAML, e.g. --set stages.thumb.size=[128,128]",
    )
    add_verbosity_flags(parser)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """`--backend`, `--workers`, `--scheduler`: shorthands for `--set backend.*`."""
    parser.add_argument(
        "--backend", "-b", help="sync | threads | processes | distributed (overrides the config)"
    )
    parser.add_argument("--workers", "-w", type=int, help="worker threads or processes")
    parser.add_argument("--scheduler", help="dask scheduler address, e.g. tcp://host:8786")


def overrides_from(args: argparse.Namespace) -> list[str]:
    """`--set` overrides, with `--backend`, `--workers` and `--scheduler` in the same form
    (so that a problem with one says `--set backend.kind: ...`)."""
    flags = [getattr(args, name, None) for name in ("backend", "workers", "scheduler")]
    return [*args.overrides, *backend_overrides(*flags)]


def plan_from(args: argparse.Namespace) -> Plan:
    """The plan the command line asks for: `pipeline.load` of CONFIG with the overrides."""
    return pipeline.load(args.config, overrides_from(args))
