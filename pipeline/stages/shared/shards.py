"""The base of sinks that pack many items into one file: shards written per partition.

Each partition's task gets its own writer (`for_partition`): items are buffered and
every `shard_size` of them become one file named `<prefix>-<digest>.<ext>`, where the
digest is a hash of the keys it holds, written atomically; `finish` writes the rest.
Names and contents depend only on the items, so every backend writes the same
shards, and an incremental re-run (whose pending items are packed into partitions
numbered from 0 again) can never overwrite an earlier run's shard. Items' records
name their shard once it is written; if it cannot be written, for whatever reason (an
OSError, or the format library refusing a value: a pyarrow type error, a numpy error),
every item of the shard is marked failed, never only the one whose arrival triggered the
write, and no partial file is left; a fatal error such as a full disk stops the run
instead. `finish` (the last shard) is guarded the same way.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, ClassVar, TypeVar

from pydantic import Field, PositiveInt

from pipeline.config.model import Options
from pipeline.errors import ItemError, PipelineError
from pipeline.records import Item, Partition
from pipeline.stages.base import Sink
from pipeline.storage import (
    AtomicFile,
    OutputPath,
    ensure_parent,
    join,
    output_error,
    output_folder,
)


class ShardOptions(Options):
    path: OutputPath = Field(
        description="Folder or fsspec URL; relative paths are inside the run dir"
    )
    shard_size: PositiveInt = Field(1000, description="Items per shard (per partition)")
    prefix: str = Field("shard", pattern=r"^[A-Za-z0-9_-]+$", description="Shard file name prefix")


ShardOptionsT = TypeVar("ShardOptionsT", bound=ShardOptions)


class ShardedSink(Sink[ShardOptionsT]):
    """Buffers `row(item)` values and writes them with `write_shard` every `shard_size`."""

    extension: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pending: list[tuple[Item, Any]] = []

    def for_partition(self, partition: Partition) -> ShardedSink[ShardOptionsT]:
        writer = copy.copy(self)
        writer.pending = []
        return writer

    def process(self, item: Item) -> Item:
        self.pending.append((item, self.row(item)))
        if len(self.pending) >= self.options.shard_size:
            self.flush()
        return item

    def finish(self) -> None:
        if self.pending:
            self.flush()

    def shard_path(self, items: list[Item]) -> str:
        """`<prefix>-<hash of the items' keys>.<ext>` in the sink's folder."""
        keys = "\n".join(item.key for item in items).encode()
        name = f"{self.options.prefix}-{hashlib.sha256(keys).hexdigest()[:16]}.{self.extension}"
        return join(output_folder(self.job.run_dir, self.options.path), name)

    def flush(self) -> None:
        """Write the pending items as one shard; if it cannot be written, fail them all.

        Only a PipelineError (the run cannot go on) escapes: any other error belongs to
        the whole shard, never to the one item whose arrival triggered the write.
        """
        pending, self.pending = self.pending, []
        items = [item for item, _ in pending]
        try:
            path = self.shard_path(items)
            self.write_atomically(path, [row for _, row in pending])
        except PipelineError:
            raise
        except Exception as exc:
            error = self.shard_error(exc)
            for item in items:
                item.fail(self.name, error)
            return
        for item in items:
            self.add_output(item, path)

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
        """What to keep of an item until its shard is written (bytes, a dict, an array)."""
        raise NotImplementedError

    def write_shard(self, target: AtomicFile, rows: list[Any]) -> None:
        raise NotImplementedError
