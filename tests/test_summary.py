"""The report's batch summary: formats, size histograms in fixed buckets, mean brightness,
computed on the client as records arrive; real runs over local photos of known sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.state.results import (
    BYTES_EDGES,
    SIZE_EDGES,
    BatchSummary,
    RunStats,
    bucket_label,
    summary_lines,
)
from pipeline.testing.images import photo, png_bytes
from tests.stage_jobs import records, run_job, write_photos

KIB, MIB = 1024, 1024 * 1024


def photos(folder: Path, prefix: str, count: int, size: tuple[int, int]) -> list[Path]:
    """write_photos' JPEGs of one size, renamed `<prefix>-NN.jpg` into `folder`."""
    made = write_photos(folder / f".{prefix}", count, size)
    moved = [Path(shutil.move(path, folder / f"{prefix}-{path.name}")) for path in made]
    (folder / f".{prefix}").rmdir()
    return moved


def expected_counts(values: list[int], edges: tuple[int, ...]) -> list[int]:
    """Bucket i holds edges[i] <= v < edges[i + 1]; the last has no upper edge."""
    bounds = [*edges[1:], float("inf")]
    return [sum(low <= v < high for v in values) for low, high in zip(edges, bounds, strict=True)]


def job(images: Path, out: Path, stats: bool = True) -> list[str]:
    top = "stats" if stats else "decode"
    stages = [
        f"files: {{kind: files, path: {images}}}",
        "get: {kind: download, input: files, allow_schemes: [file]}",
        "decode: {kind: decode, input: get}",
        f"write: {{kind: write_images, input: {top}, path: {out}}}",
    ]
    if stats:
        stages.insert(3, "stats: {kind: stats, input: decode}")
    return stages


def sample_images(folder: Path) -> dict[str, list[Path]]:
    """JPEGs of three known sizes, two PNGs and one file that fails to decode."""
    folder.mkdir(parents=True)
    made = {
        "small": photos(folder, "small", 3, (50, 40)),  # width <64, height <64
        "mid": photos(folder, "mid", 4, (300, 200)),  # width 256-512, height 128-256
        "edge": photos(folder, "edge", 2, (128, 64)),  # on the edges: 128-256 and 64-128
    }
    pngs = []
    for index, size in enumerate([(1100, 20), (64, 600)]):  # 1024-2048 x <64; 64-128 x 512-1024
        path = folder / f"drawing-{index}.png"
        path.write_bytes(png_bytes(photo(*size, seed=7 + index)))
        pngs.append(path)
    made["png"] = pngs
    (folder / "broken.jpg").write_bytes(b"not an image at all")  # fails: has bytes, no sizes
    return made


