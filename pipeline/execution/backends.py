"""Backends: where partitions run. Each one is a context manager that yields a
`concurrent.futures.Executor`; the engine is the same for all of them.

    sync          dask.local.SynchronousExecutor (one at a time, in the client)
    threads       a thread pool, like dask's threaded scheduler
    processes     a process pool in dask's multiprocessing context
    distributed   a dask.distributed Client: an existing scheduler, a cluster the run
                  creates from `backend.cluster` (any cluster class), or a LocalCluster

Names have aliases (`BACKEND_ALIASES`); an unknown name is a ConfigError that
lists the valid ones.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, closing, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.config import BackendConfig
from pipeline.config.model import ClusterConfig, unknown_backend
from pipeline.errors import ConfigError, RunIncompleteError
from pipeline.logs import logger
from pipeline.plan import Plan
from pipeline.records import Partition
from pipeline.stages.registry import loaded_stage_modules
from pipeline.stages.shared.host_slots import HostSlotServer, join_host_slot_server

if TYPE_CHECKING:
    from distributed import Client

log = logger("backend")

CONNECT_TIMEOUT = "10s"
WORKER_WAIT = 60  # seconds to wait for a first worker (a scaling cluster may start empty)
SIZE_INTERVAL = 1.0  # seconds between two reads of a cluster's live size (one RPC each)
IDLE_POLL = 5.0  # seconds the engine waits for a partition before it checks the workers
DEFAULT_THREADS_PER_WORKER = 2  # as workers_per_core: a second task hides the first's waits
# The statistical profiler samples every worker thread: 6 % of CPU per image (bench).
LOCAL_CLUSTER_CONFIG = {"distributed.worker.profile.enabled": False}
# Debug logs (each comm's last messages, the scheduler's transitions) keep 1000 entries
# each, and a logged task message keeps its partition alive: the client grew by up to
# 1000 partitions per comm, three comms with a LocalCluster (its scheduler is in-process).
# Every event loop (client, LocalCluster scheduler and workers) wakes every 20 ms by
# default only to time itself: 500 ms still catches a stuck loop, and a LocalCluster
# at rest then costs 2.8 % of a core instead of 6 % (client plus two workers).
CLIENT_CONFIG = {
    "distributed.admin.low-level-log-length": 0,
    "distributed.admin.tick.interval": "500ms",
}


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Backend:
    """Base: sizes the pool and defines how many partitions may be in flight."""

    name: ClassVar[str]
    dashboard_link: str | None = None  # a page showing the run live, where there is one
    # A partition blocks on its first downloads and on writes; a second worker per core
    # keeps the core busy meanwhile (bench: 1.4x images/s at 0 ms latency, 2.3x at 50 ms).
    workers_per_core: ClassVar[int] = 2
    # Whether `restart` can replace an executor that a dead worker broke (a process pool).
    can_restart: ClassVar[bool] = False

    def __init__(self, config: BackendConfig):
        self.config = config
        self.workers = config.workers or default_workers() * self.workers_per_core
        self._stack = ExitStack()

    @property
    def max_in_flight(self) -> int:
        """Partitions submitted and not yet collected: enough to keep workers busy."""
        return self.config.max_in_flight or 2 * self.workers

    def describe(self) -> str:
        return f"{self.name} ({self.workers} workers)"

    def __enter__(self) -> Executor:
        try:
            return self._executor_stack().enter_context(self.executor())
        except BaseException:  # `with` will not call __exit__: close what was started
            self._stack.close()
            raise

    def _executor_stack(self) -> ExitStack:
        """Where the executor's lifetime is kept: the backend's own stack."""
        return self._stack

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def executor(self) -> Executor:
        raise NotImplementedError

    def restart(self) -> Executor:
        """A fresh executor in place of a broken one, inside `with backend` (`can_restart`)."""
        raise NotImplementedError(f"the {self.name} backend cannot replace its executor")

    def prepare(self, plan: Plan) -> None:
        """Called inside `with backend`, before any task: check the workers can run `plan`."""

    def task_options(self, partition: Partition) -> dict[str, Any]:
        """Extra keyword arguments for `executor.submit` (e.g. a task key)."""
        return {}

    # Seconds the engine waits for a partition before calling `waiting`; None: no limit.
    poll_interval: float | None = None

    def waiting(self, in_flight: int) -> None:
        """Called by the engine when `poll_interval` passed with no partition finished:
        a backend whose workers may all be gone logs it, and raises once it waited too long."""


class SyncBackend(Backend):
    name = "sync"

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        self.workers = 1

    @property
    def max_in_flight(self) -> int:
        return 1

    def describe(self) -> str:
        return "sync (one partition at a time, in this process)"

    def executor(self) -> Executor:
        from dask.local import SynchronousExecutor

        return SynchronousExecutor()


class ThreadsBackend(Backend):
    name = "threads"

    def executor(self) -> Executor:
        return ThreadPoolExecutor(self.workers, thread_name_prefix="pipeline-worker")


class ProcessesBackend(Backend):
    """A process pool. Its processes fork from a forkserver that has imported the worker
    code once; spawning each one (dask's default) re-imports it: 0.4 s of CPU per process.
    dask's `multiprocessing.context` setting, when given, picks another start method.

    A worker that dies breaks the pool: `restart` shuts it down (the pool has already
    terminated its other workers; this joins them and its threads) and starts another,
    closed on exit like the first.

    `per_host` and the other per-host limits hold for the whole run: this process keeps
    them (a `HostSlotServer`, for as long as the backend) and every pool process, the
    first pool's and its replacements', asks it."""

    name = "processes"
    can_restart = True
    _pool: ExitStack  # the current pool's lifetime, inside the backend's
    _host_slots: HostSlotServer

    def _executor_stack(self) -> ExitStack:
        """A stack of the pool's own inside the backend's, so `restart` closes the pool only."""
        self._host_slots = self._stack.enter_context(HostSlotServer())
        self._pool = self._stack.enter_context(ExitStack())
        return self._pool

    def restart(self) -> Executor:
        self._pool.close()
        return self._pool.enter_context(self.executor())

    def executor(self) -> Executor:
        return ProcessPool(
            self.workers,
            mp_context=process_context(),
            initializer=join_host_slot_server,
            initargs=(self._host_slots.address,),
        )


class ProcessPool(ProcessPoolExecutor):
    """A process pool whose `submit` says BrokenProcessPool whenever the pool is broken.

    CPython's starts a worker inside `submit`; if a worker dies meanwhile, the pool's
    manager thread closes its queues, and pickling them for the new worker raises
    OSError("handle is closed") instead (seen under load, after a kill -9)."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().submit(fn, *args, **kwargs)
        except OSError as exc:
            broken = getattr(self, "_broken", False)
            if broken:
                raise BrokenProcessPool(broken) from exc
            raise


def process_context() -> multiprocessing.context.BaseContext:
    """dask's configured start method, else a forkserver preloaded with the worker code."""
    import dask
    from dask.multiprocessing import get_context

    if dask.config.get("multiprocessing.context", None) or sys.platform == "win32":
        return get_context()
    return preloaded_forkserver()


WORKER_MODULES = ("pipeline.execution.worker",)
# distributed's pre-spawn environment, except glibc trimming the heap whenever 64 KiB
# are free at its top: with an image's buffers freed every few milliseconds, that cost
# LocalCluster runs 12 % of their images/s (bench, side by side), and a pipeline
# worker's memory is bounded by its partitions in flight anyway.
UNSET_FOR_WORKERS = frozenset({"MALLOC_TRIM_THRESHOLD_"})


def preloaded_forkserver(*extra: str) -> multiprocessing.context.BaseContext:
    """The forkserver context, its server started (once per process) with the worker
    code and the stage modules this process has loaded (the kinds of the plans it has
    read) imported, plus `extra` modules; children it forks start with all of them
    loaded. A server already running keeps its own modules: a later plan's other kinds
    are imported by each worker that runs them."""
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*WORKER_MODULES, *loaded_stage_modules(), *extra])
    forkserver.ensure_running()
    return context


