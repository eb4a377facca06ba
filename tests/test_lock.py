"""The run lock and exit codes: 3 if another run holds the lock, 4 if outputs cannot be written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from pipeline import logs
from pipeline.cli import main
from pipeline.errors import RunIncompleteError
from pipeline.execution.runner import RunRequest, run
from pipeline.state.lock import RunLock
from tests.conftest import REPO
from tests.test_backends import JOB
from tests.test_crash_resume import manifest_items, slow_urls, start_run, wait_for

__all__ = ["slow_urls"]  # a module fixture, shared with the crash test


def cli(*argv: str) -> int:
    """`python -m pipeline ARGV` in this process; its console log handler goes with it
    (it writes to this test's captured stderr, which is closed after the test)."""
    try:
        return main(list(argv))
    finally:
        root = logs.logger()
        for handler in [h for h in root.handlers if getattr(h, "_pipeline_console", False)]:
            root.removeHandler(handler)


def tree_state(folder):
    return {
        str(path): (path.stat().st_ino, path.stat().st_mtime_ns, path.stat().st_size)
        for path in folder.rglob("*")
    }


def test_a_held_lock_exits_3_and_touches_nothing(write_config, url_list, tmp_path, capsys):
    out = tmp_path / "out"
    config = write_config(JOB.format(out=out, urls=url_list))
    run(RunRequest(config=config))
    with RunLock(out):
        before = tree_state(out)
        assert cli("run", str(config)) == 3
        assert tree_state(out) == before
    assert "another run of this job holds" in capsys.readouterr().err


@pytest.mark.slow
def test_second_concurrent_run_exits_3_at_once(write_config, slow_urls, tmp_path):
    out = tmp_path / "out"
    config = write_config(JOB.format(out=out, urls=slow_urls))
    first = start_run(config, "--workers", "1", "--set", "partition_size=1")  # 12 s or more
    try:
        wait_for(lambda: (out / "history.jsonl").exists())
        started = time.monotonic()
        second = start_run(config)
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == 3, stderr
        assert time.monotonic() - started < 30
        assert "another run of this job holds" in stderr
        assert first.poll() is None, "the first run must still be running"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [entry["event"] for entry in history] == ["start"]  # the second left no trace


def test_output_under_a_file_exits_4_and_marks_nothing_done(write_config, url_list, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "blocker").write_text("a regular file where the output folder should be")
    text = JOB.format(out=out, urls=url_list).replace("path: small", "path: blocker/small")
    config = write_config(text)
    with pytest.raises(RunIncompleteError, match="Not a directory"):
        run(RunRequest(config=config))
    assert cli("run", str(config)) == 4
    with sqlite3.connect(out / "manifest.sqlite") as db:
        assert db.execute("SELECT count(*) FROM items WHERE status = 'ok'").fetchone() == (0,)
    report = json.loads((out / "report.json").read_text())
    assert report["exit_code"] == 4


def test_a_fatal_error_cancels_the_queued_partitions(
    write_config, url_list, image_server, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "blocker").write_text("a regular file where the output folder should be")
    text = JOB.format(out=out, urls=url_list).replace("path: small", "path: blocker/small")
    text = text.replace("workers: 2", "workers: 1, max_in_flight: 8")
    config = write_config(text.replace("partition_size: 3", "partition_size: 1"))
    before = sum(image_server.hits.values())
    with pytest.raises(RunIncompleteError, match="Not a directory"):
        run(RunRequest(config=config))
    # The first partition fails the run; the worker may have started the next one.
    # The other six of the eight submitted never run: without cancelling, all eight did.
    assert sum(image_server.hits.values()) - before <= 2


def can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs unshare -m and mount (root)")
def test_full_disk_exits_4_and_only_written_items_are_done(write_config, url_list, tmp_path):
    """A 24 KB tmpfs in a private mount namespace fills up after a few thumbnails."""
    out, disk = tmp_path / "out", tmp_path / "disk"
    disk.mkdir()
    text = JOB.format(out=out, urls=url_list).replace("path: small", f"path: {disk}")
    text = text.replace("workers: 2", "workers: 1").replace(
        "partition_size: 3", "partition_size: 1"
    )
    config = write_config(text)
    listing = tmp_path / "listing.txt"
    script = (
        f"mount -t tmpfs -o size=24k tmpfs {disk} && "
        f"{sys.executable} -m pipeline run {config}; code=$?; "
        f"find {disk} -type f -size +0 > {listing}; exit $code"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 4, result.stderr
    assert "No space left on device" in result.stderr
    written = set(listing.read_text().split())
    with sqlite3.connect(out / "manifest.sqlite") as db:
        done = [json.loads(o) for (o,) in db.execute("SELECT outputs FROM sinks")]
    small_outputs = {path for paths in done for path in paths if path.startswith(str(disk))}
    assert 0 < len(small_outputs) <= len(written)
    assert small_outputs <= written
    assert manifest_items(out) < 13
