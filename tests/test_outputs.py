"""Atomic, durable outputs: the file mode, and when outputs are flushed to disk."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

from pipeline import storage as outputs
from pipeline.errors import RunIncompleteError
from pipeline.storage import atomic_write, durable_batch


def test_outputs_get_the_usual_file_mode(tmp_path):
    """Atomic writes go through mkstemp (0600); the finished file has 0666 & ~umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "thumb.jpg"
    atomic_write(str(path), b"data")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@pytest.fixture
def flushes(monkeypatch):
    """Every fsync and syncfs call, as (kind, what), while still doing the real call."""
    calls: list[tuple[str, object]] = []
    real_fsync, real_syncfs = os.fsync, outputs._syncfs

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def syncfs(fd: int) -> int:
        calls.append(("syncfs", os.readlink(f"/proc/self/fd/{fd}")))
        return real_syncfs(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    if real_syncfs is not None:
        monkeypatch.setattr(outputs, "_syncfs", syncfs)
    return calls


def test_a_lone_write_flushes_the_file_and_its_folder(tmp_path, flushes):
    atomic_write(str(tmp_path / "a.jpg"), b"a")
    (_, temp_file), folder = flushes  # the temp file, before it is renamed to a.jpg
    assert os.path.basename(temp_file).startswith(outputs.TEMP_PREFIX)
    assert folder == ("fsync", str(tmp_path))


@pytest.mark.skipif(not outputs.BATCHES, reason="no syncfs(2) that reports errors here")
def test_a_batch_puts_its_files_in_place_and_on_disk_together_at_its_end(tmp_path, flushes):
    (tmp_path / "x").mkdir()
    with durable_batch():
        for name in ("a.jpg", "b.jpg", "x/c.jpg"):
            atomic_write(str(tmp_path / name), name.encode())
        with durable_batch():  # a nested batch belongs to the outer one
            atomic_write(str(tmp_path / "d.jpg"), b"d")
        assert flushes == []  # nothing is flushed while the batch runs,
        assert not [*tmp_path.rglob("*.jpg")]  # and no name appears before its data is safe
    # one filesystem: data to disk, renames, names to disk
    assert flushes == [("syncfs", str(tmp_path)), ("syncfs", str(tmp_path))]
    assert (tmp_path / "x" / "c.jpg").read_bytes() == b"x/c.jpg"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "a.jpg",
        "b.jpg",
        "c.jpg",
        "d.jpg",
    ]


def test_where_syncfs_reports_no_errors_each_write_stands_alone(tmp_path, flushes, monkeypatch):
    monkeypatch.setattr(outputs, "BATCHES", False)
    with durable_batch():
        atomic_write(str(tmp_path / "a.jpg"), b"a")
        assert (tmp_path / "a.jpg").read_bytes() == b"a"  # in place at once
    assert [path == str(tmp_path) for _, path in flushes] == [False, True]  # temp, folder


def test_syncfs_reports_errors_from_linux_5_8():
    assert [outputs._syncfs_reports_errors(r) for r in ("5.7.19", "5.8.0-1", "6.18.44-fc")] == [
        False,
        True,
        True,
    ]


@pytest.mark.skipif(not outputs.BATCHES, reason="no syncfs(2) that reports errors here")
def test_a_batch_that_cannot_put_its_files_in_place_stops_the_run(tmp_path):
    """Outputs that may not be on disk must not be reported as written."""
    folder = tmp_path / "gone"
    folder.mkdir()
    with pytest.raises(RunIncompleteError, match="cannot put outputs on disk"), durable_batch():
        atomic_write(str(folder / "a.jpg"), b"a")
        shutil.rmtree(folder)  # its temp file with it


@pytest.mark.skipif(not outputs.BATCHES, reason="no syncfs(2) that reports errors here")
def test_a_failed_block_flushes_nothing_and_leaves_no_temp_file(tmp_path, flushes):
    with pytest.raises(KeyError), durable_batch():
        atomic_write(str(tmp_path / "a.jpg"), b"a")
        raise KeyError("boom")
    assert flushes == []
    assert list(tmp_path.iterdir()) == []


def test_a_missing_folder_is_made_and_a_leftover_temp_name_skipped(tmp_path):
    """Outputs find a missing folder by trying (no stat per file) and make it; a temp
    file a killed run left under the same name is never reused or overwritten."""
    fd, first = outputs.new_temp_file(str(tmp_path))
    os.close(fd)
    number = int(first.rsplit("-", 1)[1].removesuffix(outputs.TEMP_SUFFIX))
    leftover = tmp_path / f"{outputs.TEMP_PREFIX}{os.getpid()}-{number + 1}{outputs.TEMP_SUFFIX}"
    leftover.write_bytes(b"a killed run's")  # the very next name this process would take
    with durable_batch():
        outputs.write_output(str(tmp_path / "new" / "deeper" / "a.jpg"), b"data")
    assert (tmp_path / "new" / "deeper" / "a.jpg").read_bytes() == b"data"
    assert leftover.read_bytes() == b"a killed run's"
