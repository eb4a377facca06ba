"""Stage kinds register here by name; every module in `pipeline.stages` is loaded once."""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable
from typing import TypeVar

from pipeline.stages.base import Stage

S = TypeVar("S", bound=type[Stage])

STAGE_KINDS: dict[str, type[Stage]] = {}


def register(kind: str) -> Callable[[S], S]:
    """Class decorator: make a stage kind available to configs under `kind`."""

    def add(cls: S) -> S:
        if kind in STAGE_KINDS and STAGE_KINDS[kind] is not cls:
            raise RuntimeError(f"stage kind {kind!r} registered twice")
        cls.kind = kind
        STAGE_KINDS[kind] = cls
        return cls

    return add


def stage_kinds() -> dict[str, type[Stage]]:
    """All registered kinds, after importing every module of this package."""
    _load_all()
    return STAGE_KINDS


_loaded = False


def stage_modules() -> list[str]:
    """The names of every module in this package (where stage kinds live)."""
    import pipeline.stages as package

    return [module.name for module in pkgutil.walk_packages(package.__path__, "pipeline.stages.")]


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for name in stage_modules():
        importlib.import_module(name)
    if os.environ.get("PIPELINE_FAULTS"):  # tests only: make chosen kinds raise on chosen items
        importlib.import_module("pipeline.testing.faults").activate()
    _loaded = True
