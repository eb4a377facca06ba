"""`decode`: bytes -> a loaded Pillow image in a normal mode (RGB, RGBA or L).

The format is identified from the magic bytes (never the name or Content-Type),
only allow-listed formats are opened (never EPS or PDF), a file that ends before
its format's end marker fails as truncated, the pixel count is checked before
any pixel is decoded (so Pillow's own bomb warning can never fire), EXIF
orientation is applied, and exotic modes (CMYK, 16-bit, palette with
transparency, 1-bit) are converted without clipping. Animated images give
their first frame. When every consumer says how large an image it
needs (a thumbnail does), JPEGs are decoded at a reduced DCT scale (draft).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Literal

from PIL import Image, ImageOps
from pydantic import Field, field_validator

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.records import Item
from pipeline.stages.base import Stage, Step, consumers_box
from pipeline.stages.registry import register
from pipeline.stages.shared.imaging import fit_inside

Format = Literal["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"]
DEFAULT_FORMATS: tuple[Format, ...] = ("JPEG", "PNG", "GIF", "WEBP")

# Magic bytes at offset 0 -> format. Allowed formats are opened only with their own
# plugin; the others are named in the error. Anything unknown is not an image.
SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xffO\xffQ", "JPEG2000"),
)


class DecodeOptions(Options):
    formats: tuple[Format, ...] = Field(DEFAULT_FORMATS, description="Formats allowed")
    max_pixels: int = Field(
        64_000_000,
        gt=0,
        le=Image.MAX_IMAGE_PIXELS,  # at most Pillow's bomb limit: its warning never fires
        description="Images with more pixels fail as decompression_bomb, before decoding",
    )

    draft: bool = Field(True, description="Decode JPEGs at reduced scale when consumers allow")

    @field_validator("formats", mode="before")
    @classmethod
    def _upper(cls, formats: object) -> object:
        if isinstance(formats, list | tuple):
            return tuple(str(name).upper() for name in formats)
        return formats


@register("decode")
class Decode(Step[DecodeOptions]):
    """Open bytes as an image, safely, and normalise its orientation and mode."""

    Options = DecodeOptions
    description = "Decode bytes with Pillow (allow-listed formats, EXIF, modes)"
    draft_size: tuple[int, int] | None = None
    draft_fitted = False  # every consumer fits inside the box: its longer side may reach it

    def connect(self, consumers: list[Stage]) -> None:
        box, fitted = consumers_box(consumers)  # square: still big enough after EXIF rotation
        if self.options.draft and box:
            self.draft_size, self.draft_fitted = box, fitted

    def fingerprint_data(self) -> dict[str, Any]:
        """The draft scale comes from the consumers and changes the pixels: it counts."""
        draft = {"draft_size": self.draft_size, "draft_fitted": self.draft_fitted}
        return {**super().fingerprint_data(), **draft}

    def process(self, item: Item) -> Item:
        """The image, oriented; the record gets its full size as oriented (not the drafted
        one), its format and its mode as stored."""
        image = open_image(item.data, self.options)
        (width, height), fmt, mode = image.size, image.format, image.mode
        if self.draft_size and image.format == "JPEG":
            # Fitted, where consumers allow: the DCT scale may then shrink both sides further.
            box = fit_inside(image.size, self.draft_size) if self.draft_fitted else self.draft_size
            image.draft("RGB", box)
        load(image)
        stored = image.size
        oriented = orient(image)
        if oriented.size != stored:  # EXIF turned it a quarter: its sides swap
            width, height = height, width
        item.record.update(width=width, height=height, format=fmt, mode=mode)
        return item.derive(normalize(oriented))


def open_image(data: bytes, options: DecodeOptions) -> Image.Image:
    """Identify and open (header only) an allow-listed image, refusing bombs."""
    if not data:
        raise ItemError("empty", "no bytes to decode")
    kind = identify(data)
    if kind is None:
        raise ItemError("not_an_image", "the bytes are not a known image format")
    if kind not in options.formats:
        raise ItemError("unsupported_format", f"{kind} is not in the allowed formats")
    if ends_early(data, kind):
        raise ItemError("truncated", f"the {kind} data ends before its end marker")
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError as exc:
        raise ItemError("decompression_bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ItemError("corrupt", f"unreadable {kind} header: {exc}") from None
    if image.width * image.height > options.max_pixels:
        raise ItemError(
            "decompression_bomb", f"{image.width}x{image.height} exceeds {options.max_pixels} px"
        )
    return image


def identify(data: bytes) -> str | None:
    """The image format named by the magic bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    return next((kind for magic, kind in SIGNATURES if data.startswith(magic)), None)


def ends_early(data: bytes, kind: str) -> bool:
    """True if the data stops before the end marker its format requires."""
    if kind == "PNG":
        return data.rfind(b"IEND") < 0
    if kind == "JPEG":
        return data.rfind(b"\xff\xd9") < 0
    if kind == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    return False


def load(image: Image.Image) -> None:
    """Decode the pixels; map Pillow's errors to reason codes."""
    try:
        image.load()
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise ItemError(reason, str(exc)) from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ItemError("corrupt", str(exc)) from None


def orient(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation in place (no copy when there is none to apply);
    a broken EXIF block leaves the image as it is."""
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def normalize(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB, RGBA or L without losing alpha or clipping 16-bit data.

    Transparency (an alpha band, a palette entry or an RGB/L colour key) becomes
    an alpha band, so no colour hidden under transparent pixels can show.
    """
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _to_8bit_gray(image)
    if "transparency" in image.info or mode in ("LA", "PA", "La", "RGBa"):
        return image.convert("RGBA")
    if mode in ("RGB", "RGBA", "L"):
        return image
    return image.convert("L" if mode == "1" else "RGB")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    import numpy as np  # here: only 16-bit and float images need it

    array = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode != "F" else max(float(array.max()), 1.0)
    scaled = np.clip(np.rint(array * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)  # 2-D uint8: mode L
