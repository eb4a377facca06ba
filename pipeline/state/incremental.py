"""Incremental runs: decide per item what is left to do, from the manifest.

An item is done for a sink if the manifest has it with the sink's current
fingerprint and its outputs still exist. A re-run skips items done for every
sink their source feeds (one `skipped` record each, reason `unchanged`), runs
only the missing sinks of the others, retries failures whose reason is
retryable (or all, with `retry_failed`), and retries any failure whose config
changed. An item a filter stage skipped (reason `filtered`) stays skipped while the
attempt is the same: the filter is upstream of the sinks, so a changed rule changes
their fingerprints and the item is evaluated again (`retry_failed` does not: it is not
a failure). Such a verdict, and a failure that is not retried, also holds only while the
list's fields for the item are the same (a `where` on them, a digest to verify against).
`full` ignores the manifest. A key met twice in one run is skipped
the second time (reason `duplicate`).

Items are looked up one source partition at a time and the pending ones are
packed into full partitions again, so the client holds only what is in flight.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import RETRYABLE_REASONS
from pipeline.records import Partition, Record, SourceItem
from pipeline.state.lineage import digest
from pipeline.state.manifest import Attempt, Entry, Manifest

OnRecords = Callable[[list[Record]], None]


@dataclass(frozen=True)
class Policy:
    """How much of the manifest to trust: all of it, or less."""

    retry_failed: bool = False  # retry every failure, not only retryable ones
    full: bool = False  # ignore the manifest: redo every item


@dataclass(frozen=True)
class Skip:
    """Why an item is not run, and what it has from earlier runs."""

    reason: str
    message: str
    outputs: list[str]


def plan_item(
    entry: Entry | None,
    fingerprints: dict[str, str],
    policy: Policy,
    fields: Mapping[str, Any] | None = None,
) -> Attempt | Skip:
    """What to do with one item, given its manifest entry, its sinks' fingerprints and
    the list's `fields` for it (a filter's `where` or a `verify_hash` reads them)."""
    if policy.full or entry is None:
        return _attempt(fingerprints, fields)
    missing = {
        sink: fingerprint
        for sink, fingerprint in fingerprints.items()
        if not _done(entry.sinks.get(sink), fingerprint)
    }
    if not missing:
        outputs = [path for sink in fingerprints for path in entry.sinks[sink][1]]
        return Skip("unchanged", f"done in run {entry.run_id}", outputs)
    attempt = _attempt(missing, fields)
    if (
        entry.status == "skipped"
        and entry.reason == "filtered"
        and entry.attempt == attempt.fingerprint
    ):
        return Skip("filtered", f"filtered in run {entry.run_id}; the rules are unchanged", [])
    if (
        entry.status == "failed"
        and entry.reason not in RETRYABLE_REASONS
        and not policy.retry_failed
        and entry.attempt == attempt.fingerprint
    ):
        return Skip(
            str(entry.reason), f"failed in run {entry.run_id}; --retry-failed retries it", []
        )
    return attempt


def _attempt(fingerprints: dict[str, str], fields: Mapping[str, Any] | None) -> Attempt:
    """The attempt at these sinks, with these list fields: a verdict on the item (filtered,
    or a failure that is not retried) holds while neither changes."""
    basis: Any = sorted(fingerprints.items())
    if fields:
        basis = [basis, dict(fields)]
    return Attempt(dict(fingerprints), digest(basis))


def _done(done: tuple[str, list[str]] | None, fingerprint: str) -> bool:
    """Done with this fingerprint, and every local output is still there."""
    if done is None or done[0] != fingerprint:
        return False
    return all("://" in path or os.path.exists(path) for path in done[1])


class Incremental:
    """Turns the source partitions into the partitions still to run.

    Skipped items go straight to `on_skipped` (an item a killed run finished without
    recording it, its shards committed, gets its `items` row); `attempts` remembers what each
    pending item was sent to do until `commit` records its result.
    """

    def __init__(
        self,
        manifest: Manifest,
        fingerprints: dict[str, str],
        sinks_of_source: dict[str, frozenset[str]],
        policy: Policy,
        partition_size: int,
        on_skipped: OnRecords,
        run_id: str,
    ):
        self.manifest = manifest
        self.fingerprints = fingerprints
        self.sinks_of_source = sinks_of_source
        self.policy = policy
        self.size = partition_size
        self.on_skipped = on_skipped
        self.run_id = run_id
        self.attempts: dict[str, Attempt] = {}

    def pending(self, parts: Iterable[Partition]) -> Iterator[Partition]:
        """The work left, in partitions of `partition_size` items (fewer at the end)."""
        waiting: dict[str, list[tuple[SourceItem, Attempt]]] = defaultdict(list)
        index = 0
        for part in parts:
            queue = waiting[part.source]
            queue += self._triage(part)
            while len(queue) >= self.size:
                yield self._partition(index, part.source, queue[: self.size])
                del queue[: self.size]
                index += 1
        for source, queue in waiting.items():
            if queue:
                yield self._partition(index, source, queue)
                index += 1

    def commit(self, records: list[Record]) -> None:
        """Record a finished partition in the manifest, and forget its attempts."""
        self.manifest.commit(records, self.attempts, self.run_id)
        for record in records:
            del self.attempts[record["key"]]

    def _partition(
        self, index: int, source: str, work: list[tuple[SourceItem, Attempt]]
    ) -> Partition:
        items = tuple(item for item, _ in work)
        sinks = tuple(frozenset(attempt.sinks) for _, attempt in work)
        for item, attempt in work:
            self.attempts[item.key] = attempt
        return Partition(index, source, items, sinks)

    def _triage(self, part: Partition) -> list[tuple[SourceItem, Attempt]]:
        """Skip what is done or duplicated (recording why); return the rest with its attempt."""
        earlier = self.manifest.first_seen(part.items)
        sinks = self.sinks_of_source[part.source]
        fingerprints = {sink: self.fingerprints[sink] for sink in sinks}
        work, skipped, unrecorded = [], [], []
        for item, first_line in zip(part.items, earlier, strict=True):
            entry = None
            if first_line is not None:
                decision: Attempt | Skip = Skip("duplicate", f"same URL as line {first_line}", [])
            else:
                entry = self.manifest.lookup(item.key)
                decision = plan_item(entry, fingerprints, self.policy, item.fields)
            if isinstance(decision, Skip):
                skipped.append(_skipped_record(item, part.source, decision))
                if entry is not None and entry.status == "incomplete":  # done, not recorded
                    unrecorded.append((skipped[-1], _attempt(fingerprints, item.fields)))
            else:
                work.append((item, decision))
        if unrecorded:
            self.manifest.note_finished(unrecorded, self.run_id)
        if skipped:
            self.on_skipped(skipped)
        return work


def _skipped_record(item: SourceItem, source: str, skip: Skip) -> Record:
    record = item.new_record(source)
    record.update(
        status="skipped", stage=None, reason=skip.reason, message=skip.message, outputs=skip.outputs
    )
    return record
