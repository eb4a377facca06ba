"""`arrays`: fixed-size images as one numpy array per partition shard, keys alongside.

Each shard is `<prefix>-<digest>.npy` (the digest: 16 hex digits of a hash of the keys
it holds, as every sharded sink names its files) holding a stacked (N, H, W[, C]) array,
and `<prefix>-<digest>.keys.json` beside it lists the N item keys in order. Input is a Pillow image
or an array from `to_array`; every item must have `shape` (put a `resize` with
`mode: cover`, `pad` or `stretch` before it), or it fails as a transform error.
"""

from __future__ import annotations

import json

import numpy as np
from pydantic import Field, PositiveInt

from pipeline.errors import ItemError
from pipeline.records import Item
from pipeline.stages.registry import register
from pipeline.stages.shared.shards import ShardedSink, ShardOptions
from pipeline.storage import AtomicFile, write_output


class ArraysOptions(ShardOptions):
    shape: tuple[PositiveInt, ...] = Field(
        description="Shape every item's array must have, e.g. [64, 64, 3]"
    )


@register("arrays")
class Arrays(ShardedSink[ArraysOptions]):
    """Stack fixed-size images into .npy shards with their keys."""

    Options = ArraysOptions
    description = "Fixed-size images stacked into .npy shards, keys in .keys.json"
    extension = "npy"

    def row(self, item: Item) -> tuple[str, np.ndarray]:
        array = np.asarray(item.data)
        expected = tuple(self.options.shape)
        if array.shape != expected:
            raise ItemError(
                "transform_error",
                f"shape {list(array.shape)} is not {list(expected)}; resize before {self.name}",
            )
        return item.key, array

    def write_shard(self, target: AtomicFile, rows: list[tuple[str, np.ndarray]]) -> None:
        np.save(target.file, np.stack([array for _, array in rows]), allow_pickle=False)
        keys = json.dumps([key for key, _ in rows]).encode()
        write_output(target.path.removesuffix(".npy") + ".keys.json", keys)
