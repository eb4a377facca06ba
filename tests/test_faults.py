"""Fault injection (issue 17): in a real run on each backend, every per-item stage kind
raises on one chosen item, and only that item fails, at that stage; the batch goes on.

The faults come from `pipeline.testing.faults` (the only injection), switched on by the
PIPELINE_FAULTS variable of a CLI subprocess: a fresh process starts a fresh forkserver,
so the `processes` and `distributed` workers forked from it inherit the variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.stage_jobs import records, write_photos
from tests.test_cli import cli

PHOTOS = 24
# stage name -> (kind, culprit photo): each kind raises on one photo of its own.
# Partitions of 4 photos; every partition keeps an ok item past the stages that fail in it,
# and each shard sink's culprit shares its partition (and shard) with ok items.
CULPRITS = {
    "urls": ("url_list", 1),
    "get": ("download", 2),
    "decode": ("decode", 3),
    "convert": ("convert", 4),
    "rotate": ("rotate", 5),
    "flip": ("flip", 7),
    "crop": ("crop", 8),
    "resize": ("resize", 9),
    "thumb": ("thumbnail", 10),
    "contrast": ("python", 11),
    "stats": ("stats", 12),
    "hash": ("phash", 13),
    "dedupe": ("dedupe", 14),
    "write": ("write_images", 16),
    "tar": ("webdataset", 17),
    "table": ("parquet", 19),
    "tensor": ("to_array", 20),
    "stack": ("arrays", 22),
}
SINKS = ("write", "tar", "table", "stack")


def name(photo: int) -> str:
    return f"photo-{photo:02d}"


def faults_variable() -> str:
    return ",".join(f"{kind}={name(photo)}" for kind, photo in CULPRITS.values())


@pytest.fixture(scope="module")
def faulted_job(tmp_path_factory) -> Path:
    """Every per-item kind in one chain (a source, download, decode, seven transforms,
    analysis, dedupe), then four sinks side by side."""
    folder = tmp_path_factory.mktemp("faults")
    paths = write_photos(folder / "photos", PHOTOS)
    listing = folder / "photos.txt"
    listing.write_text("".join(f"{path}\n" for path in paths))
    config = folder / "job.yaml"
    config.write_text(f"""
name: faults
output: {folder / "out"}  # each backend's run: --set output=...
partition_size: 4
stages:
  urls: {{kind: url_list, path: {listing}}}
  get: {{kind: download, input: urls, allow_schemes: [file]}}
  decode: {{kind: decode, input: get}}
  convert: {{kind: convert, input: decode, mode: RGB}}
  rotate: {{kind: rotate, input: convert, angle: 90}}
  flip: {{kind: flip, input: rotate, direction: horizontal}}
  crop: {{kind: crop, input: flip, center: [60, 60]}}
  resize: {{kind: resize, input: crop, size: [48, 48], mode: cover}}
  thumb: {{kind: thumbnail, input: resize, size: [32, 32]}}
  contrast: {{kind: python, input: thumb, function: "PIL.ImageOps:autocontrast"}}
  stats: {{kind: stats, input: contrast}}
  hash: {{kind: phash, input: stats}}
  dedupe: {{kind: dedupe, input: hash, threshold: 0}}
  write: {{kind: write_images, input: dedupe, path: images}}
  tar: {{kind: webdataset, input: dedupe, path: shards, shard_size: 2}}
  table: {{kind: parquet, input: dedupe, path: table, shard_size: 2}}
  tensor: {{kind: to_array, input: dedupe, channels: first}}
  stack: {{kind: arrays, input: tensor, path: arrays, shape: [3, 32, 32], shard_size: 2}}
