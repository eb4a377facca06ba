"""Content hashes of the downloaded bytes, and their check against the list's own.

Hashed once per item in the download stage, where the bytes already are: for every
scheme, the bytes as fetched (after any HTTP Content-Encoding is undone, before any
image decoding). `hashlib` releases the GIL on buffers this size, so download
threads hash in parallel.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterable
from typing import Any, Literal

from pipeline.errors import ItemError
from pipeline.records import Record

HashName = Literal["sha256", "md5", "sha1", "xxh64"]
SHOWN = 16  # hex digits of each hash a mismatch message shows


def check_available(name: str) -> str:
    """`name` if this process can compute it; ValueError (a config error) if not."""
    if name == "xxh64" and importlib.util.find_spec("xxhash") is None:
        raise ValueError("xxh64 needs the xxhash package: pip install xxhash")
    return name


def _hasher(name: str) -> Any:
    if name == "xxh64":
        import xxhash  # type: ignore[import-not-found]  # optional: checked at validation

        return xxhash.xxh64()
    return hashlib.new(name, usedforsecurity=False)  # md5 and sha1 also under FIPS


def digests(data: bytes, names: Iterable[str]) -> dict[str, str]:
    """The hex digest of `data` under each algorithm in `names`."""
    found = {}
    for name in names:
        hasher = _hasher(name)
        hasher.update(data)
        found[name] = hasher.hexdigest()
    return found


def verify(record: Record, column: str, algorithm: str, got: str) -> None:
    """Fail as `hash_mismatch` if the list's `column` gives a hash other than `got`.

    The expected value is compared as case-insensitive hex, surrounding blanks ignored;
    an entry without the column, or with an empty (or null) value, is not checked.
    """
    expected = (record.get("fields") or {}).get(column)
    if expected is None:
        return
    text = str(expected).strip().lower()
    if text and text != got:
        raise ItemError(
            "hash_mismatch",
            f"{algorithm} expected {_short(text)} ({column}), got {_short(got)}",
        )


def _short(digest: str) -> str:
    return digest if len(digest) <= SHOWN else f"{digest[:SHOWN]}..."
