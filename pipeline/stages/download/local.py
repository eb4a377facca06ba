"""Local files: regular files only, never a blocking open, size decided from stat."""

from __future__ import annotations

import errno
import os
import stat

from pipeline.errors import ItemError


def read_local(path: str, max_bytes: int, root: str | None = None) -> bytes:
    """The bytes of the regular file at `path` (inside `root`, if given)."""
    if root is not None:
        _check_inside(path, root)
    try:
        # O_NONBLOCK: opening a FIFO with no writer must not wait for one.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        _check_regular(path, os.fstat(fd), max_bytes)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # the file grew after the stat, or stat lies (/proc)
        raise ItemError("too_large", f"more than {max_bytes} bytes")
    return data


def _check_regular(path: str, info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ItemError("not_regular_file", f"{path} is a {_kind(info.st_mode)}")
    if info.st_size > max_bytes:
        raise ItemError("too_large", f"{info.st_size} bytes exceeds {max_bytes}")


def _open_error(path: str, exc: OSError) -> ItemError:
    if exc.errno == errno.ELOOP:
        return ItemError("not_regular_file", f"{path} is a symbolic link loop")
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return ItemError("not_regular_file", f"{path} is a dangling symbolic link")
    if exc.errno == errno.ENOENT:
        return ItemError("not_found", f"no such file: {path}")
    return ItemError("not_found", f"{path}: {exc.strerror}")


def _check_inside(path: str, root: str) -> None:
    """Refuse a path that, symlinks resolved, is not under `root`."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise ItemError("outside_root", f"{path} resolves to {real}, outside {root}")


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "directory",
        stat.S_ISFIFO: "FIFO",
        stat.S_ISCHR: "character device",
        stat.S_ISBLK: "block device",
        stat.S_ISSOCK: "socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "special file")
