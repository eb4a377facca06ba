"""Encoding images for sinks: formats, their options, and flattening alpha."""

from __future__ import annotations

import io
from typing import Literal

from PIL import Image
from pydantic import Field

from pipeline.config.model import Options
from pipeline.records import Item
from pipeline.stages.shared.imaging import image_of

EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
HAS_ALPHA = {"png", "webp"}
ImageFormat = Literal["jpeg", "png", "webp"]


class EncodeOptions(Options):
    """How a sink encodes images: shared by every sink that stores encoded pictures."""

    format: ImageFormat = Field("jpeg", description="Output format")
    quality: int = Field(85, ge=1, le=100, description="JPEG/WebP quality")
    background: tuple[int, int, int] = Field(
        (255, 255, 255), description="RGB colour that transparent pixels are flattened onto"
    )


def flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite an image with alpha onto an opaque background."""
    if image.mode not in ("RGBA", "LA"):
        return image
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def encode(image: Image.Image, options: EncodeOptions) -> bytes:
    """Re-encode the pixels (never the input bytes) in the configured format."""
    if options.format not in HAS_ALPHA:
        image = flatten(image, options.background)
    buffer = io.BytesIO()
    if options.format == "png":
        image.save(buffer, "PNG")
    else:
        image.save(buffer, options.format.upper(), quality=options.quality)
    return buffer.getvalue()


def require_image(item: Item, stage: str) -> Image.Image:
    """The image a sink encodes; anything else fails the item as a write error."""
    return image_of(item, stage, reason="write_error")
