"""A real cluster: `dask scheduler` and `dask worker` subprocesses on 127.0.0.1.

One scheduler with two workers serves the module; the code-shipping test starts its
own scheduler, because the scheduler remembers shipped code for workers that join later.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sysconfig
import threading
import time
from pathlib import Path

import pytest
from distributed import Client
from PIL import Image

from pipeline import logs
from pipeline.errors import RunIncompleteError
from pipeline.execution import backends
from pipeline.execution.runner import RunRequest, prepare, run
from pipeline.testing.cluster import DaskProcesses
from pipeline.testing.images import jpeg_bytes, photo
from pipeline.testing.server import TestServer, send_bytes
from tests.conftest import write_url_list
from tests.test_backends import JOB, outputs, records

pytestmark = pytest.mark.slow

SLOW_ITEMS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two workers (two threads each, with nannies), stopped on any exit.

    A task whose worker dies twice is given up (KilledWorker), instead of after four deaths.
    """
    processes = DaskProcesses(tmp_path_factory.mktemp("cluster"))
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"}
    try:
        processes.start_scheduler(env=env)
        for index in (1, 2):
            processes.add_worker(f"worker-{index}", threads=2)
        processes.wait_for_workers(2)
        yield processes
    finally:
        processes.stop()


@pytest.fixture(scope="module")
def job(tmp_path_factory, image_server):
    """Write the standard two-branch job for an output folder; return the config path."""
    base = tmp_path_factory.mktemp("jobs")
    urls = write_url_list(base / "urls.txt", image_server)

    def write(out: Path | str, name: str, url_list: Path = urls) -> Path:
        config = base / f"{name}.yaml"
        config.write_text(JOB.format(out=out, urls=url_list))
        return config

    return write


@pytest.fixture(scope="module")
def threads_outputs(job, tmp_path_factory):
    out = tmp_path_factory.mktemp("threads") / "out"
    run(RunRequest(config=job(out, "threads"), backend="threads"))
    return outputs(out)


def test_cluster_writes_the_same_bytes_as_threads(
    cluster, job, threads_outputs, tmp_path, caplog, monkeypatch
):
    out = tmp_path / "out"
    monkeypatch.setattr(logs.logger(), "propagate", True)  # a CLI run here may have stopped it
    with caplog.at_level(logging.INFO, logger="pipeline"):
        report = run(RunRequest(config=job(out, "cluster"), scheduler=cluster.address))
    assert report["backend"] == f"distributed on {cluster.address}"
    assert outputs(out) == threads_outputs
    assert len(threads_outputs) == 26
    assert len(records(out)) == 16
    assert report["counts"] == {"ok": 13, "failed": 3, "skipped": 0}
    assert "dask dashboard: http://127.0.0.1:" in caplog.text


@pytest.fixture(scope="module")
def slow_server():
    """Distinct JPEGs, each answered after 0.25 s: long enough runs to lose a worker in."""
    with TestServer(latency=0.25) as server:
        for index in range(SLOW_ITEMS):
            server.add_bytes(f"/slow/{index}.jpg", jpeg_bytes(photo(160, 120, seed=index)))
        yield server


def test_a_killed_worker_loses_no_item_and_duplicates_no_output(
    cluster, slow_server, write_config, tmp_path
):
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(slow_server.url(f"/slow/{i}.jpg") + "\n" for i in range(SLOW_ITEMS)))
    out = tmp_path / "out"
    config = write_config(
        JOB.format(out=out, urls=urls).replace("partition_size: 3", "partition_size: 2")
    )
    killed: list[int] = []
    with Client(cluster.address) as spy:
        pids = spy.run(os.getpid)

        def kill_a_busy_worker(stats) -> None:
            busy = [address for address, keys in spy.processing().items() if keys]
            if killed or not busy:
                return
            time.sleep(0.1)  # let its downloads begin, so work is really lost
            killed.append(pids[busy[0]])
            os.kill(pids[busy[0]], signal.SIGKILL)

        report = run(RunRequest(config=config, scheduler=cluster.address), kill_a_busy_worker)
        cluster.wait_for_workers(2)  # the nanny restarts it, for the next tests
        assert spy.run(os.getpid) != pids

    assert killed
    assert report["counts"] == {"ok": SLOW_ITEMS, "failed": 0, "skipped": 0}
    results = records(out)
    assert sorted(r["index"] for r in results) == list(range(1, SLOW_ITEMS + 1))
    assert sum(slow_server.hits.values()) > SLOW_ITEMS  # a lost partition was downloaded again
    written = [p for p in out.rglob("*") if p.is_file() and p.parent != out]
    finals = sorted(str(p) for p in written if not p.name.startswith(".tmp-"))
    recorded = sorted(path for r in results for path in r["outputs"])
    assert finals == recorded
    assert len(recorded) == 2 * SLOW_ITEMS
    for path in recorded:
        Image.open(path).load()  # complete, not half-written


def test_a_partition_that_keeps_killing_workers_fails_as_worker_lost(
    cluster, job, image_server, tmp_path
):
    """Partition 0 hangs, and whichever worker runs it is killed, as an OOM killer would."""

    def hang(request) -> None:
        time.sleep(3)
        send_bytes(request, b"late", "text/plain", status=503)

    poison = [image_server.add(f"/poison/{i}.jpg", hang) for i in (0, 1)]
    urls = tmp_path / "urls.txt"
    good = [image_server.url(f"/img/{i}.jpg") for i in range(12)]
    urls.write_text("\n".join(poison + good) + "\n")  # partition 0: both poisons and 0.jpg
    stop = threading.Event()
    killed: list[str] = []
    killer = threading.Thread(target=kill_workers_running_only, args=(cluster, stop, killed))
    killer.start()
    try:
        out = tmp_path / "out"
        report = run(RunRequest(config=job(out, "poison", urls), scheduler=cluster.address))
    finally:
        stop.set()
        killer.join()
    cluster.wait_for_workers(2)  # the nannies restart them, for the next tests
    assert len(killed) >= 2
    assert report["counts"] == {"ok": 11, "failed": 3, "skipped": 0}
    assert report["failures_by_reason"] == {"worker_lost": 3}
    lost = sorted(r["url"].rsplit("/", 2)[-2] for r in records(out) if r["status"] == "failed")
    assert lost == ["img", "poison", "poison"]


