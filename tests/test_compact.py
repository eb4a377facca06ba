"""`pipeline compact` on real runs: incremental runs of a few new items each leave small
shards (webdataset, parquet, arrays); compaction merges them, drops stale samples, keeps
the manifest and results.jsonl pointing at the samples, survives a crash at its commit,
and holds the run lock."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.execution.compaction import Sample, compact, cut
from pipeline.execution.runner import RunRequest, run
from pipeline.stages.shared.shards import ShardOptions
from pipeline.state.manifest import Manifest
from tests.conftest import REPO
from tests.stage_jobs import records, run_job, write_photos
from tests.test_lock import cli

JOB = """
files: {{kind: files, path: {src}}}
get: {{kind: download, input: files, allow_schemes: [file]}}
decode: {{kind: decode, input: get}}
square: {{kind: resize, input: decode, size: [24, 16], mode: cover}}
tar: {{kind: webdataset, input: square, path: wds, shard_size: 4}}
table: {{kind: parquet, input: square, path: table, shard_size: 4, include_bytes: true}}
array: {{kind: arrays, input: square, path: arrays, shape: [16, 24, 3], shard_size: 4}}
"""
FOLDERS = {"tar": ("wds", "tar"), "table": ("table", "parquet"), "array": ("arrays", "npy")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, 14)
    return sorted(folder.iterdir())


class Job:
    """The job over a folder of images that each run adds a few new ones to."""

    def __init__(self, tmp_path: Path, photos: list[Path]):
        self.tmp_path, self.photos, self.added = tmp_path, photos, 0
        self.src = tmp_path / "src"
        self.src.mkdir()
        self.out = tmp_path / "out"

    def add(self, count: int, full: bool = False) -> dict:
        """Copy `count` new images into the folder and run (incrementally unless `full`)."""
        for path in self.photos[self.added : self.added + count]:
            shutil.copy(path, self.src / path.name)
        self.added += count
        return self.run(full)

    def run(self, full: bool = False) -> dict:
        if not full:
            return run_job(self.tmp_path, JOB.format(src=self.src))
        return run(RunRequest(config=self.tmp_path / "job.yaml", full=True))

    def shards(self, sink: str) -> list[Path]:
        folder, extension = FOLDERS[sink]
        return sorted((self.out / folder).glob(f"*.{extension}"))


def incremental(tmp_path: Path, photos: list[Path], batches: list[int]) -> Job:
    job = Job(tmp_path, photos)
    for count in batches:
        assert job.add(count)["counts"]["ok"] == count
    return job


def shard_keys(sink: str, path: Path) -> list[str]:
    """The keys a shard holds, in order, read with the format's own library."""
    import pyarrow.parquet as pq

    if sink == "tar":
        with tarfile.open(path) as tar:
            names = [info.name.split(".", 1)[0] for info in tar if info.isfile()]
        return list(dict.fromkeys(names))
    if sink == "table":
        return pq.read_table(path, columns=["key"]).column("key").to_pylist()
    return json.loads(path.with_suffix(".keys.json").read_text())


def manifest_rows(out: Path, query: str) -> list[tuple]:
    with sqlite3.connect(f"file:{out / 'manifest.sqlite'}?mode=ro", uri=True) as db:
        return db.execute(query).fetchall()


def tree_state(folder: Path) -> dict[str, object]:
    """Every output file's inode, mtime and size (not the lock's or the manifest's), and
    the manifest's shards and `sinks` rows."""
    files = {
        str(path): (path.stat().st_ino, path.stat().st_mtime_ns, path.stat().st_size)
        for path in folder.rglob("*")
        if not path.name.startswith(("manifest.sqlite", ".lock"))
    }
    tables = [manifest_rows(folder, f"SELECT * FROM {table}") for table in ("shards", "sinks")]
    return {**files, "tables": tables}


def assert_consistent(job: Job) -> None:
    """Every sample in exactly one shard file, each file a done shard, and the manifest's
    `sinks` rows and every record pointing at the shard and position the sample is in."""
    keys = {key for (key,) in manifest_rows(job.out, "SELECT key FROM items")}
    assert manifest_rows(job.out, "SELECT * FROM shards WHERE state != 'done'") == []
    where: dict[tuple[str, str], tuple[str, int]] = {}
    for sink in FOLDERS:
        done = {
            p for (p,) in manifest_rows(job.out, f"SELECT path FROM shards WHERE sink='{sink}'")
        }
        assert {str(path) for path in job.shards(sink)} == done
        for path in job.shards(sink):
            for position, key in enumerate(shard_keys(sink, path)):
                assert (key, sink) not in where, f"{key} twice in {sink}"
                where[key, sink] = (str(path), position)
        assert {key for key, name in where if name == sink} == keys
    for key, sink, outputs in manifest_rows(job.out, "SELECT key, sink, outputs FROM sinks"):
        assert json.loads(outputs) == [where[key, sink][0]]
    for record in records(job.out):
        for sink, sample in record.get("shards", {}).items():
            assert (sample["path"], sample["position"]) == where[record["key"], sink]
            assert record["sink_outputs"][sink] == [sample["path"]]
        expected = sorted(where[record["key"], sink][0] for sink in FOLDERS)
        assert sorted(record["outputs"]) == expected
    leftovers = [
        p for p in job.out.rglob("*") if p.name.startswith(".tmp-") or ".pieces" in p.parts
    ]
    assert leftovers == []


