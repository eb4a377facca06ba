"""A deterministic corpus of photo-like JPEGs, generated once into `bench/corpus/`.

Sizes run from 640x480 to 1600x1200 (mean about 1 MP) in four aspect ratios,
quality 85, a quarter progressive, a third with a camera-like EXIF block (some
rotated by orientation). Each image is a smooth photo-like field upscaled from
quarter size plus fine sensor grain, so it compresses like a photograph
(about 150 KB per megapixel). Index `i` always gives the same bytes.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.testing.images import ORIENTATION_TAG, photo

VERSION = 1
ASPECTS = ((4, 3), (3, 2), (16, 9), (3, 4))
GRAIN_SIDE = 1600
ORIENTATIONS = (1, 1, 1, 6, 8, 3)
EXIF_MAKE, EXIF_MODEL, EXIF_DATETIME = 0x010F, 0x0110, 0x0132

_grain: np.ndarray | None = None


def grain() -> np.ndarray:
    """One shared tile of Gaussian sensor noise; each image takes a random window of it."""
    global _grain
    if _grain is None:
        rng = np.random.default_rng(VERSION)
        _grain = rng.normal(0.0, 5.0, (GRAIN_SIDE, GRAIN_SIDE, 3)).astype(np.int16)
    return _grain


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """A long side from 640 to 1600 and one of the aspect ratios (portrait for 3:4)."""
    across, down = ASPECTS[rng.integers(len(ASPECTS))]
    long_side = round(640 + 960 * rng.random() ** 0.75)  # skewed up: mean about 1 MP
    short_side = max(480, round(long_side * min(across, down) / max(across, down)))
    return (long_side, short_side) if across > down else (short_side, long_side)


def exif_block(rng: np.random.Generator, index: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_MAKE] = "BenchCam"
    exif[EXIF_MODEL] = f"Model {index % 7}"
    exif[EXIF_DATETIME] = f"2024:05:{1 + index % 28:02d} 12:00:00"
    exif[ORIENTATION_TAG] = ORIENTATIONS[rng.integers(len(ORIENTATIONS))]
    return exif.tobytes()


def corpus_image(index: int) -> bytes:
    """The JPEG bytes of corpus image `index` (deterministic)."""
    rng = np.random.default_rng([VERSION, index])
    width, height = image_size(rng)
    base = photo(max(16, width // 4), max(16, height // 4), seed=index)
    pixels = np.asarray(base.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    top = int(rng.integers(GRAIN_SIDE - height + 1))
    left = int(rng.integers(GRAIN_SIDE - width + 1))
    pixels = pixels + grain()[top : top + height, left : left + width]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    options: dict = {"quality": 85, "progressive": rng.random() < 0.25}
    if rng.random() < 0.33:
        options["exif"] = exif_block(rng, index)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def _write(folder: Path, index: int) -> int:
    path = folder / f"{index:05d}.jpg"
    if not path.exists():
        tmp = path.with_suffix(".part")
        tmp.write_bytes(corpus_image(index))
        os.replace(tmp, path)
    return path.stat().st_size


def ensure_corpus(root: Path, count: int, workers: int) -> list[Path]:
    """The paths of images 0..count-1, generating the missing ones on `workers` cores."""
    folder = root / f"v{VERSION}"
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_write, [folder] * count, range(count), chunksize=16))
    summary = {"count": count, "mean_bytes": sum(sizes) / max(1, count)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return [folder / f"{index:05d}.jpg" for index in range(count)]
