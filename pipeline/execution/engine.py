"""The engine: stream partitions through a backend with a bounded number in flight.

The client reads source items lazily, groups them into partitions, and keeps
at most `backend.max_in_flight` partitions submitted; as each finishes, its
records are handed to `on_records` and another partition is submitted. So
the graph and the client's memory stay small however long the input is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Executor, Future, wait
from itertools import chain

from pipeline.errors import ItemError, PipelineError
from pipeline.execution.backends import Backend
from pipeline.execution.worker import run_partition
from pipeline.plan import Plan, partitions
from pipeline.stages.base import Item, Partition, Record

OnRecords = Callable[[list[Record]], None]


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
) -> None:
    """Run `parts` on `backend`, calling `on_records` as each partition finishes, then
    `after(executor)` while the backend is still up (batch-level reductions)."""
    with backend as executor:
        backend.prepare(plan)
        in_flight: dict[Future[list[Record]], Partition] = {}
        try:
            for partition in parts:
                if len(in_flight) >= backend.max_in_flight:
                    _collect(in_flight, on_records)
                in_flight[_submit(executor, backend, plan, partition)] = partition
            while in_flight:
                _collect(in_flight, on_records)
        except BaseException:
            for future in in_flight:  # the run stops: queued partitions never start
                future.cancel()
            raise
        if after is not None:
            after(executor)


def _submit(
    executor: Executor, backend: Backend, plan: Plan, partition: Partition
) -> Future[list[Record]]:
    return executor.submit(run_partition, plan, partition, **backend.task_options(partition))


def _collect(in_flight: dict[Future[list[Record]], Partition], on_records: OnRecords) -> None:
    """Wait for at least one partition; hand over the records of all that finished."""
    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
    for future in done:
        partition = in_flight.pop(future)
        try:
            records = future.result()
        except PipelineError:  # fatal for the run: stop, and record nothing for this partition
            raise
        except Exception as exc:
            records = failed_records(partition, _task_error(exc))
        on_records(records)


def _task_error(exc: Exception) -> ItemError:
    if type(exc).__name__ == "KilledWorker":
        return ItemError("worker_lost", f"the partition's worker died repeatedly: {exc}")
    if isinstance(exc, BrokenExecutor):
        return ItemError("worker_lost", f"the partition's worker died: {exc}")
    return ItemError("internal_error", f"{type(exc).__name__}: {exc}")


def failed_records(partition: Partition, error: ItemError) -> list[Record]:
    """One failed record per item, for a partition whose task itself failed."""
    records = partition.new_records()
    for record in records:
        Item(record, None).fail("task", error)
    return records
