"""Politeness for a whole run: `per_host` requests in flight per host, `per_host_rate`
starts per second per host, and a host's Retry-After pausing it for everyone.

The limits hold for the run, whichever thread, partition, process or dask worker makes
the request. Which keeper counts them depends on where the partition runs
(`host_slots`, looked up in the partition's task thread):

- `HostSlots`: in this process (sync and threads backends);
- `PoolHostSlots`: leases from the `HostSlotServer` that the processes backend runs in
  the pool's parent, over a Unix socket; a worker that dies gives its leases back;
- `ClusterHostSlots`: leases of `distributed.Semaphore`s, and scheduler metadata, on a
  dask worker.

The last two are `LeasedSlots`: a worker reuses the `per_host` leases it took, asking
the keeper only when it needs one more, and reads the run's pauses at most every
PAUSE_POLL seconds, so a request costs no round trip (unless `per_host_rate` is set).
Each has `hold(host)` (a context manager around one request) and `pause(host, s)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

logger = logging.getLogger(__name__)
Limits = tuple[int, float | None]  # (per_host, per_host_rate)
Started = Callable[[], None]  # called as the request starts (a rate lease's timer)

LEASE_HOLD = 2.0  # seconds a worker reuses a per_host lease before it goes back to the keeper
LEASE_LINGER = 0.5  # seconds after which a worker gives back the leases it has not needed
PAUSE_POLL = 0.05  # seconds a worker trusts its copy of the run's pauses


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
        self.take(host)
        try:
            self.wait_turn(host)
        except BaseException:
            self.release(host)
            raise

    def take(self, host: str, timeout: float | None = None) -> bool:
        """A free slot (False if none came within `timeout`)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._busy.get(host, 0) < self.limit, timeout):
                return False
            self._busy[host] = self._busy.get(host, 0) + 1
            return True

    def release(self, host: str) -> None:
        with self._changed:
            self._busy[host] -= 1
            if not self._busy[host]:
                del self._busy[host]
            self._changed.notify_all()

    def wait_turn(self, host: str) -> None:
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


# --- leases kept by a worker, from a keeper shared by every worker -----------------------


class _Leases:
    """One host's `per_host` leases on one worker: when each spare one was taken from the
    keeper (`spare`), how many requests hold one (`busy`, at most `peak` since the last
    trim), how many are taking one (`takers`: the record lives while any does), and
    whether one of those is asking the keeper (`asking`)."""

    __slots__ = ("asking", "busy", "freed", "peak", "spare", "takers")

    def __init__(self, lock: threading.Lock) -> None:
        self.spare: list[float] = []  # monotonic
        self.busy = self.peak = self.takers = 0
        self.asking = False
        self.freed = threading.Condition(lock)

    def use(self, taken: float) -> float:
        self.busy += 1
        self.peak = max(self.peak, self.busy)
        return taken

    def wait_turn(self, limit: int) -> None:
        """Until a lease is spare, or this request may ask the keeper for one: no other
        request asks, and this worker holds fewer than `limit` (with the lock held)."""
        self.freed.wait_for(
            lambda: self.spare or (not self.asking and self.busy + len(self.spare) < limit)
        )

    def unneeded(self) -> list[float]:
        """The spare leases beyond the most in use at once since the last call."""
        count = max(0, len(self.spare) + self.busy - self.peak)  # < 0: one went back
        self.spare.sort()
        gone, self.spare = self.spare[:count], self.spare[count:]
        self.peak = self.busy
        return gone

    def idle(self) -> bool:
        return not (self.spare or self.busy or self.takers)


