"""The engine: stream partitions through a backend with a bounded number in flight.

The client reads source items lazily, groups them into partitions, and keeps
at most `backend.max_in_flight` partitions submitted; as each finishes, its
records are handed to `on_records` and another partition is submitted. So
the graph and the client's memory stay small however long the input is.

When a worker process dies (a native decoder crash, the OOM killer), its process
pool breaks, and every partition in flight fails with it, guilty or not. On a
backend that can replace its executor (`Backend.can_restart`: processes), each of
those partitions is a suspect: on a fresh pool, each runs alone, and one that
finishes is innocent (its records count as usual). A suspect that breaks the pool
alone is split into one-item partitions, each run alone; only an item that breaks
it alone is recorded failed (stage `task`, reason `worker_lost`). Then the stream
goes on, with its window of partitions in flight again. Elsewhere a broken
executor's partitions are recorded `worker_lost` and the run stops at the next
submit; distributed re-runs a dead worker's tasks itself (KilledWorker if it
keeps dying).

Side tasks are what the client adds while partitions run (a shard to assemble from the
pieces of several partitions: `pipeline.execution.assembly`): `SideTasks.tasks()` is
asked for new ones after every partition, `finish()` once the last partition is in, and
each one's future goes to its `done` on the client. A side task that a dead worker took
down runs again on the fresh pool (up to SIDE_TRIES times).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Executor, Future, wait
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any, Protocol

from pipeline.errors import ItemError, PipelineError
from pipeline.execution.backends import Backend
from pipeline.execution.worker import run_partition
from pipeline.logs import logger
from pipeline.plan import Plan, partitions
from pipeline.records import Item, Partition, Record

OnRecords = Callable[[list[Record]], None]

log = logger("engine")

KILLED_ITS_WORKER = ItemError(
    "worker_lost", "its worker process died while it ran alone (a crash, or out of memory)"
)


SIDE_TRIES = 3


@dataclass
class SideTask:
    """`fn(*args)` on the backend; `done` receives its finished future, on the client."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    done: Callable[[Future[Any]], None]
    tries: int = 0


class SideTasks(Protocol):
    def tasks(self) -> list[SideTask]:
        """The side tasks to submit now (each is returned once)."""
        ...

    def finish(self) -> None:
        """Every partition is in: queue the side tasks that were waiting for more."""
        ...


def plan_partitions(plan: Plan) -> Iterator[Partition]:
    """Every source's items, lazily grouped into numbered partitions."""
    size = plan.config.partition_size
    streams: list[Iterable[Partition]] = []
    for name, source in plan.source_stages().items():
        streams.append(partitions(name, source.iter_items(), size))
    for index, partition in enumerate(chain.from_iterable(streams)):
        yield Partition(index, partition.source, partition.items)


def execute(
    plan: Plan,
    backend: Backend,
    parts: Iterable[Partition],
    on_records: OnRecords,
    after: Callable[[Executor], None] | None = None,
    side: SideTasks | None = None,
) -> None:
    """Run `parts` on `backend`, calling `on_records` as each partition finishes, and the
    `side` tasks it asks for; then `after(executor)` while the backend is still up
    (batch-level reductions)."""
    with backend as executor:
        backend.prepare(plan)
        stream = _Stream(plan, backend, executor, on_records, side)
        try:
            stream.run(parts)
        except BaseException:
            stream.cancel()  # the run stops: queued partitions never start
            raise
        if after is not None:
            after(stream.executor)  # a fresh one if a worker's death broke the first


