"""`crop`: cut a fixed box, or a centred box of a given size, out of each image."""

from __future__ import annotations

from PIL import Image
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.stages.registry import register
from pipeline.stages.shared.imaging import ImageStep


class CropOptions(Options):
    box: tuple[NonNegativeInt, NonNegativeInt, NonNegativeInt, NonNegativeInt] | None = Field(
        None, description="[left, top, right, bottom] in pixels"
    )
    center: tuple[PositiveInt, PositiveInt] | None = Field(
        None, description="[width, height] of a centred box (clamped to the image)"
    )

    @model_validator(mode="after")
    def _one_of(self) -> CropOptions:
        if (self.box is None) == (self.center is None):
            raise ValueError("give exactly one of 'box' or 'center'")
        if self.box and (self.box[2] <= self.box[0] or self.box[3] <= self.box[1]):
            raise ValueError(
                "box must be [left, top, right, bottom] with right > left, bottom > top"
            )
        return self


def center_box(size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = min(crop[0], size[0]), min(crop[1], size[1])
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return left, top, left + width, top + height


@register("crop")
class Crop(ImageStep[CropOptions]):
    """Crop a box, or the centre."""

    Options = CropOptions
    description = "Crop a pixel box or a centred region"

    def transform(self, image: Image.Image) -> Image.Image:
        if self.options.center:
            return image.crop(center_box(image.size, self.options.center))
        box = self.options.box
        assert box is not None
        if box[2] > image.width or box[3] > image.height:
            raise ItemError(
                "transform_error",
                f"crop box {list(box)} exceeds the {image.width}x{image.height} image",
            )
        return image.crop(box)
