"""`arrays`: fixed-size images as one numpy array per partition shard, keys alongside.

Each shard is `<prefix>-<digest>.npy` (the digest: 16 hex digits of a hash of the keys
it holds, as every sharded sink names its files) holding a stacked (N, H, W[, C]) array,
and `<prefix>-<digest>.keys.json` beside it lists the N item keys in order. Input is a Pillow image
or an array from `to_array`; every item must have `shape` (put a `resize` with
`mode: cover`, `pad` or `stretch` before it), or it fails as a transform error.
`write_shard(read_shard(path))` writes both files' bytes again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
from pydantic import Field, PositiveInt

from pipeline.errors import ItemError
from pipeline.records import Item
from pipeline.stages.registry import register
from pipeline.stages.shared.shards import ShardedSink, ShardOptions
from pipeline.storage import AtomicFile, split_fs, write_output

Row = tuple[str, np.ndarray]


class ArraysOptions(ShardOptions):
    shape: tuple[PositiveInt, ...] = Field(
        description="Shape every item's array must have, e.g. [64, 64, 3]"
    )


def keys_path(path: str) -> str:
    """The `.keys.json` beside a shard's `.npy`."""
    return path.removesuffix(".npy") + ".keys.json"


def read_bytes(path: str) -> bytes:
    fs, local = split_fs(path)
    with fs.open(local, "rb") as file:
        return file.read()


def read_array(path: str) -> np.ndarray:
    fs, local = split_fs(path)
    with fs.open(local, "rb") as file:
        return np.load(file, allow_pickle=False)


@register("arrays")
class Arrays(ShardedSink[ArraysOptions]):
    """Stack fixed-size images into .npy shards with their keys."""

    Options = ArraysOptions
    description = "Fixed-size images stacked into .npy shards, keys in .keys.json"
    extension = "npy"

    def row(self, item: Item) -> Row:
        array = np.asarray(item.data)
        expected = tuple(self.options.shape)
        if array.shape != expected:
            raise ItemError(
                "transform_error",
                f"shape {list(array.shape)} is not {list(expected)}; resize before {self.name}",
            )
        return item.key, array

    def row_key(self, row: Row) -> str:
        return row[0]

    def row_bytes(self, row: Row) -> int:
        return row[1].nbytes

    def write_shard(self, target: AtomicFile, rows: Iterable[Row]) -> None:
        rows = list(rows)  # stacked: all in memory
        np.save(target.file, np.stack([array for _, array in rows]), allow_pickle=False)
        keys = json.dumps([key for key, _ in rows]).encode()
        write_output(keys_path(target.path), keys)

    def read_shard(self, path: str) -> list[Row]:
        """The rows of a `.npy` shard and its `.keys.json`, in order; each array is a view
        of the one array loaded from the shard."""
        keys = json.loads(read_bytes(keys_path(path)))
        stacked = read_array(path)
        if len(keys) != len(stacked):
            raise ValueError(f"{path}: {len(stacked)} arrays but {len(keys)} keys")
        return list(zip(keys, stacked, strict=True))

    def companions(self, path: str) -> list[str]:
        return [keys_path(path)]
