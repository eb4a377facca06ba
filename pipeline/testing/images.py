"""Deterministic, photo-like synthetic images (smooth colour fields, shapes and grain).

They compress like photographs (JPEG q85 of 1 MP is ~100-250 KB), so timings on
them are realistic, and the same seed always gives the same bytes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112


def photo(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image with gradients, soft blobs and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x /= width
    y /= height
    channels = []
    for _ in range(3):
        field = np.zeros((height, width), np.float32)
        for _ in range(4):
            fx, fy, phase = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 6.28)
            field += np.sin(2 * np.pi * (fx * x + fy * y) + phase) * rng.uniform(0.2, 0.6)
        channels.append(field)
    image = np.stack(channels, axis=-1)
    for _ in range(6):
        cx, cy, radius = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2))
        image += blob[..., None] * rng.uniform(-1.0, 1.0, size=3).astype(np.float32)
    image = (image - image.min()) / max(float(np.ptp(image)), 1e-6) * 255.0
    image += rng.normal(0, 6.0, size=image.shape).astype(np.float32)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(
    image: Image.Image, quality: int = 85, progressive: bool = False, orientation: int | None = None
) -> bytes:
    """Encode as JPEG, optionally progressive and with an EXIF orientation tag."""
    buffer = io.BytesIO()
    options: dict = {"quality": quality, "progressive": progressive}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        options["exif"] = exif.tobytes()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
