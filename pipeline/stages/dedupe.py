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
`dedupe` run once first (a second download and decode, no writes) on the items the
index does not hold yet; earlier runs' items come from the index. The first pass
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

An index that grows across runs (see "keeps_index" in `pipeline.stages.shared.reducing`):
the manifest keeps every committed item's hash, so a run groups its new items with
every earlier run's items, whether or not they are in this run's input, without
downloading or hashing them again; items done before are skipped as `unchanged` (the
stage's fingerprint is only `by`: `threshold` and `drop` change the groups, which are
found again every run from the index, not an item's result). An item's input index
becomes its order (`first_new + index` for this run's, lower for every earlier run's),
so a group keeps its earliest run's earliest item, and with `drop` a new item that
duplicates an earlier one is dropped, never the earlier one. `by: sha256` groups
exact duplicates (the same bytes under other URLs) by the download's `sha256`, with
the same machinery: the summary holds the 64 hex digits instead of a 64-bit hash and
`threshold` is ignored (0).
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, PositiveInt

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.records import Item, Partition, Record
from pipeline.stages.base import AnyOptions
from pipeline.stages.registry import register
from pipeline.stages.shared.reducing import Conclusion, IndexRow, Reducer
from pipeline.storage import join, write_output

PAIR_CHUNK = 4_000_000  # hash comparisons per array operation (~32 MB of uint64)


class DedupeOptions(Options):
    by: Literal["phash", "sha256"] = Field(
        "phash",
        description="phash: near-duplicates by the nearest phash upstream; sha256: exact "
        "duplicates (same bytes) by the download's sha256",
    )
    threshold: int = Field(
        8, ge=0, le=31, description="Max Hamming distance (bits of 64); ignored with sha256"
    )
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
    def of(
        cls, records: list[Record], name: str, by: str = "phash", first_new: int = 0
    ) -> HashSummary:
        """The ok records' hashes, as the `dedupe` stage `name` kept them in `results`,
        each in order `first_new + index` (this run's items after every earlier one)."""
        hashed = [(r, r.get("results", {}).get(name)) for r in records if r["status"] == "ok"]
        return cls.of_rows([(r["key"], v, first_new + r["index"]) for r, v in hashed if v], by)

    @classmethod
    def of_rows(cls, rows: list[IndexRow], by: str = "phash") -> HashSummary:
        """(key, hash as hex, order) rows, as the manifest keeps them."""
        return one_per_key(
            cls(
                np.array([key for key, _, _ in rows], dtype="S20"),
                np.array([order for _, _, order in rows], dtype=np.int64),
                hash_array([value for _, value, _ in rows], by),
                np.arange(len(rows), dtype=np.int64),
            )
        )


def hash_array(values: list[str], by: str) -> np.ndarray:
    """phash: 64-bit hashes (16 hex digits) as uint64; sha256: the 64 hex digits as bytes
    (compared for equality only)."""
    if by == "sha256":
        return np.array([value.encode() for value in values], dtype="S64")
    return np.array([int(value, 16) for value in values], dtype=np.uint64)


def distances(hashes: np.ndarray, value: Any) -> np.ndarray:
    """Bits that differ between each of `hashes` and `value` (sha256: 0 or 64)."""
    if hashes.dtype.kind == "u":
        return np.bitwise_count(hashes ^ value).astype(np.int64)
    return (hashes != value).astype(np.int64) * 64


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
    summaries = [summary for summary in summaries if len(summary.keys)] or summaries[:1]
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


def groups_of(summary: HashSummary, first_new: int | None = None) -> list[dict[str, Any]]:
    """Groups of two or more, each as the kept key (earliest in order) and its duplicates.

    Given `first_new` (the order of this run's first item), each group also lists its
    members `new` in this run, each with the earlier member it `matches`: the nearest
    one (fewest differing bits, then earliest), with its `distance`; None if the group
    has no earlier member.
    """
    by_group = np.lexsort((summary.indices, summary.labels))  # by group, then order
    labels = summary.labels[by_group]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(labels) else []
    found = []
    for members in np.split(by_group, starts[1:]) if len(labels) else []:
        if len(members) < 2:
            continue
        keys = [key.decode() for key in summary.keys[members]]
        group: dict[str, Any] = {"keep": keys[0], "duplicates": keys[1:]}
        if first_new is not None:
            is_new = summary.indices[members] >= first_new
            earlier = members[~is_new]
            group["new"] = [
                {"key": keys[position], "matches": _match(summary, earlier, members[position])}
                for position in np.flatnonzero(is_new)
            ]
        found.append(group)
    return sorted(found, key=lambda group: group["keep"])


def _match(summary: HashSummary, earlier: np.ndarray, member: int) -> dict[str, Any] | None:
    if not len(earlier):
        return None
    gaps = distances(summary.hashes[earlier], summary.hashes[member])
    nearest = int(np.argmin(gaps))  # the first of the nearest: `earlier` is in order
    return {"key": summary.keys[earlier[nearest]].decode(), "distance": int(gaps[nearest])}


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

    @classmethod
    def upstream_problems(
        cls, options: AnyOptions, upstream: Sequence[tuple[str, AnyOptions]]
    ) -> list[tuple[str, str]]:
        """`by: sha256` needs a download above that computes sha256; `by: phash` a phash."""
        assert isinstance(options, DedupeOptions)
        if options.by == "sha256":
            found = any("sha256" in getattr(above, "computed_hashes", ()) for _, above in upstream)
            needs = "a download above it that computes sha256: add sha256 to its hashes"
            other = "phash"
        else:
            found = any(kind == "phash" for kind, _ in upstream)
            needs, other = "a phash stage above it (kind: phash)", "sha256 (exact duplicates)"
        return [] if found else [("by", f"by: {options.by} needs {needs}, or group by: {other}")]

    @property
    def fan_in(self) -> int:
        return self.options.fan_in

    @property
    def needs_first_pass(self) -> bool:
        return self.options.drop

    @classmethod
    def first_pass_options(cls, options: AnyOptions) -> AnyOptions:
        return options.model_copy(update={"drop": False})

    @property
    def threshold(self) -> int:
        """The Hamming distance used: sha256 finds exact duplicates only."""
        return 0 if self.options.by == "sha256" else self.options.threshold

    @property
    def keeps_index(self) -> bool:
        return True

    def fingerprint_data(self) -> dict[str, Any]:
        """An item's result here is the hash it kept, which depends on `by` (and on the
        stages upstream) only: `threshold` and `drop` change the groups, which every run
        finds again from the manifest's index, so items done stay done."""
        return {"by": self.options.by}

    def index_value(self, record: Record) -> str | None:
        """The hash an ok record kept under this stage's name: the manifest's index."""
        if record["status"] != "ok":
            return None
        return record.get("results", {}).get(self.name) or None

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
            message=f"{'exact' if self.options.by == 'sha256' else 'near'}-duplicate of {kept}",
        )
        return None

    def process(self, item: Item) -> Item:
        """Keep the hash of the nearest `phash` upstream on this branch (or the download's
        `sha256`) under this stage's name: what `summarize` (on the client, records only)
        reads, and what the manifest keeps."""
        if self.options.by == "sha256":
            value = item.record.get("sha256")
            if not value:
                raise ItemError("transform_error", f"{self.name} needs a download before it")
        else:
            value = item.meta.get("phash")
            if not value:
                raise ItemError("transform_error", f"{self.name} needs a phash stage before it")
        item.record.setdefault("results", {})[self.name] = value
        return item

    def summarize(self, records: list[Record]) -> HashSummary:
        return HashSummary.of(records, self.name, self.options.by, self.index.first_new)

    def summarize_index(self, rows: list[IndexRow]) -> HashSummary:
        return HashSummary.of_rows(rows, self.options.by)

    def combine(self, summaries: list[HashSummary]) -> HashSummary:
        return merge(summaries, self.threshold)

    def conclude(self, summary: HashSummary) -> dict[str, Any]:
        """The groups file and the report's section. Each group says which members are
        new in this run and which earlier item each matches, with URLs."""
        first_new = self.index.first_new
        groups = groups_of(summary, first_new)
        new = [member for group in groups for member in group["new"]]
        urls = self.index.urls(
            {m["key"] for m in new} | {m["matches"]["key"] for m in new if m["matches"]}
        )
        for member in new:
            member["url"] = urls.get(member["key"])
            if member["matches"]:
                member["matches"]["url"] = urls.get(member["matches"]["key"])
        result = {
            "by": self.options.by,
            "threshold": self.threshold,
            "items": len(summary.keys),
            "groups": len(groups),
            "duplicates": sum(len(group["duplicates"]) for group in groups),
            "new_items": int(np.count_nonzero(summary.indices >= first_new)),
            "new_duplicates": sum(
                m["key"] != group["keep"] for group in groups for m in group["new"]
            ),
            "new_matching_earlier": sum(1 for member in new if member["matches"]),
        }
        document = {**result, "dropped": self.options.drop, "members": groups}
        write_output(self.groups_path, json.dumps(document, indent=1).encode())
        return {**result, "file": self.groups_path}
