"""Shards of thousands of samples whatever the partition size (issue 13): the same shards,
byte for byte, on every backend; read back by webdataset and pyarrow; and `kill -9` at
any point followed by a re-run leaves every sample in exactly one shard."""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import tarfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.execution.runner import RunRequest, run
from pipeline.testing.images import jpeg_bytes, photo
from tests.stage_jobs import records
from tests.test_crash_resume import served_list, start_run, wait_for

ITEMS = 2000

JOB = """
name: big-shards
output: {out}
partition_size: 64
stages:
  urls:   {{kind: url_list, path: {listing}, column: url}}
  get:    {{kind: download, input: urls, allow_schemes: [file]}}
  decode: {{kind: decode, input: get}}
  tar:    {{kind: webdataset, input: decode, path: wds, shard_size: 1000}}
  table:  {{kind: parquet, input: decode, path: table, shard_size: 1000, include_bytes: true}}
"""


def caption(index: int) -> str:
    """Every seventh item has no caption (an empty cell)."""
    return "" if index % 7 == 0 else f"photo number {index}"


@pytest.fixture(scope="module")
def listing(tmp_path_factory) -> Path:
    """A csv of 2,000 distinct small JPEGs on disk, with a caption column."""
    folder = tmp_path_factory.mktemp("big")
    path = folder / "list.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption"])
        for index in range(ITEMS):
            image = folder / f"p{index:04d}.jpg"
            image.write_bytes(jpeg_bytes(photo(16, 12, seed=index)))
            writer.writerow([image, caption(index)])
    return path


