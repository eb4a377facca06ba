"""`parquet`: one row per item (key, url, index, size, caption, source fields, metadata),
shards of N rows.

`fields` and `metadata` are JSON text so that every shard of every run has the same
schema (`schema()`) whatever the source columns are, and `pyarrow.dataset` reads a
folder of shards as one table; `include_bytes` adds the encoded image, `caption_field`
names the source field stored as `caption`. `write_shard(read_shard(path))` writes
`path`'s bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import Field, PositiveInt

from pipeline.records import Item
from pipeline.stages.registry import register
from pipeline.stages.shared.captions import CaptionOptions, caption_of
from pipeline.stages.shared.encoding import EncodeOptions, encode, require_image
from pipeline.stages.shared.shards import ShardedSink, ShardOptions
from pipeline.storage import AtomicFile, metadata, split_fs

if TYPE_CHECKING:
    import pyarrow as pa

Row = dict[str, Any]


class ParquetOptions(ShardOptions, EncodeOptions, CaptionOptions):
    include_bytes: bool = Field(False, description="Store the encoded image in column `image`")
    compression: str = Field("zstd", description="Parquet compression codec")
    row_group_size: PositiveInt = Field(1000, description="Rows per parquet row group")


def schema() -> pa.Schema:
    """The columns of every shard: the same whatever the source's fields are."""
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("url", pa.string()),
            ("index", pa.int64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("caption", pa.string()),
            ("fields", pa.string()),
            ("metadata", pa.string()),
            ("image", pa.binary()),
        ]
    )


@register("parquet")
class Parquet(ShardedSink[ParquetOptions]):
    """Write one parquet row per item, `shard_size` rows per file."""

    tuning_options = frozenset({*ShardedSink.tuning_options, "row_group_size"})

    Options = ParquetOptions
    description = "Parquet shards: one row per item with metadata, caption (and image bytes)"
    extension = "parquet"

    def row(self, item: Item) -> Row:
        record = item.record
        image = require_image(item, self.name) if self.options.include_bytes else None
        width, height = image.size if image is not None else (None, None)
        meta = metadata(record)
        return {
            "key": record["key"],
            "url": record["url"],
            "index": record["index"],
            "width": width or record.get("width"),
            "height": height or record.get("height"),
            "caption": caption_of(record, self.options.caption_field),
            "fields": json.dumps(record.get("fields", {}), sort_keys=True),
            "metadata": json.dumps(meta, sort_keys=True, default=str),
            "image": encode(image, self.options) if image is not None else None,
        }

    def row_key(self, row: Row) -> str:
        return row["key"]

    def row_bytes(self, row: Row) -> int:
        """The image's bytes plus the length of the row's text columns."""
        return sum(len(value) for value in row.values() if isinstance(value, str | bytes))

    def write_errors(self) -> tuple[type[Exception], ...]:
        import pyarrow as pa

        return (*super().write_errors(), pa.ArrowException)  # e.g. text for an int32 column

    def write_shard(self, target: AtomicFile, rows: Iterable[Row]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq  # imported by the jobs that write parquet only

        table = pa.Table.from_pylist(list(rows), schema=schema())
        pq.write_table(
            table,
            target.file,
            compression=self.options.compression,
            row_group_size=self.options.row_group_size,
        )

    def read_shard(self, path: str) -> list[Row]:
        """The rows of a shard, in order, as `row` makes them (ints, text, bytes, None)."""
        import pyarrow.parquet as pq

        fs, local = split_fs(path)
        with fs.open(local, "rb") as file:
            return pq.read_table(file, schema=schema()).to_pylist()
