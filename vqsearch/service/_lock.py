"""One writer per data dir: an exclusive `flock` on `<data_dir>/vqsearch.lock`, held for the life
of the process that writes there (read-only replicas take none).

`flock` locks belong to an open file, so a second server (another process, or another app in
this one) is refused, and the kernel drops the lock when the holder dies however it dies: a
crashed server never leaves the data dir locked. The file holds the holder's pid, so the one
refused can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "vqsearch.lock"


class DataDirLockedError(Exception):
    """Another process writes to this data dir."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DataDirLockedError naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirLockedError(
                f"data dir {self.path.parent} is in use by another vqsearch server (pid "
                f"{holder}); one process writes a data dir: stop it, use another "
                "VQSEARCH_DATA_DIR, or start this one as a replica (VQSEARCH_READ_ONLY=1)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None
