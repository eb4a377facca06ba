"""Where the pipeline's CPU goes (issue 16): each stage's share of CPU per image.

`python -m bench.stage_cpu [--count N] [--backend threads]` runs the bench's standard job
(`bench.measure.pipeline_job`: download, decode, 256x256 thumbnail, JPEG q85 files) in
this process on the `threads` or `sync` backend, against the bench's loopback server in
a child process (its CPU is not counted), with every stage's `run_one` timed by the CPU
clock of the thread that runs it (`time.thread_time`). What no stage spent is the
client's: start-up, the engine, results, the manifest, progress. Prints CPU ms per image
for each, and writes `bench/results/stage_cpu-<backend>.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.client_lever import child_server
from bench.corpus import ensure_corpus
from bench.measure import pipeline_job
from bench.run import HERE
from pipeline.stages.base import Step

RESULTS = HERE / "results"


@contextlib.contextmanager
def stage_clock() -> Iterator[Counter[str]]:
    """CPU seconds per stage name, from every `Step.run_one` while in the block."""
    spent: Counter[str] = Counter()
    lock = threading.Lock()
    original = Step.run_one

    def timed(self: Step[Any], item: Any) -> Any:
        started = time.thread_time()
        try:
            return original(self, item)
        finally:
            with lock:
                spent[self.name] += time.thread_time() - started

    Step.run_one = timed  # type: ignore[method-assign]
    try:
        yield spent
    finally:
        Step.run_one = original  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="corpus images")
    parser.add_argument("--backend", choices=["threads", "sync"], default="threads")
    parser.add_argument("--out", type=Path, help="markdown results file")
    args = parser.parse_args(argv)
    files = ensure_corpus(HERE / "corpus", args.count, 2)
    root = HERE / "corpus" / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    with child_server(files) as base, tempfile.TemporaryDirectory(dir=root) as folder:
        urls = Path(folder) / "urls.txt"
        urls.write_text("".join(f"{base}{path.name}\n" for path in files))
        spec = {"backend": args.backend, "urls": str(urls)}
        with stage_clock() as spent:
            cpu, wall = time.process_time(), time.perf_counter()
            result = pipeline_job(spec, Path(folder))
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    images = result["images"]
    rows = [*spent.most_common(), ("client (no stage)", cpu - sum(spent.values()))]
    lines = [
        f"{images} images on {args.backend}, {wall:.1f} s, {1000 * cpu / images:.2f} ms of "
        "CPU per image in all",
        "",
        "| where | CPU ms/img | share |",
        "|---|---|---|",
        *(
            f"| {name} | {1000 * seconds / images:.3f} | {seconds / cpu:.0%} |"
            for name, seconds in rows
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or RESULTS / f"stage_cpu-{args.backend}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
