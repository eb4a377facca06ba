"""A server's Retry-After header, as seconds to wait: read by every stage that retries."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime


def parse_retry_after(value: str) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date (None for
    anything else)."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when.timestamp() - time.time())
