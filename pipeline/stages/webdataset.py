"""`webdataset`: tar shards of samples `KEY.<ext>` (the encoded image) + `KEY.json` (metadata).

The layout the `webdataset` library reads: members grouped by the name before the
first dot. Member headers are fixed (mtime 0, uid 0, mode 0644), so a shard's bytes
depend only on its items.
"""

from __future__ import annotations

import io
import tarfile

from pipeline.records import Item
from pipeline.stages.registry import register
from pipeline.stages.shared.encoding import EXTENSIONS, EncodeOptions, encode, require_image
from pipeline.stages.shared.shards import ShardedSink, ShardOptions
from pipeline.storage import AtomicFile, metadata_json

Sample = tuple[str, bytes, bytes]


class WebDatasetOptions(ShardOptions, EncodeOptions):
    pass


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


@register("webdataset")
class WebDataset(ShardedSink[WebDatasetOptions]):
    """Write samples into WebDataset tar shards."""

    Options = WebDatasetOptions
    description = "Tar shards of KEY.jpg + KEY.json, readable by the webdataset library"
    extension = "tar"

    def row(self, item: Item) -> Sample:
        image = encode(require_image(item, self.name), self.options)
        return item.key, image, metadata_json(item.record)

    def write_errors(self) -> tuple[type[Exception], ...]:
        return (*super().write_errors(), tarfile.TarError)

    def write_shard(self, target: AtomicFile, rows: list[Sample]) -> None:
        extension = EXTENSIONS[self.options.format]
        with tarfile.open(fileobj=target.file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, image, meta in rows:
                add_member(tar, f"{key}.{extension}", image)
                add_member(tar, f"{key}.json", meta)
