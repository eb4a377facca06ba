"""Clusters the run creates from `backend.cluster` (issue 14): an adaptive LocalCluster
scaling up from no worker, a real SSHCluster over a loopback sshd, SIGTERM closing the
cluster, the in-flight window following the live size, and the example configs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from itertools import pairwise
from pathlib import Path

import psutil
import pytest

from pipeline import logs
from pipeline.config import BackendConfig
from pipeline.errors import ConfigError, RunIncompleteError
from pipeline.execution import backends
from pipeline.execution.backends import DistributedBackend
from pipeline.execution.runner import RunRequest, backend_for, load_plan, run
from pipeline.testing.cluster import LoopbackSSHD, SSHDUnavailable
from pipeline.testing.images import jpeg_bytes, photo
from pipeline.testing.server import TestServer
from tests.conftest import REPO, write_url_list
from tests.test_backends import JOB, outputs, records

LOCAL = "{host: 127.0.0.1, dashboard_address: '127.0.0.1:0'"
ADAPT_FROM_ZERO = (
    "backend:\n"
    "  cluster:\n"
    "    class: distributed.LocalCluster\n"
    f"    kwargs: {LOCAL}, n_workers: 0, threads_per_worker: 2}}\n"
    # Adaptive asks for the workers that would finish the queued work in target_duration
    # (default 5 s): 1 s makes this short job ask for its maximum.
    "    adapt: {minimum: 0, maximum: 2, interval: 200ms, target_duration: 1s}\n"
)
ADAPT_ITEMS = 24


def job_with_backend(out: Path, urls: Path, backend: str) -> str:
    """The standard two-branch job of test_backends with another `backend:` block."""
    text = JOB.format(out=out, urls=urls)
    return text.replace("backend: {kind: threads, workers: 2}\n", backend)


@pytest.fixture(scope="module")
def urls(tmp_path_factory, image_server):
    return write_url_list(tmp_path_factory.mktemp("lists") / "urls.txt", image_server)


@pytest.fixture(scope="module")
def threads_outputs(urls, tmp_path_factory):
    out = tmp_path_factory.mktemp("threads") / "out"
    config = out.parent / "threads.yaml"
    config.write_text(JOB.format(out=out, urls=urls))
    run(RunRequest(config=config))
    return outputs(out)


class WorkerCounts:
    """Samples the live worker count of a backend's cluster every `interval` seconds."""

    def __init__(self, backend: DistributedBackend, interval: float = 0.1):
        self.backend, self.interval = backend, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> WorkerCounts:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            client = self.backend.client
            if client is None or client.status != "running":
                continue
            try:
                count = len(client.scheduler_info()["workers"])
            except Exception:  # closing under us
                continue
            self.samples.append((round(time.monotonic() - self._start, 1), count))

    def changes(self) -> list[tuple[float, int]]:
        """(seconds, workers) each time the count changed."""
        found: list[tuple[float, int]] = []
        for when, count in self.samples:
            if not found or found[-1][1] != count:
                found.append((when, count))
        return found


@pytest.fixture(scope="module")
def adapt_list(tmp_path_factory):
    """Distinct JPEGs answered after 0.2 s each: a run long enough to see workers join."""
    with TestServer(latency=0.2) as server:
        for index in range(ADAPT_ITEMS):
            server.add_bytes(f"/a/{index}.jpg", jpeg_bytes(photo(96, 72, seed=index)))
        urls = tmp_path_factory.mktemp("adapt") / "urls.txt"
        urls.write_text("".join(server.url(f"/a/{i}.jpg") + "\n" for i in range(ADAPT_ITEMS)))
        yield urls


