"""`pipeline compact`: merge the small shards that incremental runs left into full ones.

Every incremental run of a sharded sink ends with a shard of fewer than `shard_size`
samples, and an item done again lands in a new shard, leaving a stale copy in its old
one. Compaction needs no config: the manifest's `sharded_sinks` table names each sharded
sink with its kind and options, and the sinks are rebuilt from it (`recorded_plan`).
Holding the run lock, it

1. collects the garbage a run collects (pieces, `writing` and `obsolete` shards, temp
   files), after pointing results.jsonl at where an interrupted compaction moved samples;
2. takes each sink's *small* done shards, in the order they were written: fewer live
   samples than `shard_size`, and fewer bytes than `shard_bytes` if set. A sample is live
   while its key's `sinks` row names the shard; a stale one is dropped;
3. cuts their live samples, in that order, as a run cuts them (`shard_size` samples, or
   before `shard_bytes`), the last shard maybe smaller; a cut that is one whole existing
   shard stays as it is (a lone small shard, or one compacted before);
4. for each new shard: notes it (`begin_shard`), has the sink write it and its summary
   from the old shards' rows (`ShardedSink.assemble`), then in ONE transaction
   (`Manifest.replace_shards`) points its samples' `sinks` rows at it (same fingerprint),
   marks it done and the old shards whose last live sample it took `obsolete`;
5. rewrites results.jsonl (temp file and rename) so that the records of moved samples name
   the new shard, and their position in it; only then deletes the obsolete shards.

A crash before a shard's transaction leaves the old shards valid (the new one is
`writing`: garbage); after it, the old shards are `obsolete`, still on disk: the next
compact first points the records at the shards the manifest has their samples in, then
deletes them (a run deletes them too, and writes a results.jsonl of its own).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import groupby, islice
from operator import attrgetter
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from pipeline.config import JobConfig
from pipeline.errors import ConfigError, PipelineError, RunIncompleteError
from pipeline.execution.assembly import (
    PieceSample,
    point_at_shard,
    remove_garbage,
    remove_shards,
    sharded_sinks,
)
from pipeline.plan import Plan
from pipeline.plan.dag import StageNode
from pipeline.records import JobContext, Record
from pipeline.stages.registry import stage_kind
from pipeline.stages.shared.shards import PiecePart, ShardCut, ShardedSink, ShardOptions
from pipeline.state.history import new_run_id, read_history
from pipeline.state.lock import RunLock
from pipeline.state.manifest import Manifest, Shard, ShardRow
from pipeline.state.results import RESULTS_FILE
from pipeline.state.rundir import MANIFEST_FILE, remove_stale_temp_files
from pipeline.storage import AtomicFile

CHUNK = 1000  # results.jsonl lines looked up in the manifest at a time


@dataclass(frozen=True)
class Sample:
    """A live sample of a small shard: where it is, and what moves with it."""

    key: str
    fingerprint: str
    shard: str
    position: int
    bytes: int


@dataclass
class Found:
    """A sink's small shards, in the order they were written, and their live samples."""

    shards: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  # samples in each file, stale too
    samples: list[Sample] = field(default_factory=list)

    @property
    def stale(self) -> int:
        return sum(self.rows.values()) - len(self.samples)