def webdataset_keys(job: Job) -> list[str]:
    import webdataset as wds

    shards = [str(path) for path in job.shards("tar")]
    return [sample["__key__"] for sample in wds.WebDataset(shards, shardshuffle=False)]


def parquet_rows(job: Job) -> list[dict]:
    import pyarrow.dataset as ds

    table = ds.dataset(job.out / "table", format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda row: row["key"])


def test_compact_merges_the_small_shards_of_incremental_runs(tmp_path, photos, capsys):
    job = incremental(tmp_path, photos, [3, 2, 3, 1])
    assert sorted(len(shard_keys("tar", path)) for path in job.shards("tar")) == [1, 2, 3, 3]
    rows = parquet_rows(job)
    capsys.readouterr()

    assert cli("compact", str(job.out)) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{sink}: 3 shards (8 samples) merged into 2; 0 stale samples dropped"
        for sink in ("array", "table", "tar")
    ]
    for sink in FOLDERS:
        assert sorted(len(shard_keys(sink, p)) for p in job.shards(sink)) == [1, 4, 4]
    keys = webdataset_keys(job)
    assert len(keys) == 9 == len(set(keys))
    assert parquet_rows(job) == rows  # one table, the same rows
    assert_consistent(job)


def test_after_compaction_a_run_redoes_nothing_and_compact_changes_nothing(tmp_path, photos):
    job = incremental(tmp_path, photos, [3, 2, 3, 1])
    compact(job.out)
    shards = {sink: job.shards(sink) for sink in FOLDERS}
    report = job.run()
    assert report["counts"] == {"ok": 0, "failed": 0, "skipped": 9}
    assert report["exit_code"] == 0
    assert {sink: job.shards(sink) for sink in FOLDERS} == shards
    assert_consistent(job)

    before = tree_state(job.out)
    done = compact(job.out)
    assert [line.summary() for line in done][-1] == "tar: nothing to compact (1 small shard)"
    assert tree_state(job.out) == before


def test_a_later_compaction_merges_the_last_shard_with_new_ones(tmp_path, photos):
    job = incremental(tmp_path, photos, [3, 2, 3, 1])
    compact(job.out)
    assert job.add(2)["counts"] == {"ok": 2, "failed": 0, "skipped": 9}
    done = {result.sink: result for result in compact(job.out)}
    assert (
        done["tar"].summary() == "tar: 2 shards (3 samples) merged into 1; 0 stale samples dropped"
    )
    assert sorted(len(shard_keys("tar", p)) for p in job.shards("tar")) == [3, 4, 4]
    assert_consistent(job)


def test_samples_redone_into_another_shard_are_dropped(tmp_path, photos):
    """A full run over two of the first run's items and a new one writes the three into a
    new shard: the two's copies in the first run's shard are stale, and dropped."""
    job = incremental(tmp_path, photos, [3, 3])
    aside = tmp_path / "aside"
    aside.mkdir()
    names = sorted(path.name for path in job.src.iterdir())
    for name in [names[0], *names[3:]]:  # the full run's list: the 2nd and 3rd images
        (job.src / name).rename(aside / name)
    assert job.add(1, full=True)["counts"]["ok"] == 3
    for name in [names[0], *names[3:]]:
        (aside / name).rename(job.src / name)
    assert len(webdataset_keys(job)) == 9  # 7 items, 2 of them twice

    done = {result.sink: result.summary() for result in compact(job.out)}

    # the first shard (1 live sample) and the second merge; the third stays whole
    assert done["tar"] == "tar: 2 shards (4 samples) merged into 1; 2 stale samples dropped"
    keys = webdataset_keys(job)
    assert len(keys) == 7 == len(set(keys))
    assert_consistent(job)
    assert job.run()["counts"] == {"ok": 0, "failed": 0, "skipped": 7}


