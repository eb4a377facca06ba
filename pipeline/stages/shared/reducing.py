"""Reducing stages: steps that also see the whole batch, through small summaries.

A partition's task never sees other partitions, and images never travel to the
client. So a stage that needs the whole batch (near-duplicate groups) splits its
work in three, each on small data:

    summarize(records)   client, as each partition's records arrive: a compact
                         summary of what the task put in the records (e.g. hashes)
    combine(summaries)   a task on the backend: merge a few summaries into one;
                         associative, so summaries are merged as a tree
                         (fan-in `fan_in`), level by level, on the workers
    conclude(summary)    client, once, at the end of the run: write the result
                         files, return the report's section

`pipeline.execution.reduction` drives this after the last partition, while the
backend is still up.

A reducer whose result changes the run itself (dedupe's `drop`: skip items before
they are written) sets `needs_first_pass`. Then, before the main pass:

    first pass           the whole batch through only the stages these reducers
                         read from and themselves (with `first_pass_options`), no
                         sink; only these reducers summarize and combine
    first_pass_conclusion(summary)
                         client: what the main pass must know, as a `Conclusion`
                         (dedupe: each duplicate's key -> the key kept in its group);
                         it goes into the main plan (`Plan.conclusions`), which every
                         task of the main pass receives
    with_conclusion(conclusion)
                         in each main-pass task: the reducer as it runs that
                         partition, knowing the conclusion, cut to the partition's
                         items (`Conclusion.for_partition`)
    conclude(summary)    at the end of the run, on the first pass's summary (the main
                         pass does not summarize again)

So the main pass reads nothing the first pass wrote: the conclusion is data in the
plan. A reducer that needs no first pass summarizes the main pass's records.
"""

from __future__ import annotations

from typing import Any

from pipeline.records import Partition, Record
from pipeline.stages.base import AnyOptions, OptionsT, Step


class Conclusion:
    """What a first pass tells the main pass: small and picklable, as it travels in the
    plan of every main-pass task."""

    def for_partition(self, partition: Partition) -> Conclusion:
        """The part of it that `partition`'s task needs (all of it, unless overridden)."""
        return self


class Reducer(Step[OptionsT]):
    """A step (items pass through `process`) that also reduces the batch's records."""

    @property
    def fan_in(self) -> int:
        """Summaries merged per reduction task."""
        return 8

    @property
    def needs_first_pass(self) -> bool:
        return False

    @classmethod
    def first_pass_options(cls, options: AnyOptions) -> AnyOptions:
        """The options the stage runs with in the first pass."""
        return options

    def summarize(self, records: list[Record]) -> Any:
        raise NotImplementedError

    def combine(self, summaries: list[Any]) -> Any:
        raise NotImplementedError

    def conclude(self, summary: Any) -> dict[str, Any]:
        raise NotImplementedError

    def first_pass_conclusion(self, summary: Any) -> Conclusion:
        """With `needs_first_pass`: what the main pass needs from the first pass's summary."""
        raise NotImplementedError

    def with_conclusion(self, conclusion: Conclusion) -> Reducer[OptionsT]:
        """With `needs_first_pass`: the object that runs a main-pass partition, knowing
        (the partition's part of) the first pass's conclusion."""
        raise NotImplementedError
