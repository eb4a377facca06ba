"""Politeness for a whole run: `per_host` requests in flight per host, `per_host_rate`
starts per second per host, and a host's Retry-After pausing it for everyone.

The limits hold for the run, whichever thread, partition, process or dask worker makes
the request. Which keeper counts them depends on where the partition runs
(`host_slots`, looked up in the partition's task thread):

- `HostSlots`: in this process (sync and threads backends);
- `SharedHostSlots`: asks the `HostSlotServer` that the processes backend runs in the
  pool's parent, over a Unix socket; a worker that dies gives its slots back;
- `ClusterHostSlots`: `distributed.Semaphore`s and scheduler metadata, on a dask worker.

Each has `hold(host)` (a context manager around one request) and `pause(host, s)`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

Limits = tuple[int, float | None]  # (per_host, per_host_rate)


class Slots(Protocol):
    def hold(self, host: str) -> contextlib.AbstractContextManager[None]: ...

    def pause(self, host: str, seconds: float) -> None: ...


class HostSlots:
    """At most `limit` requests in flight per host, at most `rate` started per second
    per host (if given), and none while a host asked to wait (`pause`); idle hosts take
    no memory. Thread-safe: one for a process is shared by every partition in it."""

    def __init__(self, limit: int, rate: float | None = None):
        self.limit, self.rate = limit, rate
        self._busy: dict[str, int] = {}
        self._next_start: dict[str, float] = {}  # monotonic: a host's next free start
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, host: str) -> Iterator[None]:
        self.acquire(host)
        try:
            yield
        finally:
            self.release(host)

    def acquire(self, host: str) -> None:
        """Wait for a free slot, then for this request's turn (rate, pause): the last
        thing before the request starts, so a pause set meanwhile holds it back too."""
        with self._changed:
            self._changed.wait_for(lambda: self._busy.get(host, 0) < self.limit)
            self._busy[host] = self._busy.get(host, 0) + 1
        try:
            self._wait_turn(host)
        except BaseException:
            self.release(host)
            raise

    def release(self, host: str) -> None:
        with self._changed:
            self._busy[host] -= 1
            if not self._busy[host]:
                del self._busy[host]
            self._changed.notify_all()

    def _wait_turn(self, host: str) -> None:
        """Sleep until this request may start: after a pause, and 1/rate after the last."""
        with self._changed:
            now = time.monotonic()
            start = max(now, self._next_start.get(host, now))
            if self.rate:
                self._next_start[host] = start + 1 / self.rate
            elif start <= now:
                self._next_start.pop(host, None)
        if start > now:
            time.sleep(start - now)

    def pause(self, host: str, seconds: float) -> None:
        """No request to `host` starts for `seconds` (a server's Retry-After)."""
        with self._changed:
            until = time.monotonic() + seconds
            self._next_start[host] = max(until, self._next_start.get(host, until))


# --- a process pool: one keeper in the parent ------------------------------------------


class HostSlotServer:
    """`HostSlots` for the processes of a pool, kept in the parent and served on a Unix
    socket in a private folder, one thread per connection (`with` starts and stops it).

    A line `["acquire", limit, rate, host]` is answered `ok` once the request may go;
    `["release", ...]` and `["pause", limit, rate, host, seconds]` get no answer. A
    connection that closes gives back the slots it held: a killed worker leaks none."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="pipeline-slots-")
        self.address = os.path.join(self._folder.name, "socket")
        self._slots: dict[Limits, HostSlots] = {}
        self._lock = threading.Lock()
        self._server = socketserver.ThreadingUnixStreamServer(self.address, _SlotRequests)
        self._server.daemon_threads = True  # a thread waiting for a slot never blocks exit
        self._server.keeper = self  # type: ignore[attr-defined]

    def slots(self, limits: Limits) -> HostSlots:
        with self._lock:
            if limits not in self._slots:
                self._slots[limits] = HostSlots(*limits)
            return self._slots[limits]

    def __enter__(self) -> HostSlotServer:
        thread = threading.Thread(target=self._server.serve_forever, name="host-slots")
        thread.daemon = True
        thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._folder.cleanup()


class _SlotRequests(socketserver.StreamRequestHandler):
    """One worker thread's connection to a `HostSlotServer`."""

    def handle(self) -> None:
        keeper: HostSlotServer = self.server.keeper  # type: ignore[attr-defined]
        held: Counter[tuple[int, float | None, str]] = Counter()
        try:
            for line in self.rfile:
                op, limit, rate, host, *seconds = json.loads(line)
                slots = keeper.slots((limit, rate))
                if op == "acquire":
                    slots.acquire(host)
                    held[limit, rate, host] += 1
                    self.wfile.write(b"ok\n")
                elif op == "release":
                    slots.release(host)
                    held[limit, rate, host] -= 1
                elif op == "pause":
                    slots.pause(host, *seconds)
        except OSError:  # the worker went: what it held is given back below
            pass
        finally:
            for (limit, rate, host), count in held.items():
                for _ in range(count):
                    keeper.slots((limit, rate)).release(host)


class SharedHostSlots:
    """The limits of a `HostSlotServer`, asked from a pool process; one connection per
    thread, so a thread waiting for its turn never holds up another's answer."""

    def __init__(self, address: str, limits: Limits):
        self.address, self.limits = address, limits
        self._local = threading.local()

    def _connection(self) -> tuple[socket.socket, Any]:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.address)
            connection = self._local.connection = (sock, sock.makefile("rb"))
        return connection

    def _send(self, op: str, host: str, *extra: float) -> Any:
        sock, answers = self._connection()
        sock.sendall(json.dumps([op, *self.limits, host, *extra]).encode() + b"\n")
        return answers

    @contextlib.contextmanager
    def hold(self, host: str) -> Iterator[None]:
        if self._send("acquire", host).readline() != b"ok\n":
            raise ConnectionError("the per_host keeper of the pool's parent has gone")
        try:
            yield
        finally:
            self._send("release", host)

    def pause(self, host: str, seconds: float) -> None:
        self._send("pause", host, seconds)


