"""`files`: the image files in a folder, under a glob, or a single file, on any fsspec filesystem.

`path` is tried as an existing file or folder first, and only then as a glob, so a
real name with glob characters (`img[1].png`) is never taken for a pattern. Folders
are walked lazily in sorted order (deterministic partitions); `recursive` descends
into subfolders; `extensions` filters by suffix, case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import fsspec
from pydantic import Field, field_validator

from pipeline.config.model import Options
from pipeline.stages.base import Source, SourceItem
from pipeline.stages.outputs import filesystem
from pipeline.stages.registry import register

GLOB_CHARACTERS = re.compile(r"[*?[]")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff")


class FilesOptions(Options):
    path: str = Field(description="A folder, a glob or a file: local or any fsspec URL")
    recursive: bool = Field(False, description="Descend into subfolders")
    extensions: tuple[str, ...] = Field(
        IMAGE_EXTENSIONS, description="File suffixes to keep (case-insensitive); [] keeps all"
    )

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str) -> str:
        fs, root = filesystem(path)
        if not GLOB_CHARACTERS.search(root) and not fs.exists(root):
            raise ValueError(f"no such file or folder: {path}")
        return path

    @field_validator("extensions")
    @classmethod
    def _normalise(cls, extensions: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(extension.lower().lstrip(".") for extension in extensions)


@register("files")
class Files(Source):
    """One item per matching file, as a URL the `download` stage can read."""

    Options = FilesOptions
    description = "Files in a folder or glob, local or on any fsspec filesystem"

    def iter_items(self) -> Iterator[SourceItem]:
        options: FilesOptions = self.options  # type: ignore[assignment]
        fs, root = fsspec.core.url_to_fs(options.path)
        index = 0
        for path in self._paths(fs, root):
            if self._wanted(path):
                index += 1
                yield SourceItem(index, fs.unstrip_protocol(path))

    def _paths(self, fs: fsspec.AbstractFileSystem, root: str) -> Iterator[str]:
        if fs.isfile(root):
            yield root
        elif fs.isdir(root):
            depth = None if self.options.recursive else 1  # type: ignore[attr-defined]
            for folder, subfolders, names in fs.walk(root, maxdepth=depth):
                subfolders.sort()
                for name in sorted(names):
                    yield f"{folder.rstrip('/')}/{name}"
        elif GLOB_CHARACTERS.search(root):
            yield from sorted(path for path in fs.glob(root) if fs.isfile(path))

    def _wanted(self, path: str) -> bool:
        extensions = self.options.extensions  # type: ignore[attr-defined]
        return not extensions or path.rsplit(".", 1)[-1].lower() in extensions
