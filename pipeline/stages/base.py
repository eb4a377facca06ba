"""What a stage is: its three roles, and how a step runs one item.

Three roles:

* `Source` runs on the client and yields `SourceItem`s lazily (a URL and its
  extra fields). Items are grouped into partitions and shipped to tasks.
* `Step` runs inside a partition's task: it turns one `Item` into another
  (download: URL -> bytes, decode: bytes -> image, thumbnail: image -> image).
* `Sink` is a step at the end of a branch: it writes the item and records the
  output path in the item's result record.

The data they pass (`SourceItem`, `Item`, its `Record`) is in `pipeline.records`. Stage
objects are shared by the threads of a worker, so they keep no per-item state; a stage
that needs per-partition state (a tar shard) returns a fresh object from `for_partition`.

Every role is generic over its options model: a kind declares
`class Thumbnail(Step[ThumbnailOptions])`, so `self.options` is a `ThumbnailOptions` to
a type checker, and also sets `Options = ThumbnailOptions`, the class the plan validates
a config's options with (and the schema describes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pipeline.config.model import Options
from pipeline.errors import ItemError, PipelineError
from pipeline.records import Item, JobContext, Partition, SourceItem, guarded_item

# Inside a stage's class body `Options` names the class attribute, so annotations there
# use this name for the base model.
AnyOptions = Options
OptionsT = TypeVar("OptionsT", bound=AnyOptions)


class Stage(Generic[OptionsT]):
    """Base of every stage kind. Subclasses set `kind`, `role` and `Options` (the model
    `OptionsT` stands for: the one the plan validates the stage's options with)."""

    kind: ClassVar[str]
    role: ClassVar[str]
    Options: ClassVar[type[AnyOptions]] = AnyOptions
    description: ClassVar[str] = ""
    # Options that change speed or politeness, never an item's outputs (not fingerprinted).
    tuning_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, options: OptionsT, job: JobContext):
        self.name = name
        self.options: OptionsT = options
        self.job = job

    @classmethod
    def upstream_problems(
        cls, options: AnyOptions, upstream: Sequence[tuple[str, AnyOptions]]
    ) -> list[tuple[str, str]]:
        """What a stage of this kind needs from the stages above it (`upstream`: the kind
        and options of each) and does not find: (option, message) pairs, which the plan
        reports as config errors at that option. None by default."""
        return []

    def connect(self, consumers: list[Stage]) -> None:
        """Called once the DAG is built with the stages that read this one's output."""

    def connect_inputs(self, inputs: list[Stage]) -> None:
        """Called once the DAG is built with the stages this one reads from."""

    def fingerprint_data(self) -> dict[str, Any]:
        """What this stage's output depends on besides its input; a change redoes items."""
        return self.options.model_dump(mode="json", exclude=set(self.tuning_options))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class Source(Stage[OptionsT]):
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


class Step(Stage[OptionsT]):
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

    def for_partition(self, partition: Partition) -> Step[OptionsT]:
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


def consumers_box(consumers: list[Stage]) -> tuple[tuple[int, int] | None, bool]:
    """The square box big enough for every step among `consumers` (their largest
    `preferred_input_size`), and whether each only fits its output inside its own; (None,
    False) if any needs full resolution. What a decoder may draft to, and what a step that
    passes images on unchanged (a filter) prefers in turn."""
    steps = [consumer for consumer in consumers if isinstance(consumer, Step)]
    sizes = [step.preferred_input_size() for step in steps]
    if not sizes or not all(sizes):
        return None, False
    side = max(max(size) for size in sizes if size)
    return (side, side), all(step.fits_inside_preferred_size() for step in steps)


class Sink(Step[OptionsT]):
    """A step that writes items; it returns nothing for further stages."""

    role = "sink"

    def add_output(self, item: Item, path: str | Path) -> None:
        """Record a written output, also under this sink's name (what the manifest keeps)."""
        item.record["outputs"].append(str(path))
        item.record.setdefault("sink_outputs", {}).setdefault(self.name, []).append(str(path))