def start_worker_forkserver() -> None:
    """Start the forkserver a LocalCluster's workers fork from, before distributed would
    start it without the pipeline's modules: distributed's and ours preloaded, and with
    the environment that distributed sets before it spawns a worker (one BLAS thread:
    `distributed.nanny.pre-spawn-environ`, less UNSET_FOR_WORKERS), which forked
    workers can only inherit from the server. Workers start 0.4 s sooner than spawned."""
    import dask
    from distributed.versions import required_packages

    for name, value in dask.config.get("distributed.nanny.pre-spawn-environ").items():
        if name not in UNSET_FOR_WORKERS:
            os.environ.setdefault(name, str(value))
    preloaded_forkserver(*required_packages)


def local_cluster_settings() -> dict[str, Any]:
    """dask settings for a LocalCluster's workers: LOCAL_CLUSTER_CONFIG, and forked from
    the preloaded forkserver (started here) where there is fork."""
    settings: dict[str, Any] = dict(LOCAL_CLUSTER_CONFIG)
    if sys.platform != "win32":  # no fork there: workers spawn
        start_worker_forkserver()
        settings["distributed.worker.multiprocessing-method"] = "forkserver"
    return settings


def forget_run(client: Client, run: str) -> None:
    """Drop what this run kept on the scheduler (the download stage's per-host pauses,
    `pipeline/RUN/...` metadata) from a cluster that may outlive it."""
    with contextlib.suppress(Exception):  # a scheduler already gone keeps nothing
        client.set_metadata(["pipeline", run], {})


