"""`parquet`: one row per item (key, url, index, size, source fields, metadata), shards of N rows.

`fields` and `metadata` are JSON text so that every shard has the same schema
whatever the source columns are; `include_bytes` adds the encoded image.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import Field

from pipeline.records import Item
from pipeline.stages.registry import register
from pipeline.stages.shared.encoding import EncodeOptions, encode, require_image
from pipeline.stages.shared.shards import ShardedSink, ShardOptions
from pipeline.storage import AtomicFile, metadata

if TYPE_CHECKING:
    import pyarrow as pa


class ParquetOptions(ShardOptions, EncodeOptions):
    include_bytes: bool = Field(False, description="Store the encoded image in column `image`")
    compression: str = Field("zstd", description="Parquet compression codec")


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
            ("fields", pa.string()),
            ("metadata", pa.string()),
            ("image", pa.binary()),
        ]
    )


@register("parquet")
class Parquet(ShardedSink[ParquetOptions]):
    """Write one parquet row per item, `shard_size` rows per file."""

    Options = ParquetOptions
    description = "Parquet shards: one row per item with metadata (and image bytes)"
    extension = "parquet"

    def row(self, item: Item) -> dict[str, Any]:
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
            "fields": json.dumps(record.get("fields", {}), sort_keys=True),
            "metadata": json.dumps(meta, sort_keys=True, default=str),
            "image": encode(image, self.options) if image is not None else None,
        }

    def write_errors(self) -> tuple[type[Exception], ...]:
        import pyarrow as pa

        return (*super().write_errors(), pa.ArrowException)  # e.g. text for an int32 column

    def write_shard(self, target: AtomicFile, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq  # imported by the jobs that write parquet only

        table = pa.Table.from_pylist(rows, schema=schema())
        pq.write_table(table, target.file, compression=self.options.compression)
