"""Shards across partitions: cut the run's samples into shards and assemble them on the
backend (what a sharded sink writes: `pipeline.stages.shared.shards`).

    ShardAssembler(plan, manifest, run_id, release)
        .track(partitions)  the partitions as they are submitted: their keys give the
                            run's order (the same on every backend)
        .add(records)       a finished partition's records (or a split one's): once
                            every earlier one is in, its samples are cut, in order, into
                            shards of `shard_size` samples (or `shard_bytes`); each full
                            shard becomes a side task (`assemble_task`) for the engine
        .finish()           no partition left: the last shard of each sink, however small
        .tasks()            the side tasks to submit now

A shard is noted in the manifest (`begin_shard`) before its task runs, and committed
with its samples' `sinks` rows once it is written (`commit_shard`). A record is
released (to results and the manifest) once every shard it is in is committed, with the
shard's path and its position there; a record without samples at once. If a shard
cannot be assembled, its samples' records fail for that sink (`write_error`); a fatal
error stops the run. A run that stops leaves `writing` shards and pieces: the next run
deletes them (`remove_garbage`) before it starts, and runs their items again.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from itertools import groupby

from pipeline.errors import PipelineError
from pipeline.execution.engine import SideTask, lost_worker, task_error
from pipeline.execution.worker import compiled
from pipeline.logs import logger
from pipeline.plan import Plan
from pipeline.records import Item, Partition, Record
from pipeline.stages.shared.shards import PIECES, PiecePart, ShardCut, ShardedSink
from pipeline.state.lineage import sink_fingerprints
from pipeline.state.manifest import Manifest, Shard
from pipeline.storage import join, remove_output, split_fs

log = logger("shards")

Release = Callable[[list[Record]], None]


def assemble_task(
    plan: Plan, sink: str, path: str, keys: list[str], parts: list[PiecePart], sole: bool
) -> int:
    """What an assembly task runs: the sink's `assemble`, in the worker's compiled plan."""
    stage = compiled(plan).steps[sink]
    assert isinstance(stage, ShardedSink)
    return stage.assemble(path, keys, parts, sole)


def sharded_sinks(plan: Plan) -> dict[str, ShardedSink]:
    """The plan's sharded sinks, instantiated on the client (to name shards)."""
    found = {}
    for node in plan.nodes:
        if node.role == "sink":
            stage = plan.instantiate(node)
            if isinstance(stage, ShardedSink):
                found[node.name] = stage
    return found


def remove_garbage(plan: Plan, manifest: Manifest) -> None:
    """Delete what a stopped run or compaction left: shards never committed (or compacted
    away), and every piece. Only with the lock held, before any task runs."""
    sinks = sharded_sinks(plan)
    removed = remove_shards(manifest, sinks, "writing", "obsolete")
    for sink in sinks.values():
        _remove_pieces(join(sink.folder, PIECES))
    if removed:
        log.info("removed %d shards an interrupted run or compaction left", removed)


def remove_shards(manifest: Manifest, sinks: dict[str, ShardedSink], *states: str) -> int:
    """Delete the shards in `states` (each with its summary and companions, by the sink
    that wrote it; only the file if that sink is gone) and forget them; how many."""
    found = manifest.shard_sinks(*states)
    for path, sink in found.items():
        if sink in sinks:
            sinks[sink].remove(path)
        else:
            remove_output(path)
    manifest.forget_shards(found)
    return len(found)


def _remove_pieces(folder: str) -> None:
    fs, local = split_fs(folder)
    if fs.exists(local):
        fs.rm(local, recursive=True)


@dataclass
class PieceSample:
    """One sample of a sharded sink: its record, and where its row is (a piece, until its
    shard is written; compaction: the shard it moves from)."""

    record: Record
    piece: str
    position: int
    bytes: int


