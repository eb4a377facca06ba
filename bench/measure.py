"""One measurement, run in a fresh process: `python -m bench.measure SPEC_JSON`.

A fresh process per measurement keeps caches, pools and memory from one run
out of the next. It prints one JSON line: wall seconds, images done, CPU
seconds of this process and its children, the client's peak RSS and the peak
RSS of its whole process tree (sampled). A pipeline spec may name its sink (`sink`:
the write stage's options; the files it wrote are counted) and gives the tail: the
wall and CPU seconds from its last partition's records to the run's end (with a
sharded sink: the last shards' assembly), and the time spent assembling shards where
that runs in this process (the threads backend). An img2dataset spec runs img2dataset
as a child process (`bench.img2dataset_row`): its whole tree's CPU is counted once it
is reaped, and `images` is the .jpg files it wrote.
"""

from __future__ import annotations

import contextlib
import functools
import json
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from bench import img2dataset_row, references

SAMPLE_SECONDS = 0.25
IMAGES_SINK = {"kind": "write_images", "path": "images", "format": "jpeg", "quality": 85}


class TreeMemory:
    """Samples the RSS of this process plus all its descendants; keeps the peak."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(SAMPLE_SECONDS):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # it may have just exited
                    total += process.memory_info().rss
            self.peak = max(self.peak, total)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def tree_cpu_seconds(reaped: bool = False) -> float:
    """User + system CPU of this process and its live descendants, so far; with
    `reaped`, also of the descendants they have reaped (pool workers that exited)."""
    total = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
            if reaped:
                total += times.children_user + times.children_system
    return total


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM: unlike ru_maxrss, not inherited via exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stop_forkserver() -> None:
    """Stop multiprocessing's forkserver, if one runs, and reap it.

    Pool workers forked by it are its children, not ours: their CPU time reaches
    RUSAGE_CHILDREN only when the forkserver, which reaps them, exits and is reaped.
    """
    from multiprocessing import forkserver

    forkserver._forkserver._stop()  # private, but the only way short of exiting


def timed(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `work` and add wall time, CPU time and memory to what it returns."""
    cpu_before = cpu_seconds()
    with TreeMemory() as memory:
        started = time.perf_counter()
        result = work()
        wall = time.perf_counter() - started
    stop_forkserver()
    return {
        **result,
        "wall": wall,
        "cpu": cpu_seconds() - cpu_before,
        "client_rss": peak_rss(),
        "tree_rss": memory.peak,
    }


def read_lines(path: str) -> list[str]:
    return Path(path).read_text().split()


class FirstRecords(BaseException):
    """Stops a run as soon as its first records are in (the start-up measurement).

    Not an Exception: the runner reports any Exception from inside a run as the run
    breaking (exit 4); this one, like KeyboardInterrupt, passes through as it is."""


Probe = Callable[[], tuple[float, float]]
Calls = list[tuple[tuple[float, float], tuple[float, float]]]


@contextlib.contextmanager
def calls(owner: type, name: str, probe: Probe) -> Iterator[Calls]:
    """Spies on method `owner.name` (in this process only) while in the block: yields a
    list that gets `(probe() at the call, probe() at its return)` for every call."""
    found: Calls = []
    original = getattr(owner, name)

    @functools.wraps(original)
    def spy(*args: Any, **kwargs: Any) -> Any:
        at = probe()
        try:
            return original(*args, **kwargs)
        finally:
            found.append((at, probe()))

    setattr(owner, name, spy)
    try:
        yield found
    finally:
        setattr(owner, name, original)


def tree_clock() -> tuple[float, float]:
    return time.perf_counter(), tree_cpu_seconds(reaped=True)


