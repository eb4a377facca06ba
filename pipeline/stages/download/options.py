"""The `download` stage's options: the network and file policy a config can change."""

from __future__ import annotations

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator

from pipeline.config.model import Options
from pipeline.stages.download.hashes import HashName, check_available
from pipeline.stages.download.policy import AllowEntry
from pipeline.stages.download.robots import product_token


class DownloadOptions(Options):
    concurrency: PositiveInt = Field(16, description="Requests in flight per partition")
    per_host: PositiveInt = Field(
        16,
        description="Requests in flight per host for the whole run, shared by every "
        "partition, worker process and dask worker",
    )
    per_host_rate: PositiveFloat | None = Field(
        None,
        description="Requests started per second per host, for the whole run like per_host; "
        "default: no limit",
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
    respect_robots_txt: bool = Field(
        False,
        description="Fail items whose host's robots.txt disallows them for `robots_agent` "
        "(disallowed); a robots.txt that times out, cannot be reached or answers 5xx "
        "disallows its host; a 4xx one allows everything",
    )
    robots_agent: str | None = Field(
        None,
        description="The name robots.txt groups are matched against; default: the product "
        "token of user_agent (the text before its first '/')",
    )
    hashes: tuple[HashName, ...] = Field(
        ("sha256",),
        description="Hex digests of the downloaded bytes put in each record (sha256, md5, "
        "sha1; xxh64 needs the xxhash package); [] for none",
    )
    verify_hash: str | None = Field(
        None,
        description="A field of the list holding the expected hex digest; a different one "
        "fails as hash_mismatch, an empty or missing one is not checked",
    )
    verify_algorithm: HashName = Field(
        "sha256", description="The algorithm of the digests in the verify_hash field"
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

    @field_validator("hashes")
    @classmethod
    def _available_hashes(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_available(name) for name in dict.fromkeys(names))

    @field_validator("verify_algorithm")
    @classmethod
    def _available_algorithm(cls, name: str) -> str:
        return check_available(name)

    @field_validator("robots_agent")
    @classmethod
    def _agent_token(cls, agent: str | None) -> str | None:
        if agent is not None and not product_token(agent):
            raise ValueError("robots_agent needs letters, '-' or '_' (a product token)")
        return agent

    @property
    def robots_token(self) -> str:
        """The product token robots.txt user-agent lines are matched against."""
        return product_token(self.robots_agent or self.user_agent)

    @property
    def computed_hashes(self) -> tuple[str, ...]:
        """`hashes`, and the verify algorithm if a column is verified (each once)."""
        extra = (self.verify_algorithm,) if self.verify_hash else ()
        return tuple(dict.fromkeys((*self.hashes, *extra)))
