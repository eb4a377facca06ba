"""Group a lazy stream of source items into partitions, the unit of work."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

from pipeline.records import Partition, SourceItem


def partitions(
    source: str, items: Iterable[SourceItem], size: int, start: int = 0
) -> Iterator[Partition]:
    """Yield partitions of at most `size` items, reading `items` only as far as needed."""
    iterator = iter(items)
    index = start
    while chunk := tuple(islice(iterator, size)):
        yield Partition(index=index, source=source, items=chunk)
        index += 1
