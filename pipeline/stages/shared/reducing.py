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
backend is still up. A reducer whose result changes the run itself (drop items
before they are written) sets `needs_first_pass`: the stages it depends on then
run once first, with `first_pass_options`, to produce its conclusion.
"""

from __future__ import annotations

from typing import Any

from pipeline.config.model import Options
from pipeline.records import Record
from pipeline.stages.base import Step


class Reducer(Step):
    """A step (items pass through `process`) that also reduces the batch's records."""

    fan_in: int = 8

    @property
    def needs_first_pass(self) -> bool:
        return False

    @classmethod
    def first_pass_options(cls, options: Options) -> Options:
        """The options the stage runs with in the first pass."""
        return options

    def summarize(self, records: list[Record]) -> Any:
        raise NotImplementedError

    def combine(self, summaries: list[Any]) -> Any:
        raise NotImplementedError

    def conclude(self, summary: Any) -> dict[str, Any]:
        raise NotImplementedError
