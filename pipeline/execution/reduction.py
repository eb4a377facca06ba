"""Run the plan's reducing stages: collect per-partition summaries, tree-reduce them on the
backend, and conclude on the client (see `pipeline.stages.shared.reducing`).

A reducer that acts on items before they are written (`dedupe` with `drop: true`)
needs its result before the main pass: `first_pass` then runs only the stages it
depends on (no sinks), reduces, and concludes; the main pass reads the conclusion.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

from pipeline.execution.backends import Backend
from pipeline.execution.engine import execute, plan_partitions
from pipeline.execution.worker import compiled
from pipeline.plan import Plan
from pipeline.records import Record
from pipeline.stages.registry import stage_kinds
from pipeline.stages.shared.reducing import Reducer

After = Callable[[Executor | None], None]


def combine_task(plan: Plan, name: str, summaries: list[Any]) -> Any:
    """What a reduction task runs: the stage's `combine`, in the worker's compiled plan."""
    stage = compiled(plan).steps[name]
    assert isinstance(stage, Reducer)
    return stage.combine(summaries)


def upstream_plan(plan: Plan, names: list[str]) -> Plan:
    """The plan cut down to `names` and the stages they read from, reducers in first-pass mode."""
    keep, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo.extend(plan.by_name[name].inputs)
    stages = {name: spec for name, spec in plan.config.stages.items() if name in keep}
    config = plan.config.model_copy(update={"stages": stages})
    kinds = stage_kinds()
    nodes = []
    for node in plan.nodes:
        if node.name in names:
            first_pass = kinds[node.kind].first_pass_options(node.options)  # type: ignore[attr-defined]
            node = replace(node, options=first_pass)
        if node.name in keep:
            nodes.append(node)
    return Plan(plan.job, config, tuple(nodes))


class Reductions:
    """The reducers of a plan and the summaries of the partitions seen so far."""

    def __init__(self, plan: Plan):
        self.plan = plan
        kinds = stage_kinds()
        self.reducers: dict[str, Reducer] = {
            node.name: kinds[node.kind](node.name, node.options, plan.job)  # type: ignore[misc]
            for node in plan.nodes
            if issubclass(kinds[node.kind], Reducer)
        }
        self.summaries: dict[str, list[Any]] = {name: [] for name in self.reducers}
        self.results: dict[str, dict[str, Any]] = {}

    def first_pass(self, backend: Backend) -> None:
        """Reduce, before the main pass, for the reducers that need their result in it."""
        early = [name for name, reducer in self.reducers.items() if reducer.needs_first_pass]
        if early:
            plan = upstream_plan(self.plan, early)
            execute(plan, backend, plan_partitions(plan), self.add, after=self.run)

    def add(self, records: list[Record]) -> None:
        for name, reducer in self.reducers.items():
            if name not in self.results:
                self.summaries[name].append(reducer.summarize(records))

    def run(self, executor: Executor | None) -> None:
        """Reduce and conclude, with tasks on `executor` (None: in this process)."""
        if executor is None:
            from dask.local import SynchronousExecutor

            executor = SynchronousExecutor()
        for name, reducer in self.reducers.items():
            if name not in self.results:
                summary = self.tree_reduce(executor, name, reducer.fan_in)
                self.results[name] = reducer.conclude(summary)

    def tree_reduce(self, executor: Executor, name: str, fan_in: int) -> Any:
        """Combine groups of `fan_in` summaries as tasks, level by level, down to one."""
        level, self.summaries[name] = self.summaries[name], []
        while True:
            chunks = [level[i : i + fan_in] for i in range(0, len(level), fan_in)] or [[]]
            futures = [executor.submit(combine_task, self.plan, name, chunk) for chunk in chunks]
            level = [future.result() for future in futures]
            if len(level) == 1:
                return level[0]
