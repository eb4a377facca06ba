"""http(s) under the download policy: guarded connections, redirects, retries, caps.

Every connection resolves its host, refuses non-public addresses unless
allowed, connects to exactly the address it checked and verifies the peer;
redirects are followed by hand, so each hop goes through the same check.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    LocationValueError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
)

from pipeline.errors import ItemError
from pipeline.records import Record
from pipeline.stages.download.options import DownloadOptions
from pipeline.stages.download.policy import (
    AddressPolicy,
    BlockedAddress,
    RetryPolicy,
    check_robots_tag,
)
from pipeline.stages.download.robots import ROBOTS_MAX_BYTES, RobotsCache, RobotsNeeded
from pipeline.stages.shared.deadline import Deadline, Watched, within_deadline
from pipeline.stages.shared.host_slots import thread_slots
from pipeline.stages.shared.retry_after import parse_retry_after

CHUNK = 64 * 1024
TRANSIENT_STATUSES = {408, 429}  # retried, like every 5xx


class RetryableError(Exception):
    """A failed attempt worth another try (after `retry_after`, if the server said)."""

    def __init__(self, error: ItemError, retry_after: str | None = None):
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class _Guarded(Watched):
    """Mixin for urllib3 connections: policy-checked connect, deadline-watched socket."""

    policy: AddressPolicy = AddressPolicy()
    _dns_host: str
    port: int
    host: str
    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        host, port = self._dns_host, self.port
        try:
            address = within_deadline(lambda: self.policy.resolve(host, port), f"resolving {host}")
        except socket.gaierror as exc:
            # self is the HTTPConnection this mixin is combined with; mypy sees only _Guarded
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, str(exc)) from None
        dns_host, self._dns_host = self._dns_host, address  # connect to what was checked
        try:
            sock = super()._new_conn()  # type: ignore[misc]  # mixin: super() is HTTPConnection
        finally:
            self._dns_host = dns_host
        peer = ipaddress.ip_address(sock.getpeername()[0].split("%")[0])
        if not self.policy.permits(self.host, peer, self.port):
            sock.close()
            raise BlockedAddress(f"{self.host} connected to {peer}, which is not allowed")
        return sock


class GuardedHTTPConnection(_Guarded, HTTPConnection):
    pass


class GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    pass


def _bind(pool: type, connection: type, policy: AddressPolicy) -> type:
    """A pool class whose connections enforce `policy`."""
    bound = type(connection.__name__, (connection,), {"policy": policy})
    return type(pool.__name__, (pool,), {"ConnectionCls": bound})


# Partitions running at once in one process share its pool: keep that many times
# `concurrency` connections per host alive, so none is discarded after use.
POOL_SHARERS = 4


def guarded_pool_manager(options: DownloadOptions) -> urllib3.PoolManager:
    manager = urllib3.PoolManager(
        num_pools=64,
        maxsize=options.concurrency * POOL_SHARERS,
        block=False,
        retries=False,
        timeout=urllib3.Timeout(
            connect=min(options.connect_timeout, options.timeout),
            read=min(options.read_timeout, options.timeout),
        ),
    )
    policy = AddressPolicy.from_entries(options.allow_hosts)
    manager.pool_classes_by_scheme = {
        "http": _bind(HTTPConnectionPool, GuardedHTTPConnection, policy),
        "https": _bind(HTTPSConnectionPool, GuardedHTTPSConnection, policy),
    }
    return manager


class HttpFetcher:
    """Fetches http(s) URLs for one set of options; shared by a process's threads."""

    def __init__(self, options: DownloadOptions):
        self.options = options
        self.pool = guarded_pool_manager(options)
        self.retry = RetryPolicy(options.backoff, options.backoff_max, options.retry_after_max)
        self.headers = {"User-Agent": options.user_agent}
        self.redirect_schemes = {"http", "https"} & set(options.allow_schemes)
        self.robots: RobotsCache | None = None
        if options.respect_robots_txt:
            self.robots = RobotsCache(self._fetch_robots, options.robots_token)

    def fetch(self, url: str, record: Record) -> bytes:
        """The body of `url`, retrying what is worth retrying; `record["attempts"]` counts.

        With `respect_robots_txt`, `url` and every redirect hop are checked against their
        host's robots.txt first. A hop to a host whose robots.txt this process has not
        read ends the attempt; it is read outside the attempt (no deadline or host slot
        held meanwhile) and the attempt starts again, which is not counted as a retry.
        """
        if self.robots is not None:
            self.robots.check(url)
        detours = 0
        while True:
            try:
                return self._retrying(lambda: self._attempt(url), record)
            except RobotsNeeded as needed:
                detours += 1
                if self.robots is None or detours > self.options.max_redirects:
                    raise ItemError(
                        "too_many_redirects", "redirects kept reaching new hosts"
                    ) from None
                self.robots.check(needed.url)

    def _retrying(self, attempt_once: Callable[[], bytes], record: Record | None) -> bytes:
        attempt = 1
        while True:
            if record is not None:
                record["attempts"] = attempt
            try:
                return attempt_once()
            except RetryableError as failure:
                if attempt > self.options.retries:
                    raise failure.error from None
                time.sleep(self.retry.delay(attempt, failure.retry_after))
            attempt += 1

    def _fetch_robots(self, robots_url: str) -> bytes:
        """The body of a host's robots.txt (at most ROBOTS_MAX_BYTES), or ItemError."""
        return self._retrying(lambda: self._attempt(robots_url, ROBOTS_MAX_BYTES, False), None)

    def _attempt(self, url: str, max_bytes: int | None = None, image: bool = True) -> bytes:
        slots = thread_slots((self.options.per_host, self.options.per_host_rate))
        host = urlsplit(url).netloc.lower()
        with slots.hold(host), Deadline(self.options.timeout) as dl:
            try:
                response = self._open(url, image)
                return self._read(response, dl, max_bytes or self.options.max_bytes)
            except BlockedAddress as exc:
                raise ItemError("blocked_address", str(exc)) from None
            except urllib3.exceptions.HTTPError as exc:
                raise classify(exc, dl) from None
            except RetryableError as failure:  # a 429 or 5xx: its Retry-After holds for all
                asked = parse_retry_after(failure.retry_after) if failure.retry_after else None
                if asked:
                    slots.pause(host, min(asked, self.options.retry_after_max))
                raise

    def _open(self, url: str, image: bool = True) -> urllib3.BaseHTTPResponse:
        """GET `url`, following at most `max_redirects` redirects, each hop checked
        (for an image, not robots.txt itself: against its host's robots.txt too)."""
        seen = {url}
        for hop in range(self.options.max_redirects + 1):
            if hop and image and self.robots is not None:
                robots = self.robots.cached(url)
                if robots is None:
                    raise RobotsNeeded(url)
                robots.check(url)
            response = self.pool.urlopen(
                "GET", url, redirect=False, preload_content=False, headers=self.headers
            )
            location = response.get_redirect_location()
            if not location:
                return self._checked(response, image)
            _discard(response)
            url = urljoin(url, location)
            if urlsplit(url).scheme.lower() not in self.redirect_schemes:
                raise ItemError("blocked_scheme", f"redirect to a blocked scheme: {url[:200]}")
            if url in seen:
                raise ItemError("too_many_redirects", f"redirect loop back to {url[:200]}")
            seen.add(url)
        raise ItemError("too_many_redirects", f"more than {self.options.max_redirects} redirects")

    def _checked(
        self, response: urllib3.BaseHTTPResponse, image: bool = True
    ) -> urllib3.BaseHTTPResponse:
        """The response if its status and headers allow reading the body; else raise."""
        try:
            error = status_error(response.status, response.headers.get("Retry-After"))
            if error:
                raise error
            if image and self.options.respect_robots_tag:
                check_robots_tag(response.headers.getlist("X-Robots-Tag"))
        except Exception:
            _discard(response)
            raise
        return response

    def _read(
        self, response: urllib3.BaseHTTPResponse, deadline: Deadline, max_bytes: int
    ) -> bytes:
        try:
            data = read_capped(response, max_bytes)
        except BaseException:
            _discard(response)
            raise
        if deadline.expired:  # a cut connection can look like the end of a body
            _discard(response)
            raise RetryableError(ItemError("timeout", f"over {self.options.timeout}s in total"))
        response.release_conn()  # fully read: the connection may be reused
        return data


