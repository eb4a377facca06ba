"""The benchmark's own parts: its corpus is deterministic and photo-like, and it runs."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from bench.corpus import corpus_image
from bench.references import thumbnail_bytes
from tests.conftest import REPO


def test_corpus_images_are_deterministic_photo_sized_jpegs():
    for index in range(4):
        data = corpus_image(index)
        assert corpus_image(index) == data
        image = Image.open(io.BytesIO(data))
        assert image.format == "JPEG"
        assert 640 <= max(image.size) <= 1600 and 480 <= min(image.size) <= 1200
        # compresses like a photo at q85: roughly 100-250 KB per megapixel
        assert 80_000 < len(data) / (image.width * image.height) * 1e6 < 300_000


def test_ceiling_thumbnail_fits_the_box():
    thumb = Image.open(io.BytesIO(thumbnail_bytes(corpus_image(0))))
    assert max(thumb.size) == 256


@pytest.mark.slow
def test_bench_runs_end_to_end_on_a_tiny_corpus(tmp_path):
    words = ["ceiling (in", "tutorial", "threads 0ms"]
    command = [sys.executable, "-m", "bench.run", "--count", "6", "--no-levers"]
    command += ["--results", str(tmp_path), "--only", *words]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "latest.json").read_text())["rows"]
    assert [row["label"] for row in rows] == [
        "ceiling (in memory, draft)",
        "tutorial (threads+processes)",
        "pipeline threads 0ms",
    ]
    assert all(row["images"] == 6 and row["rate"] > 0 for row in rows)
    assert [len(row["round_rates"]) for row in rows] == [1, 2, 2]  # 2 rounds by default
    assert Image.open(tmp_path / "latest.png").size[0] > 0
    assert "| pipeline threads 0ms" in result.stdout


def test_the_bench_server_serves_bytes_with_keep_alive_and_latency():
    import http.client
    import time

    from bench.server import StaticServer

    with StaticServer(latency=0.05) as server:
        server.add_bytes("/img/a.jpg", b"\xff\xd8" * 40_000)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        started = time.perf_counter()
        connection.request("GET", "/img/a.jpg?copy=7")  # the query is not part of the name
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"\xff\xd8" * 40_000)
        assert response.getheader("Content-Type") == "image/jpeg"
        assert time.perf_counter() - started >= 0.05
        connection.request("HEAD", "/img/a.jpg")  # the same connection: kept alive
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"")
        assert response.getheader("Content-Length") == "80000"
        connection.request("GET", "/img/missing.jpg")
        assert connection.getresponse().status == 404
    assert server.connections == set()  # closed with the server


def test_best_rounds_keeps_the_fastest_round_of_each_row():
    from bench.run import best_rounds

    rows = [
        {"label": "a", "images": 10, "wall": 2.0, "cpu": 1},
        {"label": "b", "images": 10, "wall": 1.0, "cpu": 2},
        {"label": "a", "images": 10, "wall": 1.0, "cpu": 3},
        {"label": "b", "images": 10, "wall": 4.0, "cpu": 4},
    ]
    best = best_rounds(rows)
    assert [(row["label"], row["cpu"], row["round_rates"]) for row in best] == [
        ("a", 3, [5.0, 10.0]),
        ("b", 2, [10.0, 2.5]),
    ]


def bench_module(*args: str) -> None:
    """Run `python -m bench.<args>` from the repository; it must succeed."""
    command = [sys.executable, "-m", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_client_and_stage_cpu_levers_run_on_a_tiny_corpus(tmp_path):
    """`bench.client_lever` fetches every byte each way (pycurl rows only if installed);
    `bench.stage_cpu` splits a run's CPU by stage, and the client's share."""
    bench_module(
        "bench.client_lever", "--count", "6", "--rounds", "1", "--out", str(tmp_path / "client.md")
    )
    table = (tmp_path / "client.md").read_text()
    assert "| download stage |" in table and "| guarded urllib3 |" in table
    bench_module(
        "bench.stage_cpu", "--count", "6", "--backend", "sync", "--out", str(tmp_path / "stages.md")
    )
    rows = [line.split("|")[1:3] for line in (tmp_path / "stages.md").read_text().splitlines()]
    found = {name.strip(): float(ms) for name, ms in rows[4:]}
    assert set(found) == {"download", "decode", "thumb", "write", "client (no stage)"}
    assert all(ms > 0 for ms in found.values())