@pytest.mark.slow
def test_an_adaptive_local_cluster_scales_up_from_no_worker(
    adapt_list, tmp_path, caplog, monkeypatch
):
    def config(name: str, backend: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        text = job_with_backend(tmp_path / name, adapt_list, backend)
        path.write_text(text.replace("partition_size: 3", "partition_size: 2"))
        return path

    run(load_plan(config("threads", "backend: {kind: threads, workers: 4}\n")))
    plan = load_plan(config("adapt", ADAPT_FROM_ZERO))
    backend = backend_for(plan)
    assert isinstance(backend, DistributedBackend)
    assert backend.max_in_flight == 2 * 2 * 2  # adapt.maximum x threads_per_worker, doubled
    monkeypatch.setattr(logs.logger(), "propagate", True)
    with caplog.at_level(logging.INFO, logger="pipeline"), WorkerCounts(backend) as counts:
        report = run(plan, backend=backend)
    changes = counts.changes()
    print("workers over time (s, workers):", changes)  # for the resolving note
    assert changes[0][1] == 0  # it started with none
    assert max(count for _, count in counts.samples) == 2  # adapted up to maximum
    assert outputs(tmp_path / "adapt") == outputs(tmp_path / "threads")
    assert len(outputs(tmp_path / "adapt")) == 2 * ADAPT_ITEMS
    assert report["counts"] == {"ok": ADAPT_ITEMS, "failed": 0, "skipped": 0}
    assert report["backend"].startswith("distributed on a new distributed.LocalCluster (adapt 0..2")
    assert "creating distributed.LocalCluster(" in caplog.text
    assert backend.cluster.status.name == "closed"  # closed when the run ended
    assert "closed distributed.LocalCluster" in caplog.text


def test_a_cluster_is_closed_when_the_run_fails(urls, tmp_path):
    backend_block = (
        "backend:\n  cluster:\n    class: distributed.LocalCluster\n"
        f"    kwargs: {LOCAL}, n_workers: 1, threads_per_worker: 2}}\n"
    )
    config = tmp_path / "fails.yaml"
    config.write_text(job_with_backend(tmp_path / "out", urls, backend_block))
    plan = load_plan(config)
    backend = backend_for(plan)

    def explode(stats) -> None:
        raise RuntimeError("the client broke")

    with pytest.raises(RunIncompleteError, match="the client broke"):
        run(plan, explode, backend=backend)
    assert backend.cluster.status.name == "closed"


def empty_cluster(wait_for_workers: str) -> str:
    """A backend block: a LocalCluster that never has a worker (jobs that stay queued)."""
    return (
        "backend:\n  cluster:\n    class: distributed.LocalCluster\n"
        f"    kwargs: {LOCAL}, n_workers: 0}}\n"
        f"    scale: 0\n    wait_for_workers: {wait_for_workers}\n"
    )


def test_no_worker_ever_stops_the_run_after_the_timeout_saying_so(
    urls, tmp_path, caplog, monkeypatch
):
    """A cluster with 0 workers (jobs that stay pending): the run waits, logs, gives up."""
    monkeypatch.setattr(DistributedBackend, "poll_interval", 0.3)
    backend_block = empty_cluster("{timeout: 1.5}")
    config = tmp_path / "empty.yaml"
    config.write_text(job_with_backend(tmp_path / "out", urls, backend_block))
    plan = load_plan(config)
    backend = backend_for(plan)
    monkeypatch.setattr(logs.logger(), "propagate", True)
    started = time.monotonic()
    with (
        caplog.at_level(logging.INFO, logger="pipeline"),
        pytest.raises(RunIncompleteError, match=r"no dask worker for \ds \(wait_for_workers"),
    ):
        run(plan, backend=backend)
    assert time.monotonic() - started < 30
    assert "waiting for dask workers: none connected" in caplog.text
    assert backend.cluster.status.name == "closed"


def test_the_window_follows_the_live_size_or_adapt_maximum():
    """Without a client the size is what the config asks for; connected, the scheduler's."""
    spec = {"class": "distributed.LocalCluster", "kwargs": {"threads_per_worker": 3}}
    adapting = DistributedBackend(BackendConfig(cluster={**spec, "adapt": {"maximum": 4}}))
    assert adapting.max_in_flight == 2 * 4 * 3
    scaled = DistributedBackend(BackendConfig(cluster={**spec, "scale": 0}))
    assert scaled.max_in_flight == 2 * 3  # none yet: still one worker's worth queued

    class Client:  # what `_refresh_size` reads: the scheduler's threads per worker
        status = "running"
        nthreads_now = {"tcp://a": 2, "tcp://b": 2}

        def nthreads(self):
            return self.nthreads_now

    scaled.client = Client()
    assert scaled.max_in_flight == 2 * 4  # two workers of two threads joined
    Client.nthreads_now = {**Client.nthreads_now, "tcp://c": 2}
    assert scaled.max_in_flight == 2 * 4  # re-read at most every SIZE_INTERVAL
    scaled._sized_at -= backends.SIZE_INTERVAL
    assert scaled.max_in_flight == 2 * 6
    assert adapting.max_in_flight == 2 * 4 * 3  # adapt.maximum, until more are there


def test_retries_are_a_config_key():
    assert BackendConfig().retries == 1
    assert BackendConfig(kind="distributed", retries=3).retries == 3
    assert not hasattr(backends, "TASK_RETRIES")


# --- config errors, validate and plan -------------------------------------------------


def test_address_and_cluster_together_is_a_config_error(write_config, urls, tmp_path):
    block = (
        "backend:\n  address: tcp://127.0.0.1:8786\n  cluster: {class: distributed.LocalCluster}\n"
    )
    config = write_config(job_with_backend(tmp_path / "out", urls, block))
    with pytest.raises(ConfigError) as error:
        load_plan(config)
    assert (
        f"{config}:4: backend.cluster: give one of backend.address and backend.cluster, "
        "not both (address: tcp://127.0.0.1:8786)"
    ) in str(error.value)


def test_a_missing_cluster_package_names_the_pip_install_line(write_config, urls, tmp_path):
    block = "backend:\n  cluster:\n    class: dask_gateway_missing.GatewayCluster\n"
    config = write_config(job_with_backend(tmp_path / "out", urls, block))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr
    assert f"{config}:4: backend.cluster.class: cannot import dask_gateway_missing" in result.stderr
    assert "pip install dask-gateway-missing" in result.stderr


def test_an_unknown_cluster_class_suggests(write_config, urls, tmp_path):
    block = "backend:\n  cluster: {class: distributed.LocalClustr, scale: 2, adapt: {maximum: 2}}\n"
    config = write_config(job_with_backend(tmp_path / "out", urls, block))
    with pytest.raises(ConfigError) as error:
        load_plan(config)
    message = str(error.value)
    assert "backend.cluster.class: distributed has no class LocalClustr; did you mean" in message
    assert "backend.cluster.adapt: give scale or adapt, not both" in message


def test_the_slurm_example_plans_its_job_script(monkeypatch, capsys):
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is a dev dependency")
    from pipeline.cli import main

    monkeypatch.chdir(REPO)
    assert main(["validate", "configs/slurm.yaml"]) == 0
    assert main(["plan", "configs/slurm.yaml"]) == 0
    shown = capsys.readouterr().out
    assert "distributed on a new dask_jobqueue.SLURMCluster (adapt 0..10 workers)" in shown
    assert "cluster    creates dask_jobqueue.SLURMCluster(queue='normal'" in shown
    assert "at most 1800s with none" in shown
    assert "  #SBATCH -p normal" in shown
    assert "  #SBATCH --cpus-per-task=8" in shown
    assert "/shared/venvs/pipeline/bin/python -m distributed.cli.dask_worker" in shown
    assert "up to 160 partitions in flight" in shown  # 10 jobs x 8 threads, doubled


KUBE_STUB = '''
class KubeCluster:
    """A stand-in: the test only plans the example, nothing is created."""

    def __init__(self, **kwargs):
        raise AssertionError("plan must not create the cluster")
'''


def test_the_kubernetes_example_validates_and_plans(monkeypatch, tmp_path, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(REPO)
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)  # not installed, for sure
    assert main(["validate", "configs/kubernetes.yaml"]) == 2
    error = capsys.readouterr().err
    assert "configs/kubernetes.yaml:11: backend.cluster.class: cannot import" in error
    assert "pip install dask-kubernetes" in error

    package = tmp_path / "stub" / "dask_kubernetes"
    (package / "operator").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "operator" / "__init__.py").write_text(KUBE_STUB)
    monkeypatch.delitem(sys.modules, "dask_kubernetes")
    monkeypatch.syspath_prepend(str(tmp_path / "stub"))
    assert main(["plan", "configs/kubernetes.yaml"]) == 0
    shown = capsys.readouterr().out
    assert "distributed on a new dask_kubernetes.operator.KubeCluster (adapt 1..20" in shown
    assert "image='ghcr.io/example/pipeline-worker:latest'" in shown
    assert "waits for 1 worker(s) at start, and at most 600s" in shown
    assert "job script" not in shown  # only dask-jobqueue clusters have one


