"""URLs as the stages read them."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import ItemError
from pipeline.records import clean_text


def url_text(value: Any, where: str) -> str:
    """A URL as a list or an API gave it (`where` names the place: "the 'url' cell"), as
    text; ItemError if it is empty, null, not text, or not valid Unicode."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ItemError("empty", f"{where} is {'null' if value is None else 'empty'}")
    if not isinstance(value, str):
        raise ItemError("invalid_input", f"{where} holds a {type(value).__name__}, not text")
    if clean_text(value) != value:
        raise ItemError("invalid_input", f"{where} is not valid Unicode text")
    return value


def url_scheme(url: str) -> str:
    """The lower-case scheme; '' (a plain path) counts as 'file'."""
    if "\x00" in url or any(ch in url for ch in "\r\n"):
        raise ItemError("invalid_url", "the URL contains NUL or a line break")
    try:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https") and not parts.hostname:
            raise ItemError("invalid_url", f"no host in {url[:200]!r}")
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ItemError("invalid_url", f"{exc}: {url[:200]!r}") from None
    return parts.scheme.lower() or "file"
