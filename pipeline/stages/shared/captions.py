"""Captions that sinks store beside an image: taken from a source field (a list column).

A list's other columns land in the record's `fields`; `caption_field` names the one a
sink stores as the item's caption (a webdataset `KEY.txt`, a parquet `caption` column).
"""

from __future__ import annotations

from pydantic import Field

from pipeline.config.model import Options
from pipeline.records import Record, clean_text


class CaptionOptions(Options):
    """Which source field is an item's caption: shared by the sinks that store captions."""

    caption_field: str | None = Field(
        "caption",
        description="Source field (a list column, in the record's `fields`) stored as the "
        "item's caption; items without a non-empty text value get none; null: no captions",
    )


def caption_of(record: Record, field: str | None) -> str | None:
    """The record's `fields[field]` if it is non-empty text (cleaned of lone surrogates)."""
    if field is None:
        return None
    value = (record.get("fields") or {}).get(field)
    if not isinstance(value, str) or not value:
        return None
    return clean_text(value)
