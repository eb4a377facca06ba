"""`decode`: bytes -> a loaded Pillow image in a normal mode (RGB, RGBA or L).

The format is identified from the bytes, only allow-listed formats are opened,
the pixel count is checked before any pixel is decoded, EXIF orientation is
applied, and exotic modes (CMYK, 16-bit, palette with transparency, 1-bit)
are converted without clipping. When every consumer says how large an image it
needs (a thumbnail does), JPEGs are decoded at a reduced DCT scale (draft).
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field, PositiveInt

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.stages.base import Item, Stage, Step
from pipeline.stages.registry import register

warnings.simplefilter("error", Image.DecompressionBombWarning)

DEFAULT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")


class DecodeOptions(Options):
    formats: tuple[str, ...] = Field(DEFAULT_FORMATS, description="Pillow formats allowed")
    max_pixels: PositiveInt = Field(64_000_000, description="Larger images fail as bombs")
    draft: bool = Field(True, description="Decode JPEGs at reduced scale when consumers allow")


@register("decode")
class Decode(Step):
    """Open bytes as an image, safely, and normalise its orientation and mode."""

    Options = DecodeOptions
    description = "Decode bytes with Pillow (allow-listed formats, EXIF, modes)"
    draft_size: tuple[int, int] | None = None

    def connect(self, consumers: list[Stage]) -> None:
        sizes = [c.preferred_input_size() for c in consumers if isinstance(c, Step)]
        if self.options.draft and sizes and all(sizes):  # type: ignore[attr-defined]
            side = max(max(size) for size in sizes if size)
            self.draft_size = (side, side)  # square: still big enough after an EXIF rotation

    def fingerprint_data(self) -> dict[str, Any]:
        """The draft scale comes from the consumers and changes the pixels: it counts."""
        return {**super().fingerprint_data(), "draft_size": self.draft_size}

    def process(self, item: Item) -> Item:
        options: DecodeOptions = self.options  # type: ignore[assignment]
        image = open_image(item.data, options)
        item.record.update(
            width=image.width, height=image.height, format=image.format, mode=image.mode
        )
        if self.draft_size and image.format == "JPEG":
            image.draft("RGB", self.draft_size)
        load(image)
        return item.derive(normalize(orient(image)))


def open_image(data: bytes, options: DecodeOptions) -> Image.Image:
    """Identify and open (header only) an allow-listed image, refusing bombs."""
    try:
        image = Image.open(io.BytesIO(data), formats=list(options.formats))
    except UnidentifiedImageError:
        probe = _identify_any(data)
        if probe:
            raise ItemError("unsupported_format", f"{probe} is not allowed") from None
        raise ItemError("not_an_image", "the bytes are not a known image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError("decompression_bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ItemError("corrupt", str(exc)) from None
    pixels = image.width * image.height
    if pixels > options.max_pixels:
        raise ItemError(
            "decompression_bomb", f"{image.width}x{image.height} exceeds {options.max_pixels} px"
        )
    return image


def _identify_any(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:
        return None


def load(image: Image.Image) -> None:
    """Decode the pixels; map Pillow's errors to reason codes."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError("decompression_bomb", str(exc)) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc) else "corrupt"
        raise ItemError(reason, str(exc)) from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ItemError("corrupt", str(exc)) from None


def orient(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a broken EXIF block leaves the image as it is."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def normalize(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB, RGBA or L without losing alpha or clipping 16-bit data."""
    mode = image.mode
    if mode in ("RGB", "RGBA", "L"):
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _to_8bit_gray(image)
    if mode == "1":
        return image.convert("L")
    if (mode == "P" and "transparency" in image.info) or mode in ("LA", "PA", "La", "RGBa"):
        return image.convert("RGBA")
    return image.convert("RGB")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode != "F" else max(float(array.max()), 1.0)
    scaled = np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")
