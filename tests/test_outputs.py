"""Atomic, durable outputs: the file mode, and when outputs are flushed to disk."""

from __future__ import annotations

import os
import stat

import pytest

from pipeline.errors import RunIncompleteError
from pipeline.stages import outputs
from pipeline.stages.outputs import atomic_write, durable_batch


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


@pytest.mark.skipif(outputs._syncfs is None, reason="no syncfs(2) here")
def test_a_batch_flushes_once_per_filesystem_at_its_end(tmp_path, flushes):
    (tmp_path / "x").mkdir()
    with durable_batch():
        for name in ("a.jpg", "b.jpg", "x/c.jpg"):
            atomic_write(str(tmp_path / name), name.encode())
        assert flushes == []  # nothing is flushed while the batch runs...
        assert (tmp_path / "x" / "c.jpg").read_bytes() == b"x/c.jpg"  # ...yet files are whole
        with durable_batch():  # a nested batch belongs to the outer one
            atomic_write(str(tmp_path / "d.jpg"), b"d")
        assert flushes == []
    assert [kind for kind, _ in flushes] == ["syncfs"]  # one filesystem: one call


def test_without_syncfs_a_batch_flushes_each_file_and_folder(tmp_path, flushes, monkeypatch):
    monkeypatch.setattr(outputs, "_syncfs", None)
    with durable_batch():
        atomic_write(str(tmp_path / "a.jpg"), b"a")
        atomic_write(str(tmp_path / "b.jpg"), b"b")
    flushed = sorted(path for _, path in flushes)
    assert flushed == [str(tmp_path), str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]


def test_a_batch_that_cannot_flush_stops_the_run(tmp_path):
    """Outputs that may not be on disk must not be reported as written."""
    folder = tmp_path / "gone"
    folder.mkdir()
    with pytest.raises(RunIncompleteError, match="cannot flush outputs"), durable_batch():
        atomic_write(str(folder / "a.jpg"), b"a")
        (folder / "a.jpg").unlink()
        folder.rmdir()


def test_a_failed_block_flushes_nothing(tmp_path, flushes):
    with pytest.raises(KeyError), durable_batch():
        atomic_write(str(tmp_path / "a.jpg"), b"a")
        raise KeyError("boom")
    assert flushes == []
