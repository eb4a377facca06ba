"""The dedupe index that grows across runs: the manifest keeps every committed item's hash,
so a later run hashes only its new items and groups them with every earlier run's items
(listed again or not), says which earlier item each new duplicate matches, and with
`drop` drops the new item, never the earlier one. Exact duplicates by sha256 use the same
machinery. Real runs, real files, a loopback server counting downloads."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from pipeline.execution.runner import RunRequest, run
from pipeline.records import item_key
from pipeline.state.manifest import Manifest
from pipeline.testing.images import jpeg_bytes, photo
from pipeline.testing.server import TestServer
from tests.stage_jobs import records, run_job

# the tables of a manifest from before the index (copied from the schema of that time)
OLD_SCHEMA = """
CREATE TABLE items (
    key TEXT PRIMARY KEY, url TEXT NOT NULL, status TEXT NOT NULL, stage TEXT, reason TEXT,
    message TEXT, attempt TEXT NOT NULL, run_id TEXT NOT NULL, updated_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE sinks (
    key TEXT NOT NULL, sink TEXT NOT NULL, fingerprint TEXT NOT NULL, outputs TEXT NOT NULL,
    PRIMARY KEY (key, sink)
) WITHOUT ROWID;
"""


def with_sha256(record: dict, data: bytes) -> dict:
    """A `python` stage's function (takes: record): the download's sha256, in case the
    download stage does not put it in the record itself."""
    return {} if record.get("sha256") else {"sha256": hashlib.sha256(data).hexdigest()}


def images() -> dict[str, bytes]:
    """Three distinct originals, near copies of two of them, and two more distinct."""
    found = {}
    for n in range(3):
        image = photo(320, 240, seed=500 + n)
        found[f"orig-{n}"] = jpeg_bytes(image)
        w, h = image.size
        found[f"half-{n}"] = jpeg_bytes(image.resize((w // 2, h // 2)))
        found[f"q30-{n}"] = jpeg_bytes(Image.open(io.BytesIO(jpeg_bytes(image, quality=30))), 30)
    for n in range(2):
        found[f"single-{n}"] = jpeg_bytes(photo(320, 240, seed=600 + n))
    return found


@pytest.fixture
def server():
    with TestServer() as running:
        for name, data in images().items():
            running.add_bytes(f"/{name}.jpg", data)
        yield running


def listed(tmp_path: Path, server: TestServer, names: list[str], decode: bool = True) -> str:
    """YAML for `urls` -> `get` (-> `decode`) over these served images."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(server.url(f"/{name}.jpg") + "\n" for name in names))
    stages = [
        f"urls: {{kind: url_list, path: {listing}}}",
        "get: {kind: download, input: urls, allow_hosts: [127.0.0.1]}",
    ]
    return "\n".join(stages + ["decode: {kind: decode, input: get}"] * decode)


def key(server: TestServer, name: str) -> str:
    return item_key(server.url(f"/{name}.jpg"))


def groups_file(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "dedupe-near.json").read_text())


NEAR = """
    hash: {kind: phash, input: decode}
    near: {kind: dedupe, input: hash, threshold: 12}
    """


