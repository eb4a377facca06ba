"""Stage kinds register here by name.

A kind's module is imported when a config first names it: `pipeline.stages.<kind>` if
there is one (a kind lives in the module named after it), else every module in
`pipeline.stages` (kinds that share a module, and the list of all kinds). A run then
imports only the kinds its config uses (and their libraries: numpy, pyarrow, ...).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
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


def stage_kind(kind: str) -> type[Stage]:
    """The class registered as `kind`; KeyError if no module of this package has one."""
    if os.environ.get(FAULTS):  # tests: every kind loaded, and patched, at once
        _load_all()
    elif kind not in STAGE_KINDS:
        _load_module_named(kind)
    if kind not in STAGE_KINDS:
        _load_all()
    return STAGE_KINDS[kind]


def _load_module_named(kind: str) -> None:
    name = f"{__package__}.{kind}"
    if kind.isidentifier() and importlib.util.find_spec(name) is not None:
        importlib.import_module(name)


_loaded = False
FAULTS = "PIPELINE_FAULTS"  # see pipeline.testing.faults: it patches every kind at once


def stage_modules() -> list[str]:
    """The names of every module in this package (where stage kinds live)."""
    import pipeline.stages as package

    return [module.name for module in pkgutil.walk_packages(package.__path__, "pipeline.stages.")]


def loaded_stage_modules() -> list[str]:
    """The modules of this package imported so far: those of the kinds plans named."""
    return sorted(name for name in list(sys.modules) if name.startswith(f"{__package__}."))


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for name in stage_modules():
        importlib.import_module(name)
    if os.environ.get(FAULTS):  # tests only: make chosen kinds raise on chosen items
        importlib.import_module("pipeline.testing.faults").activate()
    _loaded = True
