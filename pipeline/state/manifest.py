"""The manifest: what every item's last attempt left, kept across runs in SQLite.

SQLite in WAL mode, because it gives exactly what a cron job needs from the
standard library: one transaction per finished partition is atomic and
survives `kill -9` (and power loss, with synchronous=FULL) at any moment, a key
is found through an index in microseconds however many runs came before, and
`status` can read while a run writes. Segments of jsonl/parquet would need our
own compaction, dedup and index to do the same.

    items(key, url, status, stage, reason, message, attempt, run_id, updated_at)
    sinks(key, sink, fingerprint, outputs)   one row per sink an item is done for
    hashes(reducer, key, fingerprint, hash, ord)
                                             what a reducer keeps of an item across runs
                                             (dedupe: its hash), under the reducer's
                                             lineage fingerprint; `ord` orders items by
                                             when they were first kept (earlier runs first)
    shards(path, sink, state, samples, bytes, run_id)
                                             every shard a sharded sink assembled: `writing`
                                             from before its file is written until its
                                             samples' `sinks` rows commit with it (`done`);
                                             `obsolete` once compaction moved its samples
    sharded_sinks(sink, kind, options)       every sharded sink a run wrote, with its kind
                                             and validated options (JSON): what `compact`
                                             rebuilds it from, with no config

A shard's `sinks` rows commit with it, before the rest of its items' records (which wait
for every shard they are in): an item whose shard is done is never written to another
one, whatever happens next. A `writing` or `obsolete` shard's file is garbage (`remove_garbage`).

`attempt` is the fingerprint of the sinks the last attempt ran, so a failure
is retried when the config it failed under changed. A per-connection TEMP
table of the keys seen in this run finds duplicate lines without holding every
key of a long list in memory.

Every table is created if missing, so a manifest from before a table existed opens
as it is and gains it. A reducer's rows (`keep_values`) are written in the same
transaction as the partition's items, so neither exists without the other.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.errors import ConfigError
from pipeline.records import Record, SourceItem, clean_text

if TYPE_CHECKING:
    from pydantic import BaseModel

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    status TEXT NOT NULL,
    stage TEXT,
    reason TEXT,
    message TEXT,
    attempt TEXT NOT NULL,
    run_id TEXT NOT NULL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sinks (
    key TEXT NOT NULL,
    sink TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    outputs TEXT NOT NULL,
    PRIMARY KEY (key, sink)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hashes (
    reducer TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    hash TEXT NOT NULL,
    ord INTEGER NOT NULL,
    PRIMARY KEY (reducer, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS shards (
    path TEXT PRIMARY KEY,
    sink TEXT NOT NULL,
    state TEXT NOT NULL,
    samples INTEGER,
    bytes INTEGER,
    run_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sharded_sinks (
    sink TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    options TEXT NOT NULL
) WITHOUT ROWID;
"""
IndexRow = tuple[str, str, int]  # key, value, order


@dataclass(frozen=True)
class KeptValues:
    """What a reducer keeps of each committed record (`Manifest.keep_values`)."""

    fingerprint: str  # the reducer's lineage: rows under another one are stale
    value: Callable[[Record], str | None]  # None: nothing to keep (the row goes)


@dataclass(frozen=True)
class Entry:
    """What the manifest knows about one key."""

    status: str
    reason: str | None
    attempt: str
    run_id: str
    sinks: dict[str, tuple[str, list[str]]]  # sink -> (fingerprint, outputs)


@dataclass(frozen=True)
class Shard:
    """A shard a sink assembled, and the samples it holds: (key, fingerprint) each."""

    sink: str
    path: str
    samples: list[tuple[str, str]]
    bytes: int


@dataclass(frozen=True)
class ShardRow:
    """A done shard as the `shards` table has it."""

    path: str
    samples: int
    bytes: int


