"""Room kept on state_dir's disk, so that deploys' outcomes can be recorded when it fills up.

On a full disk SQLite can write nothing, not even the `failed` of the deploy that filled
it (a checkout of a large file), which would then look `running` forever. The records
keep a file of RESERVE_BYTES beside the database: a write that finds the disk full
removes it and is tried again, so the outcome is recorded; no new deploy starts until
there is room to keep the reserve again (records.create_deploy).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

RESERVE_BYTES = 4 * 1024 * 1024


def disk_full(exc: BaseException) -> bool:
    """Whether SQLite or the system said the disk is full."""
    if isinstance(exc, sqlite3.OperationalError):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def too_full(path: Path, size: int = RESERVE_BYTES) -> bool:
    """Whether the disk holding `path` has less room than the reserve, twice: the line
    below which no new deploy (or push) starts."""
    return shutil.disk_usage(path).free < 2 * size


class Reserve:
    """The reserve file: kept while there is room for it, given up when the disk is full."""

    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        self.path = path
        self.size = size

    def keep(self) -> bool:
        """Make sure the reserve is there (if the disk has room for it twice); whether it is."""
        if self.path.exists():
            return True
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            if too_full(self.path.parent, self.size):
                return False
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)  # blocks really taken, not a sparse file
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning("could not keep %s: %s", self.path, exc)
            return False
        return True

    def release(self) -> bool:
        """Remove the reserve to make room; whether there was one to remove."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        log.error(
            "the disk of %s is full: gave up the %d MiB kept for recording deploys' outcomes",
            self.path.parent,
            self.size >> 20,
        )
        return True
