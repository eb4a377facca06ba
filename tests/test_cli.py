"""The command line, run as users run it: `python -m pipeline ...` in a subprocess."""

from __future__ import annotations

import io
import os
import pty
import re
import shutil
import subprocess
import sys

import pytest

from pipeline.progress import Progress, Snapshot, render_line
from pipeline.state.results import RunStats
from tests.conftest import REPO

DEMO = "configs/thumbnails.yaml"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture
def served_job(write_config, url_list, tmp_path):
    """A job over the loopback server: 13 good images, a 404, a corrupt JPEG and HTML."""
    return write_config(f"""
        name: served
        output: {tmp_path / "out"}
        partition_size: 4
        stages:
          urls: {{kind: url_list, path: {url_list}}}
          download: {{kind: download, input: urls, allow_hosts: [127.0.0.1]}}
          decode: {{kind: decode, input: download}}
          thumb: {{kind: thumbnail, input: decode, size: [64, 64]}}
          write: {{kind: write_images, input: thumb, path: images}}
        """)


def test_run_ok_prints_summary_and_logs_one_line_without_tty(tmp_path):
    result = cli("run", DEMO, "--set", f"output={tmp_path / 'demo'}", "--backend", "sync")
    assert result.returncode == 0, result.stderr
    assert "24 items" in result.stdout and "ok 24, failed 0" in result.stdout
    assert "INFO pipeline: run job=thumbnails items=24" in result.stderr
    assert "\r" not in result.stderr  # no live line on a pipe


def test_items_failed_exit_1_with_reasons(served_job):
    result = cli("run", served_job, "--quiet")
    assert result.returncode == 1, result.stderr
    assert "ok 13, failed 3" in result.stdout
    assert "failed: http_4xx x1" in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"error: 3 items failed; see {served_job.parent / 'out'}/results.jsonl"
    ]


