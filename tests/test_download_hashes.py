"""Content hashes in the download stage (`hashes`, `verify_hash`): every scheme, once."""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json

import fsspec
import pytest

from pipeline.config import load_config, mapping_document, validate_job
from pipeline.errors import ConfigError
from pipeline.execution.runner import RunRequest, run
from pipeline.plan.dag import build_plan
from pipeline.records import Item, JobContext, Record, SourceItem
from pipeline.stages.download import Download, DownloadOptions
from pipeline.testing.server import TestServer, send_bytes
from tests.conftest import REPO
from tests.hostile_cases import IMAGE

SHA256 = hashlib.sha256(IMAGE).hexdigest()
MD5 = hashlib.md5(IMAGE).hexdigest()


@pytest.fixture(scope="module")
def server():
    with TestServer() as served:
        served.add_bytes("/a.jpg", IMAGE)
        packed = gzip.compress(IMAGE)
        served.add(
            "/gzipped.jpg",
            lambda request: send_bytes(
                request, packed, "image/jpeg", 200, {"Content-Encoding": "gzip"}
            ),
        )
        yield served


def download(
    url: str, fields: dict | None = None, port: int | None = None, **options
) -> tuple[Record, Item | None]:
    allow = {"allow_hosts": [f"127.0.0.1:{port}"]} if port else {}
    settings = {"timeout": 2.0, "retries": 0, "allow_schemes": ["http", "file", "memory"]}
    stage = Download(
        "download", DownloadOptions(**{**settings, **allow, **options}), JobContext("h", ".")
    )
    record = SourceItem(0, url, fields or {}).new_record()
    return record, stage.run_one(Item(record, None))


