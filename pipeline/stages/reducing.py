"""Reducing stages: steps that also see the whole batch, through small summaries.

A partition's task never sees other partitions, and images never travel to the
client. So a stage that needs the whole batch (near-duplicate groups) splits its
work in three, each on small data:

    summarize(records)   client, as each partition's records arrive: a compact
                         summary of what the task put in the records (e.g. hashes)
    combine(summaries)   a task on the backend: merge a few summaries into one;
                         associative, so summaries are merged as a tree
                         (fan-in `fan_in`), level by level, on the workers
    conclude(summary)    client, once: write the result files, return a report section

`pipeline.execution.reduction` drives this after the last partition, while the
backend is still up.
"""

from __future__ import annotations

from typing import Any

from pipeline.stages.base import Record, Step


class Reducer(Step):
    """A step (items pass through `process`) that also reduces the batch's records."""

    fan_in: int = 8

    def summarize(self, records: list[Record]) -> Any:
        raise NotImplementedError

    def combine(self, summaries: list[Any]) -> Any:
        raise NotImplementedError

    def conclude(self, summary: Any) -> dict[str, Any]:
        raise NotImplementedError
