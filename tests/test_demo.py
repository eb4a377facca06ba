"""The README's demo: `make run` on the shipped samples, offline."""

from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from tests.conftest import REPO


@pytest.mark.slow
def test_make_run_demo(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        ["make", "--no-print-directory", "run", f"ARGS=--set output={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "24 items" in result.stdout and "ok 24, failed 0" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["ok"] == 24
    thumbs = sorted((out / "images").glob("*.jpg"))
    assert len(thumbs) == 24
    assert all(max(Image.open(path).size) == 256 for path in thumbs)
    # photo-03 carries EXIF orientation 6 (rotate 90): its 1200x800 pixels become portrait.
    rotated = next(path for path in thumbs if path.name.startswith("photo-03-"))
    assert Image.open(rotated).size == (171, 256)