class DistributedBackend(Backend):
    """A dask.distributed cluster: the scheduler at `address`, a cluster this run
    creates from `backend.cluster` and closes, or a LocalCluster.

    The address comes from `--scheduler`, else `backend.address` in the YAML, else
    `DASK_SCHEDULER_ADDRESS` (not with `backend.cluster`). Before any task runs, every
    worker gets this client's code and is checked (`prepare_workers`). Tasks have named
    keys (`partition-N-RUN`) and `retries=backend.retries` for transient errors; a
    partition whose worker dies is recomputed elsewhere, up to
    `distributed.scheduler.allowed-failures` times. The plan (about 2 KB pickled)
    travels in every task instead of being scattered once: a task then depends on
    nothing that a dead worker could take with it.

    The in-flight window follows the cluster's live size (read at most every
    SIZE_INTERVAL seconds), or its `adapt.maximum` when adapting, so that enough
    partitions stay queued for dask's Adaptive to scale up on. With no worker at all,
    the run waits, logging it, for at most `cluster.wait_for_workers.timeout` seconds.
    A cluster this run created (or its LocalCluster) is closed however the run ends:
    SIGTERM then raises `Terminated` in the main thread, which unwinds like Ctrl-C.
    """

    name = "distributed"
    workers_per_core = 1  # one process per core, each with DEFAULT_THREADS_PER_WORKER threads
    poll_interval = IDLE_POLL

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        self.cluster_config: ClusterConfig | None = config.cluster
        env_address = None if config.cluster else os.environ.get("DASK_SCHEDULER_ADDRESS")
        self.address = config.address or env_address or None
        self.client: Client | None = None
        self.cluster: Any = None  # the cluster object this run created, if any
        self.threads_per_worker = config.threads_per_worker or DEFAULT_THREADS_PER_WORKER
        if self.cluster_config is not None:  # its size until connected: what it asks for
            spec = self.cluster_config
            size = spec.adapt.maximum if spec.adapt else spec.scale
            self.workers = size or config.workers or 1
            self.threads_per_worker = worker_threads(spec) or self.threads_per_worker
        self.threads = self.workers * self.threads_per_worker
        self._run = secrets.token_hex(4)
        self._sized_at = 0.0  # when the live size was last read
        self._idle_since: float | None = None  # since when the cluster has had no worker

    @property
    def idle_timeout(self) -> float:
        """The longest a run waits with no worker (and, at start, for its first ones)."""
        return self.cluster_config.wait_for_workers.timeout if self.cluster_config else WORKER_WAIT

    @property
    def max_in_flight(self) -> int:
        """2 x the cluster's live threads (re-read as workers come and go), or 2 x the
        threads of `adapt.maximum` workers; never less than 2 x one worker's threads, so
        that a cluster with no worker yet still has work queued to scale up for."""
        if self.config.max_in_flight:
            return self.config.max_in_flight
        self._refresh_size()
        threads = self.threads
        adapt = self.cluster_config.adapt if self.cluster_config else None
        if adapt is not None:
            threads = max(threads, adapt.maximum * self.threads_per_worker)
        return 2 * max(threads, self.threads_per_worker)

    def _refresh_size(self, force: bool = False) -> None:
        """Workers and threads now, from the scheduler (one cheap RPC), at most every
        SIZE_INTERVAL seconds."""
        client = self.client
        if client is None or client.status != "running":  # not yet, or no more: the last size
            return
        if not force and time.monotonic() - self._sized_at < SIZE_INTERVAL:
            return
        self._sized_at = time.monotonic()
        try:
            nthreads = client.nthreads()
        except OSError:  # the scheduler is away for a moment: keep the last size
            return
        self.workers, self.threads = len(nthreads), sum(nthreads.values())
        if nthreads:
            self.threads_per_worker = max(nthreads.values())

    def waiting(self, in_flight: int) -> None:
        """No partition finished for `poll_interval` seconds: fine while workers work;
        with none, log it each time, and stop the run after `idle_timeout` seconds."""
        self._refresh_size(force=True)
        if self.workers:
            self._idle_since = None
            return
        now = time.monotonic()
        self._idle_since = self._idle_since or now
        waited = now - self._idle_since
        if waited >= self.idle_timeout:
            raise RunIncompleteError(
                f"no dask worker for {waited:.0f}s (wait_for_workers.timeout: "
                f"{self.idle_timeout:g}s) with {in_flight} partition(s) queued on "
                f"{self.describe()}: are its jobs or pods pending? (squeue, kubectl get pods)"
            )
        log.warning(
            "waiting for dask workers: none connected, %d partition(s) queued "
            "(%.0fs of %gs, wait_for_workers.timeout)",
            in_flight,
            waited,
            self.idle_timeout,
        )

    def describe(self) -> str:
        spec = self.cluster_config
        if spec is not None:
            now = f"; {self.workers} workers, {self.threads} threads now" if self.client else ""
            return f"distributed on a new {spec.class_} ({scaling(spec)}{now})"
        if self.address and self.client is None:  # its size is known once connected
            return f"distributed on {self.address}"
        where = self.address or "a LocalCluster"
        return f"distributed on {where} ({self.workers} workers, {self.threads} threads)"

    def executor(self) -> Executor:
        self.client = self._connect()
        self._refresh_size(force=True)
        if "dashboard" in self.client.scheduler_info()["services"]:  # served if bokeh is there
            self.dashboard_link = self.client.dashboard_link
            log.info("dask dashboard: %s", self.dashboard_link)  # --quiet hides it
        return self.client.get_executor(pure=False, retries=self.config.retries)

    def _connect(self) -> Client:
        """A client of the scheduler at `address`, of a cluster made from `backend.cluster`,
        or of a new LocalCluster; all closed on exit."""
        import dask
        import distributed  # noqa: F401 (load its defaults first: leaving `config.set` restores them)

        with dask.config.set(CLIENT_CONFIG):  # read as comms and the scheduler start
            if self.cluster_config is not None:
                return self._cluster_client(self.cluster_config)
            return self._remote_client() if self.address else self._local_client()

    def _cluster_client(self, spec: ClusterConfig) -> Client:
        """`class(**kwargs)`, scaled or adapting, and a client of it: the cluster is closed
        on exit (its batch jobs cancelled, its pods deleted), SIGTERM included."""
        import dask
        from distributed import Client

        self._stack.enter_context(sigterm_raises())
        log.info("creating %s", describe_cluster(spec))
        # A LocalCluster's workers start as the default one's do (forked, no profiler).
        local = spec.class_ in ("distributed.LocalCluster", "distributed.deploy.LocalCluster")
        try:
            with dask.config.set(local_cluster_settings() if local else {}):
                cluster = cluster_class(spec.class_)(**spec.kwargs)
        except Exception as exc:
            raise RunIncompleteError(
                f"could not create {spec.class_}: {type(exc).__name__}: {exc}"
            ) from exc
        self.cluster = cluster
        self._stack.enter_context(cluster if hasattr(cluster, "__exit__") else closing(cluster))
        self._stack.callback(log.info, "closed %s", spec.class_)
        if spec.adapt is not None:
            cluster.adapt(**spec.adapt.kwargs)
        elif spec.scale is not None:
            cluster.scale(spec.scale)
        client = self._stack.enter_context(Client(cluster, **self.config.client_kwargs))
        wanted = spec.workers_to_wait_for
        if wanted:
            log.info("waiting for %d dask worker(s), at most %gs", wanted, self.idle_timeout)
            try:
                client.wait_for_workers(wanted, timeout=self.idle_timeout)
            except TimeoutError as exc:
                raise RunIncompleteError(
                    f"{spec.class_}: {exc} (wait_for_workers: {wanted} in "
                    f"{self.idle_timeout:g}s; are its jobs or pods pending?)"
                ) from None
        return client

    def _local_client(self) -> Client:
        import dask
        from distributed import Client, LocalCluster

        self._stack.enter_context(sigterm_raises())
        with dask.config.set(local_cluster_settings()):  # nannies hand it to their workers
            cluster = self._stack.enter_context(
                LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=self.threads_per_worker,
                    processes=True,
                    dashboard_address="127.0.0.1:0",
                    host="127.0.0.1",
                )
            )
        self.cluster = cluster
        return self._stack.enter_context(Client(cluster, **self.config.client_kwargs))

    def _remote_client(self) -> Client:
        from distributed import Client

        try:
            client = self._stack.enter_context(
                Client(self.address, timeout=CONNECT_TIMEOUT, **self.config.client_kwargs)
            )
            self._stack.callback(forget_run, client, self._run)  # the cluster outlives the run
            client.wait_for_workers(1, timeout=WORKER_WAIT)
        except (OSError, TimeoutError) as exc:
            raise RunIncompleteError(
                f"no usable dask cluster at {self.address}: {exc} "
                f"(is `dask scheduler` running, with at least one `dask worker`?)"
            ) from None
        return client

    def prepare(self, plan: Plan) -> None:
        from pipeline.execution.code_shipping import prepare_workers

        assert self.client is not None, "prepare runs inside `with backend`"
        prepare_workers(self.client, plan.job.run_dir)

    def task_options(self, partition: Partition) -> dict[str, Any]:
        return {"key": f"partition-{partition.index:06d}-{self._run}"}


