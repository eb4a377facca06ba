"""The data that flows through a run: one input entry, its result record, its payload.

    SourceItem   one input entry (a list's line or row), made on the client: small and
                 picklable; an unusable entry carries its `problem`
    Partition    the unit of work: a few dozen items of one source, run as one task
    Record       the small dict per entry that is the only thing a task returns
    Item         a payload (bytes, an image, an array) inside a task, tied to its record
    JobContext   what stages may know about the job: its name and run directory

Every layer uses these; they import nothing of the pipeline but its errors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from pipeline.errors import ItemError


def item_key(url: str) -> str:
    """The stable key of an input: a short hash of its URL."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:20]


class Entry(TypedDict):
    """What a record says about its input entry: kept with the item's outputs."""

    key: str  # a hash of the URL: names the item in the manifest and in output names
    index: int  # the entry's line (or row) number
    url: str


class ShardSample(TypedDict):
    """Where one sample is: its shard (a piece, until the shard is assembled), its
    position there (tar: the n-th sample, members `KEY.*`; parquet: the row; npy: the
    index along axis 0), and about its bytes."""

    path: str
    position: int
    bytes: int


class Outcome(TypedDict, total=False):
    """What a record says about this run's work on the entry: never stored with outputs."""

    input: str  # the entry's original text (at most MAX_INPUT_CHARS)
    status: str  # ok | failed | skipped
    stage: str | None  # where it failed, or was skipped
    reason: str | None  # a code of pipeline.errors.REASONS
    message: str | None
    outputs: list[str]
    sink_outputs: dict[str, list[str]]  # the outputs by sink that wrote them
    shards: dict[str, ShardSample]  # where a sharded sink put the item's sample
    timings: dict[str, float]  # seconds per stage
    attempts: int  # downloads tried


# A record is a JSON-able dict: `Entry` and `Outcome` are its typed core; stages add
# what they measure (`bytes`, `width`, ...), per-stage results under `results`, and the
# list's other columns under `fields`.
Record = dict[str, Any]
OUTCOME_KEYS = frozenset(Outcome.__annotations__)
CORE_KEYS = frozenset(Entry.__annotations__) | OUTCOME_KEYS | {"fields"}
# A record keeps at most this much of an entry's original text (`input`).
MAX_INPUT_CHARS = 4096


def clean_text(text: str) -> str:
    """`text` with lone surrogates (bytes that were not UTF-8, read with surrogateescape,
    or a JSON `\\udXXX`) shown as backslash escapes: safe for JSON, SQLite and parquet."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def jsonable(value: Any) -> Any:
    """Field values must survive JSON results, SQLite and parquet: text is cleaned of
    lone surrogates, other types (dates, bytes, decimals) become text."""
    if isinstance(value, str):
        return clean_text(value)
    if value is None or isinstance(value, bool | int) or _finite(value):
        return value
    if isinstance(value, list | tuple):
        return [jsonable(element) for element in value]
    if isinstance(value, dict):
        return {clean_text(str(key)): jsonable(element) for key, element in value.items()}
    if isinstance(value, bytes):
        return clean_text(value.decode("utf-8", "surrogateescape"))
    return clean_text(str(value))


def _finite(value: Any) -> bool:
    return isinstance(value, float) and value - value == 0  # not inf, -inf or nan


def entry_text(text: str) -> str:
    """An entry's original text as a record keeps it: clean, and at most MAX_INPUT_CHARS."""
    if len(text) <= MAX_INPUT_CHARS and text.isascii():
        return text  # the common case, at no cost
    if len(text) > MAX_INPUT_CHARS:
        text = f"{text[:MAX_INPUT_CHARS]}... ({len(text) - MAX_INPUT_CHARS} more characters)"
    return clean_text(text)


@dataclass(frozen=True)
class SourceItem:
    """One input entry (a list's line or row): small and picklable, made on the client.

    `index` is the entry's line (or row) number, `input` its original text when that is
    not the `url`. An entry that cannot be used (a malformed URL, a corrupt JSON line, an
    empty cell) is still an item, with the `problem` (reason, message) its record fails
    with: every entry gets exactly one record, and no stage runs on a failed one.
    """

    index: int
    url: str
    fields: dict[str, Any] = field(default_factory=dict)
    input: str | None = None
    problem: tuple[str, str] | None = None

    @classmethod
    def invalid(
        cls, index: int, text: str, reason: str, message: str, fields: dict[str, Any] | None = None
    ) -> SourceItem:
        """The item of an unusable entry: keyed and shown by its text."""
        shown = entry_text(text)
        problem = (reason, clean_text(message[:500]))
        return cls(index, shown, fields or {}, input=shown, problem=problem)

    @property
    def key(self) -> str:
        return item_key(self.url)

    def new_record(self, source: str = "source") -> Record:
        """A fresh record; an unusable entry's says it failed at `source`, and why."""
        record: Record = {
            "key": self.key,
            "index": self.index,
            "url": self.url,
            "input": entry_text(self.url if self.input is None else self.input),
            "status": "ok",
            "stage": None,
            "reason": None,
            "message": None,
            "outputs": [],
            "timings": {},
        }
        if self.fields:
            record["fields"] = dict(self.fields)
        if self.problem is not None:
            reason, message = self.problem
            record.update(status="failed", stage=source, reason=reason, message=message)
        return record


def guarded_item(index: int, text: str, build: Callable[[], SourceItem]) -> SourceItem:
    """`build()`, or, if it raises, the unusable entry's item: a bad entry never stops a
    batch (an ItemError keeps its reason; anything else is `invalid_input`)."""
    try:
        return build()
    except ItemError as error:
        return SourceItem.invalid(index, text, error.reason, error.message)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        return SourceItem.invalid(index, text, "invalid_input", message)


@dataclass(frozen=True)
class Partition:
    """The unit of work: a few dozen items from one source, run as one task."""

    index: int
    source: str
    items: tuple[SourceItem, ...]
    sinks: tuple[frozenset[str], ...] | None = None  # per item, the sinks to run; None: all

    def new_records(self) -> list[Record]:
        """One fresh record per item, in order."""
        return [item.new_record(self.source) for item in self.items]


@dataclass(frozen=True)
class JobContext:
    """What stages may know about the job: its name and run directory."""

    name: str
    run_dir: str


@dataclass
class Item:
    """A payload moving through a partition's stages, tied to its result record."""

    record: Record
    data: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.record["key"]

    def derive(self, data: Any, **meta: Any) -> Item:
        """A new item for the same input with a new payload (branches stay independent)."""
        return Item(self.record, data, {**self.meta, **meta})

    def fail(self, stage: str, error: ItemError) -> None:
        """Mark the input failed at `stage`; the first failure of an input wins."""
        if self.record["status"] != "failed":
            self.record.update(
                status="failed", stage=stage, reason=error.reason, message=error.message[:500]
            )