class LeasedSlots:
    """The run's limits as seen by one worker, with the leases it keeps.

    A request takes a `per_host` lease this worker holds and no request uses, with no
    round trip to the keeper, or waits for one while a single request of this worker
    asks the keeper for a new one (none asks while this worker holds them all, and the
    one asking looks for a spare lease again every LEASE_LINGER seconds). A lease goes
    back when its request ends once it is LEASE_HOLD old (so another worker waits at
    most that long), and every LEASE_LINGER seconds the leases beyond the most in use
    at once meanwhile go back. The run's pauses are read at most every PAUSE_POLL
    seconds, so one worker's 429 holds back every worker's requests within that time.

    A keeper implements `_ask` and `_give_back` (one lease), `_fetch_pauses` and
    `_publish_pause` (epoch seconds), and `_rate_gate` when it counts `rate`."""

    def __init__(self, limit: int, rate: float | None) -> None:
        self.limit, self.rate = limit, rate
        self._leases: dict[str, _Leases] = {}
        self._trimming = False
        self._pauses: dict[str, float] = {}  # host: epoch seconds it asked to wait until
        self._pauses_read = -PAUSE_POLL  # monotonic: when they were last read
        self._reading_pauses = False
        self._lock = threading.Lock()

    # --- what a keeper provides ---

    def _ask(self, host: str, timeout: float) -> bool:
        """One `per_host` lease from the keeper, if one comes within `timeout`."""
        raise NotImplementedError

    def _give_back(self, host: str) -> None:
        raise NotImplementedError

    def _fetch_pauses(self) -> dict[str, float]:
        raise NotImplementedError

    def _publish_pause(self, host: str, until: float) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def _rate_gate(self, host: str) -> Iterator[Started]:
        """Around a request: waits for its `rate` turn and yields what to call as it
        starts. Without a rate, nothing."""
        yield lambda: None

    # --- a request ---

    @contextlib.contextmanager
    def hold(self, host: str) -> Iterator[None]:
        with self._rate_gate(host) as started:
            leases, taken = self._take(host)
            try:
                self._wait_pause(host)  # last: a pause set while this one queued holds it
                started()
                yield
            finally:
                self._give(host, leases, taken)

    def pause(self, host: str, seconds: float) -> None:
        with self._lock:
            self._pauses = _later(self._pauses, {host: time.time() + seconds})
            until = self._pauses[host]  # a later pause already known is not cut short
        self._publish_pause(host, until)

    # --- per_host leases ---

    def _take(self, host: str) -> tuple[_Leases, float]:
        """A lease for one request: the host's record, and when the lease was taken from
        the keeper."""
        with self._lock:
            leases = self._leases.get(host)
            if leases is None:
                leases = self._leases[host] = _Leases(self._lock)
            leases.takers += 1
        try:
            while True:
                with self._lock:
                    leases.wait_turn(self.limit)
                    if leases.spare:
                        return leases, leases.use(leases.spare.pop())
                    leases.asking = True
                got = False
                try:
                    got = self._ask(host, LEASE_LINGER)
                finally:
                    with self._lock:  # counted before the trimmer can see the record idle
                        leases.asking = False
                        leases.freed.notify()  # the next waiting request may ask
                        if got:
                            self._start_trimming()
                            taken = leases.use(time.monotonic())
                if got:
                    return leases, taken
        finally:
            with self._lock:
                leases.takers -= 1

    def _start_trimming(self) -> None:
        if not self._trimming:
            self._trimming = True
            threading.Thread(target=self._trim, name="host-leases", daemon=True).start()

    def _give(self, host: str, leases: _Leases, taken: float) -> None:
        """A request is done: its lease is spare for LEASE_HOLD, then goes back."""
        with self._lock:
            leases.busy -= 1
            kept = time.monotonic() - taken < LEASE_HOLD
            if kept:
                leases.spare.append(taken)
            leases.freed.notify()  # a spare lease, or room to ask for one
        if not kept:
            self._give_back_quietly(host)

    def _give_back_quietly(self, host: str) -> None:
        """`_give_back`; if the keeper or this worker's loop has gone, so has the lease
        (a keeper releases what a gone worker held), and the request's own outcome stands."""
        try:
            self._give_back(host)
        except (OSError, RuntimeError) as exc:
            logger.debug("a per_host lease of %s was not given back: %s", host, exc)

    def _trim(self) -> None:
        """Every LEASE_LINGER seconds, give back the leases beyond the most in use at once
        meanwhile; ends once this worker holds none (a later lease starts it again)."""
        try:
            while self._trim_once():
                pass
        except BaseException:  # a later lease must start another trimmer
            with self._lock:
                self._trimming = False
            raise

    def _trim_once(self) -> bool:
        """One trim, after LEASE_LINGER seconds; False once no lease is left to watch."""
        time.sleep(LEASE_LINGER)
        with self._lock:
            unneeded = {host: leases.unneeded() for host, leases in self._leases.items()}
            for host in [host for host, leases in self._leases.items() if leases.idle()]:
                del self._leases[host]
            watching = self._trimming = bool(self._leases)
        for host, gone in unneeded.items():
            for _ in gone:
                self._give_back_quietly(host)
        return watching

    # --- pauses ---

    def _wait_pause(self, host: str) -> None:
        wait = self._current_pauses().get(host, 0.0) - time.time()
        if wait > 0:
            time.sleep(wait)

    def _current_pauses(self) -> dict[str, float]:
        """The run's pauses, read from the keeper if this worker's copy is older than
        PAUSE_POLL (by one thread at a time: the others use the copy meanwhile)."""
        with self._lock:
            if self._reading_pauses or time.monotonic() - self._pauses_read < PAUSE_POLL:
                return self._pauses
            self._reading_pauses = True
        try:
            read = self._fetch_pauses()
        finally:
            with self._lock:
                self._reading_pauses = False
        with self._lock:
            self._pauses = _later(self._pauses, read)
            self._pauses_read = time.monotonic()
            return self._pauses


