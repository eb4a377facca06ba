"""`download`: fetch each item's URL into bytes, several requests in flight per partition.

http(s) goes through one urllib3 connection pool per worker process (connections
are reused across partitions); `file://` URLs and plain paths are read from disk.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import unquote, urlsplit

import urllib3
from pydantic import Field, PositiveFloat, PositiveInt

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.stages.base import Item, Step
from pipeline.stages.registry import register


class DownloadOptions(Options):
    concurrency: PositiveInt = Field(16, description="Requests in flight per partition")
    timeout: PositiveFloat = Field(10.0, description="Seconds allowed per attempt, all included")
    connect_timeout: PositiveFloat = Field(5.0, description="Seconds to establish a connection")
    max_bytes: PositiveInt = Field(50_000_000, description="Largest body accepted, in bytes")
    retries: int = Field(2, ge=0, description="Extra attempts on connection errors and 5xx")
    user_agent: str = Field("pipeline-images/0.1", description="User-Agent header")
    allow_schemes: tuple[str, ...] = Field(
        ("http", "https"), description="URL schemes allowed; add 'file' for local paths"
    )
    allow_hosts: tuple[str, ...] = Field(
        (), description="Non-public addresses allowed anyway: 'host', 'host:port' or a CIDR"
    )


_pools: dict[tuple, urllib3.PoolManager] = {}
_pools_lock = threading.Lock()


def _pool_for(options: DownloadOptions) -> urllib3.PoolManager:
    """One PoolManager per process and option set, so connections are reused."""
    key = (options.concurrency, options.connect_timeout, options.timeout)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = urllib3.PoolManager(
                num_pools=64,
                maxsize=options.concurrency,
                block=False,
                retries=False,
                timeout=urllib3.Timeout(connect=options.connect_timeout, read=options.timeout),
            )
        return _pools[key]


@register("download")
class Download(Step):
    """Fetch bytes for each URL; http(s), file:// and local paths."""

    Options = DownloadOptions
    description = "Fetch each URL (http, https, file) into bytes"
    tuning_options = frozenset({"concurrency", "timeout", "connect_timeout", "retries"})

    def process(self, item: Item) -> Item:
        url = item.record["url"]
        data = self.fetch(url)
        if not data:
            raise ItemError("empty", "the response body is empty")
        item.record["bytes"] = len(data)
        return item.derive(data)

    def fetch(self, url: str) -> bytes:
        scheme = urlsplit(url).scheme.lower() or "file"
        if scheme not in self.options.allow_schemes:  # type: ignore[attr-defined]
            raise ItemError("blocked_scheme", f"scheme {scheme!r} is not in allow_schemes")
        if scheme in ("http", "https"):
            return self._fetch_http(url)
        if scheme == "file":
            return _read_local(_local_path(url), self.options.max_bytes)
        raise ItemError("blocked_scheme", f"scheme {scheme!r} is not supported")

    def _fetch_http(self, url: str) -> bytes:
        options: DownloadOptions = self.options  # type: ignore[assignment]
        pool = _pool_for(options)
        for attempt in range(options.retries + 1):
            try:
                response = pool.request(
                    "GET",
                    url,
                    headers={"User-Agent": options.user_agent},
                    preload_content=False,
                    redirect=True,
                )
            except urllib3.exceptions.TimeoutError as exc:
                error = ItemError("timeout", str(exc))
            except urllib3.exceptions.HTTPError as exc:
                error = ItemError("connection_error", str(exc))
            else:
                try:
                    if response.status >= 500:
                        error = ItemError("http_5xx", f"HTTP {response.status}")
                    elif response.status >= 400:
                        raise ItemError("http_4xx", f"HTTP {response.status}")
                    else:
                        return _read_capped(response, options.max_bytes)
                finally:
                    response.drain_conn()  # never hand a half-read connection back to the pool
                    response.release_conn()
            if attempt < options.retries:
                time.sleep(min(0.2 * 2**attempt, 2.0))
        raise error

    def stream(self, items: Iterable[Item]) -> Iterator[Item]:
        """Keep `concurrency` downloads in flight; yield results in input order."""
        concurrency = self.options.concurrency  # type: ignore[attr-defined]
        with ThreadPoolExecutor(concurrency, thread_name_prefix=f"download-{self.name}") as pool:
            window: deque[Future[Item | None]] = deque()
            for item in items:
                window.append(pool.submit(self.run_one, item))
                if len(window) >= concurrency:
                    result = window.popleft().result()
                    if result is not None:
                        yield result
            while window:
                result = window.popleft().result()
                if result is not None:
                    yield result


def _read_capped(response: urllib3.BaseHTTPResponse, max_bytes: int) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ItemError("too_large", f"Content-Length {declared} exceeds {max_bytes}")
    chunks, total = [], 0
    for chunk in response.stream(64 * 1024):
        total += len(chunk)
        if total > max_bytes:
            raise ItemError("too_large", f"body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _local_path(url: str) -> str:
    parts = urlsplit(url)
    return unquote(parts.path) if parts.scheme == "file" else url


def _read_local(path: str, max_bytes: int) -> bytes:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ItemError("not_found", f"no such file: {path}") from None
    except OSError as exc:
        raise ItemError("not_found", f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ItemError("not_regular_file", f"{path} is not a regular file")
    if info.st_size > max_bytes:
        raise ItemError("too_large", f"{info.st_size} bytes exceeds {max_bytes}")
    with open(path, "rb") as handle:
        return handle.read(max_bytes + 1)