class Terminated(SystemExit):
    """SIGTERM, as an exception: the run unwinds (its cluster closed) and exits 143."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` in the main thread, so that the
    ExitStack that holds a cluster closes it (a batch scheduler's or Kubernetes' stop,
    `kill PID`), instead of the process dying with its jobs and pods left running.
    A second SIGTERM during the cleanup is logged and ignored. Outside the main
    thread (signals are only handled there) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if received:
            log.warning("SIGTERM again: still closing the cluster")
            return
        received.append(signum)
        log.warning("SIGTERM: stopping the run and closing the cluster")
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cluster_class(path: str) -> Any:
    """The class (or factory, like distributed.SSHCluster) at the import path `path`."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def worker_threads(spec: ClusterConfig) -> int | None:
    """A worker's threads, as the cluster's kwargs say (LocalCluster's threads_per_worker,
    dask-jobqueue's cores / processes), before any worker is there to ask."""
    kwargs = spec.kwargs
    threads = kwargs.get("threads_per_worker") or kwargs.get("worker_threads")
    if threads is None and isinstance(kwargs.get("cores"), int):
        threads = kwargs["cores"] // max(1, int(kwargs.get("processes") or 1))
    return threads if isinstance(threads, int) and threads > 0 else None


def scaling(spec: ClusterConfig) -> str:
    if spec.adapt is not None:
        extra = "".join(
            f", {k}={v!r}" for k, v in spec.adapt.kwargs.items() if k not in ("minimum", "maximum")
        )
        return f"adapt {spec.adapt.minimum}..{spec.adapt.maximum} workers{extra}"
    if spec.scale is not None:
        return f"scale to {spec.scale} workers"
    return "sized by its kwargs"


