"""`rotate` and `flip`: right angles are exact pixel moves; other angles resample."""

from __future__ import annotations

from typing import Literal

from PIL import Image
from pydantic import Field

from pipeline.config.model import Options
from pipeline.stages.registry import register
from pipeline.stages.shared.imaging import RESAMPLING, ImageStep

RIGHT_ANGLES = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}
FLIPS = {
    "horizontal": Image.Transpose.FLIP_LEFT_RIGHT,
    "vertical": Image.Transpose.FLIP_TOP_BOTTOM,
}


class RotateOptions(Options):
    angle: float = Field(description="Degrees counter-clockwise")
    expand: bool = Field(True, description="Grow the canvas to hold the whole rotated image")
    fill: tuple[int, int, int] = Field((0, 0, 0), description="Colour of uncovered corners")
    resample: Literal["nearest", "bilinear", "bicubic"] = Field("bicubic", description="Filter")


class FlipOptions(Options):
    direction: Literal["horizontal", "vertical"] = Field(description="Mirror left-right or up-down")


@register("rotate")
class Rotate(ImageStep[RotateOptions]):
    """Rotate by any angle; multiples of 90 are lossless transposes."""

    Options = RotateOptions
    description = "Rotate counter-clockwise (right angles are exact)"

    def transform(self, image: Image.Image) -> Image.Image:
        angle = self.options.angle % 360
        if angle == 0:
            return image
        if angle in RIGHT_ANGLES and self.options.expand:
            return image.transpose(RIGHT_ANGLES[int(angle)])
        fill = self.options.fill if image.mode != "L" else sum(self.options.fill) // 3
        return image.rotate(
            angle, RESAMPLING[self.options.resample], expand=self.options.expand, fillcolor=fill
        )


@register("flip")
class Flip(ImageStep[FlipOptions]):
    """Mirror horizontally or vertically."""

    Options = FlipOptions
    description = "Mirror left-right or top-bottom"

    def transform(self, image: Image.Image) -> Image.Image:
        return image.transpose(FLIPS[self.options.direction])
