"""`write_images`: encode each image and write it atomically under a folder."""

from __future__ import annotations

import io
import os
from typing import Literal

from PIL import Image
from pydantic import Field

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.stages.base import Item, Sink, Stage
from pipeline.stages.outputs import atomic_write, output_error, output_name
from pipeline.stages.registry import register

EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
HAS_ALPHA = {"png", "webp"}


class WriteImagesOptions(Options):
    path: str = Field(
        description="Folder to write into; relative paths are inside the run directory"
    )
    format: Literal["jpeg", "png", "webp"] = Field("jpeg", description="Output format")
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


def encode(image: Image.Image, options: WriteImagesOptions) -> bytes:
    """Re-encode the pixels (never the input bytes) in the configured format."""
    if options.format not in HAS_ALPHA:
        image = flatten(image, options.background)
    buffer = io.BytesIO()
    if options.format == "png":
        image.save(buffer, "PNG")
    else:
        image.save(buffer, options.format.upper(), quality=options.quality)
    return buffer.getvalue()


@register("write_images")
class WriteImages(Sink):
    """Write each image to `<path>/<stem>-<key>.<ext>`."""

    Options = WriteImagesOptions
    description = "Encode (JPEG/PNG/WebP) and write files atomically"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._suffix_inputs = False

    def connect_inputs(self, inputs: list[Stage]) -> None:
        self._suffix_inputs = len(inputs) > 1

    def process(self, item: Item) -> Item:
        options: WriteImagesOptions = self.options  # type: ignore[assignment]
        if not isinstance(item.data, Image.Image):
            raise ItemError("write_error", f"{self.name} needs an image input")
        suffix = item.meta.get("from", "") if self._suffix_inputs else ""
        name = output_name(item.record, EXTENSIONS[options.format], suffix)
        folder = os.path.join(self.job.run_dir, options.path)
        path = os.path.join(folder, name)
        data = encode(item.data, options)
        try:
            os.makedirs(folder, exist_ok=True)
            atomic_write(path, data)
        except OSError as exc:
            raise output_error(exc, path) from None
        self.add_output(item, path)
        return item
