"""robots.txt (`respect_robots_txt`): fetched once per host per process, checked per URL.

Rules follow RFC 9309 (as Google reads them), not `urllib.robotparser`, which picks
the first group whose name is a *substring* of the agent, applies the first rule
that matches rather than the longest, and reads `*` and `$` in paths literally (so
`Disallow: /*.jpg$` would allow every JPEG):

* the groups for our product token (case-insensitive, equal, several merged) apply,
  else those for `*`, else nothing is disallowed;
* of the rules matching a path (`*` any characters, a final `$` the end), the longest
  wins, `Allow` on a tie; `/robots.txt` itself is always allowed.

The file is fetched through the same guarded client as images (address policy,
`allow_hosts`, redirects checked per hop, `timeout`, `retries`), read up to
`ROBOTS_MAX_BYTES`. A 4xx answer (but 408 and 429) means there is none: everything
is allowed. A 5xx, 408 or 429, a timeout, a failed connection, a body over the cap
or a protocol error disallows the whole host (Google treats a failing robots.txt as
a full disallow for a while); the verdict is cached like any other. Verdicts are
kept in the process per origin (scheme://host:port) for `ROBOTS_MAX_AGE` seconds,
for at most `ROBOTS_MAX_HOSTS` origins (the least recently used go first: a list of
millions of hosts keeps memory bounded): one request per host per worker process in
a run, a lock per origin so that threads wait for the one fetch in flight.
"""

from __future__ import annotations

import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from pipeline.errors import ItemError

ROBOTS_MAX_BYTES = 512 * 1024
ROBOTS_MAX_AGE = 3600.0  # seconds a verdict is kept in a process
ROBOTS_MAX_HOSTS = 10_000  # verdicts a process keeps (each holds its robots.txt's rules)
# Failures of the robots.txt request the item fails with as they are: the image's own
# request would fail the same way (the host is not allowed, or the URL is unusable).
PASSED_ON = frozenset({"blocked_address", "blocked_scheme", "invalid_url"})
_TOKEN = re.compile(r"[A-Za-z_-]+")
_SAFE = "/?=&;:@!'()*+,~-._$"  # kept as they are when paths are normalised


def product_token(agent: str) -> str:
    """The product token of a User-Agent (`pipeline-images/0.1 (...)` -> `pipeline-images`)."""
    found = _TOKEN.match(agent.strip())
    return found.group(0).lower() if found else ""


def _normal(path: str) -> str:
    """`path` percent-encoded one way, so that `%7e`, `%7E` and `~` compare equal."""
    return quote(unquote(path, errors="surrogateescape"), safe=_SAFE, errors="surrogateescape")


@dataclass(frozen=True)
class Rule:
    allow: bool
    pattern: str  # normalised; `*` any characters, a final `$` the end of the path

    def matches(self, path: str) -> bool:
        """Wildcard match in linear passes (no regex: a hostile pattern cannot backtrack)."""
        anchored = self.pattern.endswith("$")
        parts = (self.pattern[:-1] if anchored else self.pattern).split("*")
        if not path.startswith(parts[0]):
            return False
        position = len(parts[0])
        if len(parts) == 1:
            return not anchored or position == len(path)
        for part in parts[1:-1]:
            found = path.find(part, position)
            if found < 0:
                return False
            position = found + len(part)
        last = parts[-1]
        if anchored:
            return path.endswith(last) and len(path) - len(last) >= position
        return path.find(last, position) >= 0


