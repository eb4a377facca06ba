"""Thumbnails from a reduced-scale JPEG decode look like full-resolution ones."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.config import load_config
from pipeline.plan import build_plan
from pipeline.records import Item
from pipeline.testing.images import jpeg_bytes, photo


def _psnr(a: Image.Image, b: Image.Image) -> float:
    error = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(error, 1e-12)))


def compiled(write_config, tmp_path, *stages: str) -> dict:
    """The live stages of a job: a list -> download -> decode, then `stages` (YAML lines)."""
    (tmp_path / "urls.txt").write_text("x.jpg\n")
    lines = "".join(f"          {line}\n" for line in stages)
    config = write_config(f"""
        name: t
        output: {tmp_path / "out"}
        stages:
          urls: {{kind: url_list, path: {tmp_path / "urls.txt"}}}
          download: {{kind: download, input: urls, allow_schemes: [file]}}
          decode: {{kind: decode, input: download}}
{lines}""")
    return build_plan(*load_config(config)).compile()


def test_draft_decode_to_the_box_keeps_thumbnail_quality(write_config, tmp_path):
    stages = compiled(
        write_config, tmp_path, "thumb: {kind: thumbnail, input: decode, size: [256, 256]}"
    )
    data = jpeg_bytes(photo(1600, 1200, seed=3))
    decoded = stages["decode"].process(Item({}, data))
    thumb = stages["thumb"].process(decoded).data

    assert decoded.data.size == (400, 300)  # DCT-scaled by 1/4, still covers the box
    reference = Image.open(io.BytesIO(data)).resize((256, 192), Image.LANCZOS)
    assert thumb.size == (256, 192)
    assert _psnr(thumb, reference) > 38


def test_draft_keeps_both_sides_for_a_consumer_that_fills_the_box(write_config, tmp_path):
    """A cover resize crops a panorama to the box: its short side must reach the box too."""
    stages = compiled(
        write_config,
        tmp_path,
        "thumb: {kind: thumbnail, input: decode, size: [256, 256]}",
        "square: {kind: resize, input: decode, size: [256, 256], mode: cover}",
    )
    decoded = stages["decode"].process(Item({}, jpeg_bytes(photo(1600, 400, seed=4))))
    assert decoded.data.size == (1600, 400)  # 1/2 scale would leave the short side at 200


def test_a_filter_between_decode_and_thumbnail_keeps_the_draft(write_config, tmp_path):
    """A filter passes images on unchanged: the decoder still drafts to what follows it,
    and the record keeps the full size the filter's rules read."""
    stages = compiled(
        write_config,
        tmp_path,
        "keep: {kind: filter, input: decode, min_width: 1000}",
        "thumb: {kind: thumbnail, input: keep, size: [256, 256]}",
    )
    record = {"status": "ok", "timings": {}}
    decoded = stages["decode"].process(Item(record, jpeg_bytes(photo(1600, 1200, seed=3))))
    assert decoded.data.size == (400, 300)
    assert (decoded.record["width"], decoded.record["height"]) == (1600, 1200)
    assert stages["keep"].run_one(decoded) is decoded


def test_the_record_has_the_size_as_oriented_and_not_drafted(write_config, tmp_path):
    """A phone photo stored 1600x800 with EXIF orientation 6 is 800x1600 to its viewers,
    and to a filter's or the summary's width and height, drafted or not."""
    stages = compiled(
        write_config, tmp_path, "thumb: {kind: thumbnail, input: decode, size: [256, 256]}"
    )
    stored = photo(1600, 800, seed=5)
    exif = stored.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes())
    decoded = stages["decode"].process(Item({}, buffer.getvalue()))
    assert (decoded.record["width"], decoded.record["height"]) == (800, 1600)
    assert decoded.data.height > decoded.data.width
