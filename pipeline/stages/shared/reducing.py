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

A reducer that `keeps_index` reduces across runs, not only over this run's batch: the
manifest keeps `index_value(record)` of every item it commits (dedupe: the hash), in
the same transaction as the item, under the reducer's lineage fingerprint. Then:

    with_index(index)    client: the reducer as the run's client uses it, knowing the
                         `Index` (the order of this run's first new item, the URLs of
                         keys); this run's items come after every earlier one in order
    summarize_index(rows)
                         client: a summary of kept (key, value, order) rows, read from
                         the manifest a chunk at a time; these summaries are leaves of
                         the same tree as the partitions'
    without a first pass the reducer reduces only the manifest's rows, once the last
                         partition is committed: items done in earlier runs (skipped
                         as `unchanged`) are never run again, and items that are not
                         in this run's input at all still count
    with a first pass    the first pass runs only the items without a kept value, and
                         reduces their summaries with the rows kept before the run
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.records import Partition, Record
from pipeline.stages.base import AnyOptions, OptionsT, Step


class Conclusion:
    """What a first pass tells the main pass: small and picklable, as it travels in the
    plan of every main-pass task."""

    def for_partition(self, partition: Partition) -> Conclusion:
        """The part of it that `partition`'s task needs (all of it, unless overridden)."""
        return self


IndexRow = tuple[str, str, int]  # key, kept value, order (earlier runs' items first)


def _no_urls(keys: Iterable[str]) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Index:
    """What a reducer that `keeps_index` knows on the client about the items it kept."""

    first_new: int = 0  # orders from here on are this run's items (order: first_new + index)
    urls: Callable[[Iterable[str]], dict[str, str]] = field(default=_no_urls)  # key -> URL


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

    index: Index = Index()

    @property
    def keeps_index(self) -> bool:
        """True: the manifest keeps `index_value` of each item, and reductions span runs."""
        return False

    def index_value(self, record: Record) -> str | None:
        """With `keeps_index`: what the manifest keeps of a committed record (None: nothing,
        and any value kept earlier goes)."""
        return None

    def with_index(self, index: Index) -> Reducer[OptionsT]:
        """With `keeps_index`: a copy that knows `index` (on the client only)."""
        bound = copy.copy(self)
        bound.index = index
        return bound

    def summarize_index(self, rows: list[IndexRow]) -> Any:
        """With `keeps_index`: a summary of rows the manifest kept."""
        raise NotImplementedError

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