# --- a real SSHCluster ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An sshd of its own on 127.0.0.1 (keys made here); skipped, naming why, where
    none can start, except with CI=true, where the SSH test must run."""
    server = LoopbackSSHD(tmp_path_factory.mktemp("sshd"))
    try:
        server.start()
    except (SSHDUnavailable, OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the SSH cluster test, but: {exc}")
        pytest.skip(f"no sshd can be started here: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_a_real_ssh_cluster_runs_the_demo_job(sshd, tmp_path, monkeypatch):
    pytest.importorskip("asyncssh", reason="distributed.SSHCluster needs asyncssh")
    monkeypatch.chdir(REPO)  # the demo's paths are relative to the repository
    demo = REPO / "configs" / "thumbnails.yaml"
    reference = tmp_path / "threads"
    run(load_plan(demo, [f"output={reference}"]))
    cluster = {
        "class": "distributed.SSHCluster",
        "kwargs": {
            "hosts": ["127.0.0.1", "127.0.0.1", "127.0.0.1"],  # the scheduler, two workers
            "connect_options": sshd.connect_options(),
            "remote_python": sys.executable,  # the venv's python, on the "remote" host
            "worker_options": {"nthreads": 2, "host": "127.0.0.1"},
            "scheduler_options": {"port": 0, "dashboard_address": "127.0.0.1:0"},
        },
        "wait_for_workers": {"n": 2, "timeout": 120},
    }
    out = tmp_path / "ssh"
    plan = load_plan(demo, [f"output={out}", "backend=" + json.dumps({"cluster": cluster})])
    backend = backend_for(plan)
    seen: dict[str, object] = {}

    def spy(stats) -> None:
        if "pythons" not in seen and backend.client is not None:
            seen["pythons"] = set(backend.client.run(lambda: sys.executable).values())
            seen["workers"] = len(backend.client.scheduler_info()["workers"])

    report = run(plan, spy, backend=backend)
    assert report["counts"] == {"ok": 24, "failed": 0, "skipped": 0}
    assert report["backend"].startswith("distributed on a new distributed.SSHCluster")
    assert outputs(out) == outputs(reference)
    assert seen == {"pythons": {sys.executable}, "workers": 2}
    assert backend.cluster.status.name == "closed"
    assert sshd.log_text().count("Accepted publickey") >= 3  # one session per process


# --- SIGTERM --------------------------------------------------------------------------

SLOW_ITEMS = 40


@pytest.fixture
def slow_server():
    with TestServer(latency=0.3) as server:
        for index in range(SLOW_ITEMS):
            server.add_bytes(f"/slow/{index}.jpg", jpeg_bytes(photo(64, 48, seed=index)))
        yield server


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.mark.slow
def test_sigterm_mid_run_closes_the_cluster_it_created(slow_server, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(slow_server.url(f"/slow/{i}.jpg") + "\n" for i in range(SLOW_ITEMS)))
    block = (
        "backend:\n  cluster:\n    class: distributed.LocalCluster\n"
        f"    kwargs: {LOCAL}, n_workers: 2, threads_per_worker: 1}}\n"
        "    wait_for_workers: {n: 2, timeout: 60}\n"
    )
    config = tmp_path / "term.yaml"
    text = job_with_backend(tmp_path / "out", urls, block).replace(
        "partition_size: 3", "partition_size: 1"
    )
    config.write_text(text)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while sum(slow_server_hits(slow_server)) < 3:  # mid-run: downloads have begun
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never started downloading"
            time.sleep(0.05)
        family = descendants(process.pid)
        servers = [p for p in family if p.ppid() == process.pid and is_forkserver(p)]
        workers = [p for p in family if p.ppid() in {server.pid for server in servers}]
        assert len(workers) >= 2, [p.cmdline() for p in family]  # forked by the forkserver
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: stopping the run and closing the cluster" in stderr
    _, alive = psutil.wait_procs(family, timeout=15)
    assert alive == [], [p.cmdline() for p in alive]  # no worker process left behind
    results = tmp_path / "out" / "results.jsonl"
    assert not results.exists() or len(records(tmp_path / "out")) < SLOW_ITEMS  # stopped mid-run


def is_forkserver(process: psutil.Process) -> bool:
    try:
        return "forkserver" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def slow_server_hits(server: TestServer) -> list[int]:
    return list(server.hits.values())


# --- politeness across the cluster -----------------------------------------------------

POLITE_ITEMS = 48


class CountingImages:
    """Distinct JPEGs, each answered after 0.1 s; counts the requests in flight at once."""

    def __init__(self) -> None:
        self.active = self.peak = self.total = 0
        self._lock = threading.Lock()
        self.images = [jpeg_bytes(photo(48, 36, seed=index)) for index in range(POLITE_ITEMS)]

    def __call__(self, request) -> None:
        with self._lock:
            self.active += 1
            self.total += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(0.1)
        finally:
            # counted until its answer starts: a client that read the answer may have let
            # its next request in before this thread got here after sending
            with self._lock:
                self.active -= 1
        index = int(request.path.rsplit("/", 1)[-1].split(".")[0])
        from pipeline.testing.server import send_bytes

        send_bytes(request, self.images[index], "image/jpeg")


POLITE_JOB = """
name: polite
backend:
  cluster:
    class: distributed.LocalCluster
    kwargs: {local}, n_workers: 2, threads_per_worker: 4}}
    wait_for_workers: {{n: 2, timeout: 60}}
