"""Near-duplicate groups across partitions: crafted copies (resized, recompressed, cropped) of
real images among distinct ones, reduced as a tree on the backend; and the band index
checked against brute force."""

from __future__ import annotations

import io
import json
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from pipeline.execution import engine
from pipeline.execution.reduction import first_pass_plan
from pipeline.execution.runner import RunRequest, prepare
from pipeline.stages.dedupe import (
    Dedupe,
    Duplicates,
    HashSummary,
    UnionFind,
    band_keys,
    groups_of,
    merge,
)
from pipeline.stages.phash import dhash, phash
from pipeline.testing.images import jpeg_bytes, photo, png_bytes
from tests.stage_jobs import decoded_files, records, run_job, write_photos

FAMILIES, SINGLES = 6, 6
LOCAL_BACKENDS = ["threads", pytest.param("processes", marks=pytest.mark.slow)]


def near_copies(image: Image.Image) -> dict[str, bytes]:
    width, height = image.size
    return {
        "orig": jpeg_bytes(image),
        "half": jpeg_bytes(image.resize((width // 2, height // 2))),
        "q30": jpeg_bytes(Image.open(io.BytesIO(jpeg_bytes(image, quality=30))), quality=30),
        "crop": jpeg_bytes(image.crop((6, 5, width - 6, height - 5))),
    }


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """Families of near-copies and distinct singles, interleaved in name order."""
    folder = tmp_path_factory.mktemp("near")
    family_of = {}
    for n in range(FAMILIES):
        for variant, data in near_copies(photo(320, 240, seed=200 + n)).items():
            name = f"{variant}-{n}.jpg"
            (folder / name).write_bytes(data)
            family_of[name] = n
    for n in range(SINGLES):
        (folder / f"single-{n}.jpg").write_bytes(jpeg_bytes(photo(320, 240, seed=300 + n)))
    return folder, family_of


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_dedupe_finds_every_family_and_merges_nothing_else(tmp_path, crafted, backend):
    folder, family_of = crafted
    report = run_job(
        tmp_path,
        decoded_files(folder),
        """
        hash: {kind: phash, input: decode}
        near: {kind: dedupe, input: hash, threshold: 12, fan_in: 2}
        """,
        backend=backend,
        partition_size=3,  # 10 partitions: families span partitions and tree levels
    )
    assert report["counts"]["ok"] == FAMILIES * 4 + SINGLES
    summary = report["reductions"]["near"]
    assert summary["groups"] == FAMILIES and summary["duplicates"] == FAMILIES * 3
    name_of = {r["key"]: r["url"].rsplit("/", 1)[1] for r in records(tmp_path / "out")}
    groups = json.loads((tmp_path / "out" / "dedupe-near.json").read_text())["members"]
    found = [{name_of[key] for key in [g["keep"], *g["duplicates"]]} for g in groups]
    expected = [
        {name for name, family in family_of.items() if family == n} for n in range(FAMILIES)
    ]
    assert sorted(map(sorted, found)) == sorted(map(sorted, expected))  # recall 1, no false merge


@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_drop_skips_duplicates_before_they_are_written(tmp_path, crafted, backend):
    folder, _ = crafted
    report = run_job(
        tmp_path,
        decoded_files(folder),
        """
        hash: {kind: phash, input: decode}
        near: {kind: dedupe, input: hash, threshold: 12, drop: true}
        small: {kind: resize, input: near, size: [32, 32]}
        write: {kind: write_images, input: small, path: unique}
        """,
        backend=backend,
        partition_size=5,
    )
    assert report["counts"] == {"ok": FAMILIES + SINGLES, "failed": 0, "skipped": FAMILIES * 3}
    assert report["reductions"]["near"]["duplicates"] == FAMILIES * 3
    written = sorted(path.name.split("-")[0] for path in (tmp_path / "out" / "unique").iterdir())
    # files are listed in name order, so "crop-N" is each family's earliest member
    assert written == ["crop"] * FAMILIES + ["single"] * SINGLES
    skipped = [r for r in records(tmp_path / "out") if r["status"] == "skipped"]
    assert {r["reason"] for r in skipped} == {"duplicate"} and not any(
        r["outputs"] for r in skipped
    )


def hashed(key: str, index: int, value: int) -> dict:
    """A record as `dedupe` named `near` leaves it: the hash it used under its name."""
    return {"key": key, "index": index, "status": "ok", "results": {"near": f"{value:016x}"}}


def brute_force_groups(hashes: np.ndarray, threshold: int) -> set[frozenset[int]]:
    groups = UnionFind(np.arange(len(hashes)))
    for a, b in combinations(range(len(hashes)), 2):
        if (int(hashes[a]) ^ int(hashes[b])).bit_count() <= threshold:
            groups.union(a, b)
    labels = groups.labels()
    return {frozenset(np.flatnonzero(labels == label).tolist()) for label in set(labels.tolist())}


@pytest.mark.parametrize("threshold", [0, 3, 10])
def test_tree_of_merges_equals_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, size=60, dtype=np.uint64)
    flips = [
        sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 14), replace=False))
        for _ in range(60)
    ]
    hashes = np.concatenate([base, base ^ np.array(flips, dtype=np.uint64), base[:5]])
    records = [hashed(f"{i:020d}", i, int(h)) for i, h in enumerate(hashes)]
    leaves = [HashSummary.of(records[i : i + 7], "near") for i in range(0, len(records), 7)]
    level_one = [merge(leaves[i : i + 3], threshold) for i in range(0, len(leaves), 3)]
    result = merge(level_one, threshold)
    found = {frozenset(int(k) for k in [g["keep"], *g["duplicates"]]) for g in groups_of(result)}
    expected = {group for group in brute_force_groups(hashes, threshold) if len(group) > 1}
    assert found == expected and len(found) >= 5


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("threshold", [1, 4, 8, 13])
def test_hashes_within_the_threshold_always_share_a_band_key(masked, threshold):
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, size=500, dtype=np.uint64)
    flips = [rng.choice(64, threshold, replace=False) for _ in base]  # exactly `threshold` bits
    near = base ^ np.array([sum(1 << int(b) for b in bits) for bits in flips], dtype=np.uint64)
    shared = np.zeros(len(base), dtype=bool)
    for key in band_keys(np.concatenate([base, near]), threshold, masked):
        shared |= key[: len(base)] == key[len(base) :]
    assert shared.all()