def thread_clock() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def pipeline_job(spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """The standard thumbnail job on `spec['backend']`, with `spec['set']` overrides,
    writing with `spec['sink']` (write stage options; default: JPEG files)."""
    from pipeline.execution.runner import RunRequest, run

    config = scratch / "job.yaml"
    partition_size = spec.get("partition_size")  # None: the pipeline's default
    config.write_text(
        "name: bench\n"
        f"backend: {{kind: {spec['backend']}}}\n"
        + (f"partition_size: {partition_size}\n" if partition_size else "")
        + f"output: {scratch / 'out'}\n"
        "stages:\n"
        f"  urls: {{kind: url_list, path: {spec['urls']}}}\n"
        # the bench's own server: not the polite default (16 requests in flight per host for
        # the whole run), the 16 per partition that earlier benches ran with
        "  download: {kind: download, input: urls, allow_hosts: [127.0.0.1], per_host: 64}\n"
        "  decode: {kind: decode, input: download}\n"
        "  thumb: {kind: thumbnail, input: decode, size: [256, 256]}\n"
        f"  write: {json.dumps({**spec.get('sink', IMAGES_SINK), 'input': 'thumb'})}\n"
    )
    progress: list[tuple[float, int, float]] = []

    def on_progress(stats: Any) -> None:
        progress.append((time.perf_counter(), sum(stats.statuses.values()), tree_cpu_seconds()))
        if spec.get("stop_after_first"):
            raise FirstRecords

    from pipeline.execution.assembly import ShardAssembler
    from pipeline.stages.shared.shards import ShardedSink

    started = time.perf_counter()
    try:
        # ShardAssembler.finish: the engine has the last partition's records (sharded
        # sinks only); ShardedSink.assemble and _piece_rows (reading the pieces): in this
        # process on the threads backend only
        with (
            calls(ShardAssembler, "finish", tree_clock) as last_partition,
            calls(ShardedSink, "assemble", thread_clock) as assembled,
            calls(ShardedSink, "_piece_rows", thread_clock) as read,
        ):
            report = run(RunRequest(config, overrides=spec.get("set", [])), on_progress)
    except FirstRecords:
        return {"images": progress[0][1], "first_record": progress[0][0] - started}
    ended = tree_clock()
    return {
        "images": report["counts"]["ok"],
        "failed": report["counts"]["failed"],
        "failures": report["failures_by_reason"],
        "stage_seconds": report["stage_seconds"],
        "first_record": progress[0][0] - started if progress else None,
        **_tail(last_partition, ended),
        **_spent("assemble", assembled),
        **_spent("read_pieces", read),
        **_steady(progress),
    }


def _tail(last_partition: Calls, ended: tuple[float, float]) -> dict[str, Any]:
    """Wall and CPU seconds from the last partition's records to the run's end."""
    if not last_partition:
        return {"tail": None, "tail_cpu": None}
    (at, cpu_at), _ = last_partition[-1]
    return {"tail": ended[0] - at, "tail_cpu": ended[1] - cpu_at}


def _spent(name: str, found: Calls) -> dict[str, Any]:
    """The calls, wall and CPU seconds of a spied method, summed (None: never called)."""
    if not found:
        return {f"{name}_calls": 0, f"{name}_wall": None, f"{name}_cpu": None}
    return {
        f"{name}_calls": len(found),
        f"{name}_wall": sum(end[0] - start[0] for start, end in found),
        f"{name}_cpu": sum(end[1] - start[1] for start, end in found),
    }


def sink_files(spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """The count and bytes of the files `spec['sink']` wrote (shards, not their `_`
    summaries or `.pieces`); nothing for the default sink."""
    if "sink" not in spec:
        return {}
    folder = scratch / "out" / spec["sink"]["path"]
    sizes = [
        path.stat().st_size
        for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(("_", "."))
    ]
    return {"files": len(sizes), "file_bytes": sum(sizes)}


def _steady(progress: list[tuple[float, int, float]]) -> dict[str, float]:
    """Images/s and CPU-s/image between the first and the last partition (startup excluded)."""
    if len(progress) < 3:
        return {}
    (first_time, first_count, first_cpu), (last_time, last_count, last_cpu) = (
        progress[0],
        progress[-1],
    )
    images = max(last_count - first_count, 1)
    return {
        "steady_rate": images / max(last_time - first_time, 1e-9),
        "steady_cpu_per_image": (last_cpu - first_cpu) / images,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement, in a folder of its own under the bench's scratch folder. The
    folder stays until the bench ends (`bench.run` removes the scratch folder at exit):
    on ext4 without a journal, as here, creating a file costs up to 5x more CPU in the
    half minute after many files were deleted (`recently_deleted` in the kernel's inode
    allocator), so deleting one row's 2,000 outputs would tax the next row's writes."""
    kind = spec["kind"]
    scratch = Path(tempfile.mkdtemp(dir=spec["scratch"]))
    if kind == "ceiling":
        corpus = [Path(path).read_bytes() for path in read_lines(spec["files"])]
        corpus *= spec.get("repeat", 1)  # the same bytes again, as the URL list repeats
        return timed(lambda: {"images": references.ceiling(corpus, spec["workers"])})
    if kind == "tutorial":
        urls = read_lines(spec["urls"])
        return timed(
            lambda: {"images": references.tutorial(urls, scratch / "out", spec["workers"])}
        )
    if kind == "img2dataset":
        python, urls, workers = spec["python"], spec["urls"], spec["workers"]
        return timed(lambda: img2dataset_row.download(python, urls, scratch / "out", workers))
    if kind == "download":
        urls = read_lines(spec["urls"])
        reuse = spec.get("reuse", True)
        return timed(lambda: {"images": len(urls), "bytes": references.download_only(urls, reuse)})
    if kind == "pipeline":
        return {**timed(lambda: pipeline_job(spec, scratch)), **sink_files(spec, scratch)}
    raise ValueError(f"unknown measurement kind {kind!r}")


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
