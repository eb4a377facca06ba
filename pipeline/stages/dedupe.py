"""`dedupe`: group near-duplicate images across the whole batch by perceptual-hash distance.

Put it after a `phash` stage: it groups by the hash of the nearest `phash` upstream of
it on its branch (which reaches it in the item's `meta`), and keeps the hash it used in
the record under its own name (`record["results"][<name>]`), whatever other hash stages
put there. Items pass through unchanged; at the end of the run
the groups of near-duplicates (hashes within `threshold` bits, chained: single
linkage) are written to `<run dir>/dedupe-<name>.json` and summarised in the
report. In each group the item earliest in the input is kept, the others are
listed as its duplicates. With `drop: true` the duplicates are also skipped
(status `skipped`, reason `duplicate`) before any later stage, so they are
never written: that needs the groups before the main pass, so the stages up to
`dedupe` run once first (a second download and decode, no writes). The first pass
concludes into `Duplicates` (each duplicate's key -> the key kept in its group), which
reaches the main pass's tasks in their plan, not through a file; the groups file is
written at the end of the run, as without `drop`.

How it fits the DAG and Dask (see `pipeline.stages.shared.reducing`): a partition's
records carry each image's 64-bit hash. On the client each finished partition
becomes a small summary, three flat numpy arrays (20-byte keys, input indices,
hashes) plus group labels: about 40 bytes an image, never pixels. A key is one
item however often it is listed (the first pass sees every line of a list): a
summary and a merge keep it once, at its earliest index, so it is never grouped
with, or dropped as a duplicate of, itself. Summaries are
merged by tasks on the backend, `fan_in` at a time, level by level (a tree
reduction). A merge finds candidate pairs by multi-index hashing: the 64 bits
are cut into bands so that, by the pigeonhole principle, two hashes within
`threshold` bits share a band key (see `band_keys`); only items that share a key
are compared, and identical hashes are joined first. A
union-find over the merged arrays keeps the groups, so a merge only adds links.
"""

from __future__ import annotations

import copy
import itertools
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, PositiveInt

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.records import Item, Partition, Record
from pipeline.stages.base import AnyOptions
from pipeline.stages.registry import register
from pipeline.stages.shared.reducing import Conclusion, Reducer
from pipeline.storage import join, write_output

PAIR_CHUNK = 4_000_000  # hash comparisons per array operation (~32 MB of uint64)


class DedupeOptions(Options):
    threshold: int = Field(8, ge=0, le=31, description="Max Hamming distance (bits of 64)")
    fan_in: PositiveInt = Field(8, ge=2, description="Summaries merged per reduction task")
    drop: bool = Field(
        False, description="Skip duplicates before later stages (runs the stages up to here twice)"
    )


@dataclass(frozen=True)
class HashSummary:
    """Keys, input indices, hashes and group labels (index of the group's root) of items."""

    keys: np.ndarray
    indices: np.ndarray
    hashes: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, records: list[Record], name: str) -> HashSummary:
        """The ok records' hashes, as the `dedupe` stage `name` kept them in `results`."""
        hashed = [(r, r.get("results", {}).get(name)) for r in records if r["status"] == "ok"]
        hashed = [(r, value) for r, value in hashed if value]
        return one_per_key(
            cls(
                np.array([r["key"] for r, _ in hashed], dtype="S20"),
                np.array([r["index"] for r, _ in hashed], dtype=np.int64),
                np.array([int(value, 16) for _, value in hashed], dtype=np.uint64),
                np.arange(len(hashed), dtype=np.int64),
            )
        )


class UnionFind:
    def __init__(self, parents: np.ndarray):
        self.parents = parents.copy()

    def find(self, node: int) -> int:
        root = node
        while self.parents[root] != root:
            root = self.parents[root]
        while self.parents[node] != root:
            self.parents[node], node = root, self.parents[node]
        return int(root)

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parents[max(root_a, root_b)] = min(root_a, root_b)

    def labels(self) -> np.ndarray:
        """Every node's root, by pointer jumping over the whole array at once."""
        parents = self.parents
        while not np.array_equal(grandparents := parents[parents], parents):
            parents = grandparents
        return parents


