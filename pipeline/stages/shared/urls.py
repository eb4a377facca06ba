"""URLs as the stages read them."""

from __future__ import annotations

from urllib.parse import urlsplit

from pipeline.errors import ItemError


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