partition_size: 2
output: {out}
stages:
  urls:     {{kind: url_list, path: {urls}}}
  download: {{kind: download, input: urls, concurrency: 8, per_host: 4, allow_hosts: [127.0.0.1]}}
  write:    {{kind: write_images, input: decode, path: images}}
  decode:   {{kind: decode, input: download}}
"""


@pytest.mark.slow
def test_per_host_holds_for_the_whole_run_across_workers(tmp_path):
    """Two workers with four threads each run eight partitions at once, eight downloads
    each: without a shared limit the host would see up to 8 x 4 = 32 requests at once."""
    counter = CountingImages()
    with TestServer() as server:
        for index in range(POLITE_ITEMS):
            server.add(f"/p/{index}.jpg", counter)
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(server.url(f"/p/{i}.jpg") + "\n" for i in range(POLITE_ITEMS)))
        config = tmp_path / "polite.yaml"
        config.write_text(POLITE_JOB.format(local=LOCAL, out=tmp_path / "out", urls=urls))
        report = run(load_plan(config))
    print("peak concurrent requests the server counted:", counter.peak, "of", counter.total)
    assert report["counts"] == {"ok": POLITE_ITEMS, "failed": 0, "skipped": 0}
    assert counter.total == POLITE_ITEMS
    assert counter.peak <= 4  # the server's own count
    assert counter.peak == 4  # and the limit is used, not undercut


class StartTimes:
    """Distinct JPEGs after `latency` s; records when each request started. The first
    request answers 429 with Retry-After: `retry_after` if that is given."""

    def __init__(self, latency: float = 0.05, retry_after: int | None = None) -> None:
        self.latency, self.retry_after = latency, retry_after
        self.starts: list[float] = []
        self.limited_at: float | None = None
        self._lock = threading.Lock()
        self.images = [jpeg_bytes(photo(48, 36, seed=index)) for index in range(POLITE_ITEMS)]

    def __call__(self, request) -> None:
        from pipeline.testing.server import send_bytes

        with self._lock:
            now = time.monotonic()
            self.starts.append(now)
            limit = self.retry_after is not None and self.limited_at is None
            if limit:
                self.limited_at = now
        if limit:
            headers = {"Retry-After": str(self.retry_after)}
            send_bytes(request, b"slow down", "text/plain", status=429, headers=headers)
            return
        time.sleep(self.latency)
        index = int(request.path.rsplit("/", 1)[-1].split(".")[0])
        send_bytes(request, self.images[index], "image/jpeg")


PROCESSES_BACKEND = "{kind: processes, workers: 4}"  # 4 processes x 8 downloads each
PROCESSES = [f"backend={PROCESSES_BACKEND}"]


def polite_run(
    tmp_path: Path, handler, download: str, items: int = POLITE_ITEMS, overrides=()
) -> dict:
    with TestServer() as server:
        for index in range(items):
            server.add(f"/p/{index}.jpg", handler)
        urls = tmp_path / "urls.txt"
        urls.write_text("".join(server.url(f"/p/{i}.jpg") + "\n" for i in range(items)))
        config = tmp_path / "polite.yaml"
        text = POLITE_JOB.format(local=LOCAL, out=tmp_path / "out", urls=urls)
        config.write_text(text.replace("per_host: 4", download))
        return run(load_plan(config, list(overrides)))


across = pytest.mark.parametrize("overrides", [(), PROCESSES], ids=["cluster", "processes"])


@pytest.mark.slow
@across
def test_a_429_with_retry_after_pauses_the_host_for_every_worker(tmp_path, overrides):
    handler = StartTimes(retry_after=1)
    download = "per_host: 8, retries: 2, backoff: 0.05"
    report = polite_run(tmp_path, handler, download, overrides=overrides)
    assert report["counts"] == {"ok": POLITE_ITEMS, "failed": 0, "skipped": 0}
    assert handler.limited_at is not None
    after = sorted(t - handler.limited_at for t in handler.starts if t > handler.limited_at)
    print("request starts after the 429 (s):", [round(t, 2) for t in after[:10]])
    # Requests already past the gate when the 429 came may start at once, and each worker
    # sees the pause within PAUSE_POLL (50 ms) and a round trip; then none starts for the
    # rest of the second the server asked, from any worker.
    assert not [t for t in after if 0.25 < t < 0.9]
    assert after[-1] > 0.9


@pytest.mark.slow
@across
def test_per_host_rate_holds_for_the_whole_run_across_workers(tmp_path, overrides):
    handler = StartTimes(latency=0.01)
    items = 20
    report = polite_run(tmp_path, handler, "per_host: 16, per_host_rate: 5", items, overrides)
    assert report["counts"] == {"ok": items, "failed": 0, "skipped": 0}
    starts = sorted(handler.starts)
    busiest = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    print("most request starts in one second:", busiest, "span", round(starts[-1] - starts[0], 2))
    print("starts (s):", [round(t - starts[0], 2) for t in starts])
    assert busiest <= 5 + 1  # 5 per second (one more for the clocks' slack)
    assert starts[-1] - starts[0] >= (items - 5) / 5 - 0.5


@pytest.mark.parametrize("backend", ["{kind: threads, workers: 8}", PROCESSES_BACKEND])
def test_per_host_holds_for_the_whole_run_on_the_local_backends_too(tmp_path, backend):
    """8 threads, or 4 worker processes, each running a partition of 8 downloads: 4 for
    the host in all (the processes ask the keeper in their parent)."""
    counter = CountingImages()
    report = polite_run(tmp_path, counter, "per_host: 4", overrides=[f"backend={backend}"])
    print("peak concurrent requests the server counted:", counter.peak, "of", counter.total)
    assert report["counts"]["ok"] == POLITE_ITEMS
    assert counter.peak == 4


def test_a_worker_process_that_dies_gives_its_host_slots_back():
    """A pool process killed mid-request leaks no lease: its last connection closing
    gives back what it held, whichever of its threads took or released it."""
    from pipeline.stages.shared.host_slots import HostSlotServer, PoolHostSlots

    with HostSlotServer() as keeper:
        dying = [socket.socket(socket.AF_UNIX) for _ in range(2)]
        for sock in dying:  # two threads of one process, pid 1
            sock.connect(keeper.address)
            sock.sendall(b'["worker", 1]\n')
        dying[0].sendall(b'["take", 1, null, "h", 5]\n')
        assert dying[0].makefile("rb").readline() == b"true\n"
        slots = PoolHostSlots(keeper.address, (1, None))

        def request() -> None:
            with slots.hold("h"):
                pass

        waiting = threading.Thread(target=request)
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive()  # the one lease is held
        dying[0].close()
        waiting.join(0.6)
        assert waiting.is_alive()  # the process still has a connection: still held
        dying[1].close()
        waiting.join(5)
        assert not waiting.is_alive()  # given back when its holder went


def test_pool_processes_reuse_their_leases_and_give_them_back_when_idle():
    """A pool process asks its parent for a lease only when it holds no spare one."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.stages.shared.host_slots import LEASE_LINGER, HostSlotServer, PoolHostSlots

    with HostSlotServer() as keeper:
        asked = []
        slots = PoolHostSlots(keeper.address, (2, None))
        ask = slots._ask
        slots._ask = lambda host, timeout: asked.append(host) or ask(host, timeout)  # type: ignore[method-assign]

        def request(_: int) -> None:
            with slots.hold("h"):
                time.sleep(0.002)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(request, range(200)))
        assert len(asked) == 2  # not 200
        time.sleep(3 * LEASE_LINGER)
        assert keeper.slots((2, None))._busy == {}  # unused: given back