class ShardAssembler:
    """Cuts the run's samples into shards, has them assembled, releases their records."""

    def __init__(self, plan: Plan, manifest: Manifest, run_id: str, release: Release):
        self.plan = Plan(plan.job, plan.config, plan.nodes)  # tasks need no conclusions
        self.sinks = sharded_sinks(plan)
        self.fingerprints = sink_fingerprints(plan)
        self.manifest, self.run_id, self.release = manifest, run_id, release
        manifest.note_sharded_sinks(self.sinks)  # what `pipeline compact` rebuilds
        self.order: deque[str] = deque()  # keys of submitted items, not yet cut
        self.arrived: dict[str, Record] = {}
        self.cuts = {name: ShardCut[PieceSample](sink.options) for name, sink in self.sinks.items()}
        self.piece_left: Counter[str] = Counter()  # samples of a piece not yet in a shard
        self.piece_rows: Counter[str] = Counter()  # samples of a piece in all
        self.piece_readers: Counter[str] = Counter()  # shard tasks to read it, not done
        self.waiting: Counter[str] = Counter()  # key -> shards it waits for
        self.queued: list[SideTask] = []

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def track(self, parts: Iterable[Partition]) -> Iterator[Partition]:
        """`parts`, noting their keys as they are submitted: the run's order."""
        for partition in parts:
            self.order.extend(item.key for item in partition.items)
            yield partition

    def add(self, records: list[Record]) -> None:
        """A finished partition's records: cut the samples of every record now in order
        into shards; release at once those with no sample to wait for."""
        for record in records:
            self.arrived[record["key"]] = record
            for sink in self._samples_of(record):
                piece = record["shards"][sink]["path"]
                self.piece_left[piece] += 1
                self.piece_rows[piece] += 1
        free = []
        while self.order and self.order[0] in self.arrived:
            record = self.arrived.pop(self.order.popleft())
            sinks = self._samples_of(record)
            if not sinks:
                free.append(record)
            for sink in sinks:
                self.waiting[record["key"]] += 1
                self._take(sink, record)
        if free:
            self.release(free)

    def finish(self) -> None:
        """No partition is left: each sink's samples not yet cut become its last shard."""
        for name, cut in self.cuts.items():
            if cut.open:
                self._cut(name, cut.close())

    def tasks(self) -> list[SideTask]:
        queued, self.queued = self.queued, []
        return queued

    def _samples_of(self, record: Record) -> list[str]:
        """The sharded sinks that wrote a piece row of `record`."""
        return [sink for sink in record.get("shards", {}) if sink in self.sinks]

    def _take(self, name: str, record: Record) -> None:
        """Add the record's sample to the sink's open shard; cut the shards it closes."""
        where = record["shards"][name]
        sample = PieceSample(record, where["path"], where["position"], where["bytes"])
        for samples in self.cuts[name].add(sample, sample.bytes):
            self._cut(name, samples)

    def _cut(self, name: str, samples: list[PieceSample]) -> None:
        """`samples` of the sink become one shard: noted, then queued for a task."""
        keys = [sample.record["key"] for sample in samples]
        path = self.sinks[name].shard_path(keys)
        parts = [
            (piece, [sample.position for sample in group])
            for piece, group in groupby(samples, key=lambda sample: sample.piece)
        ]
        pieces = [piece for piece, _ in parts]
        self.piece_left.subtract(sample.piece for sample in samples)
        # the shard is every row of one piece, which no other shard reads: moved, not copied
        sole = len(parts) == 1 and len(parts[0][1]) == self.piece_rows[pieces[0]]
        self.piece_readers.update(pieces)
        self.manifest.begin_shard(name, path, self.run_id)
        args = (self.plan, name, path, keys, parts, sole)
        done = partial(self._assembled, name, path, samples, pieces)
        self.queued.append(SideTask(assemble_task, args, done))

    def _assembled(
        self, name: str, path: str, samples: list[PieceSample], pieces: list[str], future: Future
    ) -> None:
        """A shard's task ended: commit it and point its records at it, or fail them;
        delete the pieces no shard task reads any more."""
        self._read(name, pieces)
        try:
            size = future.result()
        except PipelineError:
            raise
        except Exception as exc:
            error = task_error(exc) if lost_worker(exc) else self.sinks[name].shard_error(exc)
            for sample in samples:
                _forget_piece(sample.record, name, sample.piece)
                Item(sample.record, None).fail(name, error)
        else:
            fingerprint = self.fingerprints[name]
            keys = [(sample.record["key"], fingerprint) for sample in samples]
            self.manifest.commit_shard(Shard(name, path, keys, size))
            for position, sample in enumerate(samples):
                point_at_shard(sample, name, path, position)
        self._released(samples)

    def _read(self, name: str, pieces: list[str]) -> None:
        """A shard task read `pieces`: delete those no other shard will read."""
        self.piece_readers.subtract(pieces)
        for piece in pieces:
            if self.piece_readers[piece] <= 0 and self.piece_left[piece] <= 0:
                del self.piece_readers[piece]
                del self.piece_left[piece]
                del self.piece_rows[piece]
                self.sinks[name].remove(piece)

    def _released(self, samples: list[PieceSample]) -> None:
        free = []
        for sample in samples:
            key = sample.record["key"]
            self.waiting[key] -= 1
            if self.waiting[key] <= 0:
                del self.waiting[key]
                free.append(sample.record)
        if free:
            self.release(free)


def point_at_shard(sample: PieceSample, sink: str, path: str, position: int) -> None:
    """The sample's record names `path`, where its row is at `position`, for `sink`."""
    record = sample.record
    record["shards"][sink] = {"path": path, "position": position, "bytes": sample.bytes}
    record["outputs"] = [path if out == sample.piece else out for out in record["outputs"]]
    record["sink_outputs"][sink] = [path]


def _forget_piece(record: Record, sink: str, piece: str) -> None:
    """A sample whose shard was not written: its record names no piece."""
    del record["shards"][sink]
    record["outputs"] = [out for out in record["outputs"] if out != piece]
    record["sink_outputs"].pop(sink, None)