def test_a_second_run_hashes_only_its_new_items_and_links_them_to_earlier_ones(tmp_path, server):
    first = ["orig-0", "orig-1", "orig-2", "single-0"]
    report = run_job(tmp_path, listed(tmp_path, server, first), NEAR, partition_size=2)
    assert report["counts"]["ok"] == 4 and report["reductions"]["near"]["groups"] == 0
    # the second night lists two of the old items again (orig-1 and orig-2 are not
    # listed: they still count) and three new ones: near copies of orig-0 and orig-1
    second = ["orig-0", "half-0", "single-0", "q30-1", "single-1"]
    report = run_job(tmp_path, listed(tmp_path, server, second), NEAR, partition_size=2)
    assert report["counts"] == {"ok": 3, "failed": 0, "skipped": 2}
    assert all(hits == 1 for hits in server.hits.values()) and len(server.hits) == 7
    done = {r["url"].rsplit("/", 1)[1].removesuffix(".jpg"): r for r in records(tmp_path / "out")}
    hashed = sorted(name for name, r in done.items() if "hash" in r["timings"])
    assert hashed == ["half-0", "q30-1", "single-1"]  # the phash stage ran on these only
    assert {done[n]["reason"] for n in ("orig-0", "single-0")} == {"unchanged"}
    near = report["reductions"]["near"]
    assert near | {"file": None} == {
        "by": "phash",
        "threshold": 12,
        "items": 7,  # every earlier run's items and this run's
        "groups": 2,
        "duplicates": 2,
        "new_items": 3,
        "new_duplicates": 2,
        "new_matching_earlier": 2,
        "file": None,
    }
    groups = {group["keep"]: group for group in groups_file(tmp_path)["members"]}
    assert set(groups) == {key(server, "orig-0"), key(server, "orig-1")}
    for original, copy in [("orig-0", "half-0"), ("orig-1", "q30-1")]:
        group = groups[key(server, original)]
        assert group["duplicates"] == [key(server, copy)]
        (new,) = group["new"]
        assert new["key"] == key(server, copy) and new["url"] == server.url(f"/{copy}.jpg")
        matches = new["matches"]
        assert matches["key"] == key(server, original)
        assert matches["url"] == server.url(f"/{original}.jpg")  # from the manifest
        assert 0 <= matches["distance"] <= 12
    # a third run with nothing new downloads nothing and finds the same groups
    report = run_job(tmp_path, listed(tmp_path, server, second), NEAR, partition_size=2)
    assert report["counts"]["skipped"] == 5 and len(server.hits) == 7
    assert all(hits == 1 for hits in server.hits.values())
    assert report["reductions"]["near"]["groups"] == 2
    assert report["reductions"]["near"]["new_items"] == 0
    assert all(group["new"] == [] for group in groups_file(tmp_path)["members"])


DROPPING = """
    hash: {kind: phash, input: decode}
    near: {kind: dedupe, input: hash, threshold: 12, drop: true}
    write: {kind: write_images, input: near, path: unique}
    """


@pytest.mark.parametrize("backend", ["sync", "threads"])
def test_drop_drops_a_new_item_that_duplicates_an_earlier_runs_item(tmp_path, server, backend):
    first = ["orig-0", "orig-1", "single-0"]
    report = run_job(
        tmp_path, listed(tmp_path, server, first), DROPPING, backend=backend, partition_size=2
    )
    assert report["counts"]["ok"] == 3
    hits = dict(server.hits)  # each twice: the first pass, then the main pass
    assert set(hits.values()) == {2}
    # half-0 is the first line now, but orig-0, which it matches, came in an earlier run
    second = ["half-0", "orig-0", "q30-1", "single-1"]
    report = run_job(
        tmp_path, listed(tmp_path, server, second), DROPPING, backend=backend, partition_size=2
    )
    assert report["counts"] == {"ok": 1, "failed": 0, "skipped": 3}
    done = {r["url"].rsplit("/", 1)[1].removesuffix(".jpg"): r for r in records(tmp_path / "out")}
    assert {n: (r["status"], r["reason"]) for n, r in done.items()} == {
        "half-0": ("skipped", "duplicate"),
        "orig-0": ("skipped", "unchanged"),
        "q30-1": ("skipped", "duplicate"),
        "single-1": ("ok", None),
    }
    assert done["half-0"]["message"] == f"near-duplicate of {key(server, 'orig-0')}"
    assert done["q30-1"]["message"] == f"near-duplicate of {key(server, 'orig-1')}"
    # earlier items were never downloaded again, not even by the first pass; new ones
    # twice (the first pass, then the main pass up to `dedupe`)
    for name in first:
        assert server.hits[f"/{name}.jpg"] == hits[f"/{name}.jpg"]
    for name in ["half-0", "q30-1", "single-1"]:
        assert server.hits[f"/{name}.jpg"] == 2
    written = sorted(path.name for path in (tmp_path / "out" / "unique").iterdir())
    assert written == [f"{n}-{key(server, n)}.jpg" for n in [*first, "single-1"]]  # kept ones
    groups = {group["keep"]: group for group in groups_file(tmp_path)["members"]}
    assert groups[key(server, "orig-0")]["new"][0]["matches"]["key"] == key(server, "orig-0")
    assert report["reductions"]["near"]["new_matching_earlier"] == 2


