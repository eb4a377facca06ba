"""The base of image transforms: a step whose payload is a Pillow image, in and out."""

from __future__ import annotations

from PIL import Image

from pipeline.errors import ItemError
from pipeline.stages.base import Item, Step


def image_of(item: Item, stage: str, reason: str = "transform_error") -> Image.Image:
    """The item's image, or an item error that says to put a decode before `stage`."""
    if not isinstance(item.data, Image.Image):
        raise ItemError(reason, f"{stage} needs an image; put a decode before it")
    return item.data


class ImageStep(Step):
    """A transform: `transform(image) -> image`; Pillow's errors fail only the item."""

    def process(self, item: Item) -> Item:
        image = image_of(item, self.name)
        try:
            result = self.transform(image)
        except (ValueError, OSError) as exc:
            raise ItemError("transform_error", f"{type(exc).__name__}: {exc}") from None
        return item.derive(result)

    def transform(self, image: Image.Image) -> Image.Image:
        raise NotImplementedError


class AnalysisStep(Step):
    """Adds `measure(image)` to the record under `field`; the image passes on unchanged."""

    field: str

    def process(self, item: Item) -> Item:
        item.record[self.field] = self.measure(image_of(item, self.name))
        return item

    def measure(self, image: Image.Image) -> object:
        raise NotImplementedError
