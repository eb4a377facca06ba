"""`make bench-shards`: what big shards cost against per-partition shards, side by side.

    python -m bench.shards [--count 2000] [--rounds 3]

The standard job (download from the loopback server at 0 ms -> decode -> thumbnail
256) into a `webdataset` sink and a `parquet` sink with `include_bytes`, on the threads
and processes backends, at `partition_size` 64, with three shard sizes: (a) 64, each
shard one partition's piece, moved into place; (b) 1000; (c) 10000, more than the
corpus: one shard, assembled after the last partition. Every measurement runs in a
fresh process (`bench.measure`). Each round runs every variant, a sink and backend's
three shard sizes one after the other, in an order that turns by one each round; the
round with the most images/s is kept, and `x (a)` is the median over rounds of the
ratio to (a) in the same round. The tail is the wall (and CPU) time from
the last partition's records to the run's end; the assembly CPU (read pieces + write
shards) is measured where assembly runs in the client process: the threads backend.
The machine may be shared: a measurement waits for a quiet second, and runs again
(up to 3 times) while other processes took more than 10% of the CPU meanwhile; the
share they took is reported. Prints a table and writes `bench/results/shards.json`
and `shards.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from contextlib import ExitStack
from itertools import product
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.run import HERE, best_rounds, prepared, run_one, serve, url_file

MIB = 1024 * 1024
PARTITION_SIZE = 64
SINKS: dict[str, dict[str, Any]] = {
    "webdataset": {"kind": "webdataset"},
    "parquet": {"kind": "parquet", "include_bytes": True},
}
BACKENDS = ("threads", "processes")
SHARD_SIZES = {"(a) per-partition": PARTITION_SIZE, "(b) 1000": 1000, "(c) 10000": 10000}
BASELINE = "(a) per-partition"
QUIET_BUSY, QUIET_WAIT = 0.25, 60.0  # wait for a quiet second before a measurement
DISTURBED, TRIES = 0.10, 3  # measure again while others took more of the CPU
COLUMNS = (
    ("run", "{:<40}"),
    ("img/s", "{:>7.1f}"),
    ("CPU ms/img", "{:>10.2f}"),
    ("tail s", "{:>6.2f}"),
    ("tail CPU ms", "{:>11.0f}"),
    ("assembly CPU ms", "{:>15}"),
    ("shards", "{:>6d}"),
    ("samples/shard", "{:>13.0f}"),
    ("MiB/shard", "{:>9.2f}"),
    ("x (a) img/s", "{:>11.2f}"),
    ("x (a) CPU", "{:>9.2f}"),
    ("others %", "{:>8.0f}"),
    ("img/s by round", "{:<14}"),
)


def variant(sink: str, backend: str, shards: str) -> dict[str, Any]:
    """The measurement spec of one sink, backend and shard size."""
    options = {**SINKS[sink], "path": "shards", "shard_size": SHARD_SIZES[shards]}
    return {
        "label": f"{sink} {backend} {shards}",
        "group": f"{sink} {backend}",
        "shards": shards,
        "kind": "pipeline",
        "backend": backend,
        "latency": "0ms",
        "partition_size": PARTITION_SIZE,
        "sink": options,
    }


def measurements(rounds: int) -> list[dict[str, Any]]:
    """Every variant once per round; a group's shard sizes next to each other, their
    order turned by one each round (so no size always runs first)."""
    names = list(SHARD_SIZES)
    specs = []
    for round_ in range(rounds):
        turned = names[round_ % len(names) :] + names[: round_ % len(names)]
        for sink, backend in product(SINKS, BACKENDS):
            specs += [{**variant(sink, backend, shards), "round": round_} for shards in turned]
    return specs


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process), so far."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def wait_quiet() -> float:
    """Wait, at most QUIET_WAIT seconds, for a second in which the machine is at most
    QUIET_BUSY busy (the machine is shared); returns that second's busy share."""
    deadline = time.monotonic() + QUIET_WAIT
    while True:
        busy = psutil.cpu_percent(interval=1.0) / 100
        if busy <= QUIET_BUSY or time.monotonic() > deadline:
            return busy


