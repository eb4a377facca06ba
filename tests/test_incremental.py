"""Incremental runs: a re-run does only new, failed-retryable or changed work."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.execution.runner import RunRequest, run
from pipeline.plan import build_plan
from pipeline.records import SourceItem
from pipeline.state.lineage import sink_fingerprints
from pipeline.state.manifest import Attempt, Manifest
from pipeline.testing.images import photo, png_bytes
from tests.conftest import REPO
from tests.test_backends import JOB, outputs, records
from tests.test_lock import cli

SINK_FOLDERS = ("small", "large")


def file_states(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Inode and mtime of every output: a rewrite (atomic rename) changes both."""
    return {
        str(path.relative_to(run_dir)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for folder in SINK_FOLDERS
        for path in (run_dir / folder).iterdir()
    }


def job(write_config, url_list, out: Path, name: str = "job.yaml", **extra: object) -> Path:
    text = JOB.format(out=out, urls=url_list)
    text += "".join(f"{key}: {json.dumps(value)}\n" for key, value in extra.items())
    return write_config(text, name)


def test_rerun_skips_everything_and_writes_nothing(write_config, url_list, tmp_path):
    out = tmp_path / "out"
    config = job(write_config, url_list, out)
    first = run(RunRequest(config=config))
    assert first["counts"] == {"ok": 13, "failed": 3, "skipped": 0}
    before = file_states(out)

    second = run(RunRequest(config=config))

    assert second["counts"] == {"ok": 0, "failed": 0, "skipped": 16}
    # 404, HTML and corrupt JPEG fail the same way again: not retried without --retry-failed.
    assert second["skipped_by_reason"]["unchanged"] == 13
    assert second["exit_code"] == 0
    assert file_states(out) == before
    by_url = {r["url"].rsplit("/", 1)[-1]: r for r in records(out)}
    assert len(by_url) == 16
    assert by_url["3.jpg"]["status"] == "skipped"
    assert len(by_url["3.jpg"]["outputs"]) == 2  # what earlier runs wrote for it
    assert by_url["missing.jpg"]["reason"] == "http_4xx"


def test_changed_thumbnail_size_redoes_only_its_branch(write_config, url_list, tmp_path):
    out = tmp_path / "out"
    run(RunRequest(config=job(write_config, url_list, out)))
    before = file_states(out)
    change = ["stages.small.size=[48,48]"]

    report = run(RunRequest(config=job(write_config, url_list, out), overrides=change))

    after = file_states(out)
    assert report["counts"]["ok"] == 13
    for name, state in after.items():
        if name.startswith("large/"):
            assert state == before[name], f"{name} was rewritten"
        else:
            assert state[0] != before[name][0], f"{name} was not redone"
    assert all(set(r.get("sink_outputs", {})) <= {"write_small"} for r in records(out))
    clean = tmp_path / "clean"
    run(RunRequest(config=job(write_config, url_list, clean, "clean.yaml"), overrides=change))
    assert outputs(out) == outputs(clean)


def test_fingerprints_follow_what_changes_outputs(write_config, url_list, tmp_path):
    def fingerprints(*overrides: str) -> dict[str, str]:
        job_config, doc = load_config(job(write_config, url_list, tmp_path), overrides)
        return sink_fingerprints(build_plan(job_config, doc))

    base = fingerprints()
    assert fingerprints("stages.download.concurrency=1") == base  # speed, not outputs
    small = fingerprints("stages.small.size=[48,48]")
    assert small["write_small"] != base["write_small"]
    assert small["write_large"] == base["write_large"]
    # The large box sets the decoder's draft scale, which changes both branches' pixels.
    large = fingerprints("stages.large.size=[64,48]")
    assert large["write_small"] != base["write_small"]
    assert large["write_large"] != base["write_large"]


def test_duplicates_deleted_outputs_and_full(write_config, url_list, tmp_path, image_server):
    urls = url_list.read_text().splitlines()
    url_list.write_text("\n".join([*urls, urls[0]]) + "\n")
    out = tmp_path / "out"
    config = job(write_config, url_list, out)
    first = run(RunRequest(config=config))
    duplicate = next(r for r in records(out) if r["index"] == 17)
    assert duplicate["status"] == "skipped"
    assert (duplicate["reason"], duplicate["message"]) == ("duplicate", "same URL as line 1")
    assert first["counts"] == {"ok": 13, "failed": 3, "skipped": 1}

    gone = next((out / "large").iterdir())
    gone.unlink()
    second = run(RunRequest(config=config))
    assert second["counts"]["ok"] == 1 and gone.exists()

    full = run(RunRequest(config=config, full=True))
    assert full["counts"] == {"ok": 13, "failed": 3, "skipped": 1}


def test_retryable_failures_are_retried(write_config, tmp_path, image_server):
    flaky_hits = {"count": 0}
    good = image_server.routes["/img/0.jpg"]

    def flaky(request):
        flaky_hits["count"] += 1
        if flaky_hits["count"] == 1:
            request.send_error(503)
        else:
            good(request)

    urls = tmp_path / "urls.txt"
    urls.write_text(
        f"{image_server.add('/flaky.jpg', flaky)}\n{image_server.url('/gone.jpg')}\n"
        f"{image_server.url('/img/1.jpg')}\n"
    )
    out = tmp_path / "out"
    config = write_config(JOB.format(out=out, urls=urls))

    first = run(RunRequest(config=config))
    assert first["failures_by_reason"] == {"http_5xx": 1, "http_4xx": 1}
    assert first["exit_code"] == 1

    gone_hits = image_server.hits.get("/gone.jpg", 0)
    second = run(RunRequest(config=config))
    assert second["counts"] == {"ok": 1, "failed": 0, "skipped": 2}
    assert image_server.hits.get("/gone.jpg", 0) == gone_hits  # a 404 is not retried

    third = run(RunRequest(config=config, retry_failed=True))
    assert third["counts"] == {"ok": 0, "failed": 1, "skipped": 2}
    assert image_server.hits["/gone.jpg"] == gone_hits + 1


def test_failure_thresholds(write_config, url_list, tmp_path):
    tolerant = job(write_config, url_list, tmp_path / "a", "a.yaml", max_failed=3)
    report = run(RunRequest(config=tolerant))
    assert (report["exit_code"], report["failures_tolerated"]) == (0, True)
    strict = job(write_config, url_list, tmp_path / "b", "b.yaml", max_failed_fraction=0.1)
    report = run(RunRequest(config=strict))  # 3 of 16 failed: above 10%
    assert (report["exit_code"], report["failures_tolerated"]) == (1, False)


def test_stale_temp_files_are_removed(write_config, url_list, tmp_path):
    out = tmp_path / "out"
    config = job(write_config, url_list, out)
    run(RunRequest(config=config))
    stale = out / "small" / ".tmp-killed.part"
    stale.write_bytes(b"half an image")
    os.utime(stale)
    run(RunRequest(config=config))
    assert not stale.exists()


TINY_JOB = """
name: tiny
backend: {{kind: threads, workers: 2}}
partition_size: 500
output: {out}
stages:
  urls:     {{kind: url_list, path: {urls}}}
  download: {{kind: download, input: urls, allow_schemes: [file]}}
  decode:   {{kind: decode, input: download}}
  write:    {{kind: write_images, input: decode, path: images, format: png}}
"""


@pytest.mark.slow
def test_rerun_of_10000_done_items(write_config, tmp_path):
    """Prints how long an unchanged re-run of 10,000 done items takes (no timing assert)."""
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(png_bytes(photo(8, 8, seed=7)))
    urls = tmp_path / "urls.txt"  # 10,000 distinct URLs (keys) of one small local file
    urls.write_text("".join(f"{tiny.as_uri()}?n={n}\n" for n in range(10_000)))
    config = write_config(TINY_JOB.format(out=tmp_path / "out", urls=urls))
    first = run(RunRequest(config=config))
    assert first["counts"]["ok"] == 10_000

    started = time.perf_counter()
    second = run(RunRequest(config=config))
    seconds = time.perf_counter() - started

    assert second["counts"] == {"ok": 0, "failed": 0, "skipped": 10_000}
    print(f"\nfirst run {first['wall_seconds']:.1f}s; re-run of 10,000 done items: {seconds:.2f}s")


def test_nightly_config_runs_incrementally(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("NIGHTLY_OUTPUT", str(tmp_path / "nightly"))
    config = REPO / "configs" / "nightly.yaml"
    assert run(RunRequest(config=config))["counts"]["ok"] == 24
    again = run(RunRequest(config=config))
    assert (again["counts"]["skipped"], again["exit_code"]) == (24, 0)
    log = (tmp_path / "nightly" / "pipeline.log").read_text()
    assert "ended with exit 0: ok 0, failed 0, skipped 24" in log


def test_runs_and_status_commands(write_config, url_list, tmp_path, capsys):
    out = tmp_path / "out"
    config = job(write_config, url_list, out)
    assert cli("run", str(config)) == 1  # 3 items fail
    assert cli("run", str(config)) == 0  # nothing left to retry
    capsys.readouterr()

    assert cli("runs", str(out)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["run", "started", "wall", "s"]
    assert [line.split()[3:7] for line in table[1:]] == [
        ["1", "13", "3", "0"],
        ["0", "0", "0", "16"],
    ]

    assert cli("status", str(out)) == 0
    status = capsys.readouterr().out
    assert "16 items" in status
    assert [line.split() for line in status.splitlines() if "http_4xx" in line] == [
        ["failed", "http_4xx", "1"]
    ]
    assert "done for sink write_small: 13" in status

    assert cli("status", str(tmp_path / "nowhere")) == 2
    assert "no manifest" in capsys.readouterr().err


def test_a_failed_item_is_done_only_for_the_sinks_that_wrote(tmp_path):
    attempt = Attempt({"a": "new-a", "b": "new-b"}, "attempt")
    record = SourceItem(1, "http://example.invalid/x.jpg").new_record()
    record.update(status="failed", stage="b", reason="write_error", message="disk says no")
    record["sink_outputs"] = {"a": ["a/x.jpg"]}
    with Manifest(tmp_path / "m.sqlite") as manifest:
        earlier = {**record, "status": "ok", "sink_outputs": {"b": ["b/x.jpg"]}}
        manifest.commit([earlier], {record["key"]: Attempt({"b": "old-b"}, "x")}, "run-1")
        manifest.commit([record], {record["key"]: attempt}, "run-2")
        entry = manifest.lookup(record["key"])
    assert entry is not None and (entry.status, entry.reason) == ("failed", "write_error")
    # a wrote under the new config; b's file is still the one written under the old one.
    assert entry.sinks == {"a": ("new-a", ["a/x.jpg"]), "b": ("old-b", ["b/x.jpg"])}
