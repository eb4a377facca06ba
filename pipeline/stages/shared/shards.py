"""The base of sinks that pack many items into one file: shards of `shard_size` samples
(or `shard_bytes`) across the whole run, whatever the partition size.

A partition's task cannot see the others, so it writes its rows as *pieces*: files in
the sink's own format, in the folder's `.pieces/`, of up to `shard_size` rows (memory
stays bounded). Each record names its piece and position (`record["shards"][sink]`).
The client cuts the run's samples, in the run's order, into shards, and has the
backend `assemble` each one from the pieces that hold its samples (image bytes never
travel to the client): the rows are read back (`read_shard`, the exact inverse of
`write_shard`), written as one shard, atomically, with a summary beside it, and the
pieces no later shard needs are deleted (`pipeline.execution.assembly`). A shard that
is exactly one whole piece is renamed, not copied.

A shard is named `<prefix>-<digest>.<ext>`, the digest a hash of the keys it holds in
order: the same items give the same shards, byte for byte, on every backend, and an
incremental run's shards never overwrite an earlier run's. If a piece cannot be
written (an OSError, or the format library refusing a value: a pyarrow type error, a
numpy error), every item of the piece fails, never only the one whose arrival
triggered the write, and no partial file is left; a fatal error such as a full disk
stops the run instead. A shard that cannot be assembled fails its items the same way.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import Field, PositiveInt

from pipeline.config.model import Options
from pipeline.errors import ItemError, PipelineError
from pipeline.records import Item, Partition
from pipeline.stages.base import Sink
from pipeline.storage import (
    AtomicFile,
    OutputPath,
    ensure_parent,
    fsync_path,
    join,
    output_error,
    output_folder,
    remove_output,
    split_fs,
    write_output,
)

PIECES = ".pieces"  # the folder of pieces in a sink's folder
PiecePart = tuple[str, list[int]]  # a piece, and the positions of its rows a shard takes


class ShardOptions(Options):
    path: OutputPath = Field(
        description="Folder or fsspec URL; relative paths are inside the run dir"
    )
    shard_size: PositiveInt = Field(
        1000, description="Samples per shard, across partitions (a run's last may hold fewer)"
    )
    shard_bytes: PositiveInt | None = Field(
        None,
        description="Largest shard in bytes, counted as its samples' sizes; a shard ends "
        "at shard_size samples or before shard_bytes, whichever comes first",
    )
    prefix: str = Field("shard", pattern=r"^[A-Za-z0-9_-]+$", description="Shard file name prefix")


SampleT = TypeVar("SampleT")


class ShardCut(Generic[SampleT]):
    """Samples cut into shards in order, as every sharded sink cuts them: a shard ends at
    `shard_size` samples, or before the sample that would take it past `shard_bytes`."""

    def __init__(self, options: ShardOptions):
        self.options = options
        self.open: list[SampleT] = []
        self.bytes = 0

    def add(self, sample: SampleT, size: int) -> list[list[SampleT]]:
        """Add a sample of `size` bytes; the shards that closed (none, one or two)."""
        closed = []
        limit = self.options.shard_bytes
        if self.open and limit and self.bytes + size > limit:
            closed.append(self.close())
        self.open.append(sample)
        self.bytes += size
        if len(self.open) >= self.options.shard_size:
            closed.append(self.close())
        return closed

    def close(self) -> list[SampleT]:
        """The open shard's samples (maybe none); the next shard starts empty."""
        samples, self.open, self.bytes = self.open, [], 0
        return samples


ShardOptionsT = TypeVar("ShardOptionsT", bound=ShardOptions)