_pool_keeper: str | None = None  # the address of the parent's HostSlotServer, if any


def join_host_slot_server(address: str) -> None:
    """A pool process's initializer: count requests against the parent's keeper."""
    global _pool_keeper
    _pool_keeper = address


# --- a dask cluster: semaphores on the scheduler -----------------------------------------

RATE_BURST = 0.1  # seconds of per_host_rate that may start at once on a cluster
LEASE_HOLD = 2.0  # seconds a worker reuses a per_host lease before it goes back to the scheduler
LEASE_LINGER = 0.5  # seconds after which a worker gives back the leases it has not needed
PAUSE_POLL = 0.05  # seconds a worker trusts its copy of the run's pauses


class _Leases:
    """One host's `per_host` leases on one worker: when each spare one was taken from the
    scheduler (`spare`), how many requests hold one (`busy`, at most `peak` since the last
    trim), and whether a request is asking the scheduler for one (`asking`)."""

    __slots__ = ("asking", "busy", "freed", "peak", "spare")

    def __init__(self, lock: threading.Lock) -> None:
        self.spare: list[float] = []  # monotonic
        self.busy = self.peak = 0
        self.asking = False
        self.freed = threading.Condition(lock)

    def use(self, taken: float) -> float:
        self.busy += 1
        self.peak = max(self.peak, self.busy)
        return taken

    def unneeded(self) -> list[float]:
        """The spare leases beyond the most in use at once since the last call."""
        count = max(0, len(self.spare) + self.busy - self.peak)  # < 0: one went back
        self.spare.sort()
        gone, self.spare = self.spare[:count], self.spare[count:]
        self.peak = self.busy
        return gone

    def wait_turn(self, limit: int) -> None:
        """Until a lease is spare, or this request may ask the scheduler for one: no other
        request asks, and this worker holds fewer than `limit` (with the lock held)."""
        self.freed.wait_for(
            lambda: self.spare or (not self.asking and self.busy + len(self.spare) < limit)
        )

    def idle(self) -> bool:
        return not (self.spare or self.busy or self.asking)