def test_full_drops_by_the_hashes_it_computes_not_by_the_index(tmp_path, server):
    """--full redoes every item: the first pass must not trust an item's old hash."""
    report = run_job(tmp_path, listed(tmp_path, server, ["orig-0", "single-0"]), DROPPING)
    assert report["counts"]["ok"] == 2
    server.add_bytes("/single-0.jpg", images()["orig-0"])  # now a copy of orig-0
    report = run(RunRequest(config=tmp_path / "job.yaml", full=True))
    done = {
        r["url"].rsplit("/", 1)[1]: (r["status"], r["reason"]) for r in records(tmp_path / "out")
    }
    assert done == {"orig-0.jpg": ("ok", None), "single-0.jpg": ("skipped", "duplicate")}


def test_a_manifest_from_before_the_index_opens_and_gains_it(tmp_path, server):
    """An old manifest (only `items` and `sinks`) opens, keeps its rows and gains the
    `hashes` table; dedupe's fingerprint changed, so its items are hashed once more and
    from then on are in the index."""
    run_dir = tmp_path / "out"
    run_dir.mkdir()
    old = sqlite3.connect(run_dir / "manifest.sqlite")
    old.executescript(OLD_SCHEMA)
    url = server.url("/orig-0.jpg")
    old.execute(
        "INSERT INTO items VALUES (?, ?, 'ok', NULL, NULL, NULL, 'a1', 'old-run', 1.0)",
        (item_key(url), url),
    )
    old.execute("INSERT INTO sinks VALUES (?, 'near', 'uuid-fingerprint', '[]')", (item_key(url),))
    old.commit()
    old.close()
    with Manifest(run_dir / "manifest.sqlite") as manifest:
        assert manifest.lookup(item_key(url)).run_id == "old-run"
        assert manifest.first_new == 0 and manifest.urls([item_key(url)]) == {item_key(url): url}
        tables = {name for (name,) in manifest.db.execute("SELECT name FROM sqlite_master")}
        assert {"items", "sinks", "hashes"} <= tables
    report = run_job(tmp_path, listed(tmp_path, server, ["orig-0", "half-0"]), NEAR)
    assert report["counts"] == {"ok": 2, "failed": 0, "skipped": 0}  # the old one redone
    assert report["reductions"]["near"]["groups"] == 1
    report = run_job(tmp_path, listed(tmp_path, server, ["orig-0", "half-0", "q30-0"]), NEAR)
    assert report["counts"] == {"ok": 1, "failed": 0, "skipped": 2}
    (group,) = groups_file(tmp_path)["members"]
    assert group["keep"] == key(server, "orig-0") and len(group["duplicates"]) == 2
    assert [m["key"] for m in group["new"]] == [key(server, "q30-0")]


