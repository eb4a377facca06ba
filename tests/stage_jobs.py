"""Helpers for the stage tests: sample images on disk and one-call job runs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import yaml

from pipeline.execution.runner import RunRequest, run
from pipeline.testing.images import jpeg_bytes, photo


def write_photos(folder: Path, count: int, size: tuple[int, int] = (96, 72)) -> list[Path]:
    """`count` distinct small JPEGs named photo-NN.jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"photo-{index:02d}.jpg"
        path.write_bytes(jpeg_bytes(photo(*size, seed=100 + index)))
        paths.append(path)
    return paths


def decoded_files(folder: Path | str) -> str:
    """YAML for stages `files` -> `get` -> `decode` over the images in a local folder."""
    return f"""
        files: {{kind: files, path: {folder}}}
        get: {{kind: download, input: files, allow_schemes: [file]}}
        decode: {{kind: decode, input: get}}
        """


def run_job(tmp_path: Path, *stages: str, backend: str = "sync", **settings: Any) -> dict:
    """Run a job made of `stages` (blocks of YAML lines) in tmp_path/out; return its report."""
    out = settings.pop("output", tmp_path / "out")
    header = {"name": "stage-test", "output": str(out), "partition_size": 4, **settings}
    text = yaml.safe_dump(header) + "stages:\n"
    blocks = "\n".join(textwrap.dedent(block).strip() for block in stages)
    text += textwrap.indent(blocks, "  ") + "\n"
    config = tmp_path / "job.yaml"
    config.write_text(text)
    return run(RunRequest(config=config, backend=backend))


def records(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "results.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda r: r["index"])
