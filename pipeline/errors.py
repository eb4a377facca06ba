"""The exceptions a user can meet, and the exit code each one carries.

    PipelineError                 exit 4  the run could not complete
    ├── ConfigError               exit 2  bad config file, override or CLI usage
    ├── LockHeldError             exit 3  another run holds the run directory's lock
    ├── RunIncompleteError        exit 4  output not writable, disk full, backend lost
    └── ItemsFailedError          exit 1  the batch ran, but some items failed

Item-level problems (a dead URL, a broken image) are not exceptions that reach
the CLI: a stage raises `ItemError` with a reason code, the partition runner
turns it into the item's result record, and the batch goes on.
"""

from __future__ import annotations

EXIT_OK = 0


class PipelineError(Exception):
    """Base class: anything the CLI reports in one line with an exit code."""

    exit_code = 4


class ConfigError(PipelineError):
    """The config file, an override or the command line is wrong."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class LockHeldError(PipelineError):
    """Another run of the same job holds the run directory's lock; nothing was touched."""

    exit_code = 3


class RunIncompleteError(PipelineError):
    """The run stopped before every item was processed and recorded.

    Items whose partition was not recorded are not marked done: the next run does them.
    """

    exit_code = 4


class ItemsFailedError(PipelineError):
    """The run finished, but more items failed than the config tolerates."""

    exit_code = 1


class ItemError(Exception):
    """One item failed in one stage; `reason` is a code from `REASONS`."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason


# The documented taxonomy of `reason` codes in result records.
REASONS: dict[str, str] = {
    "empty": "the input had no bytes, or the list entry's URL cell was empty or null",
    "invalid_input": (
        "the list entry cannot be read (corrupt JSON, not UTF-8, an overlong line, a JSON "
        "element that is not an object, a folder that cannot be listed, a later API page "
        "that is not JSON)"
    ),
    "not_an_image": "the bytes are not an image (e.g. HTML)",
    "unsupported_format": "an image format outside the allow-list",
    "corrupt": "the image data is damaged",
    "truncated": "the image data ends early",
    "decompression_bomb": "the image has more pixels than allowed",
    "too_large": "the input is larger than the size cap",
    "timeout": "the request or read did not finish in time",
    "incomplete_body": "the body was shorter than its Content-Length",
    "connection_error": "the connection failed or was reset",
    "protocol_error": "the server broke the HTTP protocol",
    "http_4xx": "the server answered with a 4xx status",
    "http_5xx": "the server answered with a 5xx status",
    "rate_limited": "the server kept answering 429",
    "too_many_redirects": "too many redirects, or a redirect loop",
    "blocked_address": "the address is not allowed (loopback, private, ...)",
    "blocked_scheme": "the URL scheme is not allowed",
    "invalid_url": "the URL (or path) cannot be parsed",
    "disallowed": "the server asked not to use the image (X-Robots-Tag, robots.txt)",
    "robots_unavailable": "the host's robots.txt failed (5xx, 408, 429, timeout, no connection): "
    "the host counts as disallowed for this run, and a re-run tries again",
    "hash_mismatch": "the downloaded bytes do not have the hash the list gives (verify_hash)",
    "not_regular_file": "a local input is a directory, FIFO, device or dangling link",
    "not_found": "the file or URL does not exist",
    "outside_root": "a local path (or its symlink target) is outside `local_root`",
    "duplicate": "the same key appeared earlier in this batch",
    "filtered": "skipped: a filter stage's rule left the item out",
    "unchanged": "skipped: done in an earlier run with the same config",
    "transform_error": "a transform could not process the image",
    "write_error": "the output could not be written",
    "worker_lost": "the worker running the item died repeatedly",
    "internal_error": "an unexpected error inside the pipeline (a bug)",
}

# Failures that may pass on their own: a re-run retries them (others need `--retry-failed`).
RETRYABLE_REASONS: frozenset[str] = frozenset(
    {
        "timeout",
        "incomplete_body",
        "connection_error",
        "protocol_error",
        "http_5xx",
        "rate_limited",
        "write_error",
        "worker_lost",
        "robots_unavailable",
    }
)
