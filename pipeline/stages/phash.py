"""`phash`: a 64-bit perceptual hash per image, in numpy, as 16 hex digits in the record
(`record["results"][<stage name>]`).

    phash  grey 32x32 -> 2-D DCT -> the 8x8 lowest frequencies -> bit = above their median
    dhash  grey 9x8 -> bit = brighter than the right-hand neighbour

Near-duplicates (resized, recompressed, slightly cropped) differ in a few bits;
the `dedupe` stage groups hashes within a Hamming distance.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from pipeline.config.model import Options
from pipeline.stages.registry import register
from pipeline.stages.shared.imaging import AnalysisStep


class PhashOptions(Options):
    algorithm: Literal["phash", "dhash"] = Field("phash", description="Hash algorithm")


@cache
def dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: `D @ x @ D.T` is the 2-D DCT of x."""
    k = np.arange(size)[:, None]
    n = np.arange(size)[None, :]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2 / size)
    matrix[0] /= np.sqrt(2)
    return matrix


def _gray(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    small = image.convert("L").resize(size, Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64)


def _pack(bits: np.ndarray) -> int:
    return int.from_bytes(np.packbits(bits.astype(np.uint8).ravel()).tobytes(), "big")


def phash(image: Image.Image) -> int:
    dct = dct_matrix(32)
    low = (dct @ _gray(image, (32, 32)) @ dct.T)[:8, :8]
    return _pack(low > np.median(low.ravel()[1:]))  # the DC term would skew the median


def dhash(image: Image.Image) -> int:
    gray = _gray(image, (9, 8))
    return _pack(gray[:, 1:] > gray[:, :-1])


ALGORITHMS = {"phash": phash, "dhash": dhash}


@register("phash")
class Phash(AnalysisStep[PhashOptions]):
    """A perceptual hash into `record['results'][name]` (16 hex digits)."""

    Options = PhashOptions
    description = "Perceptual hash (pHash/dHash) into the record"

    def measure(self, image: Image.Image) -> str:
        value = ALGORITHMS[self.options.algorithm](image)
        return f"{value:016x}"