class ShardedSink(Sink[ShardOptionsT]):
    """Buffers `row(item)` values and writes them as pieces; `assemble` makes shards."""

    extension: ClassVar[str]
    # Where samples land, never what they hold: a change redoes no item.
    tuning_options = frozenset({"shard_size", "shard_bytes"})

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pending: list[tuple[Item, Any, int]] = []  # item, row, the row's bytes
        self.pending_bytes = 0

    @property
    def folder(self) -> str:
        return output_folder(self.job.run_dir, self.options.path)

    def for_partition(self, partition: Partition) -> ShardedSink[ShardOptionsT]:
        writer = copy.copy(self)
        writer.pending, writer.pending_bytes = [], 0
        return writer

    def process(self, item: Item) -> Item:
        row = self.row(item)
        size = self.row_bytes(row)
        self.pending.append((item, row, size))
        self.pending_bytes += size
        limit = self.options.shard_bytes
        if len(self.pending) >= self.options.shard_size or (limit and self.pending_bytes >= limit):
            self.flush()
        return item

    def finish(self) -> None:
        if self.pending:
            self.flush()

    def shard_path(self, keys: list[str], folder: str | None = None) -> str:
        """`<prefix>-<hash of the keys>.<ext>` in the sink's folder (or `folder`)."""
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        name = f"{self.options.prefix}-{digest}.{self.extension}"
        return join(folder or self.folder, name)

    def flush(self) -> None:
        """Write the pending items as one piece; if it cannot be written, fail them all.

        Only a PipelineError (the run cannot go on) escapes: any other error belongs to
        the whole piece, never to the one item whose arrival triggered the write.
        """
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        items = [item for item, _, _ in pending]
        try:
            path = self.shard_path([item.key for item in items], join(self.folder, PIECES))
            self.write_atomically(path, [row for _, row, _ in pending])
        except PipelineError:
            raise
        except Exception as exc:
            error = self.shard_error(exc)
            for item in items:
                item.fail(self.name, error)
            return
        for position, (item, _, size) in enumerate(pending):
            self.add_output(item, path)
            sample = {"path": path, "position": position, "bytes": size}
            item.record.setdefault("shards", {})[self.name] = sample

    def assemble(self, path: str, keys: list[str], parts: list[PiecePart], sole: bool) -> int:
        """Write shard `path`, holding `keys`, from `parts` (pieces, and the positions of
        their rows it takes, in order), then its summary; returns the shard's bytes. If
        `sole` (it is the only shard that reads its pieces) and it is one whole local
        piece, the piece is moved into place instead of copied."""
        try:
            if not (sole and self._moved_whole(path, parts)):
                self.write_atomically(path, self._rows(parts))
            fs, local = split_fs(path)
            size = fs.size(local)
            summary = {"shard": os.path.basename(local), "samples": len(keys), "bytes": size}
            write_output(self.summary_path(path), json.dumps({**summary, "keys": keys}).encode())
        except OSError as exc:
            raise output_error(exc, path) from None
        return size

    def _rows(self, parts: list[PiecePart]) -> Iterator[Any]:
        """The shard's rows, read one piece at a time: a kind whose `write_shard` streams
        (a tar) holds one piece in memory, not the whole shard."""
        for piece, positions in parts:
            yield from self._piece_rows(piece, positions)

    def _piece_rows(self, piece: str, positions: list[int]) -> list[Any]:
        found = self.read_shard(piece)
        return [found[position] for position in positions]

    def _moved_whole(self, path: str, parts: list[PiecePart]) -> bool:
        """Move the shard's one piece (all of it: `assemble` was told `sole`) into place
        instead of copying it, if both are local. A piece already gone while the shard is
        there was moved by an earlier try of this task (one a dead worker took down)."""
        piece = parts[0][0]
        if len(parts) > 1 or ":" in piece or ":" in path:  # an fsspec URL: a copy anyway
            return False
        if not os.path.exists(piece) and os.path.exists(path):
            return True
        for source, target in zip(
            [piece, *self.companions(piece)], [path, *self.companions(path)], strict=True
        ):
            os.replace(source, target)
        fsync_path(os.path.dirname(path) or ".")
        return True

    def summary_path(self, path: str) -> str:
        """`_<shard name>.summary.json` beside the shard: readers of a folder of shards
        (`pyarrow.dataset`, Spark) skip names that start with `_`."""
        folder, _, name = path.rpartition("/")
        return f"{folder}/_{name.removesuffix(f'.{self.extension}')}.summary.json"

    def companions(self, path: str) -> list[str]:
        """The files a shard or piece has beside it (arrays: its keys)."""
        return []

    def remove(self, path: str) -> None:
        """Delete a shard or piece, its summary and companions (missing ones are fine)."""
        for name in [path, self.summary_path(path), *self.companions(path)]:
            remove_output(name)

    def shard_error(self, exc: Exception) -> ItemError:
        """The error every item of a shard that could not be written fails with: a
        `write_error` (retried by a later run) if the format refused the data, else an
        `internal_error` (a bug)."""
        if isinstance(exc, ItemError):
            return exc
        reason = "write_error" if isinstance(exc, self.write_errors()) else "internal_error"
        return ItemError(reason, f"shard not written: {type(exc).__name__}: {exc}")

    def write_errors(self) -> tuple[type[Exception], ...]:
        """What writing raises for data the format cannot hold (a value of the wrong type,
        out of range); a sink adds its library's errors."""
        return (ValueError, TypeError, ArithmeticError)

    def write_atomically(self, path: str, rows: list[Any]) -> None:
        try:
            ensure_parent(path)
            target = AtomicFile(path)
        except OSError as exc:
            raise output_error(exc, path) from None
        try:
            self.write_shard(target, rows)
            target.commit()
        except OSError as exc:
            target.abort()
            raise output_error(exc, path) from None
        except BaseException:
            target.abort()
            raise

    def row(self, item: Item) -> Any:
        """What to keep of an item until its piece is written (bytes, a dict, an array)."""
        raise NotImplementedError

    def row_key(self, row: Any) -> str:
        """The key of the item a row holds."""
        raise NotImplementedError

    def row_bytes(self, row: Any) -> int:
        """About the bytes a row takes in a shard (what `shard_bytes` counts)."""
        raise NotImplementedError

    def write_shard(self, target: AtomicFile, rows: Iterable[Any]) -> None:
        """Write `rows` (iterated once) into `target`."""
        raise NotImplementedError

    def read_shard(self, path: str) -> list[Any]:
        """The rows of a file `write_shard` wrote, in order: writing them again gives the
        same bytes."""
        raise NotImplementedError
