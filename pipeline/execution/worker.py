"""What runs inside a task: one partition through every stage of the plan.

Image bytes and decoded pixels live only here; the task returns the small
per-input result records. Each worker process compiles a plan once and keeps
its stages (and their connection pools) for every later partition.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pipeline.plan import Plan
from pipeline.stages.base import Item, Partition, Record, Step

_compiled: dict[str, CompiledPlan] = {}
_compile_lock = threading.Lock()


@dataclass(frozen=True)
class CompiledPlan:
    """Live stage objects and each stage's consumers, built once per worker."""

    steps: dict[str, Step]
    consumers: dict[str, tuple[str, ...]]
    order: tuple[str, ...]


def compiled(plan: Plan) -> CompiledPlan:
    """This process's compiled copy of `plan`."""
    with _compile_lock:
        if plan.fingerprint not in _compiled:
            stages = plan.compile()
            steps = {name: stage for name, stage in stages.items() if isinstance(stage, Step)}
            consumers = {node.name: plan.consumers(node.name) for node in plan.nodes}
            order = tuple(node.name for node in plan.nodes if node.name in steps)
            _compiled[plan.fingerprint] = CompiledPlan(steps, consumers, order)
        return _compiled[plan.fingerprint]


def run_partition(plan: Plan, partition: Partition) -> list[Record]:
    """Run every item of `partition` through the DAG; one record per item."""
    compiled_plan = compiled(plan)
    bound = {name: step.for_partition(partition) for name, step in compiled_plan.steps.items()}
    records = [item.new_record() for item in partition.items]
    for root in compiled_plan.consumers[partition.source]:
        inputs = (Item(record, None, {"from": partition.source}) for record in records)
        for item in bound[root].stream(inputs):
            _push(bound, compiled_plan.consumers, root, item)
    for name in compiled_plan.order:
        bound[name].finish()
    return records


def _push(bound: dict[str, Step], consumers: dict[str, tuple[str, ...]], name: str, item: Item):
    """Hand `item`, produced by stage `name`, to each of its consumers, depth first."""
    for consumer in consumers[name]:
        result = bound[consumer].run_one(item.derive(item.data, **{"from": name}))
        if result is not None:
            _push(bound, consumers, consumer, result)
