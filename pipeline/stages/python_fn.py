"""`python`: call a user function, named by dotted path `package.module:function`.

`takes: image` calls `function(image, **kwargs)` and expects a Pillow image (or a
numpy array) back; `takes: record` calls `function(record, image, **kwargs)` and
merges the dict it returns into the item's record (the image passes on): its values
as JSON has them (numpy scalars and other objects become text), and only new keys:
never one the pipeline keeps (`CORE_KEYS`: status, url, ...) or an earlier stage set
(`results`, `width`, ...), or the item fails. The
function is imported and pickled at validation, so a typo, a missing module or a
lambda/closure that the processes and distributed backends could not ship fails
before any work starts. Every worker imports it by name.
"""

from __future__ import annotations

import importlib
import json
import pickle
from collections.abc import Callable
from functools import cached_property
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from pipeline.config.model import Options
from pipeline.errors import ItemError
from pipeline.records import CORE_KEYS, Item, Record
from pipeline.stages.base import Step
from pipeline.stages.registry import register


def load_function(path: str) -> Callable[..., Any]:
    """Import `module:function` (or `module.function`); ValueError saying what is wrong."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"'{path}' is not a dotted path like 'mypkg.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module '{module_name}': {exc}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"module '{module_name}' has no function '{attribute}'")
    try:
        pickle.loads(pickle.dumps(function))
    except Exception as exc:
        raise ValueError(
            f"'{path}' cannot be pickled, so the processes and distributed backends cannot "
            f"run it ({exc}); define it with `def` at module level"
        ) from None
    return function


class PythonOptions(Options):
    function: str = Field(description="Dotted path 'mypkg.module:function'")
    takes: Literal["image", "record"] = Field(
        "image", description="image: f(image) -> image; record: f(record, image) -> dict"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments")

    @field_validator("function")
    @classmethod
    def _importable(cls, path: str) -> str:
        load_function(path)
        return path


def record_updates(updates: Any, function: str, record: Record) -> dict[str, Any]:
    """What a record function returned, as JSON values; ItemError if it is not a dict,
    cannot be JSON, or would set a key the pipeline keeps or an earlier stage set (the
    `results` a reducer's index reads among them): a record function only adds keys."""
    if not isinstance(updates, dict):
        raise ItemError("transform_error", f"{function} must return a dict")
    taken = sorted(map(str, CORE_KEYS.union(record).intersection(updates)))
    if taken:
        raise ItemError("transform_error", f"{function} may not set {', '.join(taken)}")
    try:
        return json.loads(json.dumps(updates, default=str))
    except (TypeError, ValueError) as exc:
        raise ItemError("transform_error", f"{function} returned no JSON: {exc}") from None


@register("python")
class Python(Step[PythonOptions]):
    """Run a user function on each image or record."""

    Options = PythonOptions
    description = "A user function mypkg.mod:func on the image or the record"

    @cached_property
    def function(self) -> Callable[..., Any]:
        return load_function(self.options.function)

    def process(self, item: Item) -> Item:
        if self.options.takes == "record":
            updates = self.call(dict(item.record), item.data)
            item.record.update(record_updates(updates, self.options.function, item.record))
            return item
        result = self.call(item.data)
        if not isinstance(result, Image.Image | np.ndarray):
            kind = type(result).__name__
            raise ItemError(
                "transform_error", f"{self.options.function} returned {kind}, not an image"
            )
        return item.derive(result)

    def call(self, *args: Any) -> Any:
        """The user function's result; its exceptions fail the item, with their message."""
        try:
            return self.function(*args, **self.options.kwargs)
        except ItemError:
            raise
        except Exception as exc:
            message = f"{self.options.function}: {type(exc).__name__}: {exc}"
            raise ItemError("transform_error", message) from None