class Configured(Protocol):
    """A stage as `note_sharded_sinks` records it: its kind and validated options."""

    kind: str
    options: BaseModel


@dataclass(frozen=True)
class Attempt:
    """What this run asked of an item: the sinks to run, with their fingerprints."""

    sinks: dict[str, str]
    fingerprint: str


class Manifest:
    """The run directory's item database. Use as a context manager."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        if read_only:
            if not self.path.is_file():
                raise ConfigError(f"no manifest at {self.path}: has a run used this directory?")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        else:
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA temp_store=FILE")  # the keys seen in a run stay on disk
            self.db.executescript(SCHEMA)
            self.db.execute("CREATE TEMP TABLE seen (key TEXT PRIMARY KEY, line INTEGER)")
        self.kept: dict[str, KeptValues] = {}
        self._first_new: int | None = None

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def first_seen(self, items: Iterable[SourceItem]) -> list[int | None]:
        """Note `items` as seen in this run; per item, the line its key was first seen on
        if that was earlier (a duplicate), else None."""
        earlier: list[int | None] = []
        with self._transaction():
            for item in items:
                inserted = self.db.execute(
                    "INSERT INTO seen (key, line) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                    (item.key, item.index),
                ).rowcount
                line = None
                if not inserted:
                    (line,) = self.db.execute(
                        "SELECT line FROM seen WHERE key = ?", (item.key,)
                    ).fetchone()
                earlier.append(line)
        return earlier

    def lookup(self, key: str) -> Entry | None:
        """What the manifest knows of `key`: its last record and the sinks it is done for
        (status `incomplete`: done in a shard, its record not committed yet). One query."""
        rows = self.db.execute(
            "SELECT i.status, i.reason, i.attempt, i.run_id, s.sink, s.fingerprint, s.outputs"
            " FROM (SELECT ? AS key) AS k LEFT JOIN items AS i ON i.key = k.key"
            " LEFT JOIN sinks AS s ON s.key = k.key",
            (key,),
        ).fetchall()
        sinks = {
            sink: (fingerprint, json.loads(outputs))
            for *_, sink, fingerprint, outputs in rows
            if sink is not None
        }
        status, reason, attempt, run_id = rows[0][:4]
        if status is None:
            return Entry("incomplete", None, "", "an earlier run", sinks) if sinks else None
        return Entry(status, reason, attempt, run_id, sinks=sinks)

    def begin_shard(self, sink: str, path: str, run_id: str) -> None:
        """Note a shard about to be written: garbage unless `commit_shard` follows."""
        with self._transaction():  # a done shard of the same name (--full) stays done
            self.db.execute(
                "INSERT INTO shards VALUES (?, ?, 'writing', NULL, NULL, ?)"
                " ON CONFLICT (path) DO NOTHING",
                (path, sink, run_id),
            )

    def commit_shard(self, shard: Shard) -> None:
        """A written shard and its samples, done for its sink, atomically."""
        with self._transaction():
            self._shard_done(shard)

    def _shard_done(self, shard: Shard) -> None:
        self.db.execute(
            "UPDATE shards SET state = 'done', samples = ?, bytes = ? WHERE path = ?",
            (len(shard.samples), shard.bytes, shard.path),
        )
        self.db.executemany(
            "INSERT OR REPLACE INTO sinks VALUES (?, ?, ?, ?)",
            [
                (key, shard.sink, fingerprint, json.dumps([shard.path]))
                for key, fingerprint in shard.samples
            ],
        )

    def replace_shards(self, shard: Shard | None, obsolete: Iterable[str]) -> None:
        """Compaction, atomically: `shard` (written, noted by `begin_shard`) is done with
        its samples, which moved there, and the `obsolete` shards are garbage."""
        with self._transaction():
            if shard is not None:
                self._shard_done(shard)
            self.db.executemany(
                "UPDATE shards SET state = 'obsolete' WHERE path = ?", [(p,) for p in obsolete]
            )

    def done_shards(self, sink: str) -> list[ShardRow]:
        """The sink's done shards, in the order they were noted (`begin_shard`)."""
        rows = self.db.execute(
            "SELECT path, samples, bytes FROM shards WHERE sink = ? AND state = 'done'"
            " ORDER BY rowid",
            (sink,),
        )
        return [ShardRow(*row) for row in rows]

    def shard_sinks(self, *states: str) -> dict[str, str]:
        """The shards in one of `states` (`writing`, `done`, `obsolete`; any if none given):
        path -> sink."""
        rows = self.db.execute(
            "SELECT path, sink FROM shards WHERE ? OR state IN (SELECT value FROM json_each(?))",
            (not states, json.dumps(states)),
        )
        return dict(rows.fetchall())

    def live_samples(self, sink: str) -> Counter[str]:
        """How many items' `sinks` rows name each shard of `sink` (one scan)."""
        rows = self.db.execute(
            "SELECT outputs, count(*) FROM sinks WHERE sink = ? GROUP BY outputs", (sink,)
        )
        counts: Counter[str] = Counter()
        for outputs, count in rows:
            for path in json.loads(outputs):
                counts[path] += count
        return counts

    def sink_rows(self, sink: str, keys: Iterable[str]) -> dict[str, tuple[str, list[str]]]:
        """The `sinks` row of each of `keys` done for `sink`: key -> (fingerprint, outputs)."""
        rows = self.db.execute(
            "SELECT key, fingerprint, outputs FROM sinks WHERE sink = ?"
            " AND key IN (SELECT value FROM json_each(?))",
            (sink, json.dumps(list(keys))),
        )
        return {key: (fingerprint, json.loads(outputs)) for key, fingerprint, outputs in rows}

    def note_sharded_sinks(self, sinks: Mapping[str, Configured]) -> None:
        """Record each sharded sink's kind and options (`sharded_sinks`), for `compact`."""
        if not sinks:
            return
        with self._transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO sharded_sinks VALUES (?, ?, ?)",
                [
                    (name, sink.kind, json.dumps(sink.options.model_dump(mode="json")))
                    for name, sink in sinks.items()
                ],
            )

    def sharded_sinks(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Every sharded sink a run recorded: name -> (kind, options)."""
        rows = self.db.execute("SELECT sink, kind, options FROM sharded_sinks ORDER BY sink")
        return {sink: (kind, json.loads(options)) for sink, kind, options in rows}

    def forget_shards(self, paths: Iterable[str]) -> None:
        with self._transaction():
            self.db.executemany("DELETE FROM shards WHERE path = ?", [(p,) for p in paths])

    def commit(self, records: list[Record], attempts: dict[str, Attempt], run_id: str) -> None:
        """Record one finished partition atomically (its outputs are already written)."""
        now = time.time()
        with self._transaction():
            for record in records:
                attempt = attempts[record["key"]]
                self.db.execute(
                    "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record["key"],
                        clean_text(record["url"]),
                        record["status"],
                        record["stage"],
                        record["reason"],
                        record["message"] and clean_text(record["message"]),
                        attempt.fingerprint,
                        run_id,
                        now,
                    ),
                )
                self._mark_done(record, attempt)
            self._keep(records, attempts)

    def note_finished(self, finished: list[tuple[Record, Attempt]], run_id: str) -> None:
        """Items a killed run finished but did not record (their shards were committed,
        so every sink is done): an `items` row, status ok, for each (record, attempt).
        Their sinks rows and kept values stay as they are."""
        now = time.time()
        with self._transaction():
            self.db.executemany(
                "INSERT OR IGNORE INTO items VALUES (?, ?, 'ok', NULL, NULL, NULL, ?, ?, ?)",
                [
                    (record["key"], clean_text(record["url"]), attempt.fingerprint, run_id, now)
                    for record, attempt in finished
                ],
            )

    def _mark_done(self, record: Record, attempt: Attempt) -> None:
        """An ok item is done for every sink it was sent to; a failed one for those that
        wrote (their files now follow the new config), the others keep their old rows."""
        outputs = record.get("sink_outputs", {})
        self.db.executemany(
            "INSERT OR REPLACE INTO sinks VALUES (?, ?, ?, ?)",
            [
                (record["key"], sink, fingerprint, json.dumps(outputs.get(sink, [])))
                for sink, fingerprint in attempt.sinks.items()
                if record["status"] == "ok" or sink in outputs
            ],
        )

    def keep_values(
        self, reducer: str, fingerprint: str, value: Callable[[Record], str | None]
    ) -> None:
        """From now on `commit` keeps `value(record)` of every record it commits whose
        attempt ran `reducer` (a record it gives None for loses its row)."""
        self.kept[reducer] = KeptValues(fingerprint, value)

    @property
    def first_new(self) -> int:
        """The order of this run's items: an item first kept in this run has `ord`
        `first_new + index`; every earlier run's item a lower one."""
        if self._first_new is None:
            (top,) = self.db.execute("SELECT coalesce(max(ord), -1) FROM hashes").fetchone()
            self._first_new = int(top) + 1
        return self._first_new

    def _keep(self, records: list[Record], attempts: dict[str, Attempt]) -> None:
        for reducer, kept in self.kept.items():
            ran = [r for r in records if reducer in attempts[r["key"]].sinks]
            values = [(r, kept.value(r)) for r in ran]
            self.db.executemany(
                "INSERT INTO hashes VALUES (?, ?, ?, ?, ?) ON CONFLICT (reducer, key) DO UPDATE"
                " SET fingerprint = excluded.fingerprint, hash = excluded.hash",  # order stays
                [
                    (reducer, r["key"], kept.fingerprint, value, self.first_new + r["index"])
                    for r, value in values
                    if value is not None
                ],
            )
            self.db.executemany(
                "DELETE FROM hashes WHERE reducer = ? AND key = ?",
                [(reducer, r["key"]) for r, value in values if value is None],
            )

    def indexed_keys(self, reducer: str, fingerprint: str, keys: Iterable[str]) -> set[str]:
        """Which of `keys` have a value kept by `reducer` under `fingerprint` (one query)."""
        rows = self.db.execute(
            "SELECT key FROM hashes WHERE reducer = ? AND fingerprint = ?"
            " AND key IN (SELECT value FROM json_each(?))",
            (reducer, fingerprint, json.dumps(list(keys))),
        )
        return {key for (key,) in rows}

    def kept_values(self, reducer: str, fingerprint: str, chunk: int) -> Iterator[list[IndexRow]]:
        """Every value `reducer` keeps under `fingerprint`, `chunk` rows at a time."""
        cursor = self.db.execute(
            "SELECT key, hash, ord FROM hashes WHERE reducer = ? AND fingerprint = ?",
            (reducer, fingerprint),
        )
        while rows := cursor.fetchmany(chunk):
            yield rows

    def urls(self, keys: Iterable[str]) -> dict[str, str]:
        """The URL of each of `keys` the manifest has (one query)."""
        rows = self.db.execute(
            "SELECT key, url FROM items WHERE key IN (SELECT value FROM json_each(?))",
            (json.dumps(list(keys)),),
        )
        return dict(rows.fetchall())

    def totals(self) -> Counter[tuple[str, str | None]]:
        """Items by (status, reason)."""
        rows = self.db.execute("SELECT status, reason, count(*) FROM items GROUP BY 1, 2")
        return Counter({(status, reason): count for status, reason, count in rows})

    def sink_totals(self) -> Counter[str]:
        """Items done, by sink."""
        rows = self.db.execute("SELECT sink, count(*) FROM sinks GROUP BY 1")
        return Counter(dict(rows.fetchall()))