def test_a_second_incremental_run_still_groups_the_whole_batch(tmp_path, crafted):
    folder, _ = crafted
    stages = "hash: {kind: phash, input: decode}\nnear: {kind: dedupe, input: hash, threshold: 12}"
    for _ in range(2):
        report = run_job(tmp_path, decoded_files(folder), stages, backend="threads")
        assert report["reductions"]["near"]["groups"] == FAMILIES
        assert report["reductions"]["near"]["items"] == FAMILIES * 4 + SINGLES


def test_a_key_in_many_summaries_is_one_item_at_its_earliest_index():
    """The first pass sees every line, so a key listed twice reaches the reduction twice
    (in one partition or in two): it is one item, never a duplicate of itself."""
    twice, near, other = 0x0F0F_0F0F_0F0F_0F0F, 0x0F0F_0F0F_0F0F_0F0E, 0xFFFF_0000_FFFF_0000
    first = HashSummary.of([hashed("a" * 20, 1, twice), hashed("a" * 20, 3, twice)], "near")
    assert first.keys.tolist() == [b"a" * 20] and first.indices.tolist() == [1]
    second = HashSummary.of([hashed("b" * 20, 4, near), hashed("a" * 20, 5, twice)], "near")
    third = HashSummary.of([hashed("c" * 20, 2, other), hashed("a" * 20, 6, twice)], "near")
    merged = merge([merge([second, third], 2), first], 2)
    assert sorted(merged.keys.tolist()) == [b"a" * 20, b"b" * 20, b"c" * 20]
    assert dict(zip(merged.keys.tolist(), merged.indices.tolist(), strict=True))[b"a" * 20] == 1
    assert groups_of(merged) == [{"keep": "a" * 20, "duplicates": ["b" * 20]}]
    alone = merge([HashSummary.of([hashed("a" * 20, 9, twice)], "near"), first], 2)
    assert len(alone.keys) == 1 and groups_of(alone) == []


