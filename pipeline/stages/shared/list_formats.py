"""Reading list files entry by entry, in bounded memory: txt, jsonl, csv/tsv and parquet.

Each reader yields `RawEntry`s: (line or row number, the entry's original text, its row
as a dict, or the ItemError that makes it unusable). Text is read in chunks and split on
b"\\n"; a line over MAX_LINE_BYTES is cut there, and bytes that are not UTF-8 become
surrogate escapes: both make the entry unusable, never the list. `url_list` turns the
entries into items.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec

from pipeline.errors import ItemError
from pipeline.records import jsonable

MAX_LINE_BYTES = 1024 * 1024  # a longer line is one `invalid_input` entry, cut here
READ_BYTES = 256 * 1024
EXTRA_CELLS = "_extra"  # the field holding a csv row's cells beyond the header's

# One entry as a reader sees it: (line or row number, its original text, the row as a
# dict, or the ItemError that makes it unusable).
RawEntry = tuple[int, str, "dict[str, Any] | ItemError"]


@dataclass(frozen=True)
class Line:
    """One line of a text list: its number, its text without the newline (bytes that
    are not UTF-8 as surrogate escapes), and why it cannot be an entry, if it cannot."""

    number: int
    text: str
    problem: str | None = None


def read_lines(handle: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[Line]:
    """The lines of a binary stream, split on b"\\n", in bounded memory: a line longer
    than `limit` bytes is cut there (and says so); a UTF-8 byte-order mark is dropped."""
    for number, (raw, cut) in enumerate(_raw_lines(handle, limit), start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        try:
            text, problem = raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            text, problem = raw.decode("utf-8", "surrogateescape"), f"byte {exc.start + 1}"
            problem = f"not valid UTF-8 (at {problem})"
        if cut:
            problem = f"longer than {limit} bytes"
        yield Line(number, text, problem)


def _raw_lines(handle: IO[bytes], limit: int) -> Iterator[tuple[bytes, bool]]:
    """(bytes of a line, whether it was cut at `limit`), reading up to READ_BYTES at a time
    (`read1` where there is one: a stream that breaks off gives up what came before)."""
    read = getattr(handle, "read1", handle.read)
    line, cut = b"", False
    while chunk := read(READ_BYTES):
        *complete, rest = chunk.split(b"\n")
        for piece in complete:
            yield _extend(line, cut, piece, limit)
            line, cut = b"", False
        line, cut = _extend(line, cut, rest, limit)
    if line or cut:
        yield line, cut


def _extend(line: bytes, cut: bool, piece: bytes, limit: int) -> tuple[bytes, bool]:
    room = limit - len(line)
    if len(piece) > room:
        return line + piece[: max(room, 0)], True
    return line + piece, cut


def _unusable(line: Line) -> ItemError:
    return ItemError("invalid_input", f"line {line.number} is {line.problem}")


def text_entries(lines: Iterable[Line], column: str) -> Iterator[RawEntry]:
    for line in lines:
        entry = line.text.strip()
        if entry and not entry.startswith("#"):
            yield line.number, entry, _unusable(line) if line.problem else {column: entry}


def jsonl_entries(lines: Iterable[Line]) -> Iterator[RawEntry]:
    for line in lines:
        text = line.text.strip()
        if text:
            yield line.number, text, _unusable(line) if line.problem else _json_object(text)


def _json_object(text: str) -> dict[str, Any] | ItemError:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return ItemError("invalid_input", f"not valid JSON: {exc}")
    if not isinstance(value, dict):
        return ItemError("invalid_input", f"a JSON {type(value).__name__}, not an object")
    return value


class _RowLines:
    """Feeds lines to the csv module and remembers the ones the current row is made of."""

    def __init__(self, lines: Iterable[Line]):
        self.lines = iter(lines)
        self.taken: list[Line] = []

    def __iter__(self) -> _RowLines:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        self.taken.append(line)
        return line.text + "\n"

    def take(self) -> tuple[int, str, Line | None]:
        """The current row's first line number, original text and first unusable line."""
        taken, self.taken = self.taken, []
        text = "\n".join(line.text for line in taken).rstrip("\r\n")
        unusable = next((line for line in taken if line.problem), None)
        return (taken[0].number if taken else 0), text, unusable


def csv_entries(lines: Iterable[Line], delimiter: str) -> Iterator[RawEntry]:
    """Data rows as the csv module reads them (blank lines skipped), each with its lines."""
    feed = _RowLines(lines)
    reader = csv.reader(feed, delimiter=delimiter)
    header: list[str] | None = None
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if header is None:  # no header: no row can be read
                raise ValueError(f"the header row is not valid CSV: {exc}") from None
            number, text, _ = feed.take()
            yield number, text, ItemError("invalid_input", f"not valid CSV: {exc}")
            continue
        number, text, unusable = feed.take()
        if header is None:
            header = cells
        elif cells:
            yield number, text, _unusable(unusable) if unusable else _cells(header, cells)


def _cells(header: list[str], cells: list[str]) -> dict[str, Any]:
    """A row by column name; missing cells are None, extra ones go to EXTRA_CELLS."""
    row: dict[str, Any] = dict.fromkeys(header)
    row.update(zip(header, cells, strict=False))
    if len(cells) > len(header):
        row[EXTRA_CELLS] = cells[len(header) :]
    return row


def parquet_entries(handle: Any, column: str, batch_rows: int) -> Iterator[RawEntry]:
    import pyarrow.parquet as pq  # only parquet lists pay for importing pyarrow

    number = 0
    for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            number += 1
            value = row.get(column)
            text = value if isinstance(value, str) else json.dumps(jsonable(row))
            yield number, text, row


def list_columns(path: str, kind: str) -> list[str] | None:
    """The columns a csv/tsv header or a parquet schema names; None for other formats
    or when the list cannot be read (the run then says why)."""
    if kind not in ("csv", "tsv", "parquet"):
        return None
    try:
        with fsspec.open(path, "rb", compression="infer") as handle:
            if kind == "parquet":
                import pyarrow.parquet as pq

                return list(pq.ParquetFile(handle).schema_arrow.names)
            lines = read_lines(handle)
            return next(csv.reader(_RowLines(lines), delimiter="\t" if kind == "tsv" else ","), [])
    except Exception:
        return None
