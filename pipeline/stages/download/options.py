"""The `download` stage's options: the network and file policy a config can change."""

from __future__ import annotations

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator

from pipeline.config.model import Options
from pipeline.stages.download.policy import AllowEntry


class DownloadOptions(Options):
    concurrency: PositiveInt = Field(16, description="Requests in flight per partition")
    per_host: PositiveInt = Field(
        16,
        description="Requests in flight per host, per running partition; lower it for small "
        "servers (a host gets up to this times the partitions running at once)",
    )
    timeout: PositiveFloat = Field(
        10.0, description="Total seconds per attempt (DNS lookups, redirects, headers and body)"
    )
    connect_timeout: PositiveFloat = Field(5.0, description="Seconds to establish a connection")
    read_timeout: PositiveFloat = Field(5.0, description="Seconds of silence allowed mid-read")
    max_bytes: PositiveInt = Field(
        50_000_000, description="Largest body accepted, in bytes after content decoding"
    )
    max_redirects: int = Field(10, ge=0, description="Redirects followed per attempt")
    retries: int = Field(
        2, ge=0, description="Extra attempts on connection errors, timeouts, 5xx, 408 and 429"
    )
    backoff: NonNegativeFloat = Field(0.5, description="First retry delay; doubles per attempt")
    backoff_max: NonNegativeFloat = Field(10.0, description="Longest backoff delay, in seconds")
    retry_after_max: NonNegativeFloat = Field(
        30.0, description="Longest Retry-After honoured, in seconds"
    )
    user_agent: str = Field(
        "pipeline-images/0.1 (+https://example.invalid/bot)", description="User-Agent header"
    )
    respect_robots_tag: bool = Field(
        False, description="Fail items whose X-Robots-Tag says noai or noimageai (disallowed)"
    )
    allow_schemes: tuple[str, ...] = Field(
        ("http", "https"),
        description="URL schemes allowed; 'file' for local paths, other fsspec schemes by name",
    )
    allow_hosts: tuple[str, ...] = Field(
        (), description="Non-public addresses allowed anyway: 'host', 'host:port' or a CIDR"
    )
    local_root: str | None = Field(
        None, description="Refuse local paths (and symlinks) that resolve outside this folder"
    )

    @field_validator("allow_schemes")
    @classmethod
    def _lower_schemes(cls, schemes: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(scheme.lower() for scheme in schemes)

    @field_validator("allow_hosts")
    @classmethod
    def _parse_hosts(cls, entries: tuple[str, ...]) -> tuple[str, ...]:
        for entry in entries:
            AllowEntry.parse(entry)  # raises ValueError naming a bad entry
        return entries
