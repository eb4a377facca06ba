"""The img2dataset row: img2dataset 1.47, in a throwaway virtualenv outside the repository.

`ensure_venv()` creates `~/.cache/pipeline-bench/img2dataset-1.47/` once (`python -m
venv`, `pip install img2dataset==1.47.0`) and reuses it; when that fails it says why
and the bench skips the row. Nothing of img2dataset is a dependency of the project.

`download()` runs img2dataset in its own process (a subprocess of that venv's python,
start-up included) with settings comparable to the pipeline rows: one process per core,
32 download threads each, shards of 250, a thumbnail fitted inside 256x256
(`keep_ratio_largest`: the largest side 256, as `Image.thumbnail`; img2dataset's
`keep_ratio` would make the *smallest* side 256, and costs it about 2.3 ms more CPU per
image here), JPEG quality 85, written as files, no retries, no X-Robots-Tag filtering.
Its other options keep their defaults (EXIF extraction, a sha256 per image). The images
it wrote are counted from its output folder.

It reaches nothing beyond 127.0.0.1: the only other connection it tried (checked with
`strace -f -e trace=connect`) was albumentations' update check against the package
index, once per process, with a 2 s timeout; `NO_ALBUMENTATIONS_UPDATE` turns it off,
and wandb is off (its default; `WANDB_MODE=disabled` besides).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

VERSION = "1.47.0"
VENV = Path.home() / ".cache" / "pipeline-bench" / "img2dataset-1.47"
READY = VENV / ".bench-ready"  # written once the install and an import have worked
INSTALL_SECONDS = 900
THREADS = 32
SHARD = 250
OFFLINE = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
# json.loads, not fire: the options reach download() exactly as written here
ENTRY = "import json, sys\nfrom img2dataset import download\ndownload(**json.loads(sys.argv[1]))"


def python() -> Path:
    """The venv's interpreter (there or not)."""
    return VENV / "bin" / "python"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def _step(what: str, command: list[str]) -> str | None:
    """Run one install step; None when it worked, else why not (one line)."""
    try:
        done = subprocess.run(
            command,
            env={**os.environ, **OFFLINE},  # the import check too must not call out
            capture_output=True,
            text=True,
            timeout=INSTALL_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{what}: {error}"
    if done.returncode != 0:
        return f"{what} failed (exit {done.returncode}): {_last_line(done.stderr)}"
    return None


def ensure_venv() -> tuple[Path | None, str]:
    """The venv's python and a one-line status; (None, why) when it cannot be had."""
    if READY.exists() and python().exists():
        return python(), f"img2dataset {VERSION}: {VENV}"
    shutil.rmtree(VENV, ignore_errors=True)  # a half-made one from an earlier try
    VENV.parent.mkdir(parents=True, exist_ok=True)
    print(f"img2dataset {VERSION}: installing into {VENV} (once)", flush=True)
    pip = [str(python()), "-m", "pip", "install", "--quiet", "--retries", "1", "--timeout", "30"]
    for what, command in (
        ("python -m venv", [sys.executable, "-m", "venv", str(VENV)]),
        (f"pip install img2dataset=={VERSION}", [*pip, f"img2dataset=={VERSION}"]),
        ("import img2dataset", [str(python()), "-c", "import img2dataset"]),
    ):
        if why := _step(what, command):
            shutil.rmtree(VENV, ignore_errors=True)
            return None, f"img2dataset row skipped: {why}"
    READY.write_text(VERSION + "\n")
    return python(), f"img2dataset {VERSION}: installed into {VENV}"


def settings(workers: int) -> dict[str, Any]:
    """img2dataset's `download()` arguments for the bench's setup, less the paths."""
    return {
        "processes_count": workers,
        "thread_count": THREADS,
        "image_size": 256,
        "resize_mode": "keep_ratio_largest",
        "encode_quality": 85,
        "output_format": "files",
        "number_sample_per_shard": SHARD,
        "distributor": "multiprocessing",
        "retries": 0,
        "disallowed_header_directives": [],  # [] turns the X-Robots-Tag check off
    }


def failures(out: Path) -> dict[str, int]:
    """Failed samples by img2dataset's own status message, from its shard stats files."""
    found: Counter[str] = Counter()
    for stats in out.glob("*_stats.json"):
        found.update(json.loads(stats.read_text()).get("status_dict", {}))
    found.pop("success", None)
    return dict(found)


def download(venv_python: str, urls: str, out: Path, workers: int) -> dict[str, Any]:
    """Run img2dataset on the URL list; the .jpg files it wrote, and what failed."""
    log = out.parent / "img2dataset.log"
    arguments = {"url_list": urls, "output_folder": str(out), **settings(workers)}
    with log.open("w") as output:
        done = subprocess.run(
            [venv_python, "-c", ENTRY, json.dumps(arguments)],
            env={**os.environ, **OFFLINE},
            stdout=output,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"img2dataset exited {done.returncode}:\n{log.read_text()[-3000:]}")
    images = sum(1 for _ in out.rglob("*.jpg"))
    asked = len(Path(urls).read_text().split())
    return {"images": images, "failed": asked - images, "failures": failures(out)}
