"""`url_list`: read URLs (or paths) from a list file on any fsspec path, lazily.

Formats: `txt` (one per line, `#` comments and blank lines skipped), `csv`, `tsv`,
`jsonl` and `parquet`; `.gz`/`.bz2`/... are decompressed on the fly. Tabular
formats pick the URL from `column`; the other columns (or only those named in
`fields`) travel with the item into its result record and the sinks' metadata.
The file is streamed: text formats in chunks split into lines, parquet batch by
batch, so a 10 GB list is never loaded whole.

Every entry (a txt line that is not blank or a comment, a csv/tsv data row, a
jsonl line that is not blank, a parquet row) becomes exactly one item, whatever it
holds. An entry that cannot be used is an item that fails at this stage, with its
line number and original text: bytes that are not UTF-8 or a line over
MAX_LINE_BYTES (`invalid_input`), corrupt JSON or a JSON value that is not an
object (`invalid_input`), an empty or null URL cell (`empty`), a URL that cannot
be parsed (`invalid_url`). Only a list that cannot be opened is fatal; one that
breaks off mid-way (a truncated gzip) ends with one failed item saying where.
A header (csv, tsv) or schema (parquet) without `column` is a config error.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import urlsplit

import fsspec
from pydantic import Field, PositiveInt, field_validator, model_validator

from pipeline.config.model import Options
from pipeline.errors import ConfigError, ItemError, PipelineError, RunIncompleteError
from pipeline.records import SourceItem, jsonable
from pipeline.stages.base import Source
from pipeline.stages.registry import register
from pipeline.stages.shared.urls import url_text
from pipeline.storage import filesystem

Format = Literal["auto", "txt", "csv", "tsv", "jsonl", "parquet"]
SUFFIXES = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
COUNT_LIMIT_BYTES = 64 * 1024 * 1024
MAX_LINE_BYTES = 1024 * 1024  # a longer line is one `invalid_input` entry, cut here
READ_BYTES = 256 * 1024
EXTRA_CELLS = "_extra"  # the field holding a csv row's cells beyond the header's

# One entry as a reader sees it: (line or row number, its original text, the row as a
# dict, or the ItemError that makes it unusable).
RawEntry = tuple[int, str, "dict[str, Any] | ItemError"]


class UrlListOptions(Options):
    path: str = Field(description="List file: a local path or any fsspec URL (s3://, memory://)")
    format: Format = Field("auto", description="auto (from the suffix) | txt|csv|tsv|jsonl|parquet")
    column: str = Field("url", description="Column (or JSON key) holding the URL")
    fields: list[str] | None = Field(
        None, description="Columns carried into the record's `fields`; default: all others"
    )
    batch_rows: PositiveInt = Field(10_000, description="Parquet rows read at a time")

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str) -> str:
        fs, local = filesystem(path)
        if not fs.isfile(local):
            hint = (
                "check the URL, and the filesystem's credentials and endpoint"
                if "://" in path
                else "paths are relative to the current folder"
            )
            raise ValueError(f"no such file: {path} ({hint})")
        return path

    @model_validator(mode="after")
    def _has_column(self) -> UrlListOptions:
        """A csv/tsv header or parquet schema must name `column` (the list is read once
        more here, only its first row or its schema)."""
        columns = list_columns(self.path, list_format(self.path, self.format))
        if columns is not None and self.column not in columns:
            raise ValueError(missing_column(self.path, self.column, columns))
        return self


def list_format(path: str, declared: str) -> str:
    """The declared format, or the one the suffix names (`.csv.gz` -> csv; else txt)."""
    if declared != "auto":
        return declared
    name = path.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    return SUFFIXES.get(os.path.splitext(name)[1], "txt")


def missing_column(path: str, column: str, columns: list[str]) -> str:
    return (
        f"{path} has no column '{column}' (columns: {', '.join(columns)}); set the stage's 'column'"
    )


def resolve(entry: str, base: str) -> str:
    """URLs stay as they are; a relative path is taken relative to the list's folder.

    No file is looked at (a symlink loop in a path is the download stage's to report).
    """
    try:
        scheme = urlsplit(entry).scheme
    except ValueError as exc:
        raise ItemError("invalid_url", f"{type(exc).__name__}: {exc}") from None
    if scheme and not os.path.isabs(entry):
        return entry
    if "://" in base:
        return f"{base}/{entry}" if not entry.startswith("/") else entry
    return Path(os.path.normpath(os.path.join(base, entry))).as_uri()


def _base(path: str) -> str:
    """The folder relative entries are resolved against: a local dir or a URL prefix."""
    if "://" in path and not path.startswith("file://"):
        return path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path.removeprefix("file://")))


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


def _text_entries(lines: Iterable[Line], column: str) -> Iterator[RawEntry]:
    for line in lines:
        entry = line.text.strip()
        if entry and not entry.startswith("#"):
            yield line.number, entry, _unusable(line) if line.problem else {column: entry}


def _jsonl_entries(lines: Iterable[Line]) -> Iterator[RawEntry]:
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


def _csv_entries(lines: Iterable[Line], delimiter: str) -> Iterator[RawEntry]:
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


def _parquet_entries(handle: Any, column: str, batch_rows: int) -> Iterator[RawEntry]:
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


@register("url_list")
class UrlList(Source[UrlListOptions]):
    """One item per entry of a list file (txt, csv, tsv, jsonl, parquet; maybe compressed)."""

    Options = UrlListOptions
    description = "URLs or paths from a txt/csv/tsv/jsonl/parquet list, streamed"

    def iter_items(self) -> Iterator[SourceItem]:
        base = _base(self.options.path)
        for number, text, row in self._entries():
            yield self.entry(number, text, partial(self._item, number, text, row, base))

    def count_items(self) -> int | None:
        """The entry count for progress, when the list is small enough to read twice;
        None when it is not, or cannot be read (the run itself then says why)."""
        try:
            fs, path = filesystem(self.options.path)
            if fs.size(path) > COUNT_LIMIT_BYTES:
                return None
            return sum(1 for _ in self._entries())
        except (PipelineError, OSError):
            return None

    def _item(
        self, number: int, text: str, row: dict[str, Any] | ItemError, base: str
    ) -> SourceItem:
        """The item of a row; an unusable row's keeps its fields (ItemError if unreadable)."""
        if isinstance(row, ItemError):
            raise row
        fields = self._fields(row)
        column = self.options.column
        try:
            if column not in row:
                keys = ", ".join(map(str, row))[:200]
                raise ItemError("invalid_input", f"no '{column}' key (keys: {keys})")
            cell = url_text(row[column], f"the '{column}' cell")
        except ItemError as error:  # no URL text: the row shows what the entry was
            return SourceItem.invalid(number, text, error.reason, error.message, fields)
        try:
            url = resolve(cell.strip(), base)
        except ItemError as error:
            return SourceItem.invalid(number, cell, error.reason, error.message, fields)
        return SourceItem(number, url, fields, input=None if url == cell else cell)

    def _fields(self, row: dict[str, Any]) -> dict[str, Any]:
        names = self.options.fields if self.options.fields is not None else list(row)
        return {name: jsonable(row.get(name)) for name in names if name != self.options.column}

    def _entries(self) -> Iterator[RawEntry]:
        """Every entry of the list. A list that cannot be opened stops the run; one that
        breaks off mid-way ends with one unusable entry saying where."""
        number = 0
        try:
            for entry in self._read():
                number = entry[0]
                yield entry
        except PipelineError:
            raise
        except Exception as exc:
            message = f"cannot read {self.options.path}: {type(exc).__name__}: {exc}"
            if number == 0:
                raise RunIncompleteError(f"{self.name}: {message}") from None
            after = f"past line {number}"
            yield (
                number + 1,
                f"(the rest of the list, {after})",
                ItemError("invalid_input", message),
            )

    def _read(self) -> Iterator[RawEntry]:
        kind = list_format(self.options.path, self.options.format)
        with fsspec.open(self.options.path, "rb", compression="infer") as handle:
            if kind == "parquet":
                yield from self._checked(
                    _parquet_entries(handle, self.options.column, self.options.batch_rows)
                )
                return
            lines = read_lines(handle)
            if kind == "txt":
                yield from _text_entries(lines, self.options.column)
            elif kind == "jsonl":
                yield from _jsonl_entries(lines)
            else:
                yield from self._checked(_csv_entries(lines, "\t" if kind == "tsv" else ","))

    def _checked(self, entries: Iterator[RawEntry]) -> Iterator[RawEntry]:
        """Entries of a list with a header, which must name `column` (else ConfigError)."""
        column = self.options.column
        for entry in entries:
            row = entry[2]
            if isinstance(row, dict) and column not in row:
                raise ConfigError(missing_column(self.options.path, column, list(row)))
            yield entry
