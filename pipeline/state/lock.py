"""One run at a time per run directory: an OS file lock the kernel releases if we die."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from pipeline.errors import LockHeldError
from pipeline.state.rundir import LOCK_FILE


class RunLock:
    """`flock` on `RUN_DIR/.lock`, non-blocking: a second run fails at once with exit 3.

    The file is never deleted (deleting a lock file races with its next user); a
    lock left by a killed run is no lock at all, because the kernel dropped it.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LockHeldError(
                f"another run of this job holds {self.path} ({holder}); nothing was changed"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None