def test_drop_keeps_an_image_listed_twice(tmp_path):
    """Line 3 repeats line 1: the main pass skips line 3 (same URL), and line 1 is written;
    it is not dropped as a near-duplicate of its own key."""
    folder = tmp_path / "photos"
    write_photos(folder, 3)
    listing = folder / "list.txt"
    listing.write_text("photo-00.jpg\nphoto-01.jpg\nphoto-00.jpg\nphoto-02.jpg\n")
    report = run_job(
        tmp_path,
        f"""
        urls: {{kind: url_list, path: {listing}}}
        get: {{kind: download, input: urls, allow_schemes: [file]}}
        decode: {{kind: decode, input: get}}
        hash: {{kind: phash, input: decode}}
        near: {{kind: dedupe, input: hash, threshold: 4, drop: true}}
        write: {{kind: write_images, input: near, path: unique}}
        """,
        partition_size=2,  # the two lines of photo-00 reach the reduction in two summaries
    )
    assert report["counts"] == {"ok": 3, "failed": 0, "skipped": 1}
    assert report["reductions"]["near"] | {"file": None} == {
        "by": "phash",
        "threshold": 4,
        "items": 3,
        "groups": 0,
        "duplicates": 0,
        "new_items": 3,
        "new_duplicates": 0,
        "new_matching_earlier": 0,
        "file": None,
    }
    status = [(r["index"], r["status"], r["reason"]) for r in records(tmp_path / "out")]
    assert status == [
        (1, "ok", None),
        (2, "ok", None),
        (3, "skipped", "duplicate"),
        (4, "ok", None),
    ]
    written = sorted(path.name.split("-")[1] for path in (tmp_path / "out" / "unique").iterdir())
    assert written == ["00", "01", "02"]


@pytest.mark.parametrize("backend", ["sync", "threads"])
def test_drop_drops_when_every_stage_is_upstream_of_dedupe(tmp_path, crafted, backend):
    """With no stage after `dedupe`, the first pass's plan has the same config as the main
    pass's (only the nodes' `drop` differs): the main pass must not run the first pass's
    compiled stages (same process on sync and threads), or it would drop nothing."""
    folder, _ = crafted
    stages = """
    hash: {kind: phash, input: decode}
    near: {kind: dedupe, input: hash, threshold: 12, drop: true}
    """
    report = run_job(tmp_path, decoded_files(folder), stages, backend=backend, partition_size=5)
    assert report["counts"] == {"ok": FAMILIES + SINGLES, "failed": 0, "skipped": FAMILIES * 3}
    skipped = [r for r in records(tmp_path / "out") if r["status"] == "skipped"]
    assert {r["reason"] for r in skipped} == {"duplicate"} and len(skipped) == FAMILIES * 3
    plan, _ = prepare(RunRequest(config=tmp_path / "job.yaml"))
    first_pass = first_pass_plan(plan, ["near"])
    assert first_pass.config == plan.config and first_pass.fingerprint != plan.fingerprint


# hash -> near (drops) -> write: the stages of the two tests of the first pass below
DROPPING = """
    hash: {kind: phash, input: decode}
    near: {kind: dedupe, input: hash, threshold: 12, drop: true}
    write: {kind: write_images, input: near, path: unique}
    """