def test_local_host_slots_space_starts_by_rate_and_pause_for_every_thread():
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.stages.shared.host_slots import HostSlots

    slots = HostSlots(limit=4, rate=20.0)
    starts: list[float] = []

    def request(_: int) -> None:
        with slots.hold("h"):
            starts.append(time.monotonic())

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(request, range(10)))
    starts.sort()
    gaps = [later - earlier for earlier, later in pairwise(starts)]
    assert min(gaps) > 0.04  # 1/20 s apart, whichever thread asks

    slots = HostSlots(limit=4)
    slots.pause("h", 0.3)  # a 429's Retry-After, seen by one thread
    began = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(request, range(2)))
    assert min(starts[-2:]) - began > 0.25  # every thread waited
    with slots.hold("other"):  # other hosts do not
        assert time.monotonic() - began < 0.5


def _sequential_requests(count: int, concurrency: int) -> int:
    """In a dask task: `count` requests to one host from `concurrency` threads; the most
    in flight at once."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.stages.shared.host_slots import host_slots

    slots, active, peak, lock = host_slots((2, None)), [0], [0], threading.Lock()

    def request(_: int) -> None:
        with slots.hold("h"):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.002)
            with lock:
                active[0] -= 1

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(request, range(count)))
    return peak[0]


def test_a_dask_worker_reuses_its_per_host_leases_and_gives_them_back_when_idle():
    """A request on a cluster asks the scheduler for a lease only when its worker holds
    no spare one, and leases nobody uses go back after LEASE_LINGER."""
    from distributed import Client, LocalCluster

    from pipeline.stages.shared.host_slots import LEASE_LINGER

    name = "pipeline-per-host-leaserun-h"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as client,
    ):
        semaphores = cluster.scheduler.extensions["semaphores"]
        peak = client.submit(_sequential_requests, 200, 4, key="partition-0-leaserun").result()
        assert peak == 2  # the limit, used and never passed
        assert semaphores.metrics["acquire_total"][name] == 2  # not 200
        deadline = time.monotonic() + 10 * LEASE_LINGER
        while semaphores.leases[name] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not semaphores.leases[name]  # unused: given back
        client.submit(_sequential_requests, 10, 1, key="partition-1-leaserun").result()
        assert semaphores.metrics["acquire_total"][name] == 3  # asked again, once


def test_workers_that_never_come_at_start_stop_the_run_and_close_the_cluster(urls, tmp_path):
    """wait_for_workers at start (batch jobs that stay queued): one clear error, and the
    cluster is closed although `with backend` was never entered."""
    block = empty_cluster("{n: 1, timeout: 1}")
    config = tmp_path / "never.yaml"
    config.write_text(job_with_backend(tmp_path / "out", urls, block))
    plan = load_plan(config)
    backend = backend_for(plan)
    with pytest.raises(RunIncompleteError, match=r"wait_for_workers: 1 in 1s; are its jobs"):
        run(plan, backend=backend)
    assert backend.cluster.status.name == "closed"


def test_leased_slots_under_churn_never_pass_the_limit_nor_lose_a_lease(monkeypatch):
    """Many threads, hosts coming and going, leases aging and trimmed every 10 ms: at most
    `limit` requests in flight per host, every request served, and every lease back with
    the keeper at the end (a record trimmed while a lease was being taken lost one)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.stages.shared import host_slots
    from pipeline.stages.shared.host_slots import HostSlots, LeasedSlots

    monkeypatch.setattr(host_slots, "LEASE_LINGER", 0.0005)
    monkeypatch.setattr(host_slots, "LEASE_HOLD", 0.02)
    keeper = HostSlots(limit=1)

    class InMemory(LeasedSlots):
        def _ask(self, host: str, timeout: float) -> bool:
            return keeper.take(host, timeout)

        def _give_back(self, host: str) -> None:
            keeper.release(host)

        def _fetch_pauses(self) -> dict[str, float]:
            return {}

        def _publish_pause(self, host: str, until: float) -> None:
            pass

    workers = [InMemory(1, None) for _ in range(3)]  # three worker processes, one keeper
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    lock = threading.Lock()

    def request(n: int) -> None:
        host = f"h{n % 40}"  # records go idle, and are trimmed, all the time
        with workers[n % 3].hold(host):
            with lock:
                active[host] = active.get(host, 0) + 1
                peak[host] = max(peak.get(host, 0), active[host])
            time.sleep(0.0005 * (n % 4))
            with lock:
                active[host] -= 1

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(request, range(6000)))
    deadline = time.monotonic() + 5
    while keeper._busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert max(peak.values()) == 1
    assert keeper._busy == {}  # every lease given back
