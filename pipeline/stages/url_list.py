"""`url_list`: read URLs (or local paths) from a text file, one per line, lazily."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from pipeline.config.model import Options
from pipeline.stages.base import Source, SourceItem
from pipeline.stages.registry import register


class UrlListOptions(Options):
    path: str = Field(description="Text file with one URL or path per line ('#' comments)")

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str) -> str:
        if not Path(path).is_file():
            raise ValueError(f"no such file: {path} (paths are relative to the current folder)")
        return path


def resolve(entry: str, base: Path) -> str:
    """URLs stay as they are; a relative path is taken relative to the list's folder."""
    if urlsplit(entry).scheme and not os.path.isabs(entry):
        return entry
    return (base / entry).resolve().as_uri()


@register("url_list")
class UrlList(Source):
    """One item per non-blank, non-comment line of a text file."""

    Options = UrlListOptions
    description = "URLs or paths from a text file"

    def iter_items(self) -> Iterator[SourceItem]:
        path = Path(self.options.path)  # type: ignore[attr-defined]
        base = path.resolve().parent
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                entry = line.strip()
                if entry and not entry.startswith("#"):
                    yield SourceItem(index=number, url=resolve(entry, base))

    def count_items(self) -> int:
        """A local text file: counting its lines is cheap."""
        return sum(1 for _ in self.iter_items())
