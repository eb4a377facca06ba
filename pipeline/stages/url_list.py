"""`url_list`: read URLs (or paths) from a list file on any fsspec path, lazily.

Formats: `txt` (one per line, `#` comments and blank lines skipped), `csv`, `tsv`,
`jsonl` and `parquet`; `.gz`/`.bz2`/... are decompressed on the fly. Tabular
formats pick the URL from `column`; the other columns (or only those named in
`fields`) travel with the item into its result record and the sinks' metadata.
The file is streamed (`shared/list_formats`): text formats in chunks split into lines,
parquet batch by batch, so a 10 GB list is never loaded whole.

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

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import fsspec
from pydantic import Field, PositiveInt, field_validator, model_validator

from pipeline.config.model import Options
from pipeline.errors import ConfigError, ItemError, PipelineError, RunIncompleteError
from pipeline.records import SourceItem, jsonable
from pipeline.stages.base import Source
from pipeline.stages.registry import register
from pipeline.stages.shared.list_formats import (
    RawEntry,
    csv_entries,
    jsonl_entries,
    list_columns,
    parquet_entries,
    read_lines,
    text_entries,
)
from pipeline.stages.shared.urls import url_text
from pipeline.storage import filesystem

Format = Literal["auto", "txt", "csv", "tsv", "jsonl", "parquet"]
SUFFIXES = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
COUNT_LIMIT_BYTES = 64 * 1024 * 1024


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
                    parquet_entries(handle, self.options.column, self.options.batch_rows)
                )
                return
            lines = read_lines(handle)
            if kind == "txt":
                yield from text_entries(lines, self.options.column)
            elif kind == "jsonl":
                yield from jsonl_entries(lines)
            else:
                yield from self._checked(csv_entries(lines, "\t" if kind == "tsv" else ","))

    def _checked(self, entries: Iterator[RawEntry]) -> Iterator[RawEntry]:
        """Entries of a list with a header, which must name `column` (else ConfigError)."""
        column = self.options.column
        for entry in entries:
            row = entry[2]
            if isinstance(row, dict) and column not in row:
                raise ConfigError(missing_column(self.options.path, column, list(row)))
            yield entry
