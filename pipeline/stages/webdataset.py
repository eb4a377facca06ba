"""`webdataset`: tar shards of samples `KEY.<ext>` (the encoded image), `KEY.txt` (the
caption, when the item has one) and `KEY.json` (metadata), in that order.

The layout the `webdataset` library reads: members grouped by the name before the
first dot. Member headers are fixed (USTAR, mtime 0, uid 0, mode 0644), so a shard's
bytes depend only on its rows, and `write_shard(read_shard(path))` writes `path`'s bytes.
"""

from __future__ import annotations

import io
import itertools
import tarfile
from collections.abc import Iterable

from pipeline.records import Item
from pipeline.stages.registry import register
from pipeline.stages.shared.captions import CaptionOptions, caption_of
from pipeline.stages.shared.encoding import EXTENSIONS, EncodeOptions, encode, require_image
from pipeline.stages.shared.shards import ShardedSink, ShardOptions
from pipeline.storage import AtomicFile, metadata_json, split_fs

# (key, encoded image, UTF-8 caption or None, metadata JSON)
Sample = tuple[str, bytes, bytes | None, bytes]
HEADER_BYTES = 512


class WebDatasetOptions(ShardOptions, EncodeOptions, CaptionOptions):
    pass


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def members_of(sample: Sample, extension: str) -> list[tuple[str, bytes]]:
    """A sample's (name, data) members, in the order they are written."""
    key, image, caption, meta = sample
    members = [(f"{key}.{extension}", image)]
    if caption is not None:
        members.append((f"{key}.txt", caption))
    members.append((f"{key}.json", meta))
    return members


def read_members(path: str) -> list[tuple[str, bytes]]:
    """Every file member of a tar (local path or fsspec URL) as (name, data), in order."""
    fs, local = split_fs(path)
    with fs.open(local, "rb") as file, tarfile.open(fileobj=file, mode="r:") as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar if info.isfile()]


def sample_of(key: str, members: list[tuple[str, bytes]], extension: str) -> Sample:
    """The sample of one key's consecutive members; ValueError if they are not a sample."""
    suffixes = [name.split(".", 1)[1] if "." in name else "" for name, _ in members]
    if suffixes not in ([extension, "json"], [extension, "txt", "json"]):
        raise ValueError(f"sample {key!r} has members {suffixes}, not [{extension}, (txt,) json]")
    data = [content for _, content in members]
    return key, data[0], data[1] if len(data) == 3 else None, data[-1]


def samples_of(members: list[tuple[str, bytes]], extension: str) -> list[Sample]:
    """Group members by the name before the first dot, as the webdataset library does."""
    groups = itertools.groupby(members, key=lambda member: member[0].split(".", 1)[0])
    return [sample_of(key, list(group), extension) for key, group in groups]


@register("webdataset")
class WebDataset(ShardedSink[WebDatasetOptions]):
    """Write samples into WebDataset tar shards."""

    Options = WebDatasetOptions
    description = (
        "Tar shards of KEY.jpg (+ KEY.txt caption) + KEY.json, readable by the webdataset library"
    )
    extension = "tar"

    def row(self, item: Item) -> Sample:
        image = encode(require_image(item, self.name), self.options)
        caption = caption_of(item.record, self.options.caption_field)
        text = caption.encode() if caption is not None else None
        return item.key, image, text, metadata_json(item.record)

    def row_key(self, row: Sample) -> str:
        return row[0]

    def row_bytes(self, row: Sample) -> int:
        """Member data plus one 512-byte header per member (padding not counted)."""
        members = members_of(row, EXTENSIONS[self.options.format])
        return sum(HEADER_BYTES + len(data) for _, data in members)

    def write_errors(self) -> tuple[type[Exception], ...]:
        return (*super().write_errors(), tarfile.TarError)

    def write_shard(self, target: AtomicFile, rows: Iterable[Sample]) -> None:
        extension = EXTENSIONS[self.options.format]
        with tarfile.open(fileobj=target.file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row in rows:
                for name, data in members_of(row, extension):
                    add_member(tar, name, data)

    def read_shard(self, path: str) -> list[Sample]:
        """The rows of a shard `write_shard` wrote (with this sink's `format`), in order."""
        return samples_of(read_members(path), EXTENSIONS[self.options.format])