def test_drop_main_pass_gets_the_duplicates_in_its_tasks_plan(tmp_path, crafted, monkeypatch):
    """The first pass's conclusion reaches the main pass as data: every main-pass task's
    plan carries it (cut to the task's partition), while the groups file, written only at
    the end of the run, does not exist yet; first-pass tasks carry no conclusion."""
    folder, _ = crafted
    groups_file = tmp_path / "out" / "dedupe-near.json"
    tasks = []

    def spy(plan, partition):
        task_plan = plan.for_partition(partition)
        conclusion = task_plan.conclusions.get("near")
        keys = {item.key for item in partition.items}
        dropped = conclusion.as_dict() if conclusion is not None else None
        tasks.append(("write" in plan.by_name, dropped, keys, groups_file.exists()))
        return run_partition(plan, partition)

    run_partition = engine.run_partition
    monkeypatch.setattr(engine, "run_partition", spy)
    report = run_job(
        tmp_path,
        decoded_files(folder),
        DROPPING,
        backend="threads",
        partition_size=5,
    )
    assert report["counts"] == {"ok": FAMILIES + SINGLES, "failed": 0, "skipped": FAMILIES * 3}
    first = [task for task in tasks if not task[0]]
    main = [task for task in tasks if task[0]]
    assert len(first) == len(main) == -(-(FAMILIES * 4 + SINGLES) // 5)
    assert all(dropped is None for _, dropped, _, _ in first)
    assert all(dropped is not None and set(dropped) <= keys for _, dropped, keys, _ in main)
    assert sum(len(dropped) for _, dropped, _, _ in main) == FAMILIES * 3
    assert not any(exists for *_, exists in tasks)  # no task could have read it
    groups = json.loads(groups_file.read_text())
    assert groups["dropped"] is True and groups["duplicates"] == FAMILIES * 3
    skipped = {r["key"]: r["message"] for r in records(tmp_path / "out") if r["reason"]}
    from_tasks = {key: kept for _, dropped, _, _ in main for key, kept in dropped.items()}
    assert skipped == {key: f"near-duplicate of {kept}" for key, kept in from_tasks.items()}


def test_only_the_reducer_that_needs_a_first_pass_runs_in_it(tmp_path, crafted, monkeypatch):
    """`near` drops, `other` (a sibling) only reports: the first pass runs the stages up to
    `near` and summarizes only `near`; `other` reduces the main pass's committed hashes,
    read back from the manifest's index at the end of the run."""
    folder, _ = crafted
    summarized = []
    first_pass_stages = []
    summarize, run_partition = Dedupe.summarize, engine.run_partition
    summarize_index = Dedupe.summarize_index

    def spy_summarize(self, records):
        summarized.append(self.name)
        return summarize(self, records)

    def spy_summarize_index(self, rows):
        summarized.append((self.name, len(rows)))
        return summarize_index(self, rows)

    def spy_run(plan, partition):
        if "write" not in plan.by_name:
            first_pass_stages.append(tuple(plan.by_name))
        return run_partition(plan, partition)

    monkeypatch.setattr(Dedupe, "summarize", spy_summarize)
    monkeypatch.setattr(Dedupe, "summarize_index", spy_summarize_index)
    monkeypatch.setattr(engine, "run_partition", spy_run)
    report = run_job(
        tmp_path,
        decoded_files(folder),
        DROPPING,
        """
        other: {kind: dedupe, input: hash, threshold: 12}
        """,
        backend="threads",
        partition_size=5,
    )
    partitions = -(-(FAMILIES * 4 + SINGLES) // 5)
    assert set(first_pass_stages) == {("files", "get", "decode", "hash", "near")}
    # the first pass: `near` only (an empty manifest: no index rows); then `other`'s index,
    # which holds the main pass's ok records: `near` skipped the duplicates there
    assert summarized == ["near"] * partitions + [("other", FAMILIES + SINGLES)]
    near, other = report["reductions"]["near"], report["reductions"]["other"]
    assert near["items"] == FAMILIES * 4 + SINGLES and near["duplicates"] == FAMILIES * 3
    assert other["items"] == FAMILIES + SINGLES and other["groups"] == 0
    assert report["counts"]["skipped"] == FAMILIES * 3


def test_duplicates_are_every_group_member_but_the_earliest():
    summary = merge(
        [
            HashSummary.of([hashed("b" * 20, 2, 0xFF), hashed("a" * 20, 5, 0xFE)], "near"),
            HashSummary.of([hashed("c" * 20, 1, 0xFF), hashed("d" * 20, 4, 0xFF00)], "near"),
        ],
        2,
    )
    found = Duplicates.of(summary)
    assert found.as_dict() == {"a" * 20: "c" * 20, "b" * 20: "c" * 20}
    assert found.keys.tolist() == sorted(found.keys.tolist())  # sorted, for lookups
    assert Duplicates.of(merge([], 2)).as_dict() == {}


def ramp(seed: int, stripes: bool) -> Image.Image:
    """A faint photo under a strong left-to-right ramp, maybe with light and dark stripes
    across: every row brightens to the right, so all have the same dHash (all ones), while
    the pHash sees the photo and the stripes."""
    grey = np.asarray(photo(144, 96, seed=seed).convert("L"), dtype=np.float32)
    image = 0.2 * grey + 180 * np.linspace(0, 1, 144)[None, :]
    if stripes:
        image += 30 * np.sign(np.sin(2 * np.pi * np.arange(96)[:, None] / 24))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "L").convert("RGB")


@pytest.mark.parametrize(
    "dhash_stage",
    [
        "d: {kind: phash, input: near, algorithm: dhash}",  # later on dedupe's branch
        "d: {kind: phash, input: decode, algorithm: dhash}",  # on a sibling branch
    ],
)
def test_dedupe_groups_by_the_hash_stage_on_its_own_branch(tmp_path, dhash_stage):
    """Two hash stages each keep their value under their own name; `dedupe` groups by the
    nearest one upstream of it (pHash here), whatever the other (dHash, which runs later,
    on the way to a sink) says."""
    folder = tmp_path / "ramps"
    folder.mkdir()
    images = {
        f"{seed}{'s' if stripes else 'p'}": ramp(seed, stripes)
        for seed in (1, 2)
        for stripes in (False, True)
    }
    for name, image in images.items():
        (folder / f"{name}.png").write_bytes(png_bytes(image))
    threshold = 10
    names = sorted(images)
    p_groups = brute_force_groups(np.array([phash(images[n]) for n in names], np.uint64), threshold)
    d_groups = brute_force_groups(np.array([dhash(images[n]) for n in names], np.uint64), threshold)
    assert {frozenset(names[i] for i in g) for g in p_groups} == {
        frozenset({"1p", "1s"}),
        frozenset({"2p", "2s"}),
    }
    assert len(d_groups) == 1  # the premise: the two algorithms disagree
    report = run_job(
        tmp_path,
        decoded_files(folder),
        f"""
        p: {{kind: phash, input: decode}}
        near: {{kind: dedupe, input: p, threshold: {threshold}}}
        {dhash_stage}
        write: {{kind: write_images, input: d, path: written}}
        """,
    )
    assert report["counts"]["ok"] == 4
    done = records(tmp_path / "out")
    name_of = {r["key"]: r["url"].rsplit("/", 1)[1].removesuffix(".png") for r in done}
    groups = json.loads((tmp_path / "out" / "dedupe-near.json").read_text())["members"]
    found = {frozenset(name_of[k] for k in [g["keep"], *g["duplicates"]]) for g in groups}
    assert found == {frozenset({"1p", "1s"}), frozenset({"2p", "2s"})}  # pHash's, not dHash's
    for record in done:
        results, image = record["results"], images[name_of[record["key"]]]
        assert results["p"] == f"{phash(image):016x}" and results["d"] == f"{dhash(image):016x}"
        assert results["near"] == results["p"]  # the hash `dedupe` used, under its name
    hashes = np.array([int(r["results"]["p"], 16) for r in done], np.uint64)
    from_records = {
        frozenset(name_of[done[i]["key"]] for i in group)
        for group in brute_force_groups(hashes, threshold)
        if len(group) > 1
    }
    assert found == from_records


MISSING_HASH = """name: dedupe-without-its-hash
output: {out}
stages:
  urls:   {{kind: url_list, path: {urls}}}
  get:    {{kind: download, input: urls, allow_schemes: [file], hashes: {hashes}}}
  decode: {{kind: decode, input: get}}
  same:   {{kind: dedupe, input: decode, by: {by}}}
"""


@pytest.mark.parametrize(
    ("by", "hashes", "needs"),
    [
        ("sha256", "[]", "a download above it that computes sha256"),
        ("phash", "[sha256]", "a phash"),
    ],
)
def test_a_dedupe_without_the_hash_it_groups_by_is_a_config_error(tmp_path, by, hashes, needs):
    """Not every item failing at run time: the config error names the file, line and key."""
    from pipeline.errors import ConfigError

    config = tmp_path / "job.yaml"
    urls = tmp_path / "urls.txt"
    urls.write_text("a.jpg\n")
    config.write_text(MISSING_HASH.format(out=tmp_path / "out", urls=urls, by=by, hashes=hashes))
    with pytest.raises(ConfigError) as raised:
        prepare(RunRequest(config=config))
    assert f"{config}:7: stages.same.by: by: {by} needs {needs}" in str(raised.value)
    fixed = MISSING_HASH.format(out=tmp_path / "out", urls=urls, by="sha256", hashes="[sha256]")
    config.write_text(fixed)
    prepare(RunRequest(config=config))  # sha256 computed above it: valid


class KillsItsWorker(HashSummary):
    """A summary that kills the process that unpickles it (a worker dying mid-combine)."""

    def __reduce__(self):
        import os

        return (os._exit, (1,))


@pytest.mark.slow
def test_a_worker_dying_while_summaries_are_combined_does_not_stop_the_run(
    tmp_path, crafted, monkeypatch
):
    """The items are committed when the reduction runs: a dead worker there ends the run
    with its report and the same groups, the level combined in the client."""
    folder, _ = crafted
    summarize = Dedupe.summarize_index  # dedupe keeps an index: summaries come from it
    killed: list[bool] = []

    def first_kills(self, rows):
        summary = summarize(self, rows)
        if not killed:
            killed.append(True)
            summary = KillsItsWorker(summary.keys, summary.indices, summary.hashes, summary.labels)
        return summary

    monkeypatch.setattr(Dedupe, "summarize_index", first_kills)
    job = """
        hash: {kind: phash, input: decode}
        near: {kind: dedupe, input: hash, threshold: 12, fan_in: 2}
        """
    report = run_job(tmp_path, decoded_files(folder), job, backend="processes", partition_size=3)
    assert killed and report["exit_code"] == 0
    assert report["counts"]["ok"] == FAMILIES * 4 + SINGLES
    summary = report["reductions"]["near"]
    assert summary["groups"] == FAMILIES and summary["duplicates"] == FAMILIES * 3
