"""Shard formats on real files: `read_shard` is the exact inverse of `write_shard` (a
re-written shard, or a subset of its rows, has the bytes writing those rows directly
gives), webdataset captions as `KEY.txt`, and parquet shards read as one table."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.records import Item, JobContext, SourceItem
from pipeline.stages.arrays import Arrays
from pipeline.stages.parquet import Parquet
from pipeline.stages.shared.captions import caption_of
from pipeline.stages.shared.shards import ShardedSink
from pipeline.stages.webdataset import WebDataset
from pipeline.storage import AtomicFile
from pipeline.testing.images import jpeg_bytes, photo

CAPTIONS = ["a red kite over a hill", None, "ünïcode caption ✓", "", "the last one"]


def make_items(captions: list[Any], size: tuple[int, int] = (24, 16)) -> list[Item]:
    """One decoded photo per caption; a None caption leaves the field out."""
    items = []
    for index, caption in enumerate(captions):
        fields: dict[str, Any] = {"id": index}
        if caption is not None:
            fields["caption"] = caption
        record = SourceItem(index, f"https://example.com/{index}.jpg", fields).new_record()
        record["results"] = {"stats": {"brightness": 0.5 + index}}
        image = Image.open(io.BytesIO(jpeg_bytes(photo(*size, seed=index)))).convert("RGB")
        items.append(Item(record, image))
    return items


def sink(kind: type[ShardedSink], folder: Path | str, **options: Any) -> ShardedSink:
    context = JobContext("shard-test", str(folder))
    return kind("out", kind.Options(path=str(folder), **options), context)


def write(stage: ShardedSink, path: str, rows: list[Any]) -> str:
    target = AtomicFile(path)
    stage.write_shard(target, rows)
    target.commit()
    return path


def contents(path: str) -> bytes:
    """A shard's bytes; an arrays shard's with its `.keys.json`."""
    with fsspec.open(path, "rb") as file:
        data = file.read()
    if path.endswith(".npy"):
        with fsspec.open(path.removesuffix(".npy") + ".keys.json", "rb") as file:
            data += b"\0" + file.read()
    return data


KINDS = {
    "webdataset": (WebDataset, {}),
    "parquet": (Parquet, {"include_bytes": True, "row_group_size": 2}),
    "parquet-no-bytes": (Parquet, {}),
    "arrays": (Arrays, {"shape": (16, 24, 3)}),
}


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path)
        return
    url = f"memory://shards-{uuid.uuid4().hex}"
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_shard_written_again_from_its_rows_has_the_same_bytes(folder, kind):
    stage_class, options = KINDS[kind]
    stage = sink(stage_class, folder, **options)
    ext = stage.extension
    rows = [stage.row(item) for item in make_items(CAPTIONS)]
    first = write(stage, f"{folder}/first.{ext}", rows)
    read = stage.read_shard(first)
    assert [stage.row_key(row) for row in read] == [item.key for item in make_items(CAPTIONS)]
    again = write(stage, f"{folder}/again.{ext}", read)
    assert contents(again) == contents(first)

    subset = write(stage, f"{folder}/subset.{ext}", read[1:4])
    direct = write(stage, f"{folder}/direct.{ext}", rows[1:4])
    assert contents(subset) == contents(direct)
    assert [stage.row_key(row) for row in stage.read_shard(subset)] == [
        stage.row_key(row) for row in rows[1:4]
    ]
    assert all(
        stage.row_bytes(row) == stage.row_bytes(orig) for row, orig in zip(read, rows, strict=True)
    )


def test_webdataset_samples_have_a_txt_member_when_they_have_a_caption(tmp_path):
    import webdataset as wds

    stage = sink(WebDataset, tmp_path)
    items = make_items(CAPTIONS)
    path = write(stage, str(tmp_path / "shard.tar"), [stage.row(item) for item in items])
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    key = [item.key for item in items]
    assert [member.name for member in members] == [
        f"{key[0]}.jpg",
        f"{key[0]}.txt",
        f"{key[0]}.json",
        f"{key[1]}.jpg",
        f"{key[1]}.json",
        f"{key[2]}.jpg",
        f"{key[2]}.txt",
        f"{key[2]}.json",
        f"{key[3]}.jpg",  # an empty caption is none
        f"{key[3]}.json",
        f"{key[4]}.jpg",
        f"{key[4]}.txt",
        f"{key[4]}.json",
    ]
    assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {
        (0, 0o644, 0, 0, "", "")
    }

    samples = list(wds.WebDataset([path], shardshuffle=False))
    assert [sample["__key__"] for sample in samples] == key
    for index, (sample, caption) in enumerate(zip(samples, CAPTIONS, strict=True)):
        if caption:
            assert sample["txt"].decode("utf-8") == caption
        else:
            assert "txt" not in sample
        assert json.loads(sample["json"])["fields"]["id"] == index
        assert Image.open(io.BytesIO(sample["jpg"])).size == (24, 16)


def test_webdataset_caption_field_names_the_field_or_turns_captions_off(tmp_path):
    items = make_items(["a caption"])
    items[0].record["fields"]["alt"] = "alt text"
    assert sink(WebDataset, tmp_path, caption_field="alt").row(items[0])[2] == b"alt text"
    assert sink(WebDataset, tmp_path, caption_field=None).row(items[0])[2] is None
    assert sink(WebDataset, tmp_path, caption_field="missing").row(items[0])[2] is None


def test_caption_of_takes_non_empty_text_only():
    record = {"fields": {"caption": "ok", "n": 3, "empty": "", "none": None}}
    assert caption_of(record, "caption") == "ok"
    assert [caption_of(record, name) for name in ("n", "empty", "none", "x")] == [None] * 4
    assert caption_of({}, "caption") is None and caption_of(record, None) is None


def test_webdataset_read_refuses_a_tar_that_is_not_its_layout(tmp_path):
    path = tmp_path / "other.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("abc.png")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="abc"):
        sink(WebDataset, tmp_path).read_shard(str(path))


def test_parquet_shards_with_and_without_captions_and_images_read_as_one_table(tmp_path):
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from pipeline.stages.parquet import schema

    folder = tmp_path / "table"
    folder.mkdir()
    with_all = sink(Parquet, folder, include_bytes=True, row_group_size=2)
    bare = sink(Parquet, folder, caption_field=None)
    first = make_items(CAPTIONS)
    second = make_items([None, None, None])
    write(with_all, str(folder / "a.parquet"), [with_all.row(item) for item in first])
    write(bare, str(folder / "b.parquet"), [bare.row(item) for item in second])

    assert pq.read_schema(folder / "a.parquet") == pq.read_schema(folder / "b.parquet") == schema()
    table = ds.dataset(folder).to_table()
    assert table.schema == schema() and table.num_rows == 8
    by_file = {"a": table.slice(0, 5).to_pylist(), "b": table.slice(5).to_pylist()}
    assert [row["caption"] for row in by_file["a"]] == [c or None for c in CAPTIONS]
    assert {row["caption"] for row in by_file["b"]} == {None}
    assert {row["image"] is None for row in by_file["b"]} == {True}
    assert Image.open(io.BytesIO(by_file["a"][0]["image"])).size == (24, 16)
    metadata = pq.ParquetFile(folder / "a.parquet").metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [2, 2, 1]


def test_parquet_read_shard_gives_the_rows_it_was_given(tmp_path):
    stage = sink(Parquet, tmp_path, include_bytes=True)
    rows = [stage.row(item) for item in make_items(CAPTIONS)]
    rows[1]["width"] = rows[1]["height"] = None  # a null int column round-trips as None
    path = write(stage, str(tmp_path / "rows.parquet"), rows)
    assert stage.read_shard(path) == rows
    assert stage.row_bytes(rows[0]) > len(rows[0]["image"]) + len(rows[0]["metadata"])


def test_arrays_read_shard_pairs_each_array_with_its_key(tmp_path):
    stage = sink(Arrays, tmp_path, shape=(16, 24, 3))
    items = [item.derive(np.asarray(item.data)) for item in make_items(CAPTIONS)]
    rows = [stage.row(item) for item in items]
    path = write(stage, str(tmp_path / "a.npy"), rows)
    read = stage.read_shard(path)
    assert [key for key, _ in read] == [item.key for item in items]
    assert all(
        np.array_equal(a, b) and a.dtype == b.dtype
        for (_, a), (_, b) in zip(read, rows, strict=True)
    )
    assert stage.row_bytes(read[0]) == 16 * 24 * 3
    (tmp_path / "a.keys.json").write_text(json.dumps(["only-one"]))
    with pytest.raises(ValueError, match="5 arrays but 1 keys"):
        stage.read_shard(path)
