"""`runs` and `status`: what a run directory says about past runs and about its items."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.errors import EXIT_OK, ConfigError
from pipeline.state.history import read_history, runs_table
from pipeline.state.manifest import Manifest
from pipeline.state.results import REPORT_FILE, summary_lines
from pipeline.state.rundir import HISTORY_FILE, MANIFEST_FILE


def add_commands(commands: argparse._SubParsersAction) -> None:
    runs_parser = commands.add_parser("runs", help="recent runs of a job, from its history")
    runs_parser.add_argument("run_dir", type=Path, help="the job's run directory (output)")
    runs_parser.add_argument("--last", "-n", type=int, default=20, help="how many runs (20)")
    runs_parser.set_defaults(handler=command_runs)

    status_parser = commands.add_parser(
        "status", help="items by status and reason, and the latest run's summary"
    )
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
    report = latest_report(args.run_dir)
    if report is not None:
        print("\n".join(report_summary_lines(report)))
    return EXIT_OK


def latest_report(run_dir: Path) -> dict[str, Any] | None:
    """The latest finished run's report: `report.json`, or else the history's last end
    line (outputs are never reread). None when no run has finished here."""
    try:
        return json.loads((run_dir / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if not (run_dir / HISTORY_FILE).is_file():
        return None
    ended = [run for run in read_history(run_dir) if "exit_code" in run]
    return ended[-1] if ended else None


def report_summary_lines(report: dict[str, Any]) -> list[str]:
    """`latest run RUN_ID (exit N, ended AT): K ok images`, then the summary's lines."""
    counts = report.get("counts", {})
    head = (
        f"latest run {report.get('run_id', '?')} (exit {report.get('exit_code', '?')}, "
        f"ended {report.get('finished_at', '?')}): ok {counts.get('ok', 0)}, "
        f"failed {counts.get('failed', 0)}, skipped {counts.get('skipped', 0)}"
    )
    summary = report.get("summary")
    if summary is None:
        return [head, "  no summary (a run before summaries were reported)"]
    return [head, *(f"  {line}" for line in summary_lines(summary))]