class ClusterHostSlots:
    """The same limits for a whole run on a dask cluster, shared by every worker.

    - `per_host` is a `distributed.Semaphore` of `limit` leases per host. A worker reuses
      the leases its requests took, for LEASE_HOLD seconds each, with no round trip to the
      scheduler: a request takes a spare one, or waits for one while a single request of
      this worker asks the scheduler for a new one. A lease older than LEASE_HOLD goes
      back when its request ends (so another worker waits at most that long), and every
      LEASE_LINGER seconds the leases beyond the most in use at once meanwhile go back.
    - `rate` is a second semaphore, of rate x RATE_BURST leases (at least one), each held
      for leases/rate seconds from its request's start (at most `rate` starts a second,
      in bursts of 0.1 s).
    - A pause is the time until which a host asked to wait, kept on the scheduler for all
      the run's hosts (`set_metadata`). A worker reads them at most every PAUSE_POLL
      seconds, so one worker's 429 holds back every worker's requests within that time.

    All are named by run and host. Made in a task's thread: it binds the worker's
    scheduler connection and event loop (the download threads have no worker context)."""

    def __init__(self, limit: int, rate: float | None, run: str, scheduler: Any, loop: Any):
        self.limit, self.rate, self.run = limit, rate, run
        self._scheduler, self._loop = scheduler, loop
        self._semaphores: dict[str, Any] = {}
        self._leases: dict[str, _Leases] = {}
        self._trimming = False
        self._pauses: dict[str, float] = {}  # host: epoch seconds it asked to wait until
        self._pauses_read = -PAUSE_POLL  # monotonic: when they were last read
        self._reading_pauses = False
        self._lock = threading.Lock()

    def loop_closed(self) -> bool:
        """Whether the worker these were bound to has gone (an in-process worker)."""
        return getattr(self._loop, "asyncio_loop", None) is not None and (
            self._loop.asyncio_loop.is_closed()
        )

    def semaphore_name(self, host: str, what: str = "per-host") -> str:
        return f"pipeline-{what}-{self.run}-{host}"

    def _semaphore(self, host: str, what: str, leases: int) -> Any:
        from distributed import Semaphore

        name = self.semaphore_name(host, what)
        with self._lock:
            if name not in self._semaphores:
                self._semaphores[name] = Semaphore(
                    max_leases=leases, name=name, scheduler_rpc=self._scheduler, loop=self._loop
                )
            return self._semaphores[name]

    def _per_host(self, host: str) -> Any:
        return self._semaphore(host, "per-host", self.limit)

    @contextlib.contextmanager
    def hold(self, host: str) -> Iterator[None]:
        rated, held = None, 0.0
        if self.rate:
            leases = max(1, round(self.rate * RATE_BURST))
            rated, held = self._semaphore(host, "per-host-rate", leases), leases / self.rate
            rated.acquire()
        started = False
        try:
            taken = self._take(host)
            try:
                self._wait_pause(host)  # last: a pause set while this one queued holds it
                started = True
                if rated is not None:  # counted from the request's start, not the wait
                    timer = threading.Timer(held, rated.release)
                    timer.daemon = True
                    timer.start()
                yield
            finally:
                self._give(host, taken)
        finally:
            if rated is not None and not started:  # no request started: its lease goes back
                rated.release()

    # --- per_host leases ---

    def _take(self, host: str) -> float:
        """A lease for one request (when it was taken from the scheduler): a spare one of
        this worker's, else a new one. One request at a time asks the scheduler, none
        while this worker holds them all, and the asking one looks for a spare lease
        again every LEASE_LINGER seconds."""
        while True:
            with self._lock:
                leases = self._leases.setdefault(host, _Leases(self._lock))
                leases.wait_turn(self.limit)
                if leases.spare:
                    return leases.use(leases.spare.pop())
                leases.asking = True
            try:
                got = self._per_host(host).acquire(timeout=LEASE_LINGER)
            finally:
                with self._lock:
                    leases.asking = False
                    leases.freed.notify()  # the next waiting request may ask
            if got:
                with self._lock:
                    self._start_trimming()
                    return leases.use(time.monotonic())

    def _start_trimming(self) -> None:
        if not self._trimming:
            self._trimming = True
            threading.Thread(target=self._trim, name="host-leases", daemon=True).start()

    def _give(self, host: str, taken: float) -> None:
        """A request is done: its lease is spare for LEASE_HOLD, then goes back."""
        with self._lock:
            leases = self._leases[host]
            leases.busy -= 1
            kept = time.monotonic() - taken < LEASE_HOLD
            if kept:
                leases.spare.append(taken)
            leases.freed.notify()  # a spare lease, or room to ask for one
        if not kept:
            self._per_host(host).release()

    def _trim(self) -> None:
        """Every LEASE_LINGER seconds, give back the leases beyond the most in use at once
        meanwhile; ends once this worker holds none."""
        while True:
            time.sleep(LEASE_LINGER)
            with self._lock:
                unneeded = {host: leases.unneeded() for host, leases in self._leases.items()}
                for host in [host for host, leases in self._leases.items() if leases.idle()]:
                    del self._leases[host]
                self._trimming = bool(self._leases)
            with contextlib.suppress(RuntimeError):  # the worker's loop closed: it has gone,
                for host, gone in unneeded.items():  # and the scheduler times its leases out
                    for _ in gone:
                        self._per_host(host).release()
            if not self._trimming:
                return

    # --- pauses ---

    def _pause_key(self, host: str | None = None) -> list[str]:
        return ["pipeline", self.run, "pauses", *([host] if host else [])]

    def _wait_pause(self, host: str) -> None:
        wait = self._read_pauses().get(host, 0.0) - time.time()
        if wait > 0:
            time.sleep(wait)

    def _read_pauses(self) -> dict[str, float]:
        """The run's pauses, read from the scheduler if this worker's copy is older than
        PAUSE_POLL (by one thread at a time: the others use the copy meanwhile)."""
        from distributed.utils import sync

        with self._lock:
            if self._reading_pauses or time.monotonic() - self._pauses_read < PAUSE_POLL:
                return self._pauses
            self._reading_pauses = True
        try:
            read = sync(
                self._loop, self._scheduler.get_metadata, keys=self._pause_key(), default={}
            )
        finally:
            with self._lock:
                self._reading_pauses = False
        with self._lock:
            self._pauses = _later(self._pauses, read or {})
            self._pauses_read = time.monotonic()
            return self._pauses

    def pause(self, host: str, seconds: float) -> None:
        from distributed.utils import sync

        until = time.time() + seconds
        with self._lock:
            self._pauses = _later(self._pauses, {host: until})
        sync(self._loop, self._scheduler.set_metadata, keys=self._pause_key(host), value=until)


