"""Helpers shared by sinks: safe output names and atomic writes."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import unicodedata
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from pipeline.errors import ItemError, RunIncompleteError
from pipeline.stages.base import Record

# Errors that no other item could avoid either: stop the run instead of failing every item.
FATAL_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.ENOTDIR}
# Names of the temp files `atomic_write` renames into place; a killed run may leave some.
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".part"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_STEM = 40


def safe_stem(url: str) -> str:
    """A short, filesystem-safe stem from the last path segment of a URL (may be '')."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return _UNSAFE.sub("_", stem).strip("_-")[:MAX_STEM].lower()


def output_name(record: Record, extension: str, suffix: str = "") -> str:
    """`<stem>-<key>[-suffix].<ext>`: unique per URL (the key), never a path."""
    stem = safe_stem(record["url"])
    parts = [part for part in (stem, record["key"], _UNSAFE.sub("_", suffix)) if part]
    return "-".join(parts) + "." + extension


def atomic_write(path: str, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def output_error(exc: OSError, path: str) -> Exception:
    """The error to raise for a failed write: fatal for the run, or for this item only."""
    message = f"cannot write {path}: {exc.strerror or exc}"
    if exc.errno in FATAL_ERRNOS:
        return RunIncompleteError(message)
    return ItemError("write_error", message)
