"""`compact`: merge the small shards that incremental runs left into full ones."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.arguments import add_verbosity_flags
from pipeline.errors import EXIT_OK
from pipeline.execution.compaction import compact


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "compact",
        help="merge the small shards of a run directory's sharded sinks into full ones",
        description="Merge the small shards that incremental runs left (fewer samples than "
        "shard_size) into full ones, and drop the samples a later run redid; the manifest "
        "and results.jsonl then point at the new shards. Needs no config; holds the lock.",
    )
    parser.add_argument("run_dir", type=Path, help="the job's run directory (output)")
    parser.add_argument("--sink", metavar="NAME", help="only this sharded sink")
    add_verbosity_flags(parser)
    parser.set_defaults(handler=command_compact)


def command_compact(args: argparse.Namespace) -> int:
    for done in compact(args.run_dir, args.sink):
        print(done.summary())
    return EXIT_OK