def describe_cluster(spec: ClusterConfig) -> str:
    """`Class(key=value, ...)`: what the run will create."""
    arguments = ", ".join(f"{key}={value!r}" for key, value in spec.kwargs.items())
    return f"{spec.class_}({arguments}), {scaling(spec)}"


def job_script(spec: ClusterConfig) -> str | None:
    """The batch script each worker job of a dask-jobqueue cluster runs (None for other
    classes), made without starting the cluster's scheduler: its address is a placeholder."""
    factory = cluster_class(spec.class_)
    job_cls = getattr(factory, "job_cls", None)
    if job_cls is None or not hasattr(job_cls, "job_script"):
        return None
    import inspect

    from dask_jobqueue.core import JobQueueCluster

    cluster_only = set(inspect.signature(JobQueueCluster.__init__).parameters) - {
        "interface",
        "protocol",
        "security",
        "config_name",
    }
    kwargs = {key: value for key, value in spec.kwargs.items() if key not in cluster_only}
    job = job_cls(scheduler="tcp://<scheduler>:8786", name="dummy-name", **kwargs)
    return job.job_script()


BACKENDS: dict[str, type[Backend]] = {
    "sync": SyncBackend,
    "threads": ThreadsBackend,
    "processes": ProcessesBackend,
    "distributed": DistributedBackend,
}

BACKEND_ALIASES: dict[str, str] = {
    "synchronous": "sync",
    "single-threaded": "sync",
    "threading": "threads",
    "multiprocessing": "processes",
    "dask.distributed": "distributed",
    "cluster": "distributed",
}


def backend_class(name: str) -> type[Backend]:
    """The backend for `name` or an alias; ConfigError listing valid names otherwise."""
    canonical = BACKEND_ALIASES.get(name, name)
    if canonical not in BACKENDS:
        raise ConfigError(unknown_backend(name))
    return BACKENDS[canonical]