class _Stream:
    """The partitions in flight on a backend's executor, which a dead worker may break."""

    def __init__(
        self,
        plan: Plan,
        backend: Backend,
        executor: Executor,
        on_records: OnRecords,
        side_tasks: SideTasks | None = None,
    ):
        self.plan = plan
        self.backend = backend
        self.executor = executor
        self.on_records = on_records
        self.side_tasks = side_tasks
        self.in_flight: dict[Future[list[Record]], Partition] = {}
        self.side: dict[Future[Any], SideTask] = {}
        self.side_again: list[SideTask] = []  # taken down by a dead worker: to resubmit

    def run(self, parts: Iterable[Partition]) -> None:
        for partition in parts:
            while len(self.in_flight) >= self.backend.max_in_flight:  # a live size: re-read
                self._collect()
            self._submit(partition)
        while self.in_flight:
            self._collect()
        if self.side_tasks is not None:
            self.side_tasks.finish()
            self._submit_side()
        while self.side:
            self._collect()

    def cancel(self) -> None:
        for future in [*self.in_flight, *self.side]:
            future.cancel()

    def _submit(self, partition: Partition) -> None:
        try:
            self.in_flight[self._start(partition)] = partition
        except BrokenExecutor:  # broken by a partition in flight, or a worker died idle
            if not self.backend.can_restart:
                raise
            self._recover([partition])

    def _start(self, partition: Partition) -> Future[list[Record]]:
        options = self.backend.task_options(partition)
        plan = self.plan.for_partition(partition)  # first-pass conclusions: its items' only
        return self.executor.submit(run_partition, plan, partition, **options)

    def _collect(self) -> None:
        """Wait for at least one partition; hand over the records of all that finished.
        Every `backend.poll_interval` seconds without one, the backend checks that it
        still has workers (`Backend.waiting`: it logs, and gives up after a while)."""
        while True:
            poll = self.backend.poll_interval
            waited = [*self.in_flight, *self.side]
            done, _ = wait(waited, timeout=poll, return_when=FIRST_COMPLETED)
            if done:
                break
            self.backend.waiting(len(waited))
        suspects = self._settle([future for future in done if future in self.in_flight])
        if suspects:
            self._recover(suspects)
        for future in done:
            if future in self.side:
                self._side_done(future)
        self._submit_side()

    def _side_done(self, future: Future[Any]) -> None:
        task = self.side.pop(future)
        broken = not future.cancelled() and isinstance(future.exception(), BrokenExecutor)
        if broken and self.backend.can_restart and task.tries < SIDE_TRIES:
            self.side_again.append(task)
        else:
            task.done(future)

    def _submit_side(self) -> None:
        """Submit the side tasks to run again and the new ones. On a broken pool with no
        partition in flight (whose recovery would replace it), replace it first."""
        if self.side_tasks is None:
            return
        tasks, self.side_again = [*self.side_again, *self.side_tasks.tasks()], []
        for task in tasks:
            task.tries += 1
            try:
                self.side[self.executor.submit(task.fn, *task.args)] = task
            except BrokenExecutor:
                if not self.backend.can_restart:
                    raise
                if self.in_flight:
                    self.side_again.append(task)
                    continue
                self._restart()
                self.side[self.executor.submit(task.fn, *task.args)] = task

    def _settle(self, done: Iterable[Future[list[Record]]]) -> list[Partition]:
        """Hand over the records of the `done` partitions; return those a broken pool failed.
        A fatal error stops the run only once the others that finished are recorded."""
        suspects, fatal = [], None
        for future in done:
            partition = self.in_flight.pop(future)
            try:
                records = _outcome(future, partition, self.backend)
            except PipelineError as error:
                fatal = fatal or error
                continue
            if records is None:
                suspects.append(partition)
            else:
                self.on_records(records)
        if fatal is not None:
            raise fatal
        return suspects

    def _recover(self, suspects: list[Partition]) -> None:
        """A worker died and broke the pool, failing every partition in flight at once:
        settle them all, take a fresh pool, and run each suspect alone."""
        done, _ = wait(self.in_flight)
        suspects += self._settle(done)
        log.warning("a worker died: re-running alone the %d partition(s) in flight", len(suspects))
        self._restart()
        for partition in suspects:
            self._isolate(partition)

    def _isolate(self, partition: Partition) -> None:
        """Run a suspect alone; if it breaks the pool, split it down to the items that do."""
        records = self._alone(partition)
        if records is not None:
            self.on_records(records)
        elif len(partition.items) > 1:
            for single in one_item_partitions(partition):
                self._isolate(single)
        else:
            log.warning("%s kills its worker: recorded worker_lost", partition.items[0].url)
            self.on_records(failed_records(partition, KILLED_ITS_WORKER))

    def _alone(self, partition: Partition) -> list[Record] | None:
        """`partition`'s records, run with nothing else in flight; None if it broke the
        pool (then replaced)."""
        try:
            future = self._start(partition)
        except BrokenExecutor:  # a worker died idle, killed from outside: not this one's doing
            self._restart()
            future = self._start(partition)
        records = _outcome(future, partition, self.backend)
        if records is None:
            self._restart()
        return records

    def _restart(self) -> None:
        self.executor = self.backend.restart()


def _outcome(
    future: Future[list[Record]], partition: Partition, backend: Backend
) -> list[Record] | None:
    """A finished task's records (a task that raised: a failed record per item), or None
    if a broken pool failed it and `backend` can replace the pool."""
    try:
        return future.result()
    except PipelineError:  # fatal for the run: stop, and record nothing for this partition
        raise
    except BrokenExecutor as exc:
        return None if backend.can_restart else failed_records(partition, task_error(exc))
    except Exception as exc:
        return failed_records(partition, task_error(exc))


def one_item_partitions(partition: Partition) -> Iterator[Partition]:
    """`partition` split into partitions of one item, each with its own sinks to run."""
    for position, item in enumerate(partition.items):
        sinks = None if partition.sinks is None else (partition.sinks[position],)
        yield replace(partition, items=(item,), sinks=sinks)


def lost_worker(exc: BaseException) -> bool:
    """Whether a task failed because its worker died (a broken pool, a KilledWorker)."""
    return isinstance(exc, BrokenExecutor) or type(exc).__name__ == "KilledWorker"


def task_error(exc: Exception) -> ItemError:
    """The error each item of a task that raised `exc` fails with."""
    if lost_worker(exc):  # a KilledWorker: dask saw the task kill worker after worker
        how = "" if isinstance(exc, BrokenExecutor) else " repeatedly"
        return ItemError("worker_lost", f"the partition's worker died{how}: {exc}")
    return ItemError("internal_error", f"{type(exc).__name__}: {exc}")


def failed_records(partition: Partition, error: ItemError) -> list[Record]:
    """One failed record per item, for a partition whose task itself failed."""
    records = partition.new_records()
    for record in records:
        Item(record, None).fail("task", error)
    return records