@dataclass(frozen=True)
class Compacted:
    """What compacting one sink did."""

    sink: str
    small: int  # small shards found
    shards: int  # of them, replaced
    samples: int  # live samples moved out of those
    into: int  # new shards written
    stale: int  # stale samples dropped

    def summary(self) -> str:
        """`tar: 7 shards (3,412 samples) merged into 4; 2 stale samples dropped`."""
        if not self.shards:
            return f"{self.sink}: nothing to compact ({_count(self.small, 'small shard')})"
        return (
            f"{self.sink}: {_count(self.shards, 'shard')} ({_count(self.samples, 'sample')}) "
            f"merged into {self.into}; {_count(self.stale, 'stale sample')} dropped"
        )


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def compact(run_dir: Path, sink: str | None = None) -> list[Compacted]:
    """Compact every sharded sink of `run_dir` (or only `sink`), holding its lock."""
    with Manifest(run_dir / MANIFEST_FILE, read_only=True):
        pass  # ConfigError if no run used `run_dir`: nothing is created there
    with RunLock(run_dir), Manifest(run_dir / MANIFEST_FILE) as manifest:
        plan = recorded_plan(run_dir, manifest)
        sinks = sharded_sinks(plan)
        names = _chosen(sinks, sink, run_dir)
        index = ShardIndex(sinks)
        repoint_records(run_dir, manifest, index)  # what an interrupted compaction moved
        remove_stale_temp_files([run_dir, *plan.sink_folders()])
        remove_garbage(plan, manifest)
        done = [compact_sink(name, sinks[name], manifest, index) for name in names]
        repoint_records(run_dir, manifest, index)
        remove_shards(manifest, sinks, "obsolete")
    return done


def recorded_plan(run_dir: Path, manifest: Manifest) -> Plan:
    """A plan of just the sharded sinks the manifest recorded, rebuilt from their kind and
    options: enough to instantiate them, find their folders and collect their garbage."""
    recorded = manifest.sharded_sinks()
    if not recorded:
        raise ConfigError(
            f"{run_dir} has no sharded sinks on record: a run of a webdataset, parquet or "
            "arrays sink records them"
        )
    nodes = tuple(_node(name, kind, options) for name, (kind, options) in recorded.items())
    job = JobContext("compact", _as_runs_spell(run_dir))  # sinks never use the job's name
    return Plan(job, JobConfig(name=job.name, output=job.run_dir, stages={}), nodes)


def _as_runs_spell(run_dir: Path) -> str:
    """`run_dir` as the latest run spelled it (its config's `output`), if that names the
    same folder from here: new shards' paths then read like the runs' ones. Else as given."""
    try:
        spelled = str(read_history(run_dir)[-1]["run_dir"])
        if os.path.samefile(spelled, run_dir):
            return spelled
    except (OSError, LookupError):
        pass
    return str(run_dir)


def _node(name: str, kind: str, options: dict[str, Any]) -> StageNode:
    try:
        validated = stage_kind(kind).Options.model_validate(options)
    except (KeyError, ValidationError) as exc:
        raise ConfigError(f"cannot rebuild sink {name} ({kind}) from the manifest: {exc}") from None
    return StageNode(name, kind, "sink", (), validated)


def _chosen(sinks: dict[str, ShardedSink], name: str | None, run_dir: Path) -> list[str]:
    if name is None:
        return list(sinks)
    if name not in sinks:
        raise ConfigError(
            f"no sharded sink named '{name}' in {run_dir}; its sharded sinks: " + ", ".join(sinks)
        )
    return [name]


def compact_sink(name: str, sink: ShardedSink, manifest: Manifest, index: ShardIndex) -> Compacted:
    """Merge the sink's small shards (see the module's docstring, steps 2 to 4)."""
    found = small_shards(name, sink, manifest)
    groups = cut(found.samples, sink.options)
    kept = {group[0].shard for group in groups if _whole_shard(group, found)}
    ends = _last_groups(found, groups)
    run_id, written = f"compact-{new_run_id()}", set()
    for number, group in enumerate(groups):
        if group[0].shard not in kept:
            obsolete = [path for path in ends[number] if path not in written]
            written.add(write_shard(name, sink, manifest, group, obsolete, run_id, index))
    empty = [path for path in ends[None] if path not in written]  # no live sample
    if empty:
        manifest.replace_shards(None, empty)
    replaced = [path for path in found.shards if path not in kept | written]
    moved = sum(1 for sample in found.samples if sample.shard not in kept)
    return Compacted(name, len(found.shards), len(replaced), moved, len(written), found.stale)


