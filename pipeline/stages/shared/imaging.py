"""Imaging that kinds share: resampling filters, fitting a size in a box, and the bases of
image transforms (a step whose payload is a Pillow image, in and out) and analyses."""

from __future__ import annotations

from typing import Literal

from PIL import Image

from pipeline.errors import ItemError
from pipeline.records import Item
from pipeline.stages.base import OptionsT, Step

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
Resampling = Literal["nearest", "box", "bilinear", "hamming", "bicubic", "lanczos"]


def fit_inside(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """The largest size with `size`'s aspect ratio that fits in `box` (never upscales)."""
    width, height = size
    if width <= box[0] and height <= box[1]:
        return size
    scale = min(box[0] / width, box[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def image_of(item: Item, stage: str, reason: str = "transform_error") -> Image.Image:
    """The item's image, or an item error that says to put a decode before `stage`."""
    if not isinstance(item.data, Image.Image):
        raise ItemError(reason, f"{stage} needs an image; put a decode before it")
    return item.data


class ImageStep(Step[OptionsT]):
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


class AnalysisStep(Step[OptionsT]):
    """Adds `measure(image)` to the record, under the stage's own name in `results` (so two
    stages of one kind never collide); the image passes on unchanged.

    The value also goes into the item's `meta` under the stage's kind, which travels down
    the branch only: a later stage reads the nearest analysis of a kind upstream of it
    (`dedupe` the nearest `phash`), whatever other branches measured.
    """

    def process(self, item: Item) -> Item:
        value = self.measure(image_of(item, self.name))
        item.record.setdefault("results", {})[self.name] = value
        return item.derive(item.data, **{self.kind: value})

    def measure(self, image: Image.Image) -> object:
        raise NotImplementedError