def test_status_prints_the_latest_runs_summary_from_its_report(served_job):
    assert cli("run", served_job, "--quiet").returncode == 1  # 3 of 16 fail
    out = served_job.parent / "out"
    result = cli("status", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{out}: 16 items"
    head = next(i for i, line in enumerate(lines) if line.startswith("latest run "))
    assert re.fullmatch(
        r"latest run \d{8}T\d{6}-\w{6} \(exit 1, ended [-\d:T+]+\): ok 13, failed 3, skipped 0",
        lines[head],
    ), lines[head]
    # 12 JPEGs of 320x240 to 760x570 in steps of 40x30, and a 200x150 PNG
    assert lines[head + 1 : head + 4] == [
        "  formats     JPEG 12, PNG 1",
        "  width       128-256: 1, 256-512: 5, 512-1024: 7",
        "  height      128-256: 2, 256-512: 9, 512-1024: 2",
    ]
    assert lines[head + 4].startswith("  bytes       ")
    assert "brightness" not in result.stdout  # no stats stage

    (out / "report.json").unlink()  # the history's end line says the same
    again = cli("status", str(out))
    assert again.stdout.splitlines()[head:] == lines[head:]


def test_bad_config_reports_every_problem_with_file_line_and_no_traceback(write_config):
    config = write_config("""
        name: bad
        output: out/bad
        partition_size: 0
        stages:
          urls: {kind: url_list, path: configs/samples/urls.txt}
          download: {kind: download, input: urls, timout: 3}
          thumb: {kind: thumbnial, input: download}
        """)
    result = cli("validate", config)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    err = result.stderr
    assert f"{config}:3: partition_size: Input should be greater than 0" in err
    assert (
        f"{config}:6: stages.download.timout: unknown key 'timout'; did you mean 'timeout'?" in err
    )
    assert "download: {kind: download, input: urls, timout: 3}" in err  # the offending line
    assert f"{config}:7: stages.thumb.kind: unknown stage kind 'thumbnial'" in err
    assert "did you mean 'thumbnail'?" in err


def test_unknown_backend_is_one_line_and_verbose_adds_the_traceback():
    result = cli("run", DEMO, "--backend", "thread")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: --set backend.kind: backend.kind: unknown backend 'thread'")
    assert "did you mean 'threads'?" in line
    verbose = cli("run", DEMO, "--backend", "thread", "--verbose")  # after the subcommand
    assert verbose.returncode == 2
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == line


def test_missing_config_and_bad_override_exit_2():
    missing = cli("validate", "configs/nope.yaml")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: configs/nope.yaml: cannot read config")
    override = cli("-q", "validate", DEMO, "--set", "partition_size")
    assert override.returncode == 2
    assert "--set partition_size: expected dotted.key=value" in override.stderr


def test_unwritable_output_exit_4_in_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli("-q", "run", DEMO, "--set", f"output={blocker / 'run'}")
    assert result.returncode == 4
    assert result.stderr.splitlines() == [f"error: Not a directory: {blocker / 'run'}"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    result = cli("run", DEMO, "--dry-run", "--set", f"output={out}", "--workers", "3")
    assert result.returncode == 0, result.stderr
    assert not out.exists()
    assert "backend    threads (3 workers), up to 6 partitions in flight" in result.stdout
    assert "items      24 in 6 partitions of 4" in result.stdout
    assert f"write     write_images  <- thumb  -> {out}/images" in result.stdout


def test_plan_warns_of_local_output_with_a_remote_scheduler():
    result = cli("plan", DEMO, "--scheduler", "tcp://10.0.0.5:8786", "--set", "partition_size=64")
    assert result.returncode == 0, result.stderr
    assert "distributed on tcp://10.0.0.5:8786" in result.stdout
    assert "output out/thumbnails is a local path but the scheduler is tcp://10.0.0.5:8786" in (
        result.stdout
    )
    assert "1 partition(s) for" in result.stdout  # 24 items in one partition of 64


def test_plan_warns_of_a_stage_that_feeds_no_sink():
    gray = "stages.gray={kind: convert, input: decode, mode: L}"
    result = cli("plan", DEMO, "--set", gray)
    assert result.returncode == 0, result.stderr
    assert "stage gray feeds no sink: it will not run" in result.stdout
    assert "feeds no sink" not in cli("plan", DEMO).stdout


def test_run_logs_the_plan_warnings(tmp_path):
    gray = "stages.gray={kind: convert, input: decode, mode: L}"
    result = cli("run", DEMO, "--set", gray, "--set", f"output={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "stage gray feeds no sink" in result.stderr


def test_graph_mermaid_and_dot():
    mermaid = cli("graph", DEMO)
    assert mermaid.returncode == 0, mermaid.stderr
    assert mermaid.stdout.startswith("flowchart LR\n")
    assert '    s0(["urls<br/><i>url_list</i>"])' in mermaid.stdout
    assert "    s3 --> s4" in mermaid.stdout
    dot = cli("graph", DEMO, "--format", "dot")
    assert '"thumb" -> "write";' in dot.stdout
    assert (
        '"write" [label=<write<BR/><FONT POINT-SIZE="9" COLOR="gray35">write_images</FONT>>, '
        in (dot.stdout)
    )
    assert "shape=cylinder];" in dot.stdout


def test_graph_image_needs_graphviz(tmp_path):
    svg = tmp_path / "dag.svg"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no `dot` on this PATH
    result = cli("graph", DEMO, "-o", str(svg), env=env)
    assert result.returncode == 4
    assert result.stderr.startswith("error: drawing svg needs Graphviz's `dot`")


@pytest.mark.skipif(
    not shutil.which("dot") and not os.environ.get("CI"),
    reason="Graphviz's dot is not installed (.ci/run installs it, so CI runs this)",
)
def test_graph_draws_svg_with_graphviz(tmp_path):
    svg = tmp_path / "dag.svg"
    drawn = cli("graph", DEMO, "-o", str(svg))
    assert drawn.returncode == 0, drawn.stderr
    assert "<svg" in svg.read_text() and ">write_images</text>" in svg.read_text()


def run_on_pty(*args: str) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal; return its exit code and stderr."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return process.wait(timeout=120), b"".join(chunks).decode()


def test_progress_is_a_live_line_on_a_tty(tmp_path):
    code, stderr = run_on_pty("run", DEMO, "--set", f"output={tmp_path / 'tty'}")
    assert code == 0, stderr
    assert "\rthumbnails  [####################]  24/24  100%  failed 0" in stderr
    assert "items/s  ETA 0:00" in stderr


def test_progress_is_a_periodic_log_line_on_a_pipe(tmp_path):
    result = cli(
        "run", DEMO, "-b", "sync", "--set", f"output={tmp_path / 'pipe'}", "--progress-interval=0"
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "progress job=thumbnails" in line]
    assert [line.split("done=")[1].split()[0] for line in lines] == [
        "4",
        "8",
        "12",
        "16",
        "20",
        "24",
    ]
    assert "total=24 failed=0" in lines[-1] and "\r" not in result.stderr


def test_quiet_prints_only_the_summary(tmp_path):
    result = cli("--quiet", "run", DEMO, "--set", f"output={tmp_path / 'q'}")
    assert result.returncode == 0
    assert result.stderr == ""
    assert "ok 24, failed 0" in result.stdout


def test_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("pipeline ")


@pytest.mark.slow
def test_progress_on_distributed_shows_the_dashboard(tmp_path):
    code, stderr = run_on_pty(
        "run", DEMO, "-b", "distributed", "-w", "1", "--set", f"output={tmp_path / 'dist'}"
    )
    assert code == 0, stderr
    assert "24/24  100%  failed 0" in stderr
    assert "dashboard http://" in stderr


@pytest.mark.slow
def test_the_dashboard_link_follows_the_verbosity(tmp_path):
    job = ("run", DEMO, "-b", "distributed", "-w", "1")
    quiet = cli(*job, "--set", f"output={tmp_path / 'quiet'}", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert "dashboard" not in quiet.stderr
    assert "ok 24, failed 0" in quiet.stdout
    normal = cli(*job, "--set", f"output={tmp_path / 'normal'}")
    assert normal.returncode == 0, normal.stderr
    assert "INFO pipeline.backend: dask dashboard: http://127.0.0.1:" in normal.stderr


def test_progress_line_without_a_known_total_has_no_bar_or_eta():
    line = render_line("job", Snapshot(done=40, failed=2, total=None, rate=8.0, elapsed=5.0))
    assert line == "job  40 items  failed 2  8.0 items/s"
    eta = render_line("job", Snapshot(done=40, failed=0, total=1000, rate=8.0, elapsed=5.0))
    assert "[--------------------]  40/1000  4%" in eta and eta.endswith("ETA 2:00")


def test_progress_redraws_in_place_and_ends_its_line():
    terminal = io.StringIO()
    progress = Progress("job", total=2, stream=terminal, live=True, dashboard=lambda: None)
    stats = RunStats()
    stats.add([{"status": "ok", "reason": None, "timings": {}}] * 2)
    progress(stats)
    progress.close()
    assert terminal.getvalue().startswith("\rjob  [####################]  2/2  100%  failed 0")
    assert terminal.getvalue().endswith("\x1b[K\n")
