"""Every entry of a list gets exactly one record, whatever it holds (issue 17).

Real lists on disk, run end to end: a bad entry is a failed record with its line
number, reason and original text (`input`), and the batch goes on.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from pipeline.errors import REASONS, RunIncompleteError
from tests.stage_jobs import records, run_job, write_photos
from tests.test_cli import cli


def list_job(tmp_path: Path, list_path: Path, **settings) -> dict:
    """Run url_list -> download (local files only) -> decode -> write_images."""
    return run_job(
        tmp_path,
        f"urls: {{kind: url_list, path: '{list_path}'}}",
        "get: {kind: download, input: urls, allow_schemes: [file]}",
        "decode: {kind: decode, input: get}",
        "write: {kind: write_images, input: decode, path: images}",
        **settings,
    )


def list_config(tmp_path: Path, list_path: Path) -> Path:
    """A config file for the CLI: url_list (line 4 of the file) -> download."""
    config = tmp_path / "job.yaml"
    config.write_text(
        f"name: t\noutput: {tmp_path / 'out'}\nstages:\n"
        f"  urls: {{kind: url_list, path: '{list_path}'}}\n"
        "  get: {kind: download, input: urls}\n"
    )
    return config


def by_index(run_dir: Path) -> dict[int, dict]:
    return {record["index"]: record for record in records(run_dir)}


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    return write_photos(tmp_path / "photos", 4)


def test_a_malformed_url_fails_its_line_only(tmp_path, photos):
    lines = [str(photos[0]), "http://[::1/broken", str(photos[1])]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    report = list_job(tmp_path, tmp_path / "list.txt")
    found = by_index(tmp_path / "out")
    assert report["exit_code"] == 1 and len(found) == 3
    assert found[2]["status"] == "failed"
    assert (found[2]["stage"], found[2]["reason"]) == ("urls", "invalid_url")
    assert found[2]["input"] == "http://[::1/broken"
    assert [found[i]["status"] for i in (1, 3)] == ["ok", "ok"]


def test_a_symlink_loop_fails_its_line_only(tmp_path, photos):
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    (tmp_path / "list.txt").write_text(f"{photos[0]}\nloop.jpg\n{photos[1]}\n")
    report = list_job(tmp_path, tmp_path / "list.txt")
    found = by_index(tmp_path / "out")
    assert report["exit_code"] == 1 and len(found) == 3
    assert (found[2]["stage"], found[2]["reason"]) == ("get", "not_regular_file")
    assert found[2]["input"] == "loop.jpg"
    assert "symbolic link loop" in found[2]["message"]


def test_corrupt_jsonl_lines_fail_alone(tmp_path, photos):
    rows = [json.dumps({"url": str(photos[n % 4])}) for n in range(207)]
    rows[200] = "{broken json"
    rows[202] = "[1, 2]"
    rows[204] = json.dumps({"link": "x"})
    (tmp_path / "list.jsonl").write_text("\n".join(rows) + "\n")
    report = list_job(tmp_path, tmp_path / "list.jsonl", partition_size=32)
    found = by_index(tmp_path / "out")
    assert len(found) == 207 and report["counts"] == {"ok": 4, "failed": 3, "skipped": 200}
    assert {i: found[i]["reason"] for i in (201, 203, 205)} == dict.fromkeys(
        (201, 203, 205), "invalid_input"
    )
    assert found[201]["input"] == "{broken json" and "not valid JSON" in found[201]["message"]
    assert "not an object" in found[203]["message"]
    assert "no 'url' key" in found[205]["message"]


def test_empty_and_null_url_cells_are_records(tmp_path, photos):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "list.csv").write_text(f"url,caption\n{photos[0]},a\n,b\n{photos[1]},c\n")
    table = pa.table({"url": [str(photos[0]), None, str(photos[1])], "caption": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "list.parquet")
    for name, empty_index in (("list.csv", 3), ("list.parquet", 2)):
        run_dir = tmp_path / f"out-{name}"
        list_job(tmp_path, tmp_path / name, output=str(run_dir))
        found = by_index(run_dir)
        assert len(found) == 3, name
        assert (found[empty_index]["status"], found[empty_index]["reason"]) == ("failed", "empty")
        assert found[empty_index]["fields"] == {"caption": "b"}
        assert found[empty_index]["input"] in (",b", '{"url": null, "caption": "b"}')


def test_the_record_says_what_the_line_said(tmp_path, photos):
    (tmp_path / "list.txt").write_text("not a url at all\n  photos/photo-00.jpg  \n")
    list_job(tmp_path, tmp_path / "list.txt")
    found = by_index(tmp_path / "out")
    assert found[1]["input"] == "not a url at all" and found[1]["reason"] == "not_found"
    assert found[2]["input"] == "photos/photo-00.jpg" and found[2]["status"] == "ok"
    assert found[2]["url"] == photos[0].as_uri()


def test_lines_that_are_not_utf8_or_too_long_are_records(tmp_path, photos):
    long_line = b"http://h/" + b"x" * (1024 * 1024 + 10)
    body = b"\n".join([str(photos[0]).encode(), b"caf\xe9.jpg", long_line, str(photos[1]).encode()])
    (tmp_path / "list.txt").write_bytes(body)
    list_job(tmp_path, tmp_path / "list.txt")
    found = by_index(tmp_path / "out")
    assert [found[i]["status"] for i in (1, 4)] == ["ok", "ok"]
    assert found[2]["reason"] == "invalid_input" and found[2]["input"] == "caf\\xe9.jpg"
    assert "not valid UTF-8" in found[2]["message"]
    assert found[3]["reason"] == "invalid_input" and "longer than" in found[3]["message"]
    assert len(found[3]["input"]) < 4200


def test_a_list_that_breaks_off_keeps_what_was_read(tmp_path, photos):
    # http URLs fail fast as blocked_scheme (only file is allowed): no traffic
    text = "".join(f"http://h/{os.urandom(12).hex()}.jpg\n" for _ in range(40_000)).encode()
    packed = gzip.compress(text)
    (tmp_path / "list.txt.gz").write_bytes(packed[: len(packed) // 2])
    report = list_job(tmp_path, tmp_path / "list.txt.gz", partition_size=256)
    found = records(tmp_path / "out")
    last = found[-1]
    assert report["exit_code"] == 1 and 0 < len(found) < 40_000
    assert (last["status"], last["reason"]) == ("failed", "invalid_input")
    assert "cannot read" in last["message"] and last["index"] == len(found)
    assert {record["reason"] for record in found[:-1]} == {"blocked_scheme"}


def test_a_list_that_cannot_be_read_stops_the_run_and_leaves_no_empty_files(tmp_path, photos):
    list_job(tmp_path, photos[0])  # an earlier run's results: a jpeg read as a txt list
    assert (tmp_path / "out" / "results.jsonl").exists()
    (tmp_path / "list.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(RunIncompleteError, match=r"urls: cannot read .*list\.txt\.gz"):
        list_job(tmp_path, tmp_path / "list.txt.gz")
    run_dir = tmp_path / "out"
    assert not [
        path.name for path in run_dir.rglob("*") if path.is_file() and not path.stat().st_size
    ]
    assert not (run_dir / "results.jsonl").exists()  # not the earlier run's records
    assert not list(run_dir.glob(".tmp-*"))
    assert json.loads((run_dir / "report.json").read_text())["exit_code"] == 4


def test_the_cli_reports_an_unreadable_list_with_exit_4(tmp_path):
    (tmp_path / "list.txt.gz").write_bytes(b"not gzip at all")
    result = cli("run", str(list_config(tmp_path, tmp_path / "list.txt.gz")))
    assert result.returncode == 4 and "Traceback" not in result.stderr
    assert "error: urls: cannot read" in result.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["exit_code"] == 4


def test_a_header_without_the_column_is_a_config_error_naming_file_line_and_key(tmp_path):
    (tmp_path / "list.csv").write_text("link,caption\nhttp://h/a.jpg,x\n")
    result = cli("validate", str(list_config(tmp_path, tmp_path / "list.csv")))
    assert result.returncode == 2
    assert "job.yaml:4: stages.urls" in result.stderr
    assert "no column 'url' (columns: link, caption); set the stage's 'column'" in result.stderr


def test_every_documented_reason_is_in_the_readme():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert [reason for reason in REASONS if f"`{reason}`" not in readme] == []
