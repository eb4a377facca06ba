"""The Python API: `pipeline.load` and `pipeline.run`, as a notebook or another tool uses them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

import pipeline
from pipeline import logs
from pipeline.errors import ConfigError, LockHeldError
from pipeline.progress import Progress
from pipeline.state.lock import RunLock
from tests.conftest import REPO
from tests.stage_jobs import write_photos

DEMO = REPO / "configs/thumbnails.yaml"


@pytest.fixture
def in_repo(monkeypatch):
    """The demo's paths are relative to the repository, as when `make run` runs it."""
    monkeypatch.chdir(REPO)


@pytest.fixture
def job_dict(tmp_path):
    """A whole job as a dict: 6 local photos -> thumbnails -> files."""
    folder = tmp_path / "photos"
    write_photos(folder, 6)
    return {
        "name": "from-a-dict",
        "output": str(tmp_path / "out"),
        "partition_size": 2,
        "stages": {
            "files": {"kind": "files", "path": str(folder)},
            "get": {"kind": "download", "input": "files", "allow_schemes": ["file"]},
            "decode": {"kind": "decode", "input": "get"},
            "thumb": {"kind": "thumbnail", "input": "decode", "size": [32, 32]},
            "write": {"kind": "write_images", "input": "thumb", "path": "thumbs"},
        },
    }


@pytest.fixture
def pipeline_warnings(caplog, monkeypatch):
    """What the `pipeline` logger warns of, even after a CLI run in this process
    (`logs.configure` stops it propagating to the root logger, where caplog listens)."""
    monkeypatch.setattr(logs.logger(), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        yield caplog


def test_load_and_run_the_demo_from_python(in_repo, tmp_path):
    out = tmp_path / "demo"
    plan = pipeline.load(DEMO, overrides=[f"output={out}"])
    assert [node.name for node in plan.nodes] == ["urls", "download", "decode", "thumb", "write"]
    report = pipeline.run(plan, backend="sync")
    assert report["exit_code"] == 0
    assert report["counts"] == {"ok": 24, "failed": 0, "skipped": 0}
    assert report == json.loads((out / "report.json").read_text())
    assert len(list((out / "images").iterdir())) == 24


def test_a_dict_config_runs_and_is_left_as_it_was(job_dict, tmp_path):
    before = json.dumps(job_dict, sort_keys=True)
    report = pipeline.run(job_dict, backend="sync")
    assert report["job"] == "from-a-dict" and report["counts"]["ok"] == 6
    assert len(list((tmp_path / "out/thumbs").iterdir())) == 6
    assert json.dumps(job_dict, sort_keys=True) == before
    assert pipeline.run(job_dict, backend="sync")["counts"] == {"ok": 0, "failed": 0, "skipped": 6}


def test_overrides_apply_to_a_dict_and_a_file_and_interpolate_the_environment(
    job_dict, monkeypatch
):
    monkeypatch.setenv("THUMB_EDGE", "48")
    job_dict["stages"]["thumb"]["size"] = ["${THUMB_EDGE}", 24]
    plan = pipeline.load(job_dict, overrides=["partition_size=3", "stages.thumb.resample=box"])
    assert plan.config.partition_size == 3
    assert plan.by_name["thumb"].options.size == (48, 24)
    assert plan.by_name["thumb"].options.resample == "box"
    assert job_dict["partition_size"] == 2 and "resample" not in job_dict["stages"]["thumb"]
    demo = pipeline.load(DEMO, ["backend=sync", "stages.thumb.size=[64,64]"])
    assert demo.config.backend.kind == "sync"
    assert demo.by_name["thumb"].options.size == (64, 64)


def test_backend_arguments_replace_the_configs(job_dict):
    plan = pipeline.load(job_dict)
    assert plan.config.backend.kind == "threads"
    report = pipeline.run(plan, backend="threads", workers=3)
    assert report["backend"] == "threads (3 workers)"
    assert plan.config.backend.workers is None  # the plan given is left as it was
    assert pipeline.run(plan, "sync", full=True)["backend"].startswith("sync")
    with pytest.raises(ConfigError) as bad_kind:
        pipeline.run(plan, backend="thread")
    assert str(bad_kind.value).startswith(
        "run(backend='thread'): backend.kind: unknown backend 'thread'; did you mean 'threads'?"
    )
    with pytest.raises(ConfigError, match=r"run\(workers=0\): backend.workers: Input should be"):
        pipeline.run(plan, workers=0)


def test_a_config_error_from_a_dict_names_every_key(job_dict):
    job_dict["partition_size"] = 0
    job_dict["stages"]["thumb"]["kind"] = "thumbnial"
    job_dict["stages"]["get"]["timout"] = 3
    with pytest.raises(ConfigError) as error:
        pipeline.load(job_dict)
    problems = error.value.problems
    assert "<dict>: partition_size: Input should be greater than 0 (got 0)" in problems
    assert any(
        p.startswith("<dict>: stages.thumb.kind: unknown stage kind 'thumbnial'; did you mean")
        for p in problems
    ), problems
    assert "<dict>: stages.get.timout: unknown key 'timout'; did you mean 'timeout'?" in problems
    with pytest.raises(ConfigError, match=r"^--set stages: expected dotted.key=value"):
        pipeline.load(job_dict, overrides=["stages"])


def test_the_plan_warnings_are_logged_for_a_python_caller(job_dict, pipeline_warnings):
    job_dict["stages"]["gray"] = {"kind": "convert", "input": "decode", "mode": "L"}
    report = pipeline.run(job_dict, backend="sync")
    assert report["exit_code"] == 0
    warned = [r.getMessage() for r in pipeline_warnings.records if r.levelno == logging.WARNING]
    assert any(
        message.startswith("stage gray feeds no sink: it will not run") for message in warned
    )


def test_failed_items_return_the_report_with_exit_1(write_config, url_list, tmp_path):
    config = write_config(f"""
        name: served
        output: {tmp_path / "out"}
        stages:
          urls: {{kind: url_list, path: {url_list}}}
          download: {{kind: download, input: urls, allow_hosts: [127.0.0.1]}}
          decode: {{kind: decode, input: download}}
          write: {{kind: write_images, input: decode, path: images}}
        """)
    report = pipeline.run(config, backend="sync")  # a path: loaded first
    assert report["exit_code"] == 1
    assert report["counts"] == {"ok": 13, "failed": 3, "skipped": 0}


def test_a_held_lock_raises_and_touches_nothing(job_dict, tmp_path):
    out = tmp_path / "out"
    with RunLock(out), pytest.raises(LockHeldError, match="another run of this job holds"):
        pipeline.run(job_dict)
    assert [path.name for path in out.iterdir()] == [".lock"]


def test_progress_is_any_callable_and_is_told_the_job_and_its_total(in_repo, tmp_path):
    seen = []
    plan = pipeline.load(DEMO, overrides=[f"output={tmp_path / 'demo'}"])
    pipeline.run(plan, backend="sync", progress=lambda stats: seen.append(stats.items))
    assert seen == [4, 8, 12, 16, 20, 24]
    progress = Progress(live=False, interval=0)  # no job, no total: the run tells it both
    pipeline.run(plan, backend="sync", full=True, progress=progress)
    assert (progress.job, progress.total) == ("thumbnails", 24)


def test_import_pipeline_loads_nothing_else():
    """The CLI and every tool pay for `import pipeline`: `load` and `run` import the rest."""
    heavy = "m.startswith('pipeline') or m in ('yaml', 'pydantic', 'dask', 'PIL')"
    code = f"import sys, pipeline; print(sorted(m for m in sys.modules if {heavy}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "['pipeline']", result.stderr
