"""Run the plan's reducing stages: collect per-partition summaries, tree-reduce them on the
backend, and conclude on the client (see `pipeline.stages.reducing`)."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any

from pipeline.execution.worker import compiled
from pipeline.plan import Plan
from pipeline.stages.base import Record
from pipeline.stages.reducing import Reducer
from pipeline.stages.registry import stage_kinds


def combine_task(plan: Plan, name: str, summaries: list[Any]) -> Any:
    """What a reduction task runs: the stage's `combine`, in the worker's compiled plan."""
    stage = compiled(plan).steps[name]
    assert isinstance(stage, Reducer)
    return stage.combine(summaries)


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

    def add(self, records: list[Record]) -> None:
        for name, reducer in self.reducers.items():
            self.summaries[name].append(reducer.summarize(records))

    def run(self, executor: Executor) -> None:
        for name, reducer in self.reducers.items():
            summary = self.tree_reduce(executor, name, reducer.fan_in)
            self.results[name] = reducer.conclude(summary)

    def tree_reduce(self, executor: Executor, name: str, fan_in: int) -> Any:
        """Combine groups of `fan_in` summaries as tasks, level by level, down to one."""
        level = self.summaries.pop(name)
        while True:
            chunks = [level[i : i + fan_in] for i in range(0, len(level), fan_in)] or [[]]
            futures = [executor.submit(combine_task, self.plan, name, chunk) for chunk in chunks]
            level = [future.result() for future in futures]
            if len(level) == 1:
                return level[0]
