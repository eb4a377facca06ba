"""What a stage is, and the data that flows between stages inside a task.

Three roles:

* `Source` runs on the client and yields `SourceItem`s lazily (a URL and its
  extra fields). Items are grouped into partitions and shipped to tasks.
* `Step` runs inside a partition's task: it turns one `Item` into another
  (download: URL -> bytes, decode: bytes -> image, thumbnail: image -> image).
* `Sink` is a step at the end of a branch: it writes the item and records the
  output path in the item's result record.

An `Item` carries the heavy payload (bytes, a Pillow image, an array) and a
reference to its input line's result `record`, a small dict that is the only
thing that travels back to the client. Stage objects are shared by the
threads of a worker, so they keep no per-item state; a stage that needs
per-partition state (a tar shard) returns a fresh object from `for_partition`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.config.model import Options
from pipeline.errors import ItemError, PipelineError

Record = dict[str, Any]


def item_key(url: str) -> str:
    """The stable key of an input: a short hash of its URL."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:20]


# The keys of a record that the pipeline keeps (a stage's own results go elsewhere).
CORE_KEYS = frozenset(
    {"key", "index", "url", "input", "status", "stage", "reason", "message", "outputs"}
    | {"sink_outputs", "timings", "attempts", "fields"}
)
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
            "input": self.url if self.input is None else self.input,
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


class Stage:
    """Base of every stage kind. Subclasses set `kind`, `role` and `Options`."""

    kind: ClassVar[str]
    role: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    description: ClassVar[str] = ""
    # Options that change speed or politeness, never an item's outputs (not fingerprinted).
    tuning_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, options: Options, job: JobContext):
        self.name = name
        self.options = options
        self.job = job

    def connect(self, consumers: list[Stage]) -> None:
        """Called once the DAG is built with the stages that read this one's output."""

    def connect_inputs(self, inputs: list[Stage]) -> None:
        """Called once the DAG is built with the stages this one reads from."""

    def fingerprint_data(self) -> dict[str, Any]:
        """What this stage's output depends on besides its input; a change redoes items."""
        return self.options.model_dump(mode="json", exclude=set(self.tuning_options))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class Source(Stage):
    """Yields the job's inputs on the client, lazily."""

    role = "source"

    def iter_items(self) -> Iterator[SourceItem]:
        raise NotImplementedError

    def count_items(self) -> int | None:
        """How many items `iter_items` yields, if that is cheap to know (for ETAs)."""
        return None

    def entry(self, index: int, text: str, build: Callable[[], SourceItem]) -> SourceItem:
        """The item of one entry: `build()`, or the unusable entry's item if it raises."""
        return guarded_item(index, text, build)


class Step(Stage):
    """Turns one item into another inside a task."""

    role = "step"

    def process(self, item: Item) -> Item:
        """Return the transformed item, or raise ItemError."""
        raise NotImplementedError

    def preferred_input_size(self) -> tuple[int, int] | None:
        """The largest image size this step needs, or None if it needs full resolution.

        A decoder whose consumers all give a size decodes JPEGs at a reduced scale.
        """
        return None

    def fits_inside_preferred_size(self) -> bool:
        """True if this step's output fits inside `preferred_input_size()` (a thumbnail),
        so a decoder may shrink the input until its longer side reaches the box. False if
        the output must fill the box (cover, stretch): each side must reach it then."""
        return True

    def for_partition(self, partition: Partition) -> Step:
        """The object that processes one partition; override for per-partition state."""
        return self

    def stream(self, items: Iterable[Item]) -> Iterator[Item]:
        """Process items in order, dropping failed ones (their record says why)."""
        for item in items:
            result = self.run_one(item)
            if result is not None:
                yield result

    def run_one(self, item: Item) -> Item | None:
        """`process` with timing and failure recording."""
        started = time.perf_counter()
        try:
            return self.process(item)
        except ItemError as error:
            item.fail(self.name, error)
        except PipelineError:  # the run cannot go on (e.g. the output disk is full)
            raise
        except Exception as error:  # a bug or an unexpected library error: record, go on
            item.fail(self.name, ItemError("internal_error", f"{type(error).__name__}: {error}"))
        finally:
            timings = item.record["timings"]
            timings[self.name] = round(
                timings.get(self.name, 0.0) + time.perf_counter() - started, 6
            )
        return None

    def finish(self) -> None:
        """Called once at the end of the partition (flush a shard, ...)."""


class Sink(Step):
    """A step that writes items; it returns nothing for further stages."""

    role = "sink"

    def add_output(self, item: Item, path: str | Path) -> None:
        """Record a written output, also under this sink's name (what the manifest keeps)."""
        item.record["outputs"].append(str(path))
        item.record.setdefault("sink_outputs", {}).setdefault(self.name, []).append(str(path))
