"""`files`: the image files in a folder, under a glob, or a single file, on any fsspec filesystem.

`path` is tried as an existing file or folder first, and only then as a glob, so a
real name with glob characters (`img[1].png`) is never taken for a pattern. Folders
are walked lazily in sorted order (deterministic partitions), never through a
symbolic link to a folder; `recursive` descends into subfolders; a glob walks only
the folders that may hold a match; `extensions` filters by suffix, case-insensitively.

Every name listed (and kept by `extensions`) is one entry with one record, whatever
it is: a symbolic link (dangling, or a loop), a FIFO or a name with a newline is an
item the download stage reads or fails (local names with `%`, `#`, `?` or control
characters are quoted in their file:// URL, the record's `input` shows the name). A
path that is not valid UTF-8 fails here (`invalid_input`): its URL would not be text,
which sinks (parquet) and records need. A subfolder that cannot be listed (no
permission) is one failed entry (`invalid_input`, the folder as `input`), and the walk
goes on; only the top folder (or a glob's base folder) failing to list stops the run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate
from pydantic import Field, field_validator

from pipeline.config.model import Options
from pipeline.errors import ItemError, RunIncompleteError
from pipeline.records import SourceItem, clean_text
from pipeline.stages.base import Source
from pipeline.stages.registry import register
from pipeline.storage import filesystem

GLOB_CHARACTERS = re.compile(r"[*?[]")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff")
# What a local name cannot hold as is in a file:// URL (the download stage unquotes it).
URL_UNSAFE = re.compile(r"[%#?\x00-\x1f\x7f]")

# A listed file's path and None, or a folder that cannot be listed and why.
Listed = tuple[str, Exception | None]


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


def local_url(path: str) -> str:
    """The file:// URL of a local path, with `%`, `#`, `?` and control characters quoted."""
    return "file://" + URL_UNSAFE.sub(lambda match: f"%{ord(match[0]):02X}", path)


def describe(error: Exception) -> str:
    """Why a folder cannot be listed, in a few words."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return clean_text(f"{type(error).__name__}: {error}")


def file_item(index: int, text: str, url: str, error: Exception | None) -> SourceItem:
    """The item of a listed name; ItemError for a folder that cannot be listed, or for a
    path that is not valid UTF-8 (its surrogate escapes are no text for sinks to write)."""
    if error is not None:
        raise ItemError("invalid_input", f"the folder cannot be listed: {describe(error)}")
    if clean_text(url) != url:
        raise ItemError("invalid_input", "the path is not valid UTF-8 (rename it to read the file)")
    return SourceItem(index, url, input=None if url == text else text)


def split_listing(listing: list[dict[str, Any]], folder: str) -> tuple[list[str], list[str]]:
    """(names that are not folders, subfolders) of a folder's listing, each sorted."""
    files: list[str] = []
    folders: list[str] = []
    for info in listing:
        path = info["name"].rstrip("/")
        if path != folder.rstrip("/"):
            (folders if info["type"] == "directory" else files).append(path)
    return sorted(files), sorted(folders)


def glob_base(pattern: str) -> str:
    """The folder all matches of a glob are under (as fsspec's glob takes it)."""
    match = GLOB_CHARACTERS.search(pattern)
    head = pattern[: match.start()] if match else pattern
    return head[: head.rfind("/") + 1]


def may_hold_matches(pattern: str, base: str) -> Callable[[str], bool]:
    """Whether a folder under `base` may hold matches of `pattern`: each of its names
    matches the pattern's part at its depth, until a `**` part (which takes any depth)."""
    parts = pattern[len(base) :].split("/")
    folder_parts = parts if parts[-1] == "**" else parts[:-1]
    tests = [None if part == "**" else re.compile(glob_translate(part)) for part in folder_parts]

    def may_hold(folder: str) -> bool:
        names = folder[len(base) :].strip("/").split("/")
        for name, test in zip(names, tests):  # noqa: B905 - a longer folder is too deep
            if test is None:
                return True
            if not test.match(name):
                return False
        return len(names) <= len(tests)

    return may_hold


@register("files")
class Files(Source[FilesOptions]):
    """One item per matching file, as a URL the `download` stage can read."""

    Options = FilesOptions
    description = "Files in a folder or glob, local or on any fsspec filesystem"

    def iter_items(self) -> Iterator[SourceItem]:
        fs, root = fsspec.core.url_to_fs(self.options.path)
        local = isinstance(fs, LocalFileSystem)
        index = 0
        for path, error in self._listed(fs, root):
            if error is None and not self._wanted(path):
                continue
            index += 1
            text = fs.unstrip_protocol(path)
            url = local_url(path) if local else text
            yield self.entry(index, text, partial(file_item, index, text, url, error))

    def _listed(self, fs: fsspec.AbstractFileSystem, root: str) -> Iterator[Listed]:
        if fs.isfile(root):
            yield root, None
        elif fs.isdir(root):
            recursive = self.options.recursive
            yield from self._walk(fs, root, lambda folder: recursive)
        elif GLOB_CHARACTERS.search(root):
            yield from self._glob(fs, root)

    def _glob(self, fs: fsspec.AbstractFileSystem, pattern: str) -> Iterator[Listed]:
        """The names matching a glob (fsspec's syntax), from a walk of the folders that
        may hold them; none if the folder the glob starts from does not exist."""
        base = glob_base(pattern)
        if not fs.isdir(base):
            return
        matches = re.compile(glob_translate(pattern)).match
        for path, error in self._walk(fs, base, may_hold_matches(pattern, base)):
            if error is not None or matches(path):
                yield path, error

    def _walk(
        self, fs: fsspec.AbstractFileSystem, root: str, descend: Callable[[str], bool]
    ) -> Iterator[Listed]:
        """Every name under `root` that is not a folder, depth first in sorted order, going
        into the subfolders `descend` accepts. A subfolder that cannot be listed comes
        with its error; `root` itself not listing stops the run."""
        pending = [root]
        while pending:
            folder = pending.pop()
            try:
                files, folders = split_listing(fs.ls(folder, detail=True), folder)
            except Exception as error:
                if folder == root:
                    where = clean_text(fs.unstrip_protocol(root))
                    raise RunIncompleteError(
                        f"{self.name}: cannot list {where}: {describe(error)}"
                    ) from None
                yield folder, error
                continue
            yield from ((path, None) for path in files)
            pending.extend(reversed([sub for sub in folders if descend(sub)]))

    def _wanted(self, path: str) -> bool:
        extensions = self.options.extensions
        return not extensions or path.rsplit(".", 1)[-1].lower() in extensions
