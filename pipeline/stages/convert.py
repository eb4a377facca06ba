"""`convert`: change the colour mode; alpha is flattened onto `background` when dropped."""

from __future__ import annotations

from typing import Literal

from PIL import Image
from pydantic import Field

from pipeline.config.model import Options
from pipeline.stages.registry import register
from pipeline.stages.shared.encoding import flatten
from pipeline.stages.shared.imaging import ImageStep


class ConvertOptions(Options):
    mode: Literal["RGB", "L", "RGBA"] = Field(description="Target Pillow mode")
    background: tuple[int, int, int] = Field(
        (255, 255, 255), description="Colour that transparent pixels are flattened onto"
    )


@register("convert")
class Convert(ImageStep[ConvertOptions]):
    """Convert to RGB, L (grey) or RGBA."""

    Options = ConvertOptions
    description = "Convert to RGB, L or RGBA, flattening alpha on a background"

    def transform(self, image: Image.Image) -> Image.Image:
        if image.mode == self.options.mode:
            return image
        if self.options.mode != "RGBA":
            image = flatten(image, self.options.background)
        return image.convert(self.options.mode)
