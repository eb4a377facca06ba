"""`files` on real local trees with awkward entries: every name gets one record (issue 17)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.testing.images import jpeg_bytes, photo
from tests.conftest import REPO
from tests.stage_jobs import records, run_job

PHOTO = jpeg_bytes(photo(48, 36, seed=7))

# Runs a job in a child process and prints its exit code (and error) as JSON.
CHILD = """
import json, sys
from pathlib import Path
from pipeline.errors import PipelineError
from tests.stage_jobs import run_job
try:
    report = run_job(Path(sys.argv[1]), *json.loads(sys.argv[2]))
    print(json.dumps({"exit_code": report["exit_code"]}))
except PipelineError as error:
    print(json.dumps({"exit_code": error.exit_code, "error": str(error)}))
"""


def job(path: Path | str, **options) -> list[str]:
    """The stages files -> download -> decode -> write_images, as YAML blocks."""
    files = json.dumps({"kind": "files", "path": str(path), **options})
    return [
        f"files: {files}",
        "get: {kind: download, input: files, allow_schemes: [file]}",
        "decode: {kind: decode, input: get}",
        "write: {kind: write_images, input: decode, path: images}",
    ]


def source(tree: Path, how: str) -> list[str]:
    """A recursive walk of `tree`, or a glob of every .jpg under it."""
    return job(tree, recursive=True) if how == "walk" else job(f"{tree}/**/*.jpg")


def summary(tmp_path: Path) -> list[tuple]:
    """(index, status, stage, reason, input) of every record, in index order."""
    found = records(tmp_path / "out")
    return [(r["index"], r["status"], r["stage"], r["reason"], r["input"]) for r in found]


def photo_at(path: Path | bytes) -> None:
    """A small JPEG at `path` (bytes: a name that need not be UTF-8)."""
    with open(path, "wb") as handle:
        handle.write(PHOTO)


@pytest.mark.parametrize("how", ["walk", "glob"])
def test_every_name_of_a_walk_or_glob_is_one_record(tmp_path, how):
    tree = tmp_path / "in"
    names = ["100%41.jpg", "a\nb.jpg", "photo.jpg", "x#1.jpg", "y?.jpg", "sub/photo.jpg"]
    for name in names:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        photo_at(tree / name)
    (tree / "dangling.jpg").symlink_to("nowhere.jpg")
    (tree / "loop.jpg").symlink_to("loop.jpg")
    (tree / "sub" / "up.jpg").symlink_to("..")  # a folder loop, for a walk that followed it
    report = run_job(tmp_path, *source(tree, how))
    link = ("failed", "get", "not_regular_file")
    assert summary(tmp_path) == [
        (1, "ok", None, None, f"file://{tree}/100%41.jpg"),
        (2, "ok", None, None, f"file://{tree}/a\nb.jpg"),
        (3, *link, f"file://{tree}/dangling.jpg"),
        (4, *link, f"file://{tree}/loop.jpg"),
        (5, "ok", None, None, f"file://{tree}/photo.jpg"),
        (6, "ok", None, None, f"file://{tree}/x#1.jpg"),
        (7, "ok", None, None, f"file://{tree}/y?.jpg"),
        (8, "ok", None, None, f"file://{tree}/sub/photo.jpg"),
        (9, *link, f"file://{tree}/sub/up.jpg"),
    ]
    assert report["exit_code"] == 1
    assert len(list((tmp_path / "out" / "images").iterdir())) == 6


@pytest.mark.parametrize("how", ["walk", "glob"])
def test_names_that_are_not_utf8_are_failed_records_and_the_run_finishes(tmp_path, how):
    tree = tmp_path / "in"
    folder = os.fsencode(tree / "d") + b"\xffir"
    os.makedirs(folder)
    photo_at(folder + b"/photo.jpg")
    photo_at(os.fsencode(tree) + b"/caf\xe9.jpg")
    photo_at(tree / "photo.jpg")
    table = "table: {kind: parquet, input: decode, path: table}"  # a sink that needs text
    report = run_job(tmp_path, *source(tree, how), table)
    not_utf8 = ("failed", "files", "invalid_input")
    assert summary(tmp_path) == [
        (1, *not_utf8, f"file://{tree}/caf\\xe9.jpg"),
        (2, "ok", None, None, f"file://{tree}/photo.jpg"),
        (3, *not_utf8, f"file://{tree}/d\\xffir/photo.jpg"),
    ]
    assert records(tmp_path / "out")[0]["message"].startswith("the path is not valid UTF-8")
    assert report["exit_code"] == 1 and report["counts"]["failed"] == 2


def run_bound_by_permissions(tmp_path: Path, stages: list[str]) -> dict:
    """Run a job in a child process that file permissions stop. Tests run as root here,
    which reads any folder: the child then runs without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH (setpriv), so a folder with mode 000 stops it too."""
    command = [sys.executable, "-c", CHILD, str(tmp_path), json.dumps(stages)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root reads a mode-000 folder, and setpriv is missing to drop that")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture
def locked(tmp_path):
    """tmp_path/in with photo.jpg, z/photo.jpg and locked/photo.jpg, locked/ being mode 000."""
    tree = tmp_path / "in"
    for name in ("photo.jpg", "locked/photo.jpg", "z/photo.jpg"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        photo_at(tree / name)
    (tree / "locked").chmod(0)
    yield tree
    tree.chmod(0o755)
    (tree / "locked").chmod(0o755)


@pytest.mark.parametrize("how", ["walk", "glob"])
def test_a_subfolder_that_cannot_be_listed_is_one_failed_record(tmp_path, locked, how):
    report = run_bound_by_permissions(tmp_path, source(locked, how))
    assert summary(tmp_path) == [
        (1, "ok", None, None, f"file://{locked}/photo.jpg"),
        (2, "failed", "files", "invalid_input", f"file://{locked}/locked"),
        (3, "ok", None, None, f"file://{locked}/z/photo.jpg"),
    ]
    message = records(tmp_path / "out")[1]["message"]
    assert message == "the folder cannot be listed: Permission denied"
    assert report == {"exit_code": 1}


def test_a_top_folder_that_cannot_be_listed_stops_the_run_naming_it(tmp_path, locked):
    locked.chmod(0)
    report = run_bound_by_permissions(tmp_path, job(locked, recursive=True))
    assert report == {
        "exit_code": 4,
        "error": f"files: cannot list file://{locked}: Permission denied",
    }
