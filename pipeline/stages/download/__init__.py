"""`download`: fetch each item's URL into bytes, several requests in flight per partition.

The scheme decides how: http(s) through a guarded urllib3 pool (`http.py`: address
policy, redirects, deadline, size cap, retries), `file://` URLs and plain paths from
disk (`local.py`), any other scheme listed in `allow_schemes` through fsspec
(`fsspec_io.py`). A scheme not listed fails as `blocked_scheme`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from urllib.parse import unquote, urlsplit

from pipeline.errors import ItemError
from pipeline.records import Item, Record
from pipeline.stages.base import Step
from pipeline.stages.download.fsspec_io import read_fsspec
from pipeline.stages.download.hashes import digests, verify
from pipeline.stages.download.http import HttpFetcher, fetcher_for
from pipeline.stages.download.local import read_local
from pipeline.stages.download.options import DownloadOptions
from pipeline.stages.registry import register
from pipeline.stages.shared.host_slots import Slots, host_slots, use_host_slots
from pipeline.stages.shared.urls import url_scheme


@register("download")
class Download(Step[DownloadOptions]):
    """Fetch bytes for each URL under the configured network and file policy."""

    Options = DownloadOptions
    description = "Fetch each URL (http, https, file, fsspec schemes) into bytes"
    tuning_options = frozenset(
        {
            "concurrency",
            "per_host",
            "per_host_rate",
            "timeout",
            "connect_timeout",
            "read_timeout",
            "retries",
            "backoff",
            "backoff_max",
            "retry_after_max",
        }
    )

    def process(self, item: Item) -> Item:
        data = self.fetch(item.record["url"], item.record)
        if not data:
            raise ItemError("empty", "the body is empty")
        item.record["bytes"] = len(data)
        self.hash(data, item.record)
        return item.derive(data)

    def hash(self, data: bytes, record: Record) -> None:
        """Put the configured digests of `data` in `record`; check the list's, if asked."""
        options = self.options
        if not options.computed_hashes:
            return
        found = digests(data, options.computed_hashes)
        record.update(found)
        if options.verify_hash:
            verify(
                record,
                options.verify_hash,
                options.verify_algorithm,
                found[options.verify_algorithm],
            )

    def fetch(self, url: str, record: Record) -> bytes:
        """The bytes at `url`; raise ItemError with a reason code."""
        scheme = url_scheme(url)
        if scheme not in self.options.allow_schemes:
            raise ItemError("blocked_scheme", f"scheme {scheme!r} is not in allow_schemes")
        if scheme in ("http", "https"):
            return self.http.fetch(url, record)
        record["attempts"] = 1
        if scheme == "file":
            return read_local(local_path(url), self.options.max_bytes, self.options.local_root)
        return read_fsspec(url, self.options.max_bytes)

    @cached_property
    def http(self) -> HttpFetcher:
        """This process's fetcher for these options (found once, not per item)."""
        return fetcher_for(self.options)

    def stream(self, items: Iterable[Item]) -> Iterator[Item]:
        """Keep `concurrency` downloads in flight; yield results in input order."""
        concurrency = self.options.concurrency
        pool = _download_threads(concurrency)
        # per_host for the run: its keeper is found in the partition's task thread
        slots = host_slots((self.options.per_host, self.options.per_host_rate))
        window: deque[Future[Item | None]] = deque()
        for item in items:
            window.append(pool.submit(self._run_counted, slots, item))
            if len(window) >= concurrency:
                result = window.popleft().result()
                if result is not None:
                    yield result
        while window:
            result = window.popleft().result()
            if result is not None:
                yield result

    def _run_counted(self, slots: Slots, item: Item) -> Item | None:
        """`run_one` in a download thread, its requests counted against `slots`."""
        use_host_slots(slots)
        return self.run_one(item)


_task_thread = threading.local()


def _download_threads(concurrency: int) -> ThreadPoolExecutor:
    """The download pool of the worker thread running this partition, made once.

    Starting `concurrency` threads for every partition cost ~11 ms of wall time per
    partition under load (bench). One pool per task thread, not per process, keeps
    exactly `concurrency` requests per partition and no more threads than that.
    `per_host` is not the pool's: each download counts against the run's limit
    (`host_slots`), whichever thread, partition or worker makes the request.
    """
    pools: dict[int, ThreadPoolExecutor] = _task_thread.__dict__.setdefault("pools", {})
    if concurrency not in pools:
        pools[concurrency] = ThreadPoolExecutor(concurrency, thread_name_prefix="download")
    return pools[concurrency]


def local_path(url: str) -> str:
    """The path a `file:` URL (or a plain path) names; ItemError if it holds a NUL (`%00`)."""
    parts = urlsplit(url)
    path = unquote(parts.path) if parts.scheme.lower() == "file" else url
    if "\x00" in path:
        raise ItemError("invalid_url", f"the path contains NUL: {url[:200]!r}")
    return path