def _later(pauses: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    """Both sets of pauses, each host's later one, without those already over."""
    now = time.time()
    merged = {host: max(until, pauses.get(host, until)) for host, until in more.items()}
    return {host: until for host, until in {**pauses, **merged}.items() if until > now}


CLUSTER_SLOTS_KEPT = 4  # runs whose slots a worker process keeps (a run uses one or two)
_cluster_slots: dict[tuple[str, int, float | None], ClusterHostSlots] = {}
_local_slots: dict[Limits, HostSlots | SharedHostSlots] = {}
_slots_lock = threading.Lock()


# --- which keeper counts a partition's requests -------------------------------------------


def host_slots(limits: Limits) -> Slots:
    """The keeper of `limits` for the partition whose task thread this is: on a dask
    worker, the run's (`ClusterHostSlots`); in a pool process, the parent's
    (`SharedHostSlots`); elsewhere, this process's (`HostSlots`)."""
    with _slots_lock:
        task = _dask_task() if _pool_keeper is None else None
        if task is not None:
            return _cluster_keeper(*task, limits)
        if limits not in _local_slots:
            keeper = _pool_keeper
            _local_slots[limits] = SharedHostSlots(keeper, limits) if keeper else HostSlots(*limits)
        return _local_slots[limits]


def _dask_task() -> tuple[Any, str] | None:
    """The dask worker whose task this thread runs, and the task's key; or None."""
    if "distributed" not in sys.modules:  # not a dask worker, and no import to find out
        return None
    try:
        from distributed import get_worker

        worker = get_worker()
        return worker, str(worker.get_current_task())
    except (ImportError, ValueError, KeyError):  # not in a dask task
        return None


def _cluster_keeper(worker: Any, key: str, limits: Limits) -> ClusterHostSlots:
    """The run's keeper on this worker; the run is read from the task key `partition-N-RUN`."""
    run = key.rsplit("-", 1)[-1] if key.startswith("partition-") else key
    found = _cluster_slots.get((run, *limits))
    if found is None or found.loop_closed():
        found = ClusterHostSlots(*limits, run, worker.scheduler, worker.loop)
        _cluster_slots[run, *limits] = found
        while len(_cluster_slots) > CLUSTER_SLOTS_KEPT:  # earlier runs' are done
            _cluster_slots.pop(next(iter(_cluster_slots)))
    return found


_thread_slots = threading.local()


def use_host_slots(slots: Slots) -> None:
    """Make this thread's requests count against `slots` (from its partition's thread)."""
    _thread_slots.slots = slots


def thread_slots(limits: Limits) -> Slots:
    """What this thread's requests count against: its partition's, else `host_slots`."""
    found = getattr(_thread_slots, "slots", None)
    return found if found is not None else host_slots(limits)