def _later(pauses: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    """Both sets of pauses, each host's later one, without those already over."""
    now = time.time()
    merged = {host: max(until, pauses.get(host, until)) for host, until in more.items()}
    return {host: until for host, until in {**pauses, **merged}.items() if until > now}


# --- a process pool: one keeper in the parent ------------------------------------------


class HostSlotServer:
    """The keeper of a pool's processes: `HostSlots` and the run's pauses, kept in the
    parent and served on a Unix socket in a private folder, one thread per connection
    (`with` starts and stops it).

    A connection's first line is `["worker", pid]`; then each line is a JSON list
    `[op, limit, rate, host, *args]`: `["take", ..., timeout]` is answered `true` once a
    `per_host` lease is the worker's, or `false` after `timeout`; `["turn", ...]` is
    answered `true` when the host's `rate` lets a request start; `["pauses", ...]` is
    answered with the pauses (host: epoch seconds); `["release", ...]` (any lease of the
    worker's: its threads share them) and `["pause", ..., until]` get no answer. When a
    worker's last connection closes, the leases it held go back: a killed worker leaks
    none."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="pipeline-slots-")
        self.address = os.path.join(self._folder.name, "socket")
        self._slots: dict[Limits, HostSlots] = {}
        self.pauses: dict[str, float] = {}
        self._workers: dict[int, tuple[int, Counter[tuple[int, float | None, str]]]] = {}
        self._lock = threading.Lock()
        self._server = socketserver.ThreadingUnixStreamServer(self.address, _SlotRequests)
        self._server.daemon_threads = True  # a thread waiting for a slot never blocks exit
        self._server.keeper = self  # type: ignore[attr-defined]

    def slots(self, limits: Limits) -> HostSlots:
        with self._lock:
            if limits not in self._slots:
                self._slots[limits] = HostSlots(*limits)
            return self._slots[limits]

    def pause(self, host: str, until: float) -> None:
        with self._lock:
            self.pauses = _later(self.pauses, {host: until})

    def joined(self, worker: int) -> None:
        with self._lock:
            connections, held = self._workers.get(worker, (0, Counter()))
            self._workers[worker] = connections + 1, held

    def count(self, worker: int, lease: tuple[int, float | None, str], change: int) -> None:
        with self._lock:
            self._workers[worker][1][lease] += change

    def left(self, worker: int) -> None:
        """A connection of `worker` closed; with its last, its leases go back."""
        with self._lock:
            connections, held = self._workers.pop(worker)
            if connections > 1:
                self._workers[worker] = connections - 1, held
                return
        for (limit, rate, host), count in held.items():
            for _ in range(count):
                self.slots((limit, rate)).release(host)

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
        hello = self.rfile.readline()
        if not hello:
            return
        _, worker = json.loads(hello)
        keeper.joined(worker)
        try:
            for line in self.rfile:
                op, limit, rate, host, *args = json.loads(line)
                self._serve(keeper, worker, op, (limit, rate, host), args)
        except OSError:  # the worker went: what it held is given back below
            pass
        finally:
            keeper.left(worker)

    def _serve(
        self,
        keeper: HostSlotServer,
        worker: int,
        op: str,
        lease: tuple[int, float | None, str],
        args: list[Any],
    ) -> None:
        limit, rate, host = lease
        slots = keeper.slots((limit, rate))
        if op == "take":
            taken = slots.take(host, *args)
            if taken:
                keeper.count(worker, lease, 1)
            self._answer(taken)
        elif op == "release":
            keeper.count(worker, lease, -1)
            slots.release(host)
        elif op == "turn":
            slots.wait_turn(host)
            self._answer(True)
        elif op == "pauses":
            self._answer(keeper.pauses)
        elif op == "pause":
            keeper.pause(host, *args)

    def _answer(self, value: Any) -> None:
        self.wfile.write(json.dumps(value).encode() + b"\n")


class PoolHostSlots(LeasedSlots):
    """The limits of a `HostSlotServer`, from a pool process; one connection per thread,
    so a thread waiting for a lease never holds up another's answer. With `rate`, each
    request waits for its turn at the server (a round trip)."""

    def __init__(self, address: str, limits: Limits):
        super().__init__(*limits)
        self.address = address
        self._local = threading.local()

    def _connection(self) -> tuple[socket.socket, Any]:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.address)
            sock.sendall(json.dumps(["worker", os.getpid()]).encode() + b"\n")
            connection = self._local.connection = (sock, sock.makefile("rb"))
        return connection

    def _send(self, op: str, host: str, *args: float) -> None:
        sock, _ = self._connection()
        sock.sendall(json.dumps([op, self.limit, self.rate, host, *args]).encode() + b"\n")

    def _call(self, op: str, host: str, *args: float) -> Any:
        self._send(op, host, *args)
        answer = self._connection()[1].readline()
        if not answer:
            raise ConnectionError("the per_host keeper of the pool's parent has gone")
        return json.loads(answer)

    def _ask(self, host: str, timeout: float) -> bool:
        return bool(self._call("take", host, timeout))

    def _give_back(self, host: str) -> None:
        self._send("release", host)

    def _fetch_pauses(self) -> dict[str, float]:
        return dict(self._call("pauses", ""))

    def _publish_pause(self, host: str, until: float) -> None:
        self._send("pause", host, until)

    @contextlib.contextmanager
    def _rate_gate(self, host: str) -> Iterator[Started]:
        yield (lambda: self._call("turn", host)) if self.rate else (lambda: None)


_pool_keeper: str | None = None  # the address of the parent's HostSlotServer, if any


def join_host_slot_server(address: str) -> None:
    """A pool process's initializer: count requests against the parent's keeper."""
    global _pool_keeper
    _pool_keeper = address
    _local_slots.clear()  # a forked child must not count in the keeper it inherited


# --- a dask cluster: semaphores on the scheduler -----------------------------------------

RATE_BURST = 0.1  # seconds of per_host_rate that may start at once on a cluster


class ClusterHostSlots(LeasedSlots):
    """The leases of a dask cluster's run, shared by every worker: `per_host` is a
    `distributed.Semaphore` of `limit` leases per host; `rate` a second one, of rate x
    RATE_BURST leases (at least one), each held for leases/rate seconds from its
    request's start (at most `rate` starts a second, in bursts of 0.1 s), taken by every
    request; the pauses are the scheduler's metadata (`set_metadata`).

    All are named by run and host. Made in a task's thread: it binds the worker's
    scheduler connection and event loop (the download threads have no worker context)."""

    def __init__(self, limit: int, rate: float | None, run: str, scheduler: Any, loop: Any):
        super().__init__(limit, rate)
        self.run = run
        self._scheduler, self._loop = scheduler, loop
        self._semaphores: dict[str, Any] = {}

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

    def _ask(self, host: str, timeout: float) -> bool:
        return bool(self._semaphore(host, "per-host", self.limit).acquire(timeout=timeout))

    def _give_back(self, host: str) -> None:
        self._semaphore(host, "per-host", self.limit).release()

    def _pause_key(self, host: str | None = None) -> list[str]:
        return ["pipeline", self.run, "pauses", *([] if host is None else [host])]

    def _fetch_pauses(self) -> dict[str, float]:
        from distributed.utils import sync

        keys = self._pause_key()
        return sync(self._loop, self._scheduler.get_metadata, keys=keys, default={}) or {}

    def _publish_pause(self, host: str, until: float) -> None:
        from distributed.utils import sync

        sync(self._loop, self._scheduler.set_metadata, keys=self._pause_key(host), value=until)

    @contextlib.contextmanager
    def _rate_gate(self, host: str) -> Iterator[Started]:
        if not self.rate:
            yield lambda: None
            return
        leases = max(1, round(self.rate * RATE_BURST))
        rated, held = self._semaphore(host, "per-host-rate", leases), leases / self.rate
        rated.acquire()
        started: list[bool] = []

        def start() -> None:  # counted from the request's start, not the wait
            started.append(True)
            timer = threading.Timer(held, rated.release)
            timer.daemon = True
            timer.start()

        try:
            yield start
        finally:
            if not started:  # no request started: its lease goes back
                rated.release()


CLUSTER_SLOTS_KEPT = 4  # runs whose slots a worker process keeps (a run uses one or two)
_cluster_slots: dict[tuple[str, int, float | None], ClusterHostSlots] = {}
_local_slots: dict[Limits, HostSlots | PoolHostSlots] = {}
_slots_lock = threading.Lock()


# --- which keeper counts a partition's requests -------------------------------------------


def host_slots(limits: Limits) -> Slots:
    """The keeper of `limits` for the partition whose task thread this is: on a dask
    worker, the run's (`ClusterHostSlots`); in a pool process, the parent's
    (`PoolHostSlots`); elsewhere, this process's (`HostSlots`)."""
    with _slots_lock:
        task = _dask_task() if _pool_keeper is None else None
        if task is not None:
            return _cluster_keeper(*task, limits)
        if limits not in _local_slots:
            keeper = _pool_keeper
            _local_slots[limits] = PoolHostSlots(keeper, limits) if keeper else HostSlots(*limits)
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