def test_a_failed_retry_takes_the_item_out_of_the_index(tmp_path, server):
    """The index holds the items whose last attempt at `dedupe` hashed ok: in the same
    transaction as the item's row, an item that now fails loses its hash."""
    run_job(tmp_path, listed(tmp_path, server, ["orig-0", "half-0"]), NEAR)
    manifest = sqlite3.connect(tmp_path / "out" / "manifest.sqlite")
    assert manifest.execute("SELECT count(*) FROM hashes").fetchone() == (2,)
    manifest.execute("DELETE FROM sinks WHERE key = ?", (key(server, "half-0"),))  # redo it
    manifest.commit()
    server.add_bytes("/half-0.jpg", b"not an image any more")
    report = run_job(tmp_path, listed(tmp_path, server, ["orig-0", "half-0"]), NEAR)
    assert report["counts"] == {"ok": 0, "failed": 1, "skipped": 1}
    assert report["reductions"]["near"]["items"] == 1
    rows = manifest.execute("SELECT key FROM hashes").fetchall()
    assert rows == [(key(server, "orig-0"),)]


def exact_stages(drop: bool) -> str:
    """sha256 of the downloaded bytes (the download's, or the `python` stage's), before any
    decoding: `dedupe` by sha256 needs no image."""
    return f"""
    sha: {{kind: python, input: get, takes: record, function: "{__name__}:with_sha256"}}
    near: {{kind: dedupe, input: sha, by: sha256, drop: {str(drop).lower()}}}
    decode: {{kind: decode, input: near}}
    write: {{kind: write_images, input: decode, path: unique}}
    """


@pytest.mark.parametrize("drop", [False, True])
def test_exact_duplicates_by_sha256_across_urls_and_runs(tmp_path, server, drop):
    data = images()
    server.add_bytes("/copy-of-orig-0.jpg", data["orig-0"])  # same bytes, another URL
    server.add_bytes("/again-orig-0.jpg", data["orig-0"])
    first = ["orig-0", "half-0", "q30-0", "copy-of-orig-0", "single-0"]
    report = run_job(tmp_path, listed(tmp_path, server, first, decode=False), exact_stages(drop))
    near = report["reductions"]["near"]
    assert near["by"] == "sha256" and near["threshold"] == 0  # the default 8 is ignored
    assert (near["items"], near["groups"], near["duplicates"]) == (5, 1, 1)
    (group,) = groups_file(tmp_path)["members"]  # near copies are not exact ones
    assert group == {
        "keep": key(server, "orig-0"),
        "duplicates": [key(server, "copy-of-orig-0")],
        "new": [
            {"key": key(server, "orig-0"), "matches": None, "url": server.url("/orig-0.jpg")},
            {
                "key": key(server, "copy-of-orig-0"),
                "matches": None,
                "url": server.url("/copy-of-orig-0.jpg"),
            },
        ],
    }
    copy = {r["url"]: r for r in records(tmp_path / "out")}[server.url("/copy-of-orig-0.jpg")]
    if drop:
        assert (copy["status"], copy["reason"]) == ("skipped", "duplicate")
        assert copy["message"] == f"exact-duplicate of {key(server, 'orig-0')}"
    else:
        assert copy["status"] == "ok"
    # the next run: a third URL with orig-0's bytes matches the earlier item, by key and URL
    second = [*first, "again-orig-0"]
    report = run_job(tmp_path, listed(tmp_path, server, second, decode=False), exact_stages(drop))
    assert report["counts"]["ok"] == (0 if drop else 1)
    assert server.hits["/orig-0.jpg"] == 1 + drop  # the first run's two passes only
    group = next(g for g in groups_file(tmp_path)["members"] if g["keep"] == key(server, "orig-0"))
    (new,) = [m for m in group["new"] if m["key"] == key(server, "again-orig-0")]
    assert new["matches"] == {
        "key": key(server, "orig-0"),
        "url": server.url("/orig-0.jpg"),
        "distance": 0,
    }
    again = {r["url"]: r for r in records(tmp_path / "out")}[server.url("/again-orig-0.jpg")]
    if drop:
        assert again["message"] == f"exact-duplicate of {key(server, 'orig-0')}"
    unique = sorted(path.name for path in (tmp_path / "out" / "unique").iterdir())
    assert len(unique) == (4 if drop else 6)
