"""Run the plan's reducing stages: collect per-partition summaries, tree-reduce them on the
backend, and conclude on the client (the protocol: `pipeline.stages.shared.reducing`).

    Reductions(plan, manifest)
                            the plan's reducers, each instantiated on the client; the
                            manifest keeps the values of those that `keeps_index`
    .first_pass(backend)    only if a reducer `needs_first_pass`: run `first_pass_plan`
                            (the stages those reducers read from, them in first-pass
                            mode, no sinks) on the items none of them kept a value of,
                            summarize and tree-reduce only them (with the values kept
                            before the run), and put each one's `first_pass_conclusion`
                            into the main plan (`Plan.with_conclusions`): the main
                            pass's tasks receive it there
    .add(records)           main pass, per partition: summarize, for every reducer
                            without a first pass or an index
    .run(executor)          after the main pass: tree-reduce those (an indexed one: the
                            values the manifest keeps, this run's committed ones
                            included), then `conclude` every reducer (a first-pass one
                            on its first-pass summary)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future
from dataclasses import replace
from itertools import chain
from typing import Any

from pipeline.execution.backends import Backend
from pipeline.execution.engine import execute, plan_partitions
from pipeline.execution.worker import compiled
from pipeline.logs import logger
from pipeline.plan import Plan
from pipeline.records import Partition, Record, SourceItem
from pipeline.stages.registry import stage_kind
from pipeline.stages.shared.reducing import Index, Reducer
from pipeline.state.lineage import sink_fingerprints
from pipeline.state.manifest import Manifest

After = Callable[[Executor | None], None]
INDEX_CHUNK = 20_000  # kept values read from the manifest per summary


def combine_task(plan: Plan, name: str, summaries: list[Any]) -> Any:
    """What a reduction task runs: the stage's `combine`, in the worker's compiled plan."""
    stage = compiled(plan).steps[name]
    assert isinstance(stage, Reducer)
    return stage.combine(summaries)


def first_pass_plan(plan: Plan, names: list[str]) -> Plan:
    """The plan the first pass runs: `plan.upstream(names)`, those reducers with their
    `first_pass_options`."""
    cut = plan.upstream(names)
    nodes = []
    for node in cut.nodes:
        if node.name in names:
            kind = stage_kind(node.kind)
            assert issubclass(kind, Reducer)
            node = replace(node, options=kind.first_pass_options(node.options))
        nodes.append(node)
    return replace(cut, nodes=tuple(nodes))


class Reductions:
    """The reducers of a plan and the summaries of the partitions seen so far."""

    def __init__(self, plan: Plan, manifest: Manifest | None = None, trust_index: bool = True):
        """`trust_index`: whether the first pass may take an item's value from the index
        instead of computing it (not when the run redoes every item: `--full`)."""
        self.plan = plan
        self.manifest = manifest
        self.trust_index = trust_index
        # what combine tasks receive: the same stages (so the same compiled copy on each
        # worker), without the first pass's conclusions, which combining does not need
        self.combine_plan = Plan(plan.job, plan.config, plan.nodes)
        self.reducers: dict[str, Reducer] = {}
        for name in plan.reducers:
            reducer = plan.instantiate(plan.by_name[name])
            assert isinstance(reducer, Reducer)
            self.reducers[name] = reducer
        # reducer -> its lineage fingerprint, for those whose values the manifest keeps
        self.indexed: dict[str, str] = {}
        if manifest is not None and any(r.keeps_index for r in self.reducers.values()):
            fingerprints = sink_fingerprints(plan)
            for name, reducer in self.reducers.items():
                if reducer.keeps_index:
                    self.indexed[name] = fingerprints[name]
                    manifest.keep_values(name, fingerprints[name], reducer.index_value)
                    self.reducers[name] = reducer.with_index(
                        Index(manifest.first_new, manifest.urls)
                    )
        self.summaries: dict[str, list[Any]] = {name: [] for name in self.reducers}
        self.first_pass_summaries: dict[str, Any] = {}  # whole-batch, of the first pass
        self.results: dict[str, dict[str, Any]] = {}

    def first_pass(self, backend: Backend) -> Plan:
        """Before the main pass, for the reducers that need their conclusion in it: run
        only what they read from, reduce only them, and return the main pass's plan,
        with what they concluded (the plan itself if no reducer needs a first pass)."""
        early = [name for name, reducer in self.reducers.items() if reducer.needs_first_pass]
        if not early:
            return self.plan
        plan = first_pass_plan(self.plan, early)
        parts = plan_partitions(plan)
        if self.trust_index:
            for name in early:
                self.summaries[name] += self.index_summaries(name)  # what earlier runs kept
            parts = self.unindexed(parts, early, plan.config.partition_size)

        def summarize(records: list[Record]) -> None:
            for name in early:
                self.summaries[name].append(self.reducers[name].summarize(records))

        def reduce(executor: Executor | None) -> None:
            for name in early:
                self.first_pass_summaries[name] = self.tree_reduce(_executor(executor), plan, name)

        first = next(parts, None)
        if first is None:
            reduce(None)  # every item's value is kept: no backend, no download
        else:
            execute(plan, backend, chain([first], parts), summarize, after=reduce)
        return self.plan.with_conclusions(
            {
                name: self.reducers[name].first_pass_conclusion(summary)
                for name, summary in self.first_pass_summaries.items()
            }
        )

    def add(self, records: list[Record]) -> None:
        """A main-pass partition's records (run or skipped as done). An indexed reducer
        reads them from the manifest at the end instead, once they are committed."""
        for name, reducer in self.reducers.items():
            if name not in self.first_pass_summaries and name not in self.indexed:
                self.summaries[name].append(reducer.summarize(records))

    def run(self, executor: Executor | None) -> None:
        """Reduce and conclude, with tasks on `executor` (None: in this process)."""
        for name, reducer in self.reducers.items():
            if name in self.first_pass_summaries:
                summary = self.first_pass_summaries[name]
            else:
                if name in self.indexed:
                    self.summaries[name] = self.index_summaries(name)
                summary = self.tree_reduce(_executor(executor), self.combine_plan, name)
            self.results[name] = reducer.conclude(summary)

    def index_summaries(self, name: str) -> list[Any]:
        """Summaries of every value the manifest keeps for reducer `name` (none if it keeps
        none), `INDEX_CHUNK` rows each."""
        if self.manifest is None or name not in self.indexed:
            return []
        reducer = self.reducers[name]
        chunks = self.manifest.kept_values(name, self.indexed[name], INDEX_CHUNK)
        return [reducer.summarize_index(rows) for rows in chunks]

    def unindexed(
        self, parts: Iterable[Partition], names: list[str], size: int
    ) -> Iterator[Partition]:
        """`parts` without the items every one of the reducers `names` already kept a value
        of (one manifest query per partition and reducer), packed into full partitions."""
        indexed = [name for name in names if name in self.indexed]
        if self.manifest is None or not indexed:
            yield from parts
            return
        waiting: dict[str, list[SourceItem]] = defaultdict(list)
        index = 0
        for part in parts:
            keys = [item.key for item in part.items]
            known = set.intersection(
                *(self.manifest.indexed_keys(name, self.indexed[name], keys) for name in indexed)
            )
            queue = waiting[part.source]
            queue += [item for item in part.items if item.key not in known]
            while len(queue) >= size:
                yield Partition(index, part.source, tuple(queue[:size]))
                del queue[:size]
                index += 1
        for source, queue in waiting.items():
            if queue:
                yield Partition(index, source, tuple(queue))
                index += 1

    def tree_reduce(self, executor: Executor, plan: Plan, name: str) -> Any:
        """Combine groups of `fan_in` summaries as tasks in `plan` (the one whose partitions
        they summarize), level by level, down to one."""
        fan_in = self.reducers[name].fan_in
        level, self.summaries[name] = self.summaries[name], []
        while True:
            chunks = [level[i : i + fan_in] for i in range(0, len(level), fan_in)] or [[]]
            level = _combined(executor, plan, name, chunks)
            if len(level) == 1:
                return level[0]


def _combined(executor: Executor, plan: Plan, name: str, chunks: list[list[Any]]) -> list[Any]:
    """Each chunk combined by a task. If a pool process dies meanwhile (a broken pool),
    the level is combined in this process, which holds the summaries: the run's items are
    committed already, so it ends with its report, not an error. A dask KilledWorker is
    raised as it is: the task itself killed worker after worker (out of memory, likely),
    and would kill this process too."""
    futures: list[Future[Any]] = []
    try:
        futures = [executor.submit(combine_task, plan, name, chunk) for chunk in chunks]
        return [future.result() for future in futures]
    except BrokenExecutor:
        for future in futures:
            future.cancel()
        logger().warning("a worker died combining %s's summaries: combining them here", name)
        return [combine_task(plan, name, chunk) for chunk in chunks]


def _executor(executor: Executor | None) -> Executor:
    """`executor`, or one that runs each task in this process when there is none."""
    if executor is None:
        from dask.local import SynchronousExecutor

        return SynchronousExecutor()
    return executor
