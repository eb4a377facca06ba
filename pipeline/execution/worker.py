"""What runs inside a task: one partition through every stage of the plan.

Image bytes and decoded pixels live only here; the task returns the small
per-input result records. Each worker process compiles a plan once and keeps
its stages (and their connection pools) for every later partition.

A partition may name, per item, the sinks still to run (an incremental run
whose config changed for one branch): items then flow only along the stages
that lead to those sinks, and each record's `sink_outputs` says what every
sink that ran wrote.

A reducer that needed a first pass (`pipeline.stages.shared.reducing`) runs each
partition knowing the first pass's conclusion, which the task receives in its plan
(`Plan.conclusions`), cut to the partition's items.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.plan import Plan
from pipeline.records import Item, Partition, Record
from pipeline.stages.base import Step
from pipeline.stages.shared.reducing import Conclusion, Reducer
from pipeline.storage import durable_batch

_compiled: dict[str, CompiledPlan] = {}
_compile_lock = threading.Lock()


@dataclass(frozen=True)
class CompiledPlan:
    """Live stage objects and each stage's consumers, built once per worker."""

    steps: dict[str, Step]
    consumers: dict[str, tuple[str, ...]]
    order: tuple[str, ...]
    sinks_below: dict[str, frozenset[str]]  # the sinks each stage feeds (a sink: itself)


def compiled(plan: Plan) -> CompiledPlan:
    """This process's compiled copy of `plan`."""
    with _compile_lock:
        if plan.fingerprint not in _compiled:
            stages = plan.compile()
            steps = {name: stage for name, stage in stages.items() if isinstance(stage, Step)}
            consumers = {node.name: plan.consumers(node.name) for node in plan.nodes}
            order = tuple(node.name for node in plan.nodes if node.name in steps)
            below = {node.name: plan.sinks_below(node.name) for node in plan.nodes}
            _compiled[plan.fingerprint] = CompiledPlan(steps, consumers, order, below)
        return _compiled[plan.fingerprint]


def run_partition(plan: Plan, partition: Partition) -> list[Record]:
    """Run every item of `partition` through the DAG; one record per item.

    The records are returned only once every output they name is durable.
    """
    with durable_batch():
        return _run(compiled(plan), partition, plan.for_partition(partition).conclusions)


def _run(
    compiled_plan: CompiledPlan, partition: Partition, conclusions: Mapping[str, Conclusion]
) -> list[Record]:
    bound = {
        name: _bind(step, partition, conclusions) for name, step in compiled_plan.steps.items()
    }
    records = partition.new_records()
    wanted = {}
    if partition.sinks is not None:
        wanted = dict(zip((r["key"] for r in records), partition.sinks, strict=True))
    router = _Router(bound, compiled_plan, wanted)
    usable = [rec for rec, item in zip(records, partition.items, strict=True) if not item.problem]
    for root in compiled_plan.consumers[partition.source]:  # no stage runs on unusable entries
        inputs = (
            Item(record, None, {"from": partition.source})
            for record in usable
            if router.wants(root, record)
        )
        for item in bound[root].stream(inputs):
            router.push(root, item)
    for name in compiled_plan.order:
        bound[name].finish()
    return records


def _bind(step: Step, partition: Partition, conclusions: Mapping[str, Conclusion]) -> Step:
    """The object that runs `partition` for `step`: its own per-partition copy, and for a
    reducer that needed a first pass, one that knows what the first pass concluded."""
    bound = step.for_partition(partition)
    if isinstance(bound, Reducer) and bound.needs_first_pass:
        if step.name not in conclusions:  # a plan not given its first pass: never silently
            raise RuntimeError(f"stage {step.name} runs before its first pass concluded")
        bound = bound.with_conclusion(conclusions[step.name])
    return bound


@dataclass(frozen=True)
class _Router:
    """Hands items from stage to stage, only towards the sinks each item still needs."""

    bound: dict[str, Step]
    plan: CompiledPlan
    wanted: dict[str, frozenset[str]]  # item key -> sinks to run; a key not here: all

    def wants(self, stage: str, record: Record) -> bool:
        sinks = self.wanted.get(record["key"])
        return sinks is None or not sinks.isdisjoint(self.plan.sinks_below[stage])

    def push(self, name: str, item: Item) -> None:
        """Hand `item`, produced by stage `name`, to each consumer it needs, depth first."""
        for consumer in self.plan.consumers[name]:
            if not self.wants(consumer, item.record):
                continue
            result = self.bound[consumer].run_one(item.derive(item.data, **{"from": name}))
            if result is not None:
                self.push(consumer, result)
