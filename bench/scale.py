"""`make bench-scale`: does the rate hold for long inputs, and does a huge list start fast?

    python -m bench.scale [--items 100000] [--lines 1000000]

Reuses the corpus (the first `--count` images) with distinct query strings, so
every line is a distinct item (its own key and output file) served by the same
loopback server. Three measurements, each in a fresh process, same config:
the `--count`-item rate, the `--items`-item rate and the client's peak RSS, and
the time until the first records of a `--lines`-line URL list come back.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.corpus import ensure_corpus
from bench.run import HERE, run_one, scratch_folder, serve
from bench.server import StaticServer
from pipeline.execution.backends import default_workers

MIB = 1024 * 1024


def query_urls(path: Path, server: StaticServer, files: list[Path], lines: int) -> Path:
    """`lines` distinct URLs cycling over the corpus (`?n=<line>`), written lazily."""
    with path.open("w") as out:
        for line in range(lines):
            out.write(server.url(f"/img/{files[line % len(files)].name}?n={line}") + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="images in the corpus")
    parser.add_argument("--items", type=int, default=100_000, help="items in the long run")
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines in the huge list")
    parser.add_argument("--backend", default="processes")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every run")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    workers = default_workers()
    scratch = scratch_folder()
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    files = ensure_corpus(HERE / "corpus", args.count, workers)
    rows: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        server = serve(stack, files, 0.0)
        base = {"kind": "pipeline", "backend": args.backend, "set": args.set}
        base |= {"workers": workers, "scratch": str(scratch)}
        started = time.perf_counter()
        lists = {
            "short": query_urls(scratch / "scale-short.txt", server, files, args.count),
            "long": query_urls(scratch / "scale-long.txt", server, files, args.items),
            "huge": query_urls(scratch / "scale-huge.txt", server, files, args.lines),
        }
        print(f"url lists written in {time.perf_counter() - started:.1f}s", flush=True)
        for name, extra in (("short", {}), ("long", {}), ("huge", {"stop_after_first": True})):
            rows[name] = run_one({**base, **extra, "label": name, "urls": str(lists[name])})
            print(f"  {name}: {summary(rows[name])}", flush=True)
    return finish(args, rows)


def summary(row: dict[str, Any]) -> str:
    rate = row["images"] / row["wall"]
    return (
        f"{row['images']} images, {rate:.1f} img/s (steady {row.get('steady_rate') or 0:.1f}), "
        f"first records after {row['first_record']:.2f}s, client peak RSS "
        f"{row['client_rss'] / MIB:.0f} MiB, tree {row['tree_rss'] / MIB:.0f} MiB"
    )


def finish(args: argparse.Namespace, rows: dict[str, dict[str, Any]]) -> int:
    short, long, huge = rows["short"], rows["long"], rows["huge"]
    ratio = (long["images"] / long["wall"]) / (short["images"] / short["wall"])
    steady = (long.get("steady_rate") or 0) / (short.get("steady_rate") or 1)
    verdict = {
        "long_vs_short_rate": ratio,
        "long_vs_short_steady_rate": steady,
        "long_client_rss_mib": long["client_rss"] / MIB,
        "huge_list_first_record_s": huge["first_record"],
        "targets": {
            "rate >= 0.95x": ratio >= 0.95,
            "client RSS < 1 GiB": long["client_rss"] < 1024 * MIB,
            "first records < 10 s": huge["first_record"] < 10,
        },
    }
    print(json.dumps(verdict, indent=2))
    args.results.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}
    path = args.results / "scale.json"
    path.write_text(json.dumps({**meta, **verdict, "rows": rows}, indent=2, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
