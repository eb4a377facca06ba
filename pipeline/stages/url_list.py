"""`url_list`: read URLs (or paths) from a list file on any fsspec path, lazily.

Formats: `txt` (one per line, `#` comments and blank lines skipped), `csv`, `tsv`,
`jsonl` and `parquet`; `.gz`/`.bz2`/... are decompressed on the fly. Tabular
formats pick the URL from `column`; the other columns (or only those named in
`fields`) travel with the item into its result record and the sinks' metadata.
The file is streamed: text formats line by line, parquet batch by batch, so a
10 GB list is never loaded whole.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import fsspec
from pydantic import Field, PositiveInt, field_validator

from pipeline.config.model import Options
from pipeline.errors import ConfigError
from pipeline.stages.base import Source, SourceItem
from pipeline.stages.outputs import filesystem
from pipeline.stages.registry import register

Format = Literal["auto", "txt", "csv", "tsv", "jsonl", "parquet"]
SUFFIXES = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SUFFIXES |= {".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
Row = tuple[int, dict[str, Any]]
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


def list_format(path: str, declared: str) -> str:
    """The declared format, or the one the suffix names (`.csv.gz` -> csv; else txt)."""
    if declared != "auto":
        return declared
    name = path.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    return SUFFIXES.get(os.path.splitext(name)[1], "txt")


def resolve(entry: str, base: str) -> str:
    """URLs stay as they are; a relative path is taken relative to the list's folder."""
    if urlsplit(entry).scheme and not os.path.isabs(entry):
        return entry
    if "://" in base:
        return f"{base}/{entry}" if not entry.startswith("/") else entry
    return Path(base, entry).resolve().as_uri()


def _base(path: str) -> str:
    """The folder relative entries are resolved against: a local dir or a URL prefix."""
    if "://" in path and not path.startswith("file://"):
        return path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path.removeprefix("file://")))


def _text_rows(handle: io.TextIOBase, column: str) -> Iterator[Row]:
    for number, line in enumerate(handle, start=1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield number, {column: entry}


def _csv_rows(handle: io.TextIOBase, delimiter: str) -> Iterator[Row]:
    reader = csv.DictReader(handle, delimiter=delimiter)
    for row in reader:
        yield reader.line_num, row


def _jsonl_rows(handle: io.TextIOBase, path: str) -> Iterator[Row]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{path}:{number}: each line must be a JSON object")
        yield number, row


def _parquet_rows(handle: Any, batch_rows: int) -> Iterator[Row]:
    import pyarrow.parquet as pq  # only parquet lists pay for importing pyarrow

    number = 0
    for batch in pq.ParquetFile(handle).iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _jsonable(value: Any) -> Any:
    """Field values must survive JSON results: other types (dates, bytes) become text."""
    if value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    return str(value)


@register("url_list")
class UrlList(Source):
    """One item per entry of a list file (txt, csv, tsv, jsonl, parquet; maybe compressed)."""

    Options = UrlListOptions
    description = "URLs or paths from a txt/csv/tsv/jsonl/parquet list, streamed"

    def iter_items(self) -> Iterator[SourceItem]:
        base = _base(self.options.path)  # type: ignore[attr-defined]
        for number, entry, row in self._entries():
            yield SourceItem(number, resolve(entry, base), self._fields(row))

    def count_items(self) -> int | None:
        """The item count for progress, when the list is small enough to read twice.

        Counts the entries without resolving paths or building items: only the number matters.
        """
        fs, path = filesystem(self.options.path)  # type: ignore[attr-defined]
        if fs.size(path) > COUNT_LIMIT_BYTES:
            return None
        return sum(1 for _ in self._entries())

    def _entries(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """(line number, non-empty entry, row) of each row; a missing column is an error."""
        options: UrlListOptions = self.options  # type: ignore[assignment]
        for number, row in self._rows():
            if options.column not in row:
                raise ConfigError(
                    f"{options.path}:{number}: no column '{options.column}' "
                    f"(columns: {', '.join(map(str, row))}); set the stage's 'column'"
                )
            entry = str(row[options.column] or "").strip()
            if entry:
                yield number, entry, row

    def _fields(self, row: dict[str, Any]) -> dict[str, Any]:
        options: UrlListOptions = self.options  # type: ignore[assignment]
        names = options.fields if options.fields is not None else list(row)
        names = [name for name in names if name != options.column]
        return {name: _jsonable(row.get(name)) for name in names}

    def _rows(self) -> Iterator[Row]:
        options: UrlListOptions = self.options  # type: ignore[assignment]
        kind = list_format(options.path, options.format)
        if kind == "parquet":
            with fsspec.open(options.path, "rb", compression="infer") as handle:
                yield from _parquet_rows(handle, options.batch_rows)
            return
        with fsspec.open(options.path, "rt", compression="infer", encoding="utf-8") as handle:
            if kind == "txt":
                yield from _text_rows(handle, options.column)
            elif kind == "jsonl":
                yield from _jsonl_rows(handle, options.path)
            else:
                yield from _csv_rows(handle, "\t" if kind == "tsv" else ",")
