"""Sinks on real files read back with each format's own reader: webdataset, pyarrow, numpy;
fsspec outputs on memory://; one job writing every sink on every backend (distributed too)."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ConfigError
from tests.stage_jobs import decoded_files, records, run_job, write_photos

SINKS = """
files: {{kind: files, path: {images}}}
get: {{kind: download, input: files, allow_schemes: [file]}}
decode: {{kind: decode, input: get}}
square: {{kind: resize, input: decode, size: [24, 16], mode: cover}}
stats: {{kind: stats, input: square}}
tar: {{kind: webdataset, input: stats, path: {out}/wds, shard_size: 3, quality: 90}}
table: {{kind: parquet, input: stats, path: {out}/table, shard_size: 2, include_bytes: true,
        format: png}}
array: {{kind: arrays, input: square, path: {out}/arrays, shape: [16, 24, 3], shard_size: 8}}
files_out: {{kind: write_images, input: square, path: {out}/images, format: webp, sidecar: true}}
"""

BACKENDS = ["sync", "threads", "processes", "distributed"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, 7)
    return folder


def run_sinks(tmp_path, photos, out: str, backend: str = "sync") -> dict:
    """Run every sink into `out`, with a run directory of the backend's own."""
    run_dir = tmp_path / ("run" if backend == "sync" else f"run-{backend}")
    return run_job(
        tmp_path, SINKS.format(images=photos, out=out), backend=backend, output=str(run_dir)
    )


def test_every_sink_reads_back_with_its_own_library(tmp_path, photos):
    # imported here, not at collection: pytest's own memory shows in subprocesses' peak RSS
    import pyarrow.parquet as pq
    import webdataset as wds

    out = tmp_path / "sinks"
    report = run_sinks(tmp_path, photos, str(out))
    assert report["counts"]["ok"] == 7
    by_key = {record["key"]: record for record in records(tmp_path / "run")}

    shards = sorted(str(path) for path in (out / "wds").glob("*.tar"))
    # 3 samples a shard across the partitions (of 4 and 3 items): [3, 3, 1], named by keys
    assert len(shards) == 3
    assert all(re.fullmatch(r"shard-[0-9a-f]{16}\.tar", Path(s).name) for s in shards)
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    for sample in samples:
        tar = next(out for out in by_key[sample["__key__"]]["outputs"] if out.endswith(".tar"))
        assert tar in shards  # each record names the shard that holds it
    assert sorted(sample["__key__"] for sample in samples) == sorted(by_key)
    for sample in samples:
        assert sample["jpg"].size == (24, 16)
        assert sample["json"]["results"] == by_key[sample["__key__"]]["results"]
        assert sorted(sample["json"]["results"]["stats"]) == [
            "brightness",
            "contrast",
            "mean_color",
            "sharpness",
        ]

    table = pq.read_table(out / "table")
    assert table.num_rows == 7 and len(list((out / "table").glob("*.parquet"))) == 4
    summaries = sorted((out / "table").glob("_shard-*.summary.json"))  # skipped by readers
    assert sum(json.loads(path.read_text())["samples"] for path in summaries) == 7
    assert not (out / "table" / ".pieces").exists()  # every piece went into a shard
    for row in table.to_pylist():
        assert (
            Image.open(io.BytesIO(row["image"])).size == (row["width"], row["height"]) == (24, 16)
        )
        metadata = json.loads(row["metadata"])
        assert metadata["url"] == row["url"] == by_key[row["key"]]["url"]
        assert metadata["results"] == by_key[row["key"]]["results"]

    arrays = sorted((out / "arrays").glob("*.npy"))
    stacked = np.concatenate([np.load(path) for path in arrays])
    keys = [
        key for path in arrays for key in json.loads(path.with_suffix(".keys.json").read_text())
    ]
    assert stacked.shape == (7, 16, 24, 3) and stacked.dtype == np.uint8
    assert sorted(keys) == sorted(by_key)
    png = next(row["image"] for row in table.to_pylist() if row["key"] == keys[0])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), stacked[0])  # both lossless
    assert len(list((out / "images").glob("*.webp"))) == 7
    assert not list(out.rglob(".tmp-*")), "temp files left behind"


