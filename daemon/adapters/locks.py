"""The per-deployment deploy lock in state_dir: fair, cross-process, crash-safe.

Deploys of one deployment never overlap, whichever process starts them, and
they run in the order they were queued. Both properties rest on flock(2),
which the kernel releases when a process dies, so a SIGKILLed deploy never
leaves a lock behind:

- `held.lock` is the lock itself; its holder writes its ticket (deploy id) in it.
- every waiter holds `wait-<ticket>.lock`; it may take `held.lock` only when
  no live waiter with a smaller ticket remains. A waiter file whose flock can
  be taken belongs to a dead process and is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

_POLL_SECONDS = 0.05
# A waiter with another live waiter ahead cannot be next, so it looks less often: each
# look is file operations (and the caller's give_up) on the event loop, per waiter.
_BEHIND_POLL_SECONDS = 0.2


class DeploymentLock:
    """The lock of one deployment. Acquire once per deploy; release when it ends."""

    def __init__(self, state_dir: Path, deployment: str) -> None:
        self.dir = state_dir / "locks" / deployment
        self.dir.mkdir(parents=True, exist_ok=True)
        self._held_fd: int | None = None
        self._wait_fd: int | None = None
        self._wait_path: Path | None = None

    @property
    def held(self) -> bool:
        return self._held_fd is not None

    def try_acquire(self, ticket: int | None = None) -> bool:
        """Take the lock now if it is free (no queue check); True on success."""
        fd = os.open(self.dir / "held.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(ticket or 0).encode(), 0)
        self._held_fd = fd
        return True

    def holder(self) -> int | None:
        """The ticket of the current holder, if it wrote one."""
        try:
            text = (self.dir / "held.lock").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdecimal() and int(text) > 0 else None

    async def acquire(
        self,
        ticket: int,
        on_wait: Callable[[int | None], None] | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> bool:
        """Wait in ticket order for the lock; False if `give_up()` said so first.

        `on_wait(ahead)` is called once if we must wait.
        """
        self._enqueue(ticket)
        told = False
        try:
            while True:
                ahead = self._live_waiters_before(ticket)
                if not ahead and self.try_acquire(ticket):
                    return True
                if give_up is not None and give_up():
                    return False
                if not told and on_wait is not None:
                    on_wait(self.holder() or (ahead[0] if ahead else None))
                    told = True
                await asyncio.sleep(_BEHIND_POLL_SECONDS if ahead else _POLL_SECONDS)
        finally:
            self._dequeue()

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._held_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._held_fd, 0)
            os.close(self._held_fd)
            self._held_fd = None

    def _enqueue(self, ticket: int) -> None:
        # Lock under a temporary name, then rename: a file visible under its
        # final name is always locked while its owner lives.
        final = self.dir / f"wait-{ticket:020d}.lock"
        tmp = self.dir / f".tmp-{os.getpid()}-{ticket}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, final)
        self._wait_fd, self._wait_path = fd, final

    def _dequeue(self) -> None:
        if self._wait_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._wait_path.unlink()
        if self._wait_fd is not None:
            os.close(self._wait_fd)
        self._wait_fd = self._wait_path = None

    def _live_waiters_before(self, ticket: int) -> list[int]:
        ahead = []
        # os.listdir, not Path.glob: this runs on the event loop at every poll of every waiter.
        waiting = (n for n in os.listdir(self.dir) if n.startswith("wait-") and n.endswith(".lock"))
        for name in sorted(waiting):
            try:
                other = int(name[5:-5])
            except ValueError:
                continue
            if other >= ticket:
                break
            if self._alive(self.dir / name):
                ahead.append(other)
        return ahead

    @staticmethod
    def _alive(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        # Nobody holds it: its owner died while waiting.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False

    def live_waiter(self, ticket: int) -> bool:
        """Whether the process that queued `ticket` is still waiting."""
        path = self.dir / f"wait-{ticket:020d}.lock"
        return path.exists() and self._alive(path)
