"""`to_array`: Pillow image -> numpy array, with dtype, channel order and normalisation.

Float arrays are scaled to [0, 1] first (`scale`), then `(x - mean) / std` per
channel, the usual input of a vision model. `channels: first` gives CHW.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.records import Item
from pipeline.stages.base import Step
from pipeline.stages.registry import register
from pipeline.stages.shared.imaging import image_of


class ToArrayOptions(Options):
    dtype: Literal["uint8", "float32", "float64"] = Field("uint8", description="Array dtype")
    channels: Literal["last", "first"] = Field("last", description="HWC (last) or CHW (first)")
    scale: bool = Field(True, description="Float dtypes: divide by 255 into [0, 1]")
    mean: tuple[float, ...] | None = Field(None, description="Per-channel mean to subtract")
    std: tuple[float, ...] | None = Field(None, description="Per-channel std to divide by")

    @model_validator(mode="after")
    def _normalisation_needs_float(self) -> ToArrayOptions:
        if (self.mean or self.std) and self.dtype == "uint8":
            raise ValueError("mean/std need a float dtype (float32 or float64)")
        return self


def normalise(array: np.ndarray, options: ToArrayOptions) -> np.ndarray:
    """Scale and standardise a HWC (or HW) float array per channel."""
    if options.scale:
        array /= 255.0
    channels = array.shape[-1] if array.ndim == 3 else 1
    for name, values in (("mean", options.mean), ("std", options.std)):
        if values is not None and len(values) not in (1, channels):
            raise ItemError(
                "transform_error", f"{name} has {len(values)} values for {channels} channels"
            )
    if options.mean is not None:
        array -= np.asarray(options.mean, dtype=array.dtype)
    if options.std is not None:
        array /= np.asarray(options.std, dtype=array.dtype)
    return array


@register("to_array")
class ToArray(Step[ToArrayOptions]):
    """Turn the image into a numpy array for array sinks or user functions."""

    Options = ToArrayOptions
    description = "Image -> numpy array (dtype, HWC/CHW, mean/std)"

    def process(self, item: Item) -> Item:
        array = np.asarray(image_of(item, self.name))
        if self.options.dtype != "uint8":
            array = normalise(array.astype(self.options.dtype), self.options)
        if self.options.channels == "first" and array.ndim == 3:
            array = np.ascontiguousarray(array.transpose(2, 0, 1))
        item.record.update(array_shape=list(array.shape), array_dtype=str(array.dtype))
        return item.derive(array)