def test_sinks_write_to_memory_filesystem(tmp_path, photos):
    import pyarrow.parquet as pq

    fs = fsspec.filesystem("memory")
    report = run_sinks(tmp_path, photos, "memory://sinks-test")
    assert report["counts"]["ok"] == 7
    names = sorted(path.split("/")[2] for path in fs.find("/sinks-test"))
    # shards and their summaries; no piece is left
    assert names.count("wds") == 6 and names.count("table") == 8 and names.count("images") == 14
    tables = fs.glob("/sinks-test/table/*.parquet")
    rows = sorted(pq.read_table(fs.open(path, "rb")).num_rows for path in tables)
    assert rows == [1, 2, 2, 2]  # 2 rows a shard across the partitions of 4 and 3 items
    record = records(tmp_path / "run")[0]
    webp = next(out for out in record["outputs"] if out.endswith(".webp"))
    assert webp.startswith("memory://sinks-test/images/")
    sidecar = json.loads(fs.cat(webp.removesuffix(".webp") + ".json"))
    assert sidecar["key"] == record["key"] and sidecar["results"] == record["results"]
    fs.rm("/sinks-test", recursive=True)


def test_arrays_fail_items_of_the_wrong_shape_and_keep_the_rest(tmp_path, photos):
    report = run_job(
        tmp_path,
        decoded_files(photos),
        """
        array: {kind: arrays, input: decode, path: arrays, shape: [72, 96, 3]}
        """,
    )
    assert report["counts"]["ok"] == 7
    report = run_job(
        tmp_path,
        decoded_files(photos),
        """
        array: {kind: arrays, input: decode, path: arrays, shape: [16, 16, 3]}
        """,
    )
    assert report["failures_by_reason"] == {"transform_error": 7}


@pytest.mark.slow
def test_sinks_write_identical_bytes_on_every_backend(tmp_path, photos):
    contents = {}
    for backend in BACKENDS:
        out = tmp_path / backend
        assert run_sinks(tmp_path, photos, str(out), backend)["counts"]["ok"] == 7
        contents[backend] = {
            str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
        }
    # tars, parquets and npy (+ keys) with their summaries; webp + json
    assert len(contents["sync"]) == 3 * 2 + 4 * 2 + 3 + 14
    for backend in BACKENDS:
        assert sorted(contents[backend]) == sorted(contents["sync"]), backend
        assert contents[backend] == contents["sync"], backend


@pytest.mark.parametrize(
    ("path", "problem"),
    [("gs://bucket/out", "install gcsfs"), ("nosuch://x/out", "Protocol not known: nosuch")],
)
def test_a_sink_on_an_unavailable_filesystem_is_a_config_error(tmp_path, photos, path, problem):
    with pytest.raises(ConfigError, match=f"stages.tar.path: .*{problem}"):
        run_job(
            tmp_path,
            decoded_files(photos),
            f"tar: {{kind: webdataset, input: decode, path: {path}}}",
        )


