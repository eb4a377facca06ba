"""`runs` and `status`: what a run directory says about past runs and about its items."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.errors import EXIT_OK, ConfigError
from pipeline.state.history import read_history, runs_table
from pipeline.state.manifest import Manifest
from pipeline.state.rundir import HISTORY_FILE, MANIFEST_FILE


def add_commands(commands: argparse._SubParsersAction) -> None:
    runs_parser = commands.add_parser("runs", help="recent runs of a job, from its history")
    runs_parser.add_argument("run_dir", type=Path, help="the job's run directory (output)")
    runs_parser.add_argument("--last", "-n", type=int, default=20, help="how many runs (20)")
    runs_parser.set_defaults(handler=command_runs)

    status_parser = commands.add_parser("status", help="items by status and reason, now")
    status_parser.add_argument("run_dir", type=Path, help="the job's run directory (output)")
    status_parser.set_defaults(handler=command_status)


def command_runs(args: argparse.Namespace) -> int:
    if not (args.run_dir / HISTORY_FILE).is_file():
        raise ConfigError(f"no {HISTORY_FILE} in {args.run_dir}: has a run used this directory?")
    print(runs_table(read_history(args.run_dir)[-args.last :]))
    return EXIT_OK


def command_status(args: argparse.Namespace) -> int:
    with Manifest(args.run_dir / MANIFEST_FILE, read_only=True) as manifest:
        totals = manifest.totals()
        sinks = manifest.sink_totals()
    print(f"{args.run_dir}: {sum(totals.values())} items")
    for (status, reason), count in sorted(totals.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"  {status:<7} {reason or '':<20} {count}")
    for sink, count in sorted(sinks.items()):
        print(f"  done for sink {sink}: {count}")
    return EXIT_OK