def test_a_run_reports_formats_histograms_and_mean_brightness(tmp_path):
    images = sample_images(tmp_path / "images")
    report = run_job(tmp_path, *job(tmp_path / "images", tmp_path / "thumbs"))
    assert report["counts"] == {"ok": 11, "failed": 1, "skipped": 0}
    summary = report["summary"]
    assert summary["ok_items"] == 11
    assert summary["formats"] == {"JPEG": 9, "PNG": 2}
    assert summary["width"] == {
        "edges": [0, 64, 128, 256, 512, 1024, 2048, 4096],
        "counts": [3, 1, 2, 4, 0, 1, 0, 0],
    }
    assert summary["height"] == {
        "edges": [0, 64, 128, 256, 512, 1024, 2048, 4096],
        "counts": [4, 2, 4, 0, 1, 0, 0, 0],
    }
    # bytes: the files' sizes on disk (the download's `bytes`), in powers of 4 from 1 KiB;
    # the broken file failed and is not counted.
    sizes = [path.stat().st_size for group in images.values() for path in group]
    assert summary["bytes"]["edges"] == [0, *(KIB * 4**i for i in range(9))]
    assert summary["bytes"]["edges"][-1] == 64 * MIB
    assert summary["bytes"]["counts"] == expected_counts(sizes, BYTES_EDGES)
    assert sum(summary["bytes"]["counts"]) == 11

    ok = [record for record in records(tmp_path / "out") if record["status"] == "ok"]
    values = [record["results"]["stats"]["brightness"] for record in ok]
    assert summary["brightness"] == {
        "stats": {"mean": round(sum(values) / len(values), 3), "items": 11}
    }

    # it is in report.json and in the history's end line, as returned
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["summary"] == summary
    history = (tmp_path / "out" / "history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["summary"] == summary


def test_without_a_stats_stage_there_is_no_brightness(tmp_path):
    folder = tmp_path / "images"
    write_photos(folder, 5, (96, 72))
    report = run_job(tmp_path, *job(folder, tmp_path / "thumbs", stats=False))
    summary = report["summary"]
    assert "brightness" not in summary
    assert summary["formats"] == {"JPEG": 5}
    assert summary["width"]["counts"] == [0, 5, 0, 0, 0, 0, 0, 0]
    assert summary["height"]["counts"] == [0, 5, 0, 0, 0, 0, 0, 0]


def test_a_rerun_that_skips_unchanged_items_summarises_nothing(tmp_path):
    folder = tmp_path / "images"
    write_photos(folder, 4, (96, 72))
    stages = job(folder, tmp_path / "thumbs")
    assert run_job(tmp_path, *stages)["summary"]["ok_items"] == 4
    again = run_job(tmp_path, *stages)
    assert again["counts"] == {"ok": 0, "failed": 0, "skipped": 4}
    summary = again["summary"]
    assert (summary["ok_items"], summary["formats"]) == (0, {})
    assert all(sum(summary[name]["counts"]) == 0 for name in ("width", "height", "bytes"))
    assert "brightness" not in summary


def test_buckets_hold_their_lower_edge_and_the_last_has_no_upper_one():
    summary = BatchSummary()
    sizes = [0, 63, 64, 4095, 4096, 100_000]
    byte_counts = [0, KIB - 1, KIB, 64 * MIB - 1, 64 * MIB, 10**12]
    for width, size in zip(sizes, byte_counts, strict=True):
        summary.add({"status": "ok", "width": width, "height": width, "bytes": size})
    report = summary.report()
    assert report["width"]["counts"] == [2, 1, 0, 0, 0, 0, 1, 2]
    assert report["bytes"]["counts"] == [2, 1, 0, 0, 0, 0, 0, 0, 1, 2]
    assert [bucket_label(list(SIZE_EDGES), i) for i in (0, 1, 7)] == ["<64", "64-128", "4096+"]
    labels = [bucket_label(list(BYTES_EDGES), i, "B") for i in range(len(BYTES_EDGES))]
    assert " ".join(labels) == (
        "<1K 1K-4K 4K-16K 16K-64K 64K-256K 256K-1M 1M-4M 4M-16M 16M-64M 64M+"
    )


def test_memory_is_fixed_per_bucket_and_odd_records_are_ignored():
    stats = RunStats()
    for start in range(0, 20_000, 1000):
        batch = [
            {"status": "ok", "reason": None, "timings": {}, "width": w, "format": "JPEG"}
            for w in range(start, start + 1000)
        ]
        stats.add(batch)
    stats.add(
        [
            {"status": "ok", "reason": None, "timings": {}},  # no sizes at all
            {"status": "ok", "reason": None, "timings": {}, "width": None, "bytes": "12"},
            {"status": "ok", "reason": None, "timings": {}, "width": True, "height": float("nan")},
            {"status": "ok", "reason": None, "timings": {}, "results": {"x": [1], "y": {}}},
            {"status": "failed", "reason": "corrupt", "timings": {}, "width": 10, "format": "PNG"},
            {"status": "skipped", "reason": "unchanged", "timings": {}, "width": 10},
        ]
    )
    stats.add(
        [{"status": "ok", "reason": None, "timings": {}, "format": f"F{i}"} for i in range(40)]
    )
    # 32 names are kept (JPEG, F0 to F30), the 9 others count as one
    assert len(stats.summary.formats) == 33 and stats.summary.formats["other"] == 9
    histogram = stats.summary.histograms["width"]
    assert len(histogram.counts) == len(SIZE_EDGES)  # whatever the number of values
    summary = stats.report()["summary"]
    assert summary["ok_items"] == 20_044
    assert summary["formats"]["JPEG"] == 20_000 and "F30" in summary["formats"]
    assert summary["width"]["counts"] == [64, 64, 128, 256, 512, 1024, 2048, 15_904]
    assert "brightness" not in summary


def test_summary_lines_show_the_non_empty_buckets():
    summary = BatchSummary()
    for width, size, brightness in [(50, 2000, 10.0), (300, 5000, 20.0), (300, 70_000, 60.0)]:
        record = {"status": "ok", "format": "PNG" if width == 50 else "JPEG", "width": width}
        record |= {"height": 200, "bytes": size, "results": {"st": {"brightness": brightness}}}
        summary.add(record)
    assert summary_lines(summary.report()) == [
        "formats     JPEG 2, PNG 1",
        "width       <64: 1, 256-512: 2",
        "height      128-256: 3",
        "bytes       1K-4K: 1, 4K-16K: 1, 64K-256K: 1",
        "brightness  30.0 mean of 3 (st)",
    ]
