"""`write_images`: encode each image and write it atomically to a local folder or fsspec URL.

With `sidecar: true` a `<name>.json` beside each image holds the item's metadata:
its key, URL, source fields (e.g. id, caption) and what stages added (size, stats, hash).
"""

from __future__ import annotations

import io
from typing import Annotated, Literal

from PIL import Image
from pydantic import AfterValidator, Field

from pipeline.config.model import Options
from pipeline.stages.base import Item, Sink, Stage
from pipeline.stages.imaging import image_of
from pipeline.stages.outputs import (
    checked_location,
    join,
    metadata_json,
    output_folder,
    output_name,
    write_output,
)
from pipeline.stages.registry import register

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


class WriteImagesOptions(EncodeOptions):
    path: Annotated[str, AfterValidator(checked_location)] = Field(
        description="Folder or fsspec URL to write into; relative paths are inside the run dir"
    )
    sidecar: bool = Field(False, description="Also write <name>.json with the item's metadata")


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


@register("write_images")
class WriteImages(Sink):
    """Write each image to `<path>/<stem>-<key>.<ext>`."""

    Options = WriteImagesOptions
    description = "Encode (JPEG/PNG/WebP) and write files atomically, local or fsspec"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._suffix_inputs = False

    def connect_inputs(self, inputs: list[Stage]) -> None:
        self._suffix_inputs = len(inputs) > 1

    def process(self, item: Item) -> Item:
        options: WriteImagesOptions = self.options  # type: ignore[assignment]
        image = require_image(item, self.name)
        suffix = item.meta.get("from", "") if self._suffix_inputs else ""
        name = output_name(item.record, EXTENSIONS[options.format], suffix)
        path = join(output_folder(self.job.run_dir, options.path), name)
        write_output(path, encode(image, options))
        if options.sidecar:
            write_output(path.rsplit(".", 1)[0] + ".json", metadata_json(item.record))
        self.add_output(item, path)
        return item