def shard_files(run_dir: Path) -> dict[str, bytes]:
    """Every file under the sinks' folders, by relative name."""
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for folder in ("wds", "table")
        for path in sorted((run_dir / folder).rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def runs(listing, tmp_path_factory) -> dict[str, Path]:
    """The job on threads, processes and distributed, each in a run directory of its own."""
    base = tmp_path_factory.mktemp("runs")
    config = base / "job.yaml"
    found = {}
    for backend in ("threads", "processes", "distributed"):
        out = base / backend
        config.write_text(JOB.format(out=out, listing=listing))
        report = run(RunRequest(config=config, backend=backend, workers=2))
        assert report["counts"] == {"ok": ITEMS, "failed": 0, "skipped": 0}, backend
        found[backend] = out
    return found


@pytest.mark.slow
def test_the_same_two_full_shards_byte_for_byte_on_every_backend(runs):
    contents = {backend: shard_files(out) for backend, out in runs.items()}
    names = sorted(contents["threads"])
    assert len([n for n in names if n.endswith(".tar")]) == 2
    assert len([n for n in names if n.endswith(".parquet")]) == 2
    assert len([n for n in names if n.endswith(".summary.json")]) == 4
    for backend, files in contents.items():
        assert sorted(files) == names, backend
        assert files == contents["threads"], backend
    for name in names:
        if name.endswith(".summary.json"):
            assert json.loads(contents["threads"][name])["samples"] == 1000


@pytest.mark.slow
def test_webdataset_reads_2000_samples_with_captions_as_txt(runs):
    import webdataset as wds

    out = runs["threads"]
    tars = sorted(str(path) for path in (out / "wds").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(samples) == ITEMS == len({sample["__key__"] for sample in samples})
    by_key = {record["key"]: record for record in records(out)}
    for sample in samples:
        index = by_key[sample["__key__"]]["index"] - 2  # csv line 2 is item 0
        if caption(index):
            assert sample["txt"].decode() == caption(index)
        else:
            assert "txt" not in sample
        assert json.loads(sample["json"])["fields"]["caption"] == caption(index)


@pytest.mark.slow
def test_each_record_names_its_shard_and_position(runs):
    out = runs["processes"]
    members: dict[str, list[str]] = {}
    for path in (out / "wds").glob("*.tar"):
        with tarfile.open(path) as tar:
            names = [member.name.split(".")[0] for member in tar.getmembers()]
        members[str(path)] = list(dict.fromkeys(names))  # keys in sample order
    for record in records(out):
        where = record["shards"]["tar"]
        assert members[where["path"]][where["position"]] == record["key"]
        assert record["sink_outputs"]["tar"] == [where["path"]]
        assert where["path"] in record["outputs"]


@pytest.mark.slow
def test_pyarrow_reads_the_parquet_folder_as_2000_rows(runs):
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    folder = runs["distributed"] / "table"
    table = ds.dataset(folder, format="parquet").to_table()
    assert table.num_rows == ITEMS
    assert table.column("caption").null_count == len([i for i in range(ITEMS) if not caption(i)])
    for path in folder.glob("*.parquet"):
        metadata = pq.ParquetFile(path).metadata
        assert metadata.num_rows == 1000 and metadata.num_row_groups == 1  # 1000 rows a group


# --- kill -9 at any point ---------------------------------------------------------------

CRASH_ITEMS = 240

CRASH_JOB = """
name: crash-shards
output: {out}
partition_size: 8
backend: {{kind: processes, workers: 2}}
stages:
  urls:   {{kind: url_list, path: {listing}}}
  get:    {{kind: download, input: urls, allow_hosts: [127.0.0.1]}}
  decode: {{kind: decode, input: get}}
  tar:    {{kind: webdataset, input: decode, path: wds, shard_size: 20}}
  table:  {{kind: parquet, input: decode, path: table, shard_size: 30}}
"""


@pytest.fixture(scope="module")
def slow_listing(tmp_path_factory):
    """URLs served with 50 ms of latency each: a run takes a few seconds."""
    yield from served_list(tmp_path_factory.mktemp("crash"), CRASH_ITEMS, 0.05, (24, 18))


def done_shards(run_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{run_dir / 'manifest.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM shards WHERE state = 'done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def pieces_exist(run_dir: Path) -> bool:
    return any((run_dir / "wds" / ".pieces").glob("*.tar"))


def tar_samples(run_dir: Path) -> dict[str, bytes]:
    """Every sample's image bytes in the run's tar shards, by key; a key twice fails."""
    found: dict[str, bytes] = {}
    for path in sorted((run_dir / "wds").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                if extension == "jpg":
                    assert key not in found, f"{key} is in two shards"
                    found[key] = tar.extractfile(member).read()
    return found


def parquet_keys(run_dir: Path) -> list[str]:
    import pyarrow.dataset as ds

    return ds.dataset(run_dir / "table", format="parquet").to_table().column("key").to_pylist()


@pytest.fixture(scope="module")
def clean_samples(tmp_path_factory, slow_listing):
    out = tmp_path_factory.mktemp("clean-shards") / "out"
    config = out.parent / "job.yaml"
    config.write_text(CRASH_JOB.format(out=out, listing=slow_listing))
    assert run(RunRequest(config=config))["counts"]["ok"] == CRASH_ITEMS
    return tar_samples(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "moment",
    [pieces_exist, lambda out: done_shards(out) >= 1, lambda out: done_shards(out) >= 8],
    ids=["pieces-written", "first-shard-done", "mid-batch"],
)
def test_kill_9_at_any_point_then_every_sample_is_in_exactly_one_shard(
    tmp_path, slow_listing, clean_samples, moment
):
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(CRASH_JOB.format(out=out, listing=slow_listing))
    process = start_run(config)
    wait_for(lambda: moment(out))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    report = run(RunRequest(config=config))
    counts = report["counts"]
    print("after the kill, the re-run:", counts)
    assert counts["ok"] + counts["skipped"] == CRASH_ITEMS and counts["failed"] == 0
    assert counts["ok"] > 0, "the kill must land mid-batch"

    assert tar_samples(out) == clean_samples  # each sample once, the same bytes
    keys = parquet_keys(out)
    assert len(keys) == len(set(keys)) == CRASH_ITEMS
    leftovers = [
        *out.rglob(".tmp-*"),
        *out.rglob(".pieces/*"),
    ]
    assert not leftovers
    with sqlite3.connect(out / "manifest.sqlite") as db:
        states = dict(db.execute("SELECT state, count(*) FROM shards GROUP BY 1").fetchall())
        committed = {path for (path,) in db.execute("SELECT path FROM shards")}
    assert set(states) == {"done"}
    on_disk = {str(path) for path in [*out.glob("wds/*.tar"), *out.glob("table/*.parquet")]}
    assert on_disk == committed  # no orphan shard, none missing


# --- shard_bytes, and a shard that cannot be assembled -----------------------------------

SMALL_JOB = """
name: small-shards
output: {out}
partition_size: 4
stages:
  urls:   {{kind: url_list, path: {listing}, column: url}}
  get:    {{kind: download, input: urls, allow_schemes: [file]}}
  decode: {{kind: decode, input: get}}
  tar:    {{kind: webdataset, input: decode, path: wds, shard_size: 10{extra}}}
"""


@pytest.fixture
def small_job(tmp_path, listing):
    def write(extra: str = "", items: int = 30) -> Path:
        rows = listing.read_text().splitlines()[: items + 1]
        small = tmp_path / "small.csv"
        small.write_text("\n".join(rows) + "\n")
        config = tmp_path / "small.yaml"
        config.write_text(SMALL_JOB.format(out=tmp_path / "out", listing=small, extra=extra))
        return config

    return write


def test_shard_bytes_ends_a_shard_before_it_grows_past_the_limit(small_job, tmp_path):
    report = run(RunRequest(config=small_job(", shard_bytes: 8000"), backend="threads"))
    assert report["counts"]["ok"] == 30
    summaries = [
        json.loads(path.read_text()) for path in (tmp_path / "out" / "wds").glob("_*.summary.json")
    ]
    sample_bytes = {r["shards"]["tar"]["bytes"] for r in records(tmp_path / "out")}
    assert sum(summary["samples"] for summary in summaries) == 30
    assert all(summary["samples"] < 10 for summary in summaries)  # bytes ended each first
    # a shard's samples add up to at most shard_bytes (the tar's end blocks aside)
    assert all(summary["samples"] * min(sample_bytes) <= 8000 for summary in summaries)


def test_a_shard_that_cannot_be_assembled_fails_its_samples_then_a_rerun_writes_them(
    small_job, tmp_path, monkeypatch
):
    from pipeline.stages.shared.shards import ShardedSink

    read_rows = ShardedSink._rows

    def refuse_the_second(self, parts):  # reading its pieces fails: an I/O error
        # pieces of 4 items, shards of 10: only the second starts mid-piece (item 10)
        if parts[0][1][0] == 2:
            raise OSError(5, "Input/output error")
        return read_rows(self, parts)

    config = small_job()
    monkeypatch.setattr(ShardedSink, "_rows", refuse_the_second)
    report = run(RunRequest(config=config, backend="threads"))
    assert report["counts"] == {"ok": 20, "failed": 10, "skipped": 0}
    failed = [r for r in records(tmp_path / "out") if r["status"] == "failed"]
    assert {(r["stage"], r["reason"]) for r in failed} == {("tar", "write_error")}
    assert all("tar" not in r.get("shards", {}) and not r["outputs"] for r in failed)
    assert not list((tmp_path / "out" / "wds").rglob(".pieces/*"))

    monkeypatch.setattr(ShardedSink, "_rows", read_rows)
    report = run(RunRequest(config=config, backend="threads"))
    assert report["counts"] == {"ok": 10, "failed": 0, "skipped": 20}
    assert len(tar_samples(tmp_path / "out")) == 30


def test_items_a_killed_run_put_in_committed_shards_get_their_manifest_row(small_job, tmp_path):
    """A kill between committing a shard (its samples' sinks rows) and committing the
    records leaves items done without an `items` row: the next run skips them, as done,
    and records them ok."""
    config = small_job()
    assert run(RunRequest(config=config, backend="threads"))["counts"]["ok"] == 30
    manifest = tmp_path / "out" / "manifest.sqlite"
    with sqlite3.connect(manifest) as db:  # the state such a kill leaves
        lost = [key for (key,) in db.execute("SELECT key FROM items ORDER BY key LIMIT 12")]
        db.executemany("DELETE FROM items WHERE key = ?", [(key,) for key in lost])
        sinks_before = db.execute("SELECT * FROM sinks ORDER BY key, sink").fetchall()

    report = run(RunRequest(config=config, backend="threads"))
    assert report["counts"] == {"ok": 0, "failed": 0, "skipped": 30}
    with sqlite3.connect(manifest) as db:
        statuses = dict(db.execute("SELECT key, status FROM items").fetchall())
        assert db.execute("SELECT * FROM sinks ORDER BY key, sink").fetchall() == sinks_before
    assert len(statuses) == 30 and set(statuses.values()) == {"ok"}
    assert len(tar_samples(tmp_path / "out")) == 30


# --- any partition size, shard size, byte limit, failures and completion order -----------


@example(  # a run's last shard is the tail of one piece: copied, never the whole piece moved
    items=24,
    partition_size=6,
    shard_size=10,
    shard_bytes=None,
    missing=set(range(12, 24)),
    backend="sync",
)
@given(
    items=st.integers(1, 40),
    partition_size=st.integers(1, 12),
    shard_size=st.integers(1, 25),
    shard_bytes=st.none() | st.integers(1, 20_000),
    missing=st.sets(st.integers(0, 39), max_size=8),
    backend=st.sampled_from(["sync", "threads"]),
)
def test_every_ok_sample_is_in_exactly_one_shard_in_order(
    tmp_path_factory, listing, items, partition_size, shard_size, shard_bytes, missing, backend
):
    """Whatever the sizes, the failed items (missing files) and the order partitions finish
    in: each ok item's sample is in one shard, at the position its record names; shards
    follow the input order and are full but for the last (or cut by shard_bytes)."""
    base = tmp_path_factory.mktemp("fuzz")
    rows = listing.read_text().splitlines()
    urls = base / "list.csv"
    chosen = [rows[0]] + [
        row.replace(".jpg", "-gone.jpg") if n in missing else row
        for n, row in enumerate(rows[1 : items + 1])
    ]
    urls.write_text("\n".join(chosen) + "\n")
    limit = f", shard_bytes: {shard_bytes}" if shard_bytes else ""
    config = base / "job.yaml"
    config.write_text(
        SMALL_JOB.format(out=base / "out", listing=urls, extra=limit)
        .replace("partition_size: 4", f"partition_size: {partition_size}")
        .replace("shard_size: 10", f"shard_size: {shard_size}")
    )
    report = run(RunRequest(config=config, backend=backend, workers=3))
    ok = [r for r in records(base / "out") if r["status"] == "ok"]
    assert report["counts"]["ok"] == len(ok) == items - len([n for n in missing if n < items])

    shards = {}
    for path in sorted((base / "out" / "wds").glob("*.tar")):
        with tarfile.open(path) as tar:
            shards[str(path)] = list(dict.fromkeys(m.name.split(".")[0] for m in tar.getmembers()))
    assert sorted(key for keys in shards.values() for key in keys) == sorted(r["key"] for r in ok)
    for record in ok:
        where = record["shards"]["tar"]
        assert shards[where["path"]][where["position"]] == record["key"]
    ordered = sorted(shards.values(), key=lambda keys: by_index(ok)[keys[0]])
    flat = [key for keys in ordered for key in keys]
    assert flat == [r["key"] for r in ok]  # the input's order, shard after shard
    if not shard_bytes:
        assert all(len(keys) == shard_size for keys in ordered[:-1])
    assert all(len(keys) <= shard_size for keys in ordered)
    assert not list((base / "out").rglob(".pieces/*"))


def by_index(found: list[dict]) -> dict[str, int]:
    return {record["key"]: record["index"] for record in found}


def test_progress_counts_records_that_wait_for_their_shard(small_job):
    """With one shard for the whole run, no record is committed before the end: progress
    still shows the items whose tasks finished."""
    seen: list[tuple[int, int]] = []
    config = small_job().read_text().replace("shard_size: 10", "shard_size: 1000")
    path = small_job()
    path.write_text(config)
    report = run(RunRequest(config=path), lambda stats: seen.append((stats.items, stats.waiting)))
    assert report["counts"]["ok"] == 30
    waiting = [(items, waits) for items, waits in seen if waits]
    assert waiting and all(items == 0 for items, _ in waiting)  # none committed meanwhile
    assert max(waits for _, waits in waiting) == 30 and seen[-1] == (30, 0)


def test_a_full_rerun_that_fails_to_assemble_keeps_the_earlier_shards(
    small_job, tmp_path, monkeypatch
):
    """`--full` redoes the same items into shards of the same names: if writing them fails,
    the earlier run's shards (committed) are kept, never collected as garbage."""
    from pipeline.stages.shared.shards import ShardedSink

    config = small_job()
    assert run(RunRequest(config=config))["counts"]["ok"] == 30
    before = tar_samples(tmp_path / "out")

    def refuse(self, parts):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ShardedSink, "_rows", refuse)
    report = run(RunRequest(config=config, full=True))
    assert report["failures_by_reason"] == {"write_error": 30}
    monkeypatch.undo()
    report = run(RunRequest(config=config))  # the garbage collection of a run
    assert report["counts"] == {"ok": 0, "failed": 0, "skipped": 30}
    assert tar_samples(tmp_path / "out") == before
