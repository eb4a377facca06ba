"""Fault injection for tests: make chosen stage kinds raise on chosen items, in real runs.

Set the environment variable before the run starts (a CLI subprocess, so that the
forkserver that `processes` and `distributed` workers fork from inherits it):

    PIPELINE_FAULTS="decode=photo-03,thumbnail=photo-07,url_list=photo-11"

Each `kind=text` pair makes every stage of that kind raise a plain
`RuntimeError("injected fault ...")` (not an ItemError: an unexpected bug) for the
items whose url or input contains `text`; a kind may be named more than once. Step
and sink kinds raise in `process`; source kinds raise inside the `build` callable
their `Source.entry` is given, for an entry whose text contains `text`.

`pipeline.stages.registry` activates this module once every kind is loaded, only
when the variable is set; without it nothing here is imported or patched.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from pipeline.records import Item, SourceItem
from pipeline.stages.base import Source, Stage, Step

ENV = "PIPELINE_FAULTS"

_active: dict[str, tuple[str, ...]] | None = None


def parse(text: str) -> dict[str, tuple[str, ...]]:
    """`"kind=text,kind=text"` as {kind: (text, ...)}; ValueError on a malformed pair."""
    faults: dict[str, tuple[str, ...]] = {}
    for pair in text.split(","):
        if not pair.strip():
            continue
        kind, sep, needle = (part.strip() for part in pair.partition("="))
        if not sep or not kind or not needle:
            raise ValueError(f"{ENV}: {pair.strip()!r} is not kind=text")
        faults[kind] = (*faults.get(kind, ()), needle)
    return faults


def active() -> dict[str, tuple[str, ...]]:
    """The faults this process injects ({} when inactive)."""
    return dict(_active or {})


def activate(kinds: dict[str, type[Stage]] | None = None) -> bool:
    """Patch the kinds the variable names (once per process); False when it is unset."""
    global _active
    text = os.environ.get(ENV, "")
    if _active is not None or not text.strip():
        return _active is not None
    if kinds is None:
        from pipeline.stages.registry import STAGE_KINDS as kinds
    faults = parse(text)
    unknown = sorted(set(faults) - set(kinds))
    if unknown:
        raise ValueError(
            f"{ENV}: unknown stage kinds {unknown} (known: {', '.join(sorted(kinds))})"
        )
    for kind, needles in faults.items():
        cls = kinds[kind]
        if issubclass(cls, Source):
            cls.entry = _faulty_entry(kind, needles, cls.entry)  # type: ignore[method-assign]  # patching is the point
        elif issubclass(cls, Step):
            cls.process = _faulty_process(kind, needles, cls.process)  # type: ignore[method-assign]  # patching is the point
        else:
            raise ValueError(f"{ENV}: stage kind {kind!r} is neither a source nor a step")
    _active = faults
    return True


def _matches(needles: tuple[str, ...], *texts: Any) -> str | None:
    for needle in needles:
        if any(isinstance(text, str) and needle in text for text in texts):
            return needle
    return None


def _faulty_process(
    kind: str, needles: tuple[str, ...], process: Callable[[Step, Item], Item]
) -> Callable[[Step, Item], Item]:
    @functools.wraps(process)
    def faulty(self: Step, item: Item) -> Item:
        record = item.record
        needle = _matches(needles, record.get("url"), record.get("input"))
        if needle is not None and self.kind == kind:  # a subclass of another kind passes
            raise RuntimeError(f"injected fault in {kind} stage {self.name!r} for {needle!r}")
        return process(self, item)

    return faulty


def _faulty_entry(
    kind: str,
    needles: tuple[str, ...],
    entry: Callable[[Source, int, str, Callable[[], SourceItem]], SourceItem],
) -> Callable[[Source, int, str, Callable[[], SourceItem]], SourceItem]:
    @functools.wraps(entry)
    def faulty(self: Source, index: int, text: str, build: Callable[[], SourceItem]) -> SourceItem:
        needle = _matches(needles, text)
        if needle is not None and self.kind == kind:

            def build() -> SourceItem:
                raise RuntimeError(f"injected fault in {kind} stage {self.name!r} for {needle!r}")

        return entry(self, index, text, build)

    return faulty
