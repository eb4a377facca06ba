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

import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from typing import ClassVar

from pipeline.config import BackendConfig
from pipeline.config.model import suggest
from pipeline.errors import ConfigError


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Backend:
    """Base: sizes the pool and defines how many partitions may be in flight."""

    name: ClassVar[str]

    def __init__(self, config: BackendConfig):
        self.config = config
        self.workers = config.workers or default_workers()
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
    name = "processes"

    def executor(self) -> Executor:
        from dask.multiprocessing import get_context

        return ProcessPoolExecutor(self.workers, mp_context=get_context())


class DistributedBackend(Backend):
    name = "distributed"

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        self.address = config.address or os.environ.get("DASK_SCHEDULER_ADDRESS")
        self.client = None

    def describe(self) -> str:
        where = self.address or "a LocalCluster"
        return f"distributed on {where} ({self.workers} workers)"

    def executor(self) -> Executor:
        from distributed import Client, LocalCluster

        if self.address:
            self.client = self._stack.enter_context(Client(self.address))
            self.workers = max(1, len(self.client.scheduler_info()["workers"]))
        else:
            cluster = self._stack.enter_context(
                LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=self.config.threads_per_worker or 1,
                    processes=True,
                    dashboard_address=":0",
                )
            )
            self.client = self._stack.enter_context(Client(cluster))
        return self.client.get_executor(pure=False)


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
        names = [*BACKENDS, *BACKEND_ALIASES]
        raise ConfigError(
            f"unknown backend '{name}'{suggest(name, names)} "
            f"(valid: {', '.join(BACKENDS)}; aliases: {', '.join(BACKEND_ALIASES)})"
        )
    return BACKENDS[canonical]