@dataclass(frozen=True)
class Robots:
    """What one host's robots.txt allows our agent; `denial` set: nothing at all."""

    rules: tuple[Rule, ...] = ()
    denial: ItemError | None = None

    @classmethod
    def parse(cls, text: str, token: str) -> Robots:
        """The rules of `text` that apply to the agent named `token`."""
        groups: list[tuple[set[str], list[Rule]]] = []
        agents: set[str] | None = None  # the group being named, while no rule follows
        for raw in text.lstrip("\ufeff").splitlines():
            key, sep, value = raw.split("#", 1)[0].partition(":")
            key, value = key.strip().lower(), value.strip()
            if not sep:
                continue
            if key in ("user-agent", "useragent"):
                if agents is None:
                    agents = set()
                    groups.append((agents, []))
                agents.add("*" if value.startswith("*") else product_token(value))
            elif key in ("allow", "disallow") and groups:
                agents = None
                if value:
                    groups[-1][1].append(Rule(key == "allow", _normal(value)))
        ours = [rules for names, rules in groups if token in names] if token else []
        chosen = ours or [rules for names, rules in groups if "*" in names]
        return cls(tuple(rule for rules in chosen for rule in rules))

    def check(self, url: str) -> None:
        """Raise `disallowed` if these rules forbid `url`."""
        if self.denial is not None:
            raise ItemError(self.denial.reason, self.denial.message)
        parts = urlsplit(url)
        path = _normal((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        if path == "/robots.txt":
            return
        best: Rule | None = None
        for rule in self.rules:
            if rule.matches(path) and (
                best is None
                or len(rule.pattern) > len(best.pattern)
                or (len(rule.pattern) == len(best.pattern) and rule.allow)
            ):
                best = rule
        if best is not None and not best.allow:
            raise ItemError("disallowed", f"robots.txt disallows {path[:200]} ({best.pattern})")


def origin(url: str) -> str:
    """scheme://host:port of `url`, the port always written out."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    host = (parts.hostname or "").rstrip(".")
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"


def verdict_of(fetched: Callable[[], bytes], robots_url: str, token: str) -> Robots:
    """The rules for `token`, from `fetched()` (the body of robots_url) or its failure."""
    try:
        body = fetched()
    except ItemError as error:
        if error.reason == "http_4xx" and error.message not in ("HTTP 408",):
            return Robots()  # no robots.txt: everything allowed
        if error.reason in PASSED_ON:
            return Robots(denial=ItemError(error.reason, f"{robots_url}: {error.message}"))
        why = f"{robots_url} failed ({error.reason}: {error.message[:150]})"
        # a robots.txt too big to read stays so; one that failed may answer next run
        reason = "disallowed" if error.reason == "too_large" else "robots_unavailable"
        return Robots(denial=ItemError(reason, f"{why}: the host is disallowed"))
    return Robots.parse(body.decode("utf-8", "replace"), token)


class RobotsCache:
    """Verdicts per origin for one fetcher, fetched once while they last."""

    def __init__(self, fetch: Callable[[str], bytes], token: str):
        self._fetch = fetch  # robots.txt URL -> body, raising ItemError
        self.token = token
        self._reset()
        _caches.add(self)

    def _reset(self) -> None:
        self._verdicts: OrderedDict[str, tuple[float, Robots]] = OrderedDict()  # oldest use first
        self._fetching: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def cached(self, url: str) -> Robots | None:
        """The verdict for `url`'s host if this process has a fresh one."""
        key = origin(url)
        with self._lock:
            found = self._verdicts.get(key)
            if found is not None:
                self._verdicts.move_to_end(key)
        if found is None or time.monotonic() - found[0] > ROBOTS_MAX_AGE:
            return None
        return found[1]

    def verdict(self, url: str) -> Robots:
        """The verdict for `url`'s host, fetching its robots.txt if no thread has."""
        known = self.cached(url)
        if known is not None:
            return known
        key = origin(url)
        with self._lock:
            fetching = self._fetching.setdefault(key, threading.Lock())
        with fetching:  # one fetch per origin; other threads wait for its verdict
            known = self.cached(url)
            if known is None:
                robots_url = f"{key}/robots.txt"
                known = verdict_of(lambda: self._fetch(robots_url), robots_url, self.token)
                with self._lock:
                    self._verdicts[key] = (time.monotonic(), known)
                    self._verdicts.move_to_end(key)
                    while len(self._verdicts) > ROBOTS_MAX_HOSTS:
                        self._verdicts.popitem(last=False)
                    self._fetching.pop(key, None)
        return known

    def check(self, url: str) -> None:
        """Raise ItemError (`disallowed`, ...) unless `url` may be fetched."""
        self.verdict(url).check(url)


class RobotsNeeded(Exception):
    """A redirect leads to a host whose robots.txt this process has not read yet."""

    def __init__(self, url: str):
        super().__init__(url)
        self.url = url


_caches: weakref.WeakSet[RobotsCache] = weakref.WeakSet()


def _after_fork() -> None:  # a child starts with no lock held by a thread it lacks
    for cache in list(_caches):
        cache._reset()


os.register_at_fork(after_in_child=_after_fork)
