"""User functions for the `python` stage tests, importable as `tests.stage_userfuncs:NAME`."""

from __future__ import annotations

from PIL import Image, ImageOps


def invert(image: Image.Image) -> Image.Image:
    return ImageOps.invert(image.convert("RGB"))


def aspect(record: dict, image: Image.Image, digits: int = 2) -> dict:
    return {"aspect": round(image.width / image.height, digits)}


def not_an_image(image: Image.Image) -> str:
    return "oops"


def explode(image: Image.Image) -> Image.Image:
    raise RuntimeError("boom")


unpicklable = lambda image: image  # noqa: E731 (the point: a lambda cannot be pickled)


def claims_success(record: dict, image: Image.Image) -> dict:
    return {"status": "ok", "reason": None}


def numpy_values(record: dict, image: Image.Image) -> dict:
    import numpy as np

    return {"mean": np.float32(1.5), "shape": np.array(image.size), 3: "three"}


def rewrites_results(record: dict, image: Image.Image) -> dict:
    return {"results": {"tagger": "cat"}, "width": 1}
