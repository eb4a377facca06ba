"""One item that kills its worker process fails alone: the processes backend rebuilds its
pool, re-runs the partitions caught in the crash, and narrows the failure to the item."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import BrokenExecutor
from pathlib import Path

import pytest

from pipeline.config import BackendConfig
from pipeline.execution.backends import ProcessesBackend
from tests.stage_jobs import decoded_files, records, run_job, write_photos
from tests.test_crash_resume import pool_workers, wait_for

CULPRIT = "photo-07.jpg"


def crashing_job(images: Path) -> tuple[str, str]:
    """Stages over `images` whose `python` stage kills its worker on CULPRIT."""
    crash = (
        f'crash: {{kind: python, input: decode, function: "tests.crashing_funcs:exit_on", '
        f"takes: record, kwargs: {{marker: {CULPRIT}}}}}\n"
        "write: {kind: write_images, input: crash, path: images}"
    )
    return decoded_files(images), crash


def run_crashing(tmp_path: Path, count: int) -> dict:
    images = tmp_path / "photos"
    write_photos(images, count, size=(32, 24))
    return run_job(tmp_path, *crashing_job(images), backend="processes", partition_size=4)


def check_only_the_culprit_failed(report: dict, run_dir: Path, count: int) -> list[dict]:
    results = records(run_dir)
    assert len(results) == count
    assert len({record["key"] for record in results}) == count
    failed = [record for record in results if record["status"] != "ok"]
    assert [(r["url"].rsplit("/", 1)[-1], r["stage"], r["reason"]) for r in failed] == [
        (CULPRIT, "task", "worker_lost")
    ]
    assert report["counts"] == {"ok": count - 1, "failed": 1, "skipped": 0}
    assert report["exit_code"] == 1
    assert "error" not in report  # the run went on: no "the run stopped"
    return results


@pytest.mark.slow
def test_an_item_that_kills_its_worker_fails_alone(tmp_path):
    report = run_crashing(tmp_path, 24)  # was: 4 + 16 innocent items worker_lost
    check_only_the_culprit_failed(report, tmp_path / "out", 24)


@pytest.mark.slow
def test_a_long_batch_goes_on_after_a_worker_dies(tmp_path):
    report = run_crashing(tmp_path, 96)  # was: the run stopped after 32 items
    results = check_only_the_culprit_failed(report, tmp_path / "out", 96)
    assert Counter(record["status"] for record in results) == {"ok": 95, "failed": 1}


@pytest.mark.slow
def test_innocent_outputs_are_written_and_not_redone(tmp_path):
    report = run_crashing(tmp_path, 24)
    out = tmp_path / "out"
    for record in check_only_the_culprit_failed(report, out, 24):
        assert all(Path(path).is_file() for path in record["outputs"])
        assert len(record["outputs"]) == (record["status"] == "ok")
    wait_for(lambda: not pool_workers(os.getpid()), timeout=10)  # every pool was closed

    again = run_crashing(tmp_path, 24)

    # worker_lost may pass on its own: the culprit is retried (and fails alone again)
    assert again["counts"] == {"ok": 0, "failed": 1, "skipped": 23}
    assert again["skipped_by_reason"] == {"unchanged": 23}


def test_a_broken_pool_is_replaced_and_the_new_one_closed_on_exit():
    backend = ProcessesBackend(BackendConfig(kind="processes", workers=2))
    with backend as broken:
        assert broken.submit(abs, -1).result() == 1
        old_workers = set(pool_workers(os.getpid()))
        with pytest.raises(BrokenExecutor):
            broken.submit(os._exit, 1).result()
        fresh = backend.restart()
        assert fresh.submit(abs, -2).result() == 2
        assert old_workers and not old_workers & set(pool_workers(os.getpid()))
    with pytest.raises(RuntimeError, match="after shutdown"):
        fresh.submit(abs, -3)
    wait_for(lambda: not pool_workers(os.getpid()), timeout=10)


def test_a_pool_broken_while_submit_starts_a_worker_says_so(monkeypatch):
    """CPython starts a worker inside `submit`; a worker dying meanwhile closes the pool's
    queues, and the start fails with OSError: the engine must see BrokenProcessPool."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from pipeline.execution.backends import ProcessPool, process_context

    def dies_meanwhile(self):
        self._broken = "A child process terminated abruptly"
        raise OSError("handle is closed")

    monkeypatch.setattr(ProcessPoolExecutor, "_spawn_process", dies_meanwhile)
    pool = ProcessPool(1, mp_context=process_context())
    with pytest.raises(BrokenProcessPool, match="terminated abruptly"):
        pool.submit(print)
    pool._broken = False
    monkeypatch.undo()
    pool.shutdown()
