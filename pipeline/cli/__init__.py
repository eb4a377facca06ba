"""`python -m pipeline` (or the `pipeline` console script): the command line.

Each module here adds its subcommands with `add_commands`. Every error a user
can cause ends in one line and the exit code its exception class carries (see
`pipeline.errors`); `--verbose` adds the traceback. `--quiet` and `--verbose`
are accepted before or after the subcommand.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from pipeline import __version__, logs
from pipeline.cli import compact, inspect, run, state
from pipeline.cli.arguments import add_verbosity_flags
from pipeline.errors import PipelineError, RunIncompleteError

COMMAND_MODULES = [run, inspect, state, compact]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description="Run image pipeline jobs described in YAML."
    )
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    add_verbosity_flags(parser, default="normal")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.verbosity)
    try:
        return args.handler(args)
    except PipelineError as error:
        return _fail(args, error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # e.g. a run directory that cannot be created
        return _fail(args, RunIncompleteError(f"{error.strerror or error}: {error.filename}"))
    except Exception as error:  # a bug: still one line and a documented code
        bug = RunIncompleteError(
            f"internal error: {type(error).__name__}: {error} (--verbose shows the traceback)"
        )
        return _fail(args, bug)


def _fail(args: argparse.Namespace, error: PipelineError) -> int:
    if args.verbosity == "verbose":
        traceback.print_exc()
    print(f"error: {error}", file=sys.stderr)
    return error.exit_code