@pytest.mark.parametrize("then", ["compact", "run"])
def test_a_crash_before_the_commit_leaves_the_old_shards_valid(tmp_path, photos, monkeypatch, then):
    job = incremental(tmp_path, photos, [3, 2, 3, 1])
    old = {sink: job.shards(sink) for sink in FOLDERS}
    results = (job.out / "results.jsonl").read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("killed between writing a shard and committing it")

    monkeypatch.setattr(Manifest, "replace_shards", crash)
    with pytest.raises(RuntimeError, match="killed"):
        compact(job.out)
    monkeypatch.undo()

    written = manifest_rows(job.out, "SELECT path FROM shards WHERE state = 'writing'")
    assert len(written) == 1 and Path(written[0][0]).is_file()  # the new shard: garbage
    done = manifest_rows(job.out, "SELECT path FROM shards WHERE state = 'done'")
    assert {Path(path) for (path,) in done} == {path for paths in old.values() for path in paths}
    assert (job.out / "results.jsonl").read_bytes() == results
    if then == "run":
        assert job.run()["counts"] == {"ok": 0, "failed": 0, "skipped": 9}
        assert {sink: job.shards(sink) for sink in FOLDERS} == old
    else:
        compact(job.out)
        assert len(job.shards("tar")) == 3
    assert_consistent(job)


@pytest.mark.parametrize("then", ["compact", "run"])
def test_a_crash_after_a_commit_is_finished_by_the_next_compact_or_run(
    tmp_path, photos, monkeypatch, then
):
    """Killed right after the first new shard committed: the old shards it replaced are
    obsolete but still there, results.jsonl still names them."""
    job = incremental(tmp_path, photos, [3, 2, 3, 1])
    replace = Manifest.replace_shards

    def commit_then_crash(self, *args, **kwargs):
        replace(self, *args, **kwargs)
        raise RuntimeError("killed after a commit")

    monkeypatch.setattr(Manifest, "replace_shards", commit_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        compact(job.out)
    monkeypatch.undo()
    [(obsolete,)] = manifest_rows(job.out, "SELECT path FROM shards WHERE state = 'obsolete'")
    assert Path(obsolete).is_file()
    assert any(obsolete in record["outputs"] for record in records(job.out))  # still named

    if then == "run":  # deletes the obsolete shard, records where the manifest says
        assert job.run()["counts"] == {"ok": 0, "failed": 0, "skipped": 9}
        assert manifest_rows(job.out, "SELECT * FROM shards WHERE state != 'done'") == []
    compact(job.out)  # drops the copies of the moved samples left in the next old shard
    assert len(job.shards("tar")) == 3
    assert_consistent(job)


def test_compact_needs_a_known_sink_and_a_run_directory(tmp_path, photos, capsys):
    job = incremental(tmp_path, photos, [3, 2])
    capsys.readouterr()
    assert cli("compact", str(job.out), "--sink", "thumbs") == 2
    error = capsys.readouterr().err
    assert "no sharded sink named 'thumbs'" in error and "array, table, tar" in error

    tables = job.shards("table")
    assert cli("compact", str(job.out), "--sink", "tar") == 0
    assert capsys.readouterr().out.startswith("tar: 2 shards (5 samples) merged into 2")
    assert job.shards("table") == tables and len(job.shards("tar")) == 2

    nowhere = tmp_path / "nowhere"
    assert cli("compact", str(nowhere)) == 2
    assert "no manifest" in capsys.readouterr().err and not nowhere.exists()
    with pytest.raises(ConfigError, match="no sharded sinks on record"):
        (tmp_path / "empty").mkdir()
        Manifest(tmp_path / "empty" / "manifest.sqlite").db.close()
        compact(tmp_path / "empty")


def test_a_lock_held_by_another_process_stops_compact(tmp_path, photos, capsys):
    job = incremental(tmp_path, photos, [3, 2])
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pipeline.state.lock import RunLock\n"
            f"with RunLock({str(job.out)!r}):\n    print('held', flush=True)\n"
            "    sys.stdin.read()\n",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_state(job.out)
        capsys.readouterr()
        assert cli("compact", str(job.out)) == 3
        assert "another run of this job holds" in capsys.readouterr().err
        assert tree_state(job.out) == before
    finally:
        holder.communicate("", timeout=30)  # EOF: the holder lets go and exits


def test_cut_ends_a_shard_at_shard_size_or_before_shard_bytes():
    """The rule a run cuts by (`ShardAssembler`): `shard_size` samples, or before the sample
    that would take the shard over `shard_bytes`; a sample bigger than that stands alone."""
    samples = [Sample(f"k{i}", "f", "old", i, size) for i, size in enumerate([4, 4, 4, 9, 1, 1])]
    options = ShardOptions(path="x", shard_size=3, shard_bytes=10)
    groups = cut(samples, options)
    assert [[s.key for s in group] for group in groups] == [
        ["k0", "k1"],
        ["k2"],
        ["k3", "k4"],
        ["k5"],
    ]
