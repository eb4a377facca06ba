"""The base of sinks that pack many items into one file: shards written per partition.

Each partition's task gets its own writer (`for_partition`): items are buffered and
every `shard_size` of them become one file named `<prefix>-<partition>-<n>.<ext>`,
written atomically; `finish` writes the rest. An item's record names its shard
as soon as the item is buffered (the record goes back only after `finish`).
Names and contents depend only on the partition, so every backend writes the
same shards. If a shard cannot be written, its items are marked failed (a fatal
error such as a full disk stops the run instead).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field, PositiveInt

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.stages.base import Item, Partition, Sink
from pipeline.stages.outputs import (
    AtomicFile,
    checked_location,
    ensure_parent,
    join,
    output_error,
    output_folder,
)


class ShardOptions(Options):
    path: Annotated[str, AfterValidator(checked_location)] = Field(
        description="Folder or fsspec URL; relative paths are inside the run dir"
    )
    shard_size: PositiveInt = Field(1000, description="Items per shard (per partition)")
    prefix: str = Field("shard", pattern=r"^[A-Za-z0-9_-]+$", description="Shard file name prefix")


class ShardedSink(Sink):
    """Buffers `row(item)` values and writes them with `write_shard` every `shard_size`."""

    extension: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.partition = -1
        self.shards = 0
        self.pending: list[tuple[Item, Any]] = []

    def for_partition(self, partition: Partition) -> ShardedSink:
        writer = copy.copy(self)
        writer.partition, writer.shards, writer.pending = partition.index, 0, []
        return writer

    def process(self, item: Item) -> Item:
        self.pending.append((item, self.row(item)))
        self.add_output(item, self.shard_path())  # the shard it goes into, written by flush
        if len(self.pending) >= self.options.shard_size:  # type: ignore[attr-defined]
            self.flush()
        return item

    def finish(self) -> None:
        if self.pending:
            self.flush()

    def shard_path(self) -> str:
        options: ShardOptions = self.options  # type: ignore[assignment]
        name = f"{options.prefix}-{self.partition:06d}-{self.shards:04d}.{self.extension}"
        return join(output_folder(self.job.run_dir, options.path), name)

    def flush(self) -> None:
        """Write the pending items as one shard; on an item-level error, fail them all."""
        path, pending = self.shard_path(), self.pending
        self.pending, self.shards = [], self.shards + 1
        try:
            self.write_atomically(path, [row for _, row in pending])
        except ItemError as error:
            for item, _ in pending:
                item.fail(self.name, error)
                self.unrecord(item, path)

    def unrecord(self, item: Item, path: str) -> None:
        """Take back an output recorded for a shard that was not written."""
        item.record["outputs"].remove(path)
        written = item.record.get("sink_outputs", {}).get(self.name, [])
        if path in written:
            written.remove(path)

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
        """What to keep of an item until its shard is written (bytes, a dict, an array)."""
        raise NotImplementedError

    def write_shard(self, target: AtomicFile, rows: list[Any]) -> None:
        raise NotImplementedError