def test_sha256_by_default_for_every_scheme(server, tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(IMAGE)
    with fsspec.open("memory://hashes/a.jpg", "wb") as handle:
        handle.write(IMAGE)
    for url, port in [
        (server.url("/a.jpg"), server.port),
        (path.as_uri(), None),
        (str(path), None),
        ("memory://hashes/a.jpg", None),
    ]:
        record, item = download(url, port=port)
        assert record["status"] == "ok" and item is not None, record
        assert record["sha256"] == SHA256, url
        assert "md5" not in record


def test_the_hash_is_of_the_file_not_its_content_encoding(server):
    record, item = download(server.url("/gzipped.jpg"), port=server.port)
    assert item is not None and item.data == IMAGE
    assert record["sha256"] == SHA256


def test_hashes_chosen_or_none(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(IMAGE)
    record, _ = download(str(path), hashes=["md5", "sha1", "sha256", "md5"])
    assert record["md5"] == MD5
    assert record["sha1"] == hashlib.sha1(IMAGE).hexdigest()
    assert record["sha256"] == SHA256
    record, _ = download(str(path), hashes=[])
    assert record["status"] == "ok" and not {"sha256", "md5", "sha1"} & set(record)


@pytest.mark.skipif(importlib.util.find_spec("xxhash") is not None, reason="xxhash installed")
def test_xxh64_without_xxhash_is_a_config_error():
    for options in ({"hashes": ["sha256", "xxh64"]}, {"verify_algorithm": "xxh64"}):
        stages = {
            "urls": {"kind": "url_list", "path": str(REPO / "configs/samples/urls.txt")},
            "download": {"kind": "download", "input": "urls", **options},
        }
        doc = mapping_document({"name": "x", "output": "out", "stages": stages})
        job, problems = validate_job(doc)
        assert job is not None and not problems
        with pytest.raises(ConfigError, match="pip install xxhash"):
            build_plan(job, doc)


def test_unknown_algorithm_is_a_config_error():
    with pytest.raises(ValueError, match="sha256"):
        DownloadOptions(hashes=["crc32"])


@pytest.mark.parametrize(
    ("expected", "status"),
    [
        (SHA256, "ok"),
        (f"  {SHA256.upper()}\n", "ok"),  # case and blanks do not matter
        ("", "ok"),  # no value: not checked
        (None, "ok"),
        ("0" * 64, "failed"),
        ("abc", "failed"),
    ],
)
def test_verify_sha256(tmp_path, expected, status):
    path = tmp_path / "a.jpg"
    path.write_bytes(IMAGE)
    record, item = download(str(path), {"sha": expected}, verify_hash="sha")
    assert record["status"] == status, record
    assert record["sha256"] == SHA256  # recorded either way
    if status == "failed":
        assert item is None and record["reason"] == "hash_mismatch"
        assert record["stage"] == "download"
        assert record["message"] == (
            f"sha256 expected {expected[:16]}{'...' if len(expected) > 16 else ''} (sha), "
            f"got {SHA256[:16]}..."
        )


def test_verify_a_column_missing_from_the_entry_is_not_checked(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(IMAGE)
    record, item = download(str(path), {"other": "x"}, verify_hash="md5")
    assert record["status"] == "ok" and item is not None
    record, item = download(str(path), None, verify_hash="md5")
    assert record["status"] == "ok" and item is not None


def test_verify_md5_over_http_computes_it_once_beside_the_listed_hashes(server):
    record, item = download(
        server.url("/a.jpg"),
        {"md5": MD5.upper()},
        port=server.port,
        hashes=[],
        verify_hash="md5",
        verify_algorithm="md5",
    )
    assert record["status"] == "ok" and item is not None
    assert record["md5"] == MD5 and "sha256" not in record
    record, _ = download(
        server.url("/a.jpg"),
        {"md5": SHA256},
        port=server.port,
        verify_hash="md5",
        verify_algorithm="md5",
    )
    assert record["reason"] == "hash_mismatch" and record["sha256"] == SHA256


def results(out) -> list[Record]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_example_config_runs_and_verifies_a_list(tmp_path):
    config = REPO / "configs/hashes.yaml"
    out = tmp_path / "plain"
    report = run(RunRequest(config=config, overrides=[f"output={out}"]))
    assert report["counts"] == {"ok": 24, "failed": 0, "skipped": 0}
    for record in results(out):
        data = (REPO / "configs/samples" / record["input"]).read_bytes()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["md5"] == hashlib.md5(data).hexdigest()

    images = sorted((REPO / "configs/samples/images").glob("photo-0*.jpg"))[:4]
    listed = tmp_path / "listed.csv"
    with listed.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "label", "md5"])
        for number, image in enumerate(images):
            digest = hashlib.md5(image.read_bytes()).hexdigest()
            digest = {1: "f" * 32, 2: ""}.get(number, digest)  # one wrong, one not given
            writer.writerow([number, image, "x", digest])
    out = tmp_path / "verified"
    overrides = [
        f"output={out}",
        f"stages.listed.path={listed}",
        "stages.listed.fields=[id, md5]",
        "stages.download.verify_hash=md5",
        "stages.download.verify_algorithm=md5",
    ]
    job, doc = load_config(config, overrides)
    build_plan(job, doc)
    report = run(RunRequest(config=config, overrides=overrides))
    assert report["counts"] == {"ok": 3, "failed": 1, "skipped": 0}
    (bad,) = [record for record in results(out) if record["status"] == "failed"]
    assert bad["reason"] == "hash_mismatch" and bad["fields"]["id"] == "1"
    assert bad["message"].startswith("md5 expected ffffffffffffffff... (md5), got ")


def test_a_verify_hash_column_the_source_does_not_carry_is_a_plan_warning(tmp_path):
    from pipeline.execution.runner import backend_for, load_plan, plan_warnings

    (tmp_path / "list.csv").write_text("url,id,md5\nhttp://h/a.jpg,1,00\n")
    config = {
        "name": "t",
        "output": str(tmp_path / "out"),
        "stages": {
            "urls": {"kind": "url_list", "path": str(tmp_path / "list.csv"), "fields": ["id"]},
            "get": {"kind": "download", "input": "urls", "verify_hash": "md5"},
            "write": {"kind": "write_images", "input": "get", "path": "images"},
        },
    }
    plan = load_plan(config)
    assert any(
        "'md5', which urls does not carry" in w for w in plan_warnings(plan, backend_for(plan), 1)
    )
    config["stages"]["urls"]["fields"] = ["id", "md5"]
    plan = load_plan(config)
    assert not any("does not carry" in w for w in plan_warnings(plan, backend_for(plan), 1))