def status_error(status: int, retry_after: str | None) -> Exception | None:
    """The failure a final (non-redirect) status means, or None for 2xx."""
    if 200 <= status < 300:
        return None
    if status in TRANSIENT_STATUSES or status >= 500:
        reason = "rate_limited" if status == 429 else "http_5xx" if status >= 500 else "http_4xx"
        return RetryableError(ItemError(reason, f"HTTP {status}"), retry_after)
    if status >= 400:
        return ItemError("http_4xx", f"HTTP {status}")
    return ItemError("protocol_error", f"unexpected HTTP {status}")


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close, never return a half-read connection to the pool."""
    response.close()
    response.release_conn()


def read_capped(response: urllib3.BaseHTTPResponse, max_bytes: int) -> bytes:
    """The decoded body, refusing more than `max_bytes` (declared or actual).

    A body of declared length, neither chunked nor coded, arrives in one read, which
    cannot go past that length: in 64 KiB chunks the same body costs about 40 %
    more client CPU and half again as many thread switches (bench, 16 in flight).
    A compressed or undeclared body is streamed and counted as it is decoded.
    """
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ItemError("too_large", f"Content-Length {declared} exceeds {max_bytes}")
    if declared.isdigit() and not response.chunked and not response.headers.get("Content-Encoding"):
        return response.read()  # no more than the declared length (chunked framing ignores it)
    chunks, total = [], 0
    for chunk in response.stream(CHUNK, decode_content=True):
        total += len(chunk)
        if total > max_bytes:
            raise ItemError("too_large", f"body exceeds {max_bytes} bytes (decoded)")
        chunks.append(chunk)
    return b"".join(chunks)


def classify(exc: urllib3.exceptions.HTTPError, deadline: Deadline) -> Exception:
    """The item error for a urllib3 failure; transient ones are retryable."""
    cause = exc.args[1] if isinstance(exc, ProtocolError) and len(exc.args) > 1 else None
    refused = isinstance(exc, NewConnectionError)  # a subclass of ConnectTimeoutError
    if deadline.expired or (isinstance(exc, urllib3.exceptions.TimeoutError) and not refused):
        return RetryableError(ItemError("timeout", str(exc)[:300]))
    if isinstance(cause, http.client.IncompleteRead):
        return ItemError("incomplete_body", f"body ended early: {cause!r}")
    if isinstance(exc, DecodeError) or (
        isinstance(cause, http.client.HTTPException) and not isinstance(cause, ConnectionError)
    ):
        return ItemError("protocol_error", str(exc)[:300])
    if isinstance(exc, LocationValueError):
        return ItemError("invalid_url", str(exc)[:300])
    return RetryableError(ItemError("connection_error", str(exc)[:300]))


_fetchers: dict[str, HttpFetcher] = {}
_fetchers_lock = threading.Lock()


def fetcher_for(options: DownloadOptions) -> HttpFetcher:
    """One fetcher (pools, host slots) per process and option set."""
    key = options.model_dump_json()
    with _fetchers_lock:
        if key not in _fetchers:
            _fetchers[key] = HttpFetcher(options)
        return _fetchers[key]
