"""The core contract: every backend gives byte-identical outputs and one record per input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.execution.runner import RunRequest, run
from tests.conftest import write_url_list

BACKENDS = ["sync", "threads", "processes", "distributed"]

JOB = """
name: core
backend: {{kind: threads, workers: 2}}
partition_size: 3
output: {out}
stages:
  urls:     {{kind: url_list, path: {urls}}}
  download: {{kind: download, input: urls, concurrency: 4, retries: 0, allow_hosts: [127.0.0.1]}}
  decode:   {{kind: decode, input: download}}
  small:    {{kind: thumbnail, input: decode, size: [64, 64]}}
  large:    {{kind: thumbnail, input: decode, size: [160, 120]}}
  write_small: {{kind: write_images, input: small, path: small}}
  write_large: {{kind: write_images, input: large, path: large, format: png}}
"""


def outputs(run_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.parent != run_dir
    }


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_server):
    """Run the same two-branch job on every backend once."""
    base = tmp_path_factory.mktemp("backends")
    urls = write_url_list(base / "urls.txt", image_server)
    results = {}
    for backend in BACKENDS:
        out = base / backend
        config = base / f"{backend}.yaml"
        config.write_text(JOB.format(out=out, urls=urls))
        report = run(RunRequest(config=config, backend=backend))
        results[backend] = (report, out)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_backends_write_identical_bytes(runs, backend):
    reference = outputs(runs["sync"][1])
    assert len(reference) == 2 * 13  # 12 JPEGs + 1 PNG, two sizes each
    assert outputs(runs[backend][1]) == reference


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_record_per_input_with_reasons(runs, backend):
    report, out = runs[backend]
    by_url = {r["url"].rsplit("/", 1)[-1]: r for r in records(out)}
    assert len(records(out)) == 16 == len(by_url)
    assert by_url["missing.jpg"]["reason"] == "http_4xx"
    assert by_url["missing.jpg"]["stage"] == "download"
    assert by_url["corrupt.jpg"]["stage"] == "decode"
    assert by_url["corrupt.jpg"]["reason"] in ("truncated", "corrupt")
    assert by_url["page.jpg"]["reason"] == "not_an_image"
    assert by_url["3.jpg"]["status"] == "ok"
    assert len(by_url["3.jpg"]["outputs"]) == 2
    assert report["counts"] == {"ok": 13, "failed": 3, "skipped": 0}
    assert report["exit_code"] == 1
    assert report["failures_by_reason"]["http_4xx"] == 1


@pytest.mark.slow
def test_branch_sizes_and_alpha_flattened(runs):
    from PIL import Image

    out = runs["threads"][1]
    small = [Image.open(p) for p in (out / "small").iterdir()]
    large = [Image.open(p) for p in (out / "large").iterdir()]
    assert all(max(im.size) <= 64 for im in small)
    assert all(im.size[0] <= 160 and im.size[1] <= 120 for im in large)
    assert {im.format for im in small} == {"JPEG"}
    assert {im.format for im in large} == {"PNG"}
    # 7.jpg is 600x450: the 160x120 box keeps its 4:3 aspect ratio exactly.
    by_url = {r["url"].rsplit("/", 1)[-1]: r for r in records(out)}
    large_7 = Image.open(next(p for p in by_url["7.jpg"]["outputs"] if "/large/" in p))
    assert large_7.size == (160, 120)


def test_unknown_backend_lists_valid_names(write_config, url_list, tmp_path):
    config = write_config(JOB.format(out=tmp_path / "out", urls=url_list))
    with pytest.raises(ConfigError) as error:
        run(RunRequest(config=config, backend="thread"))
    message = str(error.value)
    assert "--set backend.kind" in message
    assert "did you mean 'threads'" in message
    assert "sync, threads, processes, distributed" in message


def test_backend_aliases_are_accepted(write_config, url_list, tmp_path):
    config = write_config(JOB.format(out=tmp_path / "out", urls=url_list))
    report = run(RunRequest(config=config, backend="threading"))
    assert report["backend"].startswith("threads")