def band_edges(count: int) -> list[tuple[int, int]]:
    """(low, high) bit positions of `count` near-equal bands covering 64 bits."""
    edges = [64 * i // count for i in range(count + 1)]
    return list(itertools.pairwise(edges))


def band_keys(
    hashes: np.ndarray, threshold: int, masked: bool | None = None
) -> Iterator[np.ndarray]:
    """Keys such that any two hashes within `threshold` bits share one of them.

    Pigeonhole, two ways: with `threshold + 1` bands, two such hashes agree on a
    whole band; with `threshold // 2 + 1` wider bands, they differ in at most one
    bit of a band, so they agree on it once the same one of its bits is masked
    (64 keys). Exact bands mean fewer sorts, masked bands fewer random candidate
    pairs: unless `masked` says, the cheaper one for this many hashes is used.
    """
    exact, wide = threshold + 1, threshold // 2 + 1
    if masked is None:
        masked = _cost(len(hashes), exact, 64 // exact) > _cost(len(hashes), 64, 64 // wide - 1)
    if masked:
        for low, high in band_edges(wide):
            band = _band(hashes, low, high)
            for bit in range(high - low):
                yield band & ~np.uint64(1 << bit)
    else:
        for low, high in band_edges(exact):
            yield _band(hashes, low, high)


def _band(hashes: np.ndarray, low: int, high: int) -> np.ndarray:
    return (hashes >> np.uint64(low)) & np.uint64((1 << (high - low)) - 1)


def _cost(items: int, keys: int, bits: int) -> float:
    """Work for `keys` sorts of `items` plus their random candidate pairs (measured:
    a sort costs about 6 hash comparisons an item)."""
    return keys * (6 * items + items * items / 2 ** (bits + 1))


def close_pairs(values: np.ndarray, hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Pairs (i, j) with equal `values` and hashes within `threshold` bits, as a (k, 2) array.

    Runs of equal values are batched by length, so each batch is compared all-pairs
    in whole-array operations, in chunks of about `PAIR_CHUNK` comparisons.
    """
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    lengths = np.diff(np.r_[starts, len(order)])
    found = [np.empty((0, 2), dtype=np.int64)]
    for length in np.unique(lengths[lengths > 1]):
        runs = starts[lengths == length]
        upper = np.triu(np.ones((length, length), dtype=bool), k=1)
        chunk = max(1, PAIR_CHUNK // (length * length))
        for begin in range(0, len(runs), chunk):
            members = order[runs[begin : begin + chunk, None] + np.arange(length)]
            bits = hashes[members]
            close = (np.bitwise_count(bits[:, :, None] ^ bits[:, None, :]) <= threshold) & upper
            run, i, j = np.nonzero(close)
            found.append(np.stack([members[run, i], members[run, j]], axis=1))
    return np.concatenate(found)


def one_per_key(summary: HashSummary) -> HashSummary:
    """`summary` with each key once, at its earliest index: rows of one key are one item,
    so whatever any of them was linked with stays linked with the row that is kept."""
    by_index = np.argsort(summary.indices, kind="stable")
    order = by_index[np.argsort(summary.keys[by_index], kind="stable")]  # by key, then index
    keys = summary.keys[order]
    first = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.ones(0, dtype=bool)
    if first.all():
        return summary
    groups = UnionFind(summary.labels)
    earliest = order[np.flatnonzero(first)][np.cumsum(first) - 1]  # per row of `order`
    for position in np.flatnonzero(~first):
        groups.union(int(earliest[position]), int(order[position]))
    kept = np.sort(order[first])
    _, roots, inverse = np.unique(groups.labels()[kept], return_index=True, return_inverse=True)
    return HashSummary(
        summary.keys[kept], summary.indices[kept], summary.hashes[kept], roots[inverse.ravel()]
    )


def concatenate(summaries: list[HashSummary]) -> HashSummary:
    """All items of `summaries` in one, labels shifted to the new positions."""
    if not summaries:
        return HashSummary.of([], "")
    offsets = np.cumsum([0] + [len(summary.keys) for summary in summaries[:-1]])
    return HashSummary(
        np.concatenate([summary.keys for summary in summaries]),
        np.concatenate([summary.indices for summary in summaries]),
        np.concatenate([summary.hashes for summary in summaries]),
        np.concatenate([s.labels + offset for s, offset in zip(summaries, offsets, strict=True)]),
    )


def merge(summaries: list[HashSummary], threshold: int) -> HashSummary:
    """One summary of all items in `summaries` (each key once), with near-duplicates linked."""
    joined = one_per_key(concatenate(summaries))
    groups = UnionFind(joined.labels)
    unique, first, inverse = np.unique(joined.hashes, return_index=True, return_inverse=True)
    representatives = first[inverse.ravel()]
    for position in np.flatnonzero(representatives != np.arange(len(representatives))):
        groups.union(int(representatives[position]), int(position))  # identical hashes
    for key in band_keys(unique, threshold) if threshold else ():
        for a, b in first[close_pairs(key, unique, threshold)]:
            groups.union(int(a), int(b))
    return HashSummary(joined.keys, joined.indices, joined.hashes, groups.labels())


def groups_of(summary: HashSummary) -> list[dict[str, Any]]:
    """Groups of two or more, each as the kept key (earliest input) and its duplicates."""
    found = []
    for label in np.unique(summary.labels):
        members = np.flatnonzero(summary.labels == label)
        if len(members) > 1:
            members = members[np.argsort(summary.indices[members], kind="stable")]
            keys = [key.decode() for key in summary.keys[members]]
            found.append({"keep": keys[0], "duplicates": keys[1:]})
    return sorted(found, key=lambda group: group["keep"])


@dataclass(frozen=True)
class Duplicates(Conclusion):
    """What `dedupe` with `drop` concludes in its first pass: the duplicates' keys, sorted,
    and the key kept in each one's group (two flat arrays: 40 bytes a duplicate)."""

    keys: np.ndarray
    kept: np.ndarray

    @classmethod
    def of(cls, summary: HashSummary) -> Duplicates:
        """Every member of a group but its earliest (the kept one). A key is in a summary
        once, so it is never the duplicate of itself."""
        by_group = np.lexsort((summary.indices, summary.labels))  # by group, then input order
        labels = summary.labels[by_group]
        first = np.r_[True, labels[1:] != labels[:-1]] if len(labels) else np.ones(0, bool)
        kept = by_group[np.flatnonzero(first)][np.cumsum(first) - 1]  # per row of `by_group`
        duplicates, kept = by_group[~first], kept[~first]
        order = np.argsort(summary.keys[duplicates], kind="stable")
        return cls(summary.keys[duplicates[order]], summary.keys[kept[order]])

    def for_partition(self, partition: Partition) -> Duplicates:
        """Only the duplicates among `partition`'s items."""
        wanted = np.array([item.key for item in partition.items], dtype="S20")
        found = np.searchsorted(self.keys, wanted).clip(max=max(len(self.keys) - 1, 0))
        hits = np.unique(found[self.keys[found] == wanted]) if len(self.keys) else found[:0]
        return Duplicates(self.keys[hits], self.kept[hits])

    def as_dict(self) -> dict[str, str]:
        """Each duplicate's key -> the key kept in its group."""
        return dict(zip(self.keys.astype(str), self.kept.astype(str), strict=True))


@register("dedupe")
class Dedupe(Reducer[DedupeOptions]):
    """Report groups of near-duplicate images across all partitions."""

    Options = DedupeOptions
    description = "Group near-duplicates across the batch by phash distance (tree reduction)"

    dropped: dict[str, str] = {}  # main pass with `drop`: a partition's duplicates -> kept

    @property
    def fan_in(self) -> int:
        return self.options.fan_in

    @property
    def needs_first_pass(self) -> bool:
        return self.options.drop

    @classmethod
    def first_pass_options(cls, options: AnyOptions) -> AnyOptions:
        return options.model_copy(update={"drop": False})

    def fingerprint_data(self) -> dict[str, Any]:
        """Groups span the whole batch, so an incremental run must hash every item again
        (a new fingerprint each run); with `drop`, the first pass already does."""
        data = super().fingerprint_data()
        return data if self.options.drop else {**data, "run": uuid.uuid4().hex}

    @property
    def groups_path(self) -> str:
        return join(self.job.run_dir, f"dedupe-{self.name}.json")

    def first_pass_conclusion(self, summary: HashSummary) -> Duplicates:
        return Duplicates.of(summary)

    def with_conclusion(self, conclusion: Conclusion) -> Dedupe:
        """With `drop`: a copy that skips the duplicates the first pass found."""
        assert isinstance(conclusion, Duplicates)
        bound = copy.copy(self)
        bound.dropped = conclusion.as_dict()
        return bound

    def run_one(self, item: Item) -> Item | None:
        kept = self.dropped.get(item.key)
        if kept is None:
            return super().run_one(item)
        item.record.update(
            status="skipped",
            stage=self.name,
            reason="duplicate",
            message=f"near-duplicate of {kept}",
        )
        return None

    def process(self, item: Item) -> Item:
        """Keep the hash of the nearest `phash` upstream on this branch under this stage's
        name: what `summarize` (on the client, records only) reads."""
        value = item.meta.get("phash")
        if not value:
            raise ItemError("transform_error", f"{self.name} needs a phash stage before it")
        item.record.setdefault("results", {})[self.name] = value
        return item

    def summarize(self, records: list[Record]) -> HashSummary:
        return HashSummary.of(records, self.name)

    def combine(self, summaries: list[HashSummary]) -> HashSummary:
        return merge(summaries, self.options.threshold)

    def conclude(self, summary: HashSummary) -> dict[str, Any]:
        groups = groups_of(summary)
        result = {
            "threshold": self.options.threshold,
            "items": len(summary.keys),
            "groups": len(groups),
            "duplicates": sum(len(group["duplicates"]) for group in groups),
        }
        document = {**result, "dropped": self.options.drop, "members": groups}
        write_output(self.groups_path, json.dumps(document, indent=1).encode())
        return {**result, "file": self.groups_path}