def small_shards(name: str, sink: ShardedSink, manifest: Manifest) -> Found:
    """The sink's done shards with fewer live samples than `shard_size` (and fewer bytes
    than `shard_bytes`), in the order they were written, and their live samples."""
    live, options, found = manifest.live_samples(name), sink.options, Found()
    for shard in manifest.done_shards(name):
        if live[shard.path] >= options.shard_size or _over_bytes(shard, options):
            continue
        found.shards.append(shard.path)
        if not live[shard.path]:  # every sample stale: no need to read it
            found.rows[shard.path] = shard.samples
            continue
        found.rows[shard.path], samples = shard_samples(name, sink, manifest, shard.path)
        found.samples += samples
    return found


def _over_bytes(shard: ShardRow, options: ShardOptions) -> bool:
    return options.shard_bytes is not None and shard.bytes >= options.shard_bytes


def shard_samples(
    name: str, sink: ShardedSink, manifest: Manifest, path: str
) -> tuple[int, list[Sample]]:
    """The rows in shard `path`, and its live samples: those whose `sinks` row names it,
    at their position in the file."""
    rows = read_rows(sink, path)
    keys = [sink.row_key(row) for row in rows]
    done = manifest.sink_rows(name, keys)
    samples = [
        Sample(key, done[key][0], path, position, sink.row_bytes(row))
        for position, (key, row) in enumerate(zip(keys, rows, strict=True))
        if key in done and done[key][1] == [path]
    ]
    return len(rows), samples


def read_rows(sink: ShardedSink, path: str) -> list[Any]:
    try:
        return sink.read_shard(path)
    except (OSError, *sink.write_errors()) as exc:
        raise RunIncompleteError(
            f"cannot read shard {path}: {exc} (compact reads the paths the runs wrote, "
            "relative ones from the folder it is started in)"
        ) from None


def cut(samples: list[Sample], options: ShardOptions) -> list[list[Sample]]:
    """Samples cut into shards as a run cuts them (`ShardCut`), the last maybe smaller."""
    shards = ShardCut[Sample](options)
    groups = [group for sample in samples for group in shards.add(sample, sample.bytes)]
    last = shards.close()
    return [*groups, last] if last else groups


def _last_groups(found: Found, groups: list[list[Sample]]) -> dict[int | None, list[str]]:
    """The small shards by the group their last live sample is in (None: none is live):
    a shard is obsolete once that group's shard is committed."""
    last = {sample.shard: number for number, group in enumerate(groups) for sample in group}
    ends: dict[int | None, list[str]] = defaultdict(list)
    for path in found.shards:
        ends[last.get(path)].append(path)
    return ends


def _whole_shard(group: list[Sample], found: Found) -> bool:
    """The group is every row of one shard, in order: writing it would give that shard."""
    first = group[0].shard
    return all(sample.shard == first for sample in group) and len(group) == found.rows[first]


def write_shard(
    name: str,
    sink: ShardedSink,
    manifest: Manifest,
    group: list[Sample],
    obsolete: list[str],
    run_id: str,
    index: ShardIndex,
) -> str:
    """Write `group` as a new shard and commit it in place of `obsolete`; its path."""
    keys = [sample.key for sample in group]
    path = sink.shard_path(keys)
    parts: list[PiecePart] = [
        (shard, [sample.position for sample in samples])
        for shard, samples in groupby(group, key=attrgetter("shard"))
    ]
    manifest.begin_shard(name, path, run_id)
    size = _assemble(sink, path, keys, parts)
    index.note(path, keys)
    samples = [(sample.key, sample.fingerprint) for sample in group]
    manifest.replace_shards(Shard(name, path, samples, size), obsolete)
    return path


def _assemble(sink: ShardedSink, path: str, keys: list[str], parts: list[PiecePart]) -> int:
    """`sink.assemble`, always a copy (the old shards stay valid until the commit)."""
    try:
        return sink.assemble(path, keys, parts, sole=False)
    except PipelineError:
        raise
    except Exception as exc:
        message = sink.shard_error(exc).message
        raise RunIncompleteError(f"cannot compact {sink.name}: {message}") from exc


