"""A record stays whole whatever a stage puts in it: user functions and odd text."""

from __future__ import annotations

import json

from pipeline.state.manifest import Attempt, Manifest
from tests.stage_jobs import decoded_files, records, run_job, write_photos


def python_job(tmp_path, function: str) -> list[dict]:
    write_photos(tmp_path / "photos", 2)
    run_job(
        tmp_path,
        decoded_files(tmp_path / "photos"),
        f"fn: {{kind: python, input: decode, takes: record, function: '{function}'}}",
        "write: {kind: write_images, input: fn, path: images}",
    )
    return records(tmp_path / "out")


def test_a_record_function_cannot_overwrite_what_the_pipeline_keeps(tmp_path):
    found = python_job(tmp_path, "tests.stage_userfuncs:claims_success")
    assert {(r["status"], r["stage"], r["reason"]) for r in found} == {
        ("failed", "fn", "transform_error")
    }
    assert "may not set reason, status" in found[0]["message"]


def test_a_record_function_returning_numpy_values_does_not_stop_the_batch(tmp_path):
    found = python_job(tmp_path, "tests.stage_userfuncs:numpy_values")
    assert [r["status"] for r in found] == ["ok", "ok"]
    assert (found[0]["mean"], found[0]["3"]) == ("1.5", "three")


def test_the_manifest_stores_text_that_is_not_utf8(tmp_path):
    record = {
        "key": "k",
        "url": "file:///caf\udce9.jpg",
        "status": "failed",
        "stage": "get",
        "reason": "not_found",
        "message": "no such file: /caf\udce9.jpg \ud800",
    }
    with Manifest(tmp_path / "m.sqlite") as manifest:
        manifest.commit([record], {"k": Attempt({"write": "f"}, "a")}, "run")
        assert manifest.lookup("k").status == "failed"
    json.dumps(record)  # results.jsonl escapes lone surrogates itself


def test_a_failure_on_one_branch_does_not_stop_the_others(tmp_path):
    write_photos(tmp_path / "photos", 2)
    report = run_job(
        tmp_path,
        decoded_files(tmp_path / "photos"),
        "boom: {kind: python, input: decode, function: 'tests.stage_userfuncs:explode'}",
        "write_a: {kind: write_images, input: boom, path: a}",
        "write_b: {kind: write_images, input: decode, path: b}",
    )
    found = records(tmp_path / "out")
    assert report["counts"]["failed"] == 2 and {r["stage"] for r in found} == {"boom"}
    assert len(list((tmp_path / "out" / "b").iterdir())) == 2
    assert all(list(r["sink_outputs"]) == ["write_b"] for r in found)


def test_a_record_function_cannot_overwrite_what_earlier_stages_set(tmp_path):
    """A phash before it put `results` in the record (what dedupe's index reads)."""
    write_photos(tmp_path / "photos", 2)
    run_job(
        tmp_path,
        decoded_files(tmp_path / "photos"),
        "hash: {kind: phash, input: decode}",
        "fn: {kind: python, input: hash, takes: record, "
        "function: 'tests.stage_userfuncs:rewrites_results'}",
        "write: {kind: write_images, input: fn, path: images}",
    )
    found = records(tmp_path / "out")
    assert {(r["status"], r["reason"]) for r in found} == {("failed", "transform_error")}
    assert "may not set results, width" in found[0]["message"]
    assert all(r["results"]["hash"] for r in found)