""")
    return config


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sync", "threads", "processes", "distributed"])
def test_each_kind_fails_only_its_culprit(faulted_job, backend):
    run_dir = faulted_job.parent / backend
    env = {**os.environ, "PIPELINE_FAULTS": faults_variable()}
    args = ("--backend", backend, "--workers", "2", "--set", f"output={run_dir}", "--quiet")
    result = cli("run", str(faulted_job), *args, env=env)
    assert result.returncode == 1, result.stderr

    found = records(run_dir)
    assert [r["index"] for r in found] == list(range(1, PHOTOS + 1))  # one per entry
    assert all(name(photo) in r["url"] for photo, r in enumerate(found))
    outcome = {name(photo): (r["status"], r["stage"], r["reason"]) for photo, r in enumerate(found)}
    expected = {name(photo): ("ok", None, None) for photo in range(PHOTOS)}
    for stage, (_, photo) in CULPRITS.items():
        reason = "invalid_input" if stage == "urls" else "internal_error"  # a source's entry
        expected[name(photo)] = ("failed", stage, reason)
    wrong = {p: (outcome[p], want) for p, want in expected.items() if outcome[p] != want}
    assert wrong == {}, "photo: (got, wanted)"

    for record in found:
        if record["status"] == "failed":
            kind = CULPRITS[record["stage"]][0]
            assert f"injected fault in {kind} stage {record['stage']!r}" in record["message"]
        else:
            assert set(record["sink_outputs"]) == set(SINKS), record
            assert all(Path(path).is_file() for path in record["outputs"]), record

    report = json.loads((run_dir / "report.json").read_text())
    assert report["exit_code"] == 1 and report["backend"].startswith(backend)
    images = {path for r in found for path in r.get("sink_outputs", {}).get("write", [])}
    assert images == {str(path) for path in (run_dir / "images").iterdir()}
    # Each shard holds exactly the items whose records name it: the ok items of its
    # partition, never its sink's culprit. (A culprit of a later sibling sink was written
    # by the sinks before it, depth first, and its record lists those outputs.)
    for sink, folder, extension in SHARDS:
        named: dict[str, set[str]] = {}
        for record in found:
            for path in record.get("sink_outputs", {}).get(sink, []):
                named.setdefault(path, set()).add(record["key"])
        written = {str(path): shard_keys(path) for path in (run_dir / folder).glob(extension)}
        assert written == named, sink
        culprit = found[CULPRITS[sink][1]]["key"]
        assert all(culprit not in keys for keys in written.values()), sink


SHARDS = (("tar", "shards", "*.tar"), ("table", "table", "*.parquet"), ("stack", "arrays", "*.npy"))


def shard_keys(path: Path) -> set[str]:
    """The item keys a shard holds, read back from the file."""
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            return {member.name.split(".", 1)[0] for member in tar.getmembers()}
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.read_table(path, columns=["key"]).column("key").to_pylist())
    keys = json.loads(path.with_suffix(".keys.json").read_text())
    assert len(keys) == len(np.load(path)), path
    return set(keys)


# Which kinds a fresh process has patched, and whether it imported the fault module at all.
PROBE = """
import sys
from pipeline.stages.base import Source
from pipeline.stages.registry import stage_kinds

patched = [
    kind
    for kind, cls in sorted(stage_kinds().items())
    if hasattr(cls.entry if issubclass(cls, Source) else cls.process, "__wrapped__")
]
print("pipeline.testing.faults" in sys.modules, patched)
"""


def probe(faults: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_FAULTS"}
    if faults is not None:
        env["PIPELINE_FAULTS"] = faults
    return subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_faults_are_inert_without_the_variable():
    assert probe(None).stdout.split("\n")[0] == "False []"
    assert probe("").stdout.split("\n")[0] == "False []"


def test_the_variable_patches_exactly_the_kinds_it_names():
    result = probe("decode=a, url_list=b,decode=c,dedupe=d")
    assert result.stdout.split("\n")[0] == "True ['decode', 'dedupe', 'url_list']", result.stderr


def test_a_mistyped_kind_is_an_error():
    result = probe("decod=photo-01")
    assert result.returncode == 1
    assert "PIPELINE_FAULTS: unknown stage kinds ['decod']" in result.stderr
    assert "not kind=text" in probe("decode").stderr
