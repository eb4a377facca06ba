"""Other schemes (memory://, s3://, ...) read through fsspec, when a config allows them."""

from __future__ import annotations

import fsspec

from pipeline.errors import ItemError


def read_fsspec(url: str, max_bytes: int) -> bytes:
    """The bytes of the file at `url`, refusing directories and files over `max_bytes`."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ItemError("blocked_scheme", f"no filesystem for {url[:100]}: {exc}") from None
    try:
        info = fs.info(path)
        if info.get("type") != "file":
            raise ItemError("not_regular_file", f"{url} is a {info.get('type', 'special file')}")
        size = info.get("size")
        if size is not None and size > max_bytes:
            raise ItemError("too_large", f"{size} bytes exceeds {max_bytes}")
        with fs.open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise ItemError("not_found", f"no such file: {url}") from None
    except OSError as exc:
        raise ItemError("connection_error", f"{url}: {exc}") from None
    if len(data) > max_bytes:
        raise ItemError("too_large", f"more than {max_bytes} bytes")
    return data