def test_rerun_with_new_items_keeps_earlier_shards(tmp_path, photos):
    """An incremental run packs pending items into partitions numbered from 0 again:
    shards are named by their keys, so the first run's shards are never overwritten."""
    import webdataset as wds

    first = tmp_path / "first"
    first.mkdir()
    for path in sorted(photos.iterdir())[:4]:
        (first / path.name).write_bytes(path.read_bytes())
    job = f"""
    files: {{kind: files, path: {first}}}
    get: {{kind: download, input: files, allow_schemes: [file]}}
    decode: {{kind: decode, input: get}}
    square: {{kind: resize, input: decode, size: [24, 16], mode: cover}}
    tar: {{kind: webdataset, input: square, path: wds, shard_size: 3}}
    """
    assert run_job(tmp_path, job)["counts"]["ok"] == 4
    for path in sorted(photos.iterdir())[4:]:
        (first / path.name).write_bytes(path.read_bytes())
    report = run_job(tmp_path, job)
    assert report["counts"] == {"ok": 3, "failed": 0, "skipped": 4}
    shards = sorted(str(path) for path in (tmp_path / "out" / "wds").glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(samples) == 7 == len({sample["__key__"] for sample in samples})


SIZE_FROM_FIELDS = """
def size_from_fields(record, image):
    return {"width": record["fields"]["w"]}
"""


@pytest.fixture
def size_from_fields(tmp_path, monkeypatch):
    """A user function (a module of its own, importable by name) that copies the list's
    `w` column into the record's `width` (no decode set it), which the parquet sink stores
    as int32."""
    folder = tmp_path / "modules"
    folder.mkdir()
    (folder / "shard_userfuncs.py").write_text(SIZE_FROM_FIELDS)
    monkeypatch.syspath_prepend(str(folder))
    yield "shard_userfuncs:size_from_fields"
    sys.modules.pop("shard_userfuncs", None)


# 7 items in one partition, 4 rows a shard: one piece is written when the 4th item arrives,
# the last one (3 items) when the partition ends (`finish`); each becomes a shard
@pytest.mark.parametrize(("bad_line", "bad_shard"), [(2, {1, 2, 3, 4}), (6, {5, 6, 7})])
def test_a_shard_that_cannot_be_written_fails_all_its_items(
    tmp_path, photos, size_from_fields, bad_line, bad_shard
):
    """One row whose width is text ("96px", from a list column of mixed types) makes pyarrow
    refuse the whole table. Every item of that shard fails with the reason, the other shard
    is written, nothing partial is left, and a re-run retries the failed items."""
    import pyarrow.parquet as pq

    listing = tmp_path / "list.jsonl"

    def write_list(bad: int | None) -> None:
        rows = [
            {"url": str(path), "w": "96px" if line == bad else 96}
            for line, path in enumerate(sorted(photos.iterdir()), 1)
        ]
        listing.write_text("".join(json.dumps(row) + "\n" for row in rows))

    stages = f"""
    urls: {{kind: url_list, path: {listing}}}
    get: {{kind: download, input: urls, allow_schemes: [file]}}
    size: {{kind: python, input: get, function: "{size_from_fields}", takes: record}}
    table: {{kind: parquet, input: size, path: table, shard_size: 4}}
    """
    write_list(bad_line)
    report = run_job(tmp_path, stages, partition_size=7)
    failed = len(bad_shard)
    assert report["counts"] == {"ok": 7 - failed, "failed": failed, "skipped": 0}
    assert report["failures_by_reason"] == {"write_error": failed}
    done = records(tmp_path / "out")
    for record in done:
        if record["index"] in bad_shard:
            assert (record["status"], record["stage"], record["reason"], record["outputs"]) == (
                "failed",
                "table",
                "write_error",
                [],
            )
            assert "ArrowInvalid" in record["message"] and "'96px'" in record["message"]
        else:
            assert record["status"] == "ok" and len(record["outputs"]) == 1
    written = sorted((tmp_path / "out" / "table").glob("[!_]*"))
    assert [path.suffix for path in written] == [".parquet"]  # no partial, temp file or piece
    ok_keys = {r["key"] for r in done if r["status"] == "ok"}
    assert set(pq.read_table(written[0]).column("key").to_pylist()) == ok_keys

    write_list(None)  # the list fixed: the failed items are retried, the others kept
    report = run_job(tmp_path, stages, partition_size=7)
    assert report["counts"] == {"ok": failed, "failed": 0, "skipped": 7 - failed}
    assert {r["index"] for r in records(tmp_path / "out") if r["status"] == "ok"} == bad_shard
    assert pq.read_table(tmp_path / "out" / "table").num_rows == 7
