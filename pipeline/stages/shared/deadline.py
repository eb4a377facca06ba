"""A total time limit per HTTP attempt, enforced by shutting sockets down.

Socket timeouts bound each `recv`, not a whole response: a server that sends
one byte per second never trips them. A `Deadline` is entered around an
attempt; connections register their sockets with the current deadline, and
one watchdog thread per process shuts those sockets down when it expires, so
the blocked read returns at once and the attempt fails as a timeout. A DNS
lookup has no socket to cut: `within_deadline` runs it in a thread of its own and
stops waiting for it when the deadline expires. `Watched` is the urllib3 connection
mixin that registers each request's socket.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_current = threading.local()


class Deadline:
    """The time limit of one attempt, and the sockets it may have to cut."""

    def __init__(self, seconds: float):
        self.expires_at = time.monotonic() + seconds
        self.expired = False
        self._finished = False
        self._sockets: set[socket.socket] = set()  # a new connection's: watched twice
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        """Cut `sock` when the deadline expires (at once if it already has)."""
        with self._lock:
            self._sockets.add(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def expire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)

    def __enter__(self) -> Deadline:
        _current.deadline = self
        WATCHDOG.add(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _current.deadline = None
        with self._lock:
            self._finished = True
            self._sockets.clear()


class Watched:
    """Mixin for a urllib3 connection: the socket each request goes out on is cut when
    the deadline entered around it (this thread's) expires."""

    sock: socket.socket | None

    def _new_conn(self) -> socket.socket:
        """A new connection's socket, watched from before its TLS handshake."""
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]  # mixin, as below
        watch_current(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)  # type: ignore[misc]  # mixin: super() is HTTPConnection
        watch_current(self.sock)  # a reused connection's, for this attempt


def watched_pool_manager(**kwargs: Any) -> Any:
    """A urllib3 PoolManager whose http and https connections are `Watched`."""
    import urllib3
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    manager = urllib3.PoolManager(**kwargs)
    manager.pool_classes_by_scheme = {
        "http": _pool_of(HTTPConnectionPool, HTTPConnection),
        "https": _pool_of(HTTPSConnectionPool, HTTPSConnection),
    }
    return manager


def _pool_of(pool: type, connection: type) -> type:
    watched = type(connection.__name__, (Watched, connection), {})
    return type(pool.__name__, (pool,), {"ConnectionCls": watched})


def watch_current(sock: socket.socket | None) -> None:
    """Register `sock` with the deadline of the attempt running in this thread."""
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None and sock is not None:
        deadline.watch(sock)


def within_deadline(call: Callable[[], T], what: str) -> T:
    """`call()`, waited for only until this thread's deadline; TimeoutError after it.

    For blocking calls that no socket shutdown can cut short (the resolver's
    `getaddrinfo`). The call runs in a daemon thread of its own, so a lookup that
    hangs delays no other lookup and no exit; left behind, it ends unwaited.
    """
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is None:
        return call()
    outcome: list[tuple[bool, Any]] = []
    finished = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the waiting thread
            outcome.append((False, exc))
        finally:
            finished.set()

    threading.Thread(target=run, name="lookup", daemon=True).start()
    if not finished.wait(max(0.0, deadline.remaining())):
        raise TimeoutError(f"{what} took longer than the attempt's time limit")
    succeeded, value = outcome[0]
    if succeeded:
        return value
    raise value


def _shut(sock: socket.socket) -> None:
    # socket.socket.shutdown, not SSLSocket.shutdown: cut the TCP stream under TLS too.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Watchdog:
    """One daemon thread per process that expires deadlines in time order."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """Start empty (also in a forked child, which has no watchdog thread)."""
        self._heap: list[tuple[float, int, Deadline]] = []
        self._counter = itertools.count()
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline) -> None:
        with self._wakeup:
            heapq.heappush(self._heap, (deadline.expires_at, next(self._counter), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="download-watchdog")
                self._thread.daemon = True
                self._thread.start()
            if self._heap[0][2] is deadline:  # sooner than the thread's wake-up: wake it now
                self._wakeup.notify()

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._wakeup.wait(wait)
                _, _, deadline = heapq.heappop(self._heap)
            deadline.expire()


WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG._reset)
