"""Plan layer: the validated stage DAG and the partitioning of its inputs."""

from pipeline.plan.dag import Plan, StageNode, build_plan, stage_problems
from pipeline.plan.partitions import partitions

__all__ = ["Plan", "StageNode", "build_plan", "partitions", "stage_problems"]
