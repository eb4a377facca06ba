"""`resize`: scale to an exact or bounding size in one of four modes.

    fit      inside the box, aspect ratio kept (the result may be smaller on one side)
    cover    fill the box, aspect ratio kept, then crop the overflow around the centre
    pad      fit inside, then centre on a canvas of exactly `size` in `pad_color`
    stretch  exactly `size`, aspect ratio ignored

`only_if_bigger` leaves images that already fit the box untouched (never upscales).
"""

from __future__ import annotations

from typing import Literal

from PIL import Image, ImageOps
from pydantic import Field, PositiveInt

from pipeline.config.model import Options
from pipeline.stages.registry import register
from pipeline.stages.shared.imaging import RESAMPLING, ImageStep, Resampling


class ResizeOptions(Options):
    size: tuple[PositiveInt, PositiveInt] = Field(description="Target [width, height]")
    mode: Literal["fit", "cover", "pad", "stretch"] = Field("fit", description="How to fit")
    only_if_bigger: bool = Field(False, description="Leave images that fit the box as they are")
    resample: Resampling = Field("lanczos", description="Resampling filter")
    pad_color: tuple[int, int, int] = Field((0, 0, 0), description="Canvas colour for pad")


def fits(size: tuple[int, int], box: tuple[int, int]) -> bool:
    return size[0] <= box[0] and size[1] <= box[1]


@register("resize")
class Resize(ImageStep[ResizeOptions]):
    """Resize with fit / cover / pad / stretch."""

    Options = ResizeOptions
    description = "Resize: fit, cover (centre crop), pad with a colour, or stretch"

    def preferred_input_size(self) -> tuple[int, int]:
        return self.options.size

    def fits_inside_preferred_size(self) -> bool:
        return self.options.mode in ("fit", "pad")

    def transform(self, image: Image.Image) -> Image.Image:
        size, method = self.options.size, RESAMPLING[self.options.resample]
        if self.options.only_if_bigger and fits(image.size, size):
            return image
        if self.options.mode == "fit":
            return ImageOps.contain(image, size, method)
        if self.options.mode == "cover":
            return ImageOps.fit(image, size, method)
        if self.options.mode == "pad":
            color = (
                self.options.pad_color if image.mode != "L" else sum(self.options.pad_color) // 3
            )
            return ImageOps.pad(image, size, method, color=color)
        return image.resize(size, method)