class ShardIndex:
    """The position of each key in a shard: noted for the shards compaction writes, read
    from the file (`read_shard`) for any other."""

    def __init__(self, sinks: dict[str, ShardedSink]):
        self.sinks = sinks
        self.positions: dict[str, dict[str, int]] = {}

    def note(self, path: str, keys: list[str]) -> None:
        self.positions[path] = {key: position for position, key in enumerate(keys)}

    def position(self, sink: str, path: str, key: str) -> int | None:
        if path not in self.positions:
            stage = self.sinks[sink]
            self.note(path, [stage.row_key(row) for row in read_rows(stage, path)])
        return self.positions[path].get(key)


def repoint_records(run_dir: Path, manifest: Manifest, index: ShardIndex) -> int:
    """If compaction moved samples (a shard is `obsolete`), rewrite results.jsonl,
    atomically, so that each record naming a shard that the manifest no longer has its
    sample in names the done shard it has it in, and its position there (`outputs`,
    `sink_outputs`, `shards`). The number of records changed (none: no rewrite)."""
    results = run_dir / RESULTS_FILE
    if not manifest.shard_sinks("obsolete") or not results.is_file():
        return 0
    repointer = Repointer(
        manifest, index, manifest.shard_sinks(), set(manifest.shard_sinks("done"))
    )
    target = AtomicFile(str(results))
    changed = 0
    try:
        with results.open(encoding="utf-8") as lines:
            while chunk := list(islice(lines, CHUNK)):
                changed += repointer.write(chunk, target.file)
    except BaseException:
        target.abort()
        raise
    if changed:
        target.commit()
    else:
        target.abort()
    return changed


@dataclass
class Repointer:
    """Points records at the shards the manifest has their samples in."""

    manifest: Manifest
    index: ShardIndex
    sink_of: dict[str, str]  # every shard the manifest knows of: path -> sink
    done: set[str]

    def write(self, lines: list[str], out: IO[bytes]) -> int:
        """Write `lines` to `out`, their records repointed; the number changed."""
        records = [_parsed(line) for line in lines]
        wanted: dict[str, set[str]] = defaultdict(set)
        for record in records:
            for sink, _ in self.named(record):
                wanted[sink].add(record["key"])
        now = {sink: self.manifest.sink_rows(sink, keys) for sink, keys in wanted.items()}
        changed = 0
        for line, record in zip(lines, records, strict=True):
            moved = [self.repoint(record, *named, now[named[0]]) for named in self.named(record)]
            text = line
            if any(moved):
                text = json.dumps(record, sort_keys=True, default=str) + "\n"  # as ResultsWriter
                changed += 1
            out.write(text.encode())
        return changed

    def named(self, record: Record | None) -> list[tuple[str, str]]:
        """(sink, shard) for each shard of a sharded sink the record names."""
        if record is None:
            return []
        found = {sample["path"]: sink for sink, sample in record.get("shards", {}).items()}
        for path in record.get("outputs", []):
            if path in self.sink_of:
                found.setdefault(path, self.sink_of[path])
        return [(sink, path) for path, sink in found.items() if sink in self.index.sinks]

    def repoint(
        self, record: Record, sink: str, old: str, now: dict[str, tuple[str, list[str]]]
    ) -> bool:
        """Point the record's sample of `sink` from `old` at the done shard it is in now."""
        outputs = now.get(record["key"], ("", []))[1]
        if len(outputs) != 1 or outputs[0] == old or outputs[0] not in self.done:
            return False
        new = outputs[0]
        position = self.index.position(sink, new, record["key"])
        if position is None:
            return False
        sample = record.get("shards", {}).get(sink)
        if sample is not None and sample["path"] == old:
            where = PieceSample(record, old, sample["position"], sample["bytes"])
            point_at_shard(where, sink, new, position)
        else:  # a skipped record names its outputs only
            record["outputs"] = [new if path == old else path for path in record["outputs"]]
        return True


def _parsed(line: str) -> Record | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "key" in record else None
