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

from pipeline.stages.dedupe import HashSummary, UnionFind, band_keys, groups_of, merge
from pipeline.testing.images import jpeg_bytes, photo
from tests.stage_jobs import decoded_files, records, run_job

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
    records = [
        {"key": f"{i:020d}", "index": i, "status": "ok", "phash": f"{int(h):016x}"}
        for i, h in enumerate(hashes)
    ]
    leaves = [HashSummary.of(records[i : i + 7]) for i in range(0, len(records), 7)]
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
