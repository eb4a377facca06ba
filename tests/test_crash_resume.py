"""Crash safety: `kill -9` mid-batch, re-run, and the result equals a clean run's."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.execution.runner import RunRequest, run
from pipeline.testing.images import jpeg_bytes, photo
from pipeline.testing.server import TestServer
from tests.conftest import REPO
from tests.test_backends import JOB, outputs, records

ITEMS = 40


def served_list(folder: Path, count: int, latency: float, size: tuple[int, int]) -> Iterator[Path]:
    """A list of `count` distinct JPEGs of `size`, served with `latency` per request, in
    `folder`; yielded while the server runs (a fixture's body: `yield from`)."""
    with TestServer(latency=latency) as server:
        urls = [
            server.add_bytes(f"/slow/{i}.jpg", jpeg_bytes(photo(*size, seed=i)))
            for i in range(count)
        ]
        path = folder / "urls.txt"
        path.write_text("\n".join(urls) + "\n")
        yield path


@pytest.fixture(scope="module")
def slow_urls(tmp_path_factory):
    """A URL list served with 0.3 s latency per request: a run takes seconds."""
    yield from served_list(tmp_path_factory.mktemp("slow"), ITEMS, 0.3, (120, 90))


def start_run(config: Path, *args: str) -> subprocess.Popen:
    """`python -m pipeline run CONFIG` in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(config), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def recovered_items(run_dir: Path) -> int:
    """Items in the manifest of a killed run, as its next writer will find them. A killed
    writer may have committed frames to the WAL but not yet counted them in the shared
    index a read-only reader trusts; a read-write connection recovers them first."""
    with sqlite3.connect(run_dir / "manifest.sqlite") as db:
        return db.execute("SELECT count(*) FROM items").fetchone()[0]


def manifest_items(run_dir: Path, name: str = "manifest.sqlite") -> int:
    """Items recorded in the manifest so far (0 before it exists)."""
    try:
        with sqlite3.connect(f"file:{run_dir / name}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def clean_outputs(tmp_path_factory, slow_urls):
    """The outputs of one uninterrupted run: what every resumed run must end with."""
    base = tmp_path_factory.mktemp("clean")
    config = base / "clean.yaml"
    config.write_text(JOB.format(out=base / "out", urls=slow_urls))
    run(RunRequest(config=config))
    return outputs(base / "out")


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [1, 20], ids=["early", "late"])
def test_kill_9_mid_batch_then_rerun_equals_clean_run(
    write_config, slow_urls, clean_outputs, tmp_path, kill_after
):
    out = tmp_path / "out"
    config = write_config(JOB.format(out=out, urls=slow_urls))
    process = start_run(config)
    wait_for(lambda: manifest_items(out) >= kill_after)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    done_before = recovered_items(out)
    assert kill_after <= done_before < ITEMS, "the kill must land mid-batch"

    report = run(RunRequest(config=config))  # the dead run's lock does not block this one

    assert report["counts"] == {"ok": ITEMS - done_before, "failed": 0, "skipped": done_before}
    assert report["skipped_by_reason"] == {"unchanged": done_before}
    keys = [r["key"] for r in records(out)]
    assert len(keys) == len(set(keys)) == ITEMS
    assert manifest_items(out) == ITEMS
    assert outputs(out) == clean_outputs
    assert len(clean_outputs) == 2 * ITEMS
    empty = [name for name, data in outputs(out).items() if not data]
    assert not [*out.rglob(".tmp-*"), *empty]


def children(pid: int) -> list[tuple[int, bytes]]:
    """The (pid, command line) of each child process of `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append((int(stat.parent.name), command))
    return found


def pool_workers(pid: int) -> list[int]:
    """The process pool's workers: children of the forkserver that `pid` started."""
    servers = [child for child, command in children(pid) if b"forkserver" in command]
    return [worker for server in servers for worker, _ in children(server)]


@pytest.mark.slow
def test_kill_9_of_a_worker_then_the_run_completes(
    write_config, slow_urls, clean_outputs, tmp_path
):
    """The pool is rebuilt and the partitions caught in the crash re-run alone."""
    out = tmp_path / "out"
    config = write_config(JOB.format(out=out, urls=slow_urls).replace("threads", "processes"))
    process = start_run(config)
    wait_for(lambda: manifest_items(out) >= 3 and pool_workers(process.pid))
    os.kill(pool_workers(process.pid)[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "a worker died" in stderr
    assert manifest_items(out) == ITEMS
    assert outputs(out) == clean_outputs

    report = run(RunRequest(config=config, backend="threads"))
    assert report["counts"]["skipped"] == ITEMS


WRITE_FOREVER = """
import sys
from pipeline.state.manifest import Attempt, Manifest

attempt = Attempt({"write": "fingerprint"}, "attempt")
with Manifest(sys.argv[1]) as manifest:
    for batch in range(10**9):
        records = [
            {"key": f"{batch}-{i}", "url": "u", "status": "ok", "stage": None, "reason": None,
             "message": None, "sink_outputs": {"write": [f"out/{batch}-{i}.jpg"]}}
            for i in range(7)
        ]
        manifest.commit(records, {record["key"]: attempt for record in records}, "run")
"""


def test_manifest_survives_kill_9_mid_commit(tmp_path):
    """Partitions of 7 committed in a tight loop, killed at once: whole partitions or none."""
    writer = subprocess.Popen([sys.executable, "-c", WRITE_FOREVER, str(tmp_path / "m.sqlite")])
    wait_for(lambda: manifest_items(tmp_path, "m.sqlite") >= 70)
    writer.kill()
    writer.wait(timeout=30)
    with sqlite3.connect(tmp_path / "m.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        items = db.execute("SELECT count(*) FROM items").fetchone()[0]
        sinks = db.execute("SELECT count(*) FROM sinks").fetchone()[0]
    assert items % 7 == 0 and items == sinks >= 70
