"""`python -m pipeline`: the command line.

Each module here adds its subcommands with `add_commands`. Every error a user
can cause ends in one line and the exit code its exception class carries (see
`pipeline.errors`); `--verbose` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from pipeline import __version__
from pipeline.cli import run, state
from pipeline.errors import PipelineError

COMMAND_MODULES = [run, state]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Run image pipeline jobs described in YAML."
    )
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(commands)
    return parser


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
