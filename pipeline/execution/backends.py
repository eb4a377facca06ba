"""Backends: where partitions run. Each one is a context manager that yields a
`concurrent.futures.Executor`; the engine is the same for all of them.

    sync          dask.local.SynchronousExecutor (one at a time, in the client)
    threads       a thread pool, like dask's threaded scheduler
    processes     a process pool in dask's multiprocessing context
    distributed   a dask.distributed Client: an existing scheduler, or a LocalCluster

Names have aliases (`BACKEND_ALIASES`); an unknown name is a ConfigError that
lists the valid ones.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import sys
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.config import BackendConfig
from pipeline.config.model import unknown_backend
from pipeline.errors import ConfigError, RunIncompleteError
from pipeline.logs import logger
from pipeline.plan import Plan
from pipeline.records import Partition
from pipeline.stages.registry import stage_modules

if TYPE_CHECKING:
    from distributed import Client

log = logger("backend")

TASK_RETRIES = 1  # distributed re-runs a task that raised (not item errors: those are records)
CONNECT_TIMEOUT = "10s"
WORKER_WAIT = 60  # seconds to wait for a first worker (a scaling cluster may start empty)
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
        return self._stack.enter_context(self.executor())

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
    closed on exit like the first."""

    name = "processes"
    can_restart = True
    _pool: ExitStack  # the current pool's lifetime, inside the backend's

    def __enter__(self) -> Executor:
        self._pool = self._stack.enter_context(ExitStack())
        return self._pool.enter_context(self.executor())

    def restart(self) -> Executor:
        self._pool.close()
        return self._pool.enter_context(self.executor())

    def executor(self) -> Executor:
        return ProcessPoolExecutor(self.workers, mp_context=process_context())


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
    code and every stage module imported, plus `extra` modules; children it forks
    start with all of them loaded. A server already running keeps its own modules."""
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*WORKER_MODULES, *stage_modules(), *extra])
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


class DistributedBackend(Backend):
    """A dask.distributed cluster: the scheduler at `address`, or a LocalCluster.

    The address comes from `--scheduler`, else `backend.address` in the YAML, else
    `DASK_SCHEDULER_ADDRESS`. Before any task runs, every worker gets this client's
    code and is checked (`prepare_workers`). Tasks have named keys (`partition-N-RUN`)
    and `retries=TASK_RETRIES` for transient errors; a partition whose worker dies
    is recomputed elsewhere, up to `distributed.scheduler.allowed-failures` times.
    The plan (about 2 KB pickled) travels in every task instead of being scattered
    once: a task then depends on nothing that a dead worker could take with it.
    """

    name = "distributed"
    workers_per_core = 1  # one process per core, each with DEFAULT_THREADS_PER_WORKER threads

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        self.address = config.address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        self.client: Client | None = None
        self.threads = self.workers * (config.threads_per_worker or DEFAULT_THREADS_PER_WORKER)
        self._run = secrets.token_hex(4)

    @property
    def max_in_flight(self) -> int:
        return self.config.max_in_flight or 2 * self.threads

    def describe(self) -> str:
        if self.address and self.client is None:  # its size is known once connected
            return f"distributed on {self.address}"
        where = self.address or "a LocalCluster"
        return f"distributed on {where} ({self.workers} workers, {self.threads} threads)"

    def executor(self) -> Executor:
        self.client = self._connect()
        threads = self.client.nthreads()
        self.workers, self.threads = len(threads), sum(threads.values())
        if "dashboard" in self.client.scheduler_info()["services"]:  # served if bokeh is there
            self.dashboard_link = self.client.dashboard_link
            log.info("dask dashboard: %s", self.dashboard_link)  # --quiet hides it
        return self.client.get_executor(pure=False, retries=TASK_RETRIES)

    def _connect(self) -> Client:
        """A client of the scheduler at `address`, or of a new LocalCluster; closed on exit."""
        import dask
        import distributed  # noqa: F401 (load its defaults first: leaving `config.set` restores them)

        with dask.config.set(CLIENT_CONFIG):  # read as comms and the scheduler start
            return self._remote_client() if self.address else self._local_client()

    def _local_client(self) -> Client:
        import dask
        from distributed import Client, LocalCluster

        settings = dict(LOCAL_CLUSTER_CONFIG)
        if sys.platform != "win32":  # no fork there: workers spawn
            start_worker_forkserver()
            settings["distributed.worker.multiprocessing-method"] = "forkserver"
        with dask.config.set(settings):  # nannies hand it to their workers
            cluster = self._stack.enter_context(
                LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=self.config.threads_per_worker or DEFAULT_THREADS_PER_WORKER,
                    processes=True,
                    dashboard_address="127.0.0.1:0",
                    host="127.0.0.1",
                )
            )
        return self._stack.enter_context(Client(cluster))

    def _remote_client(self) -> Client:
        from distributed import Client

        try:
            client = self._stack.enter_context(Client(self.address, timeout=CONNECT_TIMEOUT))
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