def kill_workers_running_only(cluster: DaskProcesses, stop: threading.Event, killed: list[str]):
    """SIGKILL each worker that runs partition 0 once it is the only task left running."""
    with Client(cluster.address) as spy:
        while not stop.wait(0.1):
            processing = {a: keys for a, keys in spy.processing().items() if keys}
            keys = [str(key) for keys in processing.values() for key in keys]
            if len(keys) == 1 and keys[0].startswith("partition-000000-"):
                (address,) = processing
                if address not in killed:
                    killed.append(address)
                    os.kill(spy.run(os.getpid, workers=[address])[address], signal.SIGKILL)


def test_address_comes_from_cli_then_yaml_then_environment(job, tmp_path, monkeypatch):
    config = job(tmp_path, "address")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://env:1")
    overrides = ("backend.kind=distributed", "backend.address=tcp://yaml:1")
    request = RunRequest(config=config, overrides=overrides, scheduler="tcp://cli:1")
    assert prepare(request)[1].address == "tcp://cli:1"
    assert prepare(RunRequest(config=config, overrides=overrides))[1].address == "tcp://yaml:1"
    assert prepare(RunRequest(config=config, backend="distributed"))[1].address == "tcp://env:1"


def test_no_scheduler_at_the_address_is_one_clear_error(job, tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "CONNECT_TIMEOUT", "1s")
    with TestServer() as server:
        closed = f"tcp://127.0.0.1:{server.port}"
    with pytest.raises(RunIncompleteError, match=f"no usable dask cluster at {closed}"):
        run(RunRequest(config=job(tmp_path / "out", "nowhere"), scheduler=closed))


def hidden_site_packages(folder: Path, hide: tuple[str, ...] = ()) -> Path:
    """A copy (of symlinks) of this venv's site-packages without `hide` entries.

    A worker run with `python -S` skips .pth files, so the editable install of
    `pipeline` is invisible; PYTHONPATH points at this folder for everything else.
    """
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(hide):
            (folder / entry.name).symlink_to(entry)
    return folder


def add_hidden_worker(cluster: DaskProcesses, name: str, hide: tuple[str, ...] = ()) -> None:
    path = hidden_site_packages(cluster.folder / f"site-{name}", hide)
    cwd = cluster.folder / f"cwd-{name}"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(path)}
    cluster.add_worker(name, python_flags=["-S"], env=env, cwd=cwd)


def test_a_worker_without_the_package_gets_it_shipped(
    job, threads_outputs, tmp_path_factory, tmp_path, monkeypatch
):
    bare = DaskProcesses(tmp_path_factory.mktemp("bare-cluster"))
    try:
        bare.start_scheduler()
        add_hidden_worker(bare, "no-pipeline")
        bare.wait_for_workers(1)
        with Client(bare.address) as client:
            assert list(client.run(importlib.util.find_spec, "pipeline").values()) == [None]
            out = tmp_path / "out"
            run(RunRequest(config=job(out, "shipped"), scheduler=bare.address))
            assert outputs(out) == threads_outputs
            origins = client.run(lambda: __import__("pipeline").__file__)
            assert all(".zip" in origin for origin in origins.values())

        monkeypatch.chdir(tmp_path)  # a relative output the worker resolves elsewhere
        with pytest.raises(RunIncompleteError, match="cannot see the output folder 'rel'"):
            run(RunRequest(config=job("rel", "relative"), scheduler=bare.address))

        add_hidden_worker(bare, "no-pillow", hide=("pil", "pillow"))
        bare.wait_for_workers(2)
        with pytest.raises(RunIncompleteError) as error:
            run(RunRequest(config=job(tmp_path / "out2", "pillowless"), scheduler=bare.address))
        message = str(error.value)
        assert "lacks pillow>=10.3 (has none)" in message
        assert "pip install 'pillow>=10.3'" in message
        assert message.count("worker tcp://") == 1
    finally:
        bare.stop()


LOCAL_WORKER_ENVIRON = """
import json, os
from pipeline.config import BackendConfig
from pipeline.execution.backends import DistributedBackend

if __name__ == "__main__":
    backend = DistributedBackend(BackendConfig(kind="distributed", workers=2))
    with backend:
        names = ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")

        def started_with():
            # what the process started with (read by malloc and BLAS at start), not the
            # os.environ that distributed also updates in the worker, too late for them
            entries = open("/proc/self/environ", "rb").read().decode().split("\\0")
            environ = dict(entry.split("=", 1) for entry in entries if "=" in entry)
            return [environ.get(name) for name in names]

        print(json.dumps(sorted(backend.client.run(started_with).values())))
"""


def test_local_cluster_workers_fork_with_distributed_s_pre_spawn_environment(tmp_path):
    """Forked workers start with the forkserver's environment: it must hold what
    distributed sets before spawning a worker (one BLAS thread)."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    script = tmp_path / "environ.py"
    script.write_text(LOCAL_WORKER_ENVIRON)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")
    }
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # one BLAS thread, as distributed sets it; no trimming of the heap (see UNSET_FOR_WORKERS)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [["1", None], ["1", None]]