def measured(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement (`run_one`), with the share of the machine's CPU that others took
    meanwhile (approximate: the measurement process's start-up counts as others')."""
    busy_before = wait_quiet()
    started, busy = time.perf_counter(), machine_busy_seconds()
    row = run_one(spec)
    others = machine_busy_seconds() - busy - row["cpu"] - row["server_cpu"]
    share = others / ((time.perf_counter() - started) * (os.cpu_count() or 1))
    return {**row, "busy_before": busy_before, "others_share": max(share, 0.0)}


def least_disturbed(spec: dict[str, Any]) -> dict[str, Any]:
    """`measured(spec)`, again while others took more than DISTURBED of the CPU, up to
    TRIES times in all: the attempt others took the least from."""
    attempts = []
    while len(attempts) < TRIES:
        attempts.append(measured(spec))
        if attempts[-1]["others_share"] <= DISTURBED:
            break
    best = min(attempts, key=lambda row: row["others_share"])
    return {**best, "attempts": len(attempts)}


def measure_all(specs: list[dict[str, Any]], common: dict[str, Any]) -> list[dict[str, Any]]:
    """Run each spec in a fresh process, one after the other; print each rate."""
    rows = []
    for number, spec in enumerate(specs, 1):
        row = least_disturbed({**spec, **common})
        if row.get("failed"):
            raise SystemExit(f"{row['label']}: {row['failed']} items failed: {row['failures']}")
        rows.append(row)
        rate = row["images"] / row["wall"]
        print(
            f"  [{number}/{len(specs)}] {row['label']:<40} {rate:8.1f} img/s, "
            f"others {100 * row['others_share']:3.0f}% of the CPU",
            flush=True,
        )
    return rows


def derive(kept: list[dict[str, Any]], every: list[dict[str, Any]]) -> None:
    """Add rates, shard sizes, the rounds' figures and the ratios to (a), in place."""
    for row in kept:
        images = max(row["images"], 1)
        row["rate"] = row["images"] / row["wall"]
        row["cpu_per_image"] = row["cpu"] / images
        row["samples_per_shard"] = row["images"] / max(row["files"], 1)
        row["bytes_per_shard"] = row["file_bytes"] / max(row["files"], 1)
        rounds = [other for other in every if other["label"] == row["label"]]
        row["round_cpu_per_image"] = [other["cpu"] / images for other in rounds]
        row["round_tails"] = [other["tail"] for other in rounds]
        row["round_tail_cpu"] = [other["tail_cpu"] for other in rounds]
        row["round_others_share"] = [other["others_share"] for other in rounds]
    for row in kept:
        row["rate_vs_a"], row["cpu_vs_a"] = paired_ratios(row, every)


def paired_ratios(row: dict[str, Any], every: list[dict[str, Any]]) -> tuple[float, float]:
    """The medians over rounds of a variant's images/s and CPU per image divided by (a)'s
    in the same round (measured next to it, so slow drift cancels out)."""
    rounds: dict[int, dict[str, dict[str, Any]]] = {}
    for other in every:
        if other["group"] == row["group"]:
            rounds.setdefault(other["round"], {})[other["shards"]] = other
    pairs = [(found[row["shards"]], found[BASELINE]) for found in rounds.values()]
    rates = [
        (mine["images"] / mine["wall"]) / (base["images"] / base["wall"]) for mine, base in pairs
    ]
    cpus = [(mine["cpu"] / mine["images"]) / (base["cpu"] / base["images"]) for mine, base in pairs]
    return statistics.median(rates), statistics.median(cpus)


def cells(row: dict[str, Any]) -> list[Any]:
    """A row's values in COLUMNS order."""
    return [
        row["label"],
        row["rate"],
        1000 * row["cpu_per_image"],
        row["tail"] or 0.0,
        1000 * (row["tail_cpu"] or 0.0),
        assembly(row),
        row["files"],
        row["samples_per_shard"],
        row["bytes_per_shard"] / MIB,
        row["rate_vs_a"],
        row["cpu_vs_a"],
        100 * row["others_share"],
        "/".join(f"{rate:.0f}" for rate in row["round_rates"]),
    ]


def assembly(row: dict[str, Any]) -> str:
    """CPU ms assembling shards, as reading pieces + the rest (writing shards and their
    summaries); known only where it runs in the client (threads): else `-`."""
    if not row["assemble_calls"]:
        return "-"
    read = 1000 * (row["read_pieces_cpu"] or 0.0)
    return f"{read:.0f} + {1000 * row['assemble_cpu'] - read:.0f}"


def ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows by sink, backend, then shard size (a), (b), (c)."""
    return sorted(rows, key=lambda row: (row["group"], list(SHARD_SIZES).index(row["shards"])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="images in the corpus")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    workers, scratch, files = prepared(args.count)
    with ExitStack() as stack:
        urls = url_file(scratch, "0ms", serve(stack, files, 0.0), files)
        common = {"workers": workers, "scratch": str(scratch), "urls": str(urls)}
        every = measure_all(measurements(args.rounds), common)
    kept = ordered(best_rounds(every))
    derive(kept, every)
    return finish(args, kept, workers, time.perf_counter() - started)


def finish(args: argparse.Namespace, rows: list[dict[str, Any]], workers: int, wall: float) -> int:
    """Print the table; write it and the rows to `shards.md` and `shards.json`."""
    text = report.table(rows, COLUMNS, cells)
    print(text)
    meta = {
        "count": args.count,
        "rounds": args.rounds,
        "partition_size": PARTITION_SIZE,
        "workers": workers,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "bench_seconds": wall,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    report.write_json(args.results / "shards.json", meta, rows)
    (args.results / "shards.md").write_text(text + "\n")
    print(f"wrote {args.results}/shards.json, shards.md ({wall:.0f}s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
