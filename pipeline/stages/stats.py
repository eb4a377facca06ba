"""`stats`: per-image statistics in numpy, a dict in the record under the stage's name
(`record["results"][<stage name>]`).

mean_color   mean of each channel (R, G, B[, A]), 0-255
brightness   mean luma (ITU-R 601 grey), 0-255
contrast     standard deviation of luma
sharpness    variance of the 4-neighbour Laplacian of luma (blurry images score low)
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.config.model import Options
from pipeline.stages.registry import register
from pipeline.stages.shared.imaging import AnalysisStep


def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the discrete Laplacian: a standard focus measure."""
    if min(gray.shape) < 3:
        return 0.0
    center = gray[1:-1, 1:-1]
    laplacian = gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4 * center
    return float(laplacian.var())


def image_stats(image: Image.Image) -> dict[str, object]:
    pixels = np.asarray(image, dtype=np.float32)
    channels = pixels.reshape(-1, pixels.shape[-1]) if pixels.ndim == 3 else pixels.reshape(-1, 1)
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    return {
        "mean_color": [round(float(v), 3) for v in channels.mean(axis=0)],
        "brightness": round(float(gray.mean()), 3),
        "contrast": round(float(gray.std()), 3),
        "sharpness": round(laplacian_variance(gray), 3),
    }


@register("stats")
class Stats(AnalysisStep[Options]):
    """Mean colour, brightness, contrast and sharpness into `record['results'][name]`."""

    description = "Mean colour, brightness, contrast, sharpness into the record"

    def measure(self, image: Image.Image) -> dict[str, object]:
        return image_stats(image)
