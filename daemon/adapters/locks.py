"""The per-deployment deploy lock in state_dir: fair, cross-process, crash-safe.

Deploys of one deployment never overlap, whichever process starts them, and
they run in the order they were queued. Both properties rest on flock(2),
which the kernel releases when a process dies, so a SIGKILLed deploy never
leaves a lock behind:

- `held.lock` is the lock itself; its holder writes its ticket (deploy id) in it.
- every waiter holds `wait-<ticket>.lock`; it may take `held.lock` only when
  no live waiter with a smaller ticket remains. A waiter file whose flock can
  be taken belongs to a dead process and is removed.

When the lock is released or a waiter leaves the queue, the first waiter of
this process in ticket order is woken at once (the others could not take the
lock anyway); `wake` wakes them all (a queued deploy was ended and should leave).
What other processes do is seen by a slow poll. A waiter looks only as far as
the first live waiter ahead of it. A daemon with hundreds of deploys queued so
spends its event loop on one look per hand-over, not one per waiter, and the
looks themselves (directory listings, flocks, truncates that may wait on the
filesystem's journal) run on one thread of the process's, in order, not on the
event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from daemon import threads

T = TypeVar("T")

log = logging.getLogger(__name__)

# How often a waiter looks without being woken: for a release, a dead waiter or a give-up
# in another process (a CLI deploy, `deployd cancel`). Each look is file operations and
# the caller's give_up, per waiter.
_POLL_SECONDS = 0.5

# The waiters of this process, by lock directory and ticket: woken by release,
# dequeue and `wake`.
_waiters: dict[Path, dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
_waiters_lock = threading.Lock()

# Every lock file operation of an `acquire`, and of a release, in the order asked:
# a release queued before a waiter's look is done before it.
_FILES = threads.pool(1, "deployd-locks")


async def _on_files(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_FILES, fn, *args)


def _logged(done: Future[None]) -> None:
    """What went wrong in a lock file operation nobody waits for (a release)."""
    if not done.cancelled() and done.exception() is not None:
        log.error("deploy lock: %s", done.exception(), exc_info=done.exception())


def wake(state_dir: Path, deployment: str) -> None:
    """Make every waiter of this process for `deployment`'s lock look again now
    (thread-safe): a queued deploy was ended and should leave the queue."""
    _wake(state_dir / "locks" / deployment, everyone=True)


def _wake(directory: Path, everyone: bool = False) -> None:
    """Wake this process's first waiter for the lock in `directory` (or all of them)."""
    with _waiters_lock:
        mine = _waiters.get(directory, {})
        tickets = list(mine) if everyone else sorted(mine)[:1]
        waiting = [mine[ticket] for ticket in tickets]
    for loop, event in waiting:
        with contextlib.suppress(RuntimeError):  # its loop has closed
            loop.call_soon_threadsafe(event.set)


class DeploymentLock:
    """The lock of one deployment. Acquire once per deploy; release when it ends."""

    def __init__(self, state_dir: Path, deployment: str) -> None:
        self.dir = state_dir / "locks" / deployment  # made by the first file operation
        self._held_fd: int | None = None
        self._wait_fd: int | None = None
        self._wait_path: Path | None = None

    @property
    def held(self) -> bool:
        return self._held_fd is not None

    def try_acquire(self, ticket: int | None = None) -> bool:
        """Take the lock now if it is free (no queue check); True on success."""
        self.dir.mkdir(parents=True, exist_ok=True)
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
        give_up: Callable[[], bool | Awaitable[bool]] | None = None,
    ) -> bool:
        """Wait in ticket order for the lock; False if `give_up()` said so first.

        `on_wait(ahead)` is called once if we must wait. `give_up` may be a coroutine
        function (a records read off the event loop).
        """
        event = asyncio.Event()
        with _waiters_lock:
            _waiters.setdefault(self.dir, {})[ticket] = (asyncio.get_running_loop(), event)
        got = told = False
        # Submitted now, before any await: whatever cancels us, `_leave` runs after it.
        enqueued = asyncio.wrap_future(_FILES.submit(self._enqueue, ticket))
        try:
            await asyncio.shield(enqueued)
            while True:
                event.clear()
                got, ahead = await _on_files(self._look, ticket, not told)
                if got:
                    break
                if give_up is not None:
                    answer = give_up()
                    if await answer if inspect.isawaitable(answer) else answer:
                        break
                if not told and on_wait is not None:
                    on_wait(ahead)
                    told = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), _POLL_SECONDS)
        finally:
            with _waiters_lock:
                mine = _waiters.get(self.dir)
                if mine is not None:
                    mine.pop(ticket, None)
                    if not mine:
                        del _waiters[self.dir]
            # In order after the enqueue and any look still running (cancelled meanwhile).
            left = _FILES.submit(self._leave, got)
        try:
            await asyncio.shield(asyncio.wrap_future(left))
        except asyncio.CancelledError:
            if got:  # cancelled as we took it: nobody would release it
                self.release()
            raise
        return got

    def _leave(self, keep: bool) -> None:
        """On the lock thread: leave the queue; unless `keep`, let go of the lock if a
        look took it for a waiter that was cancelled meanwhile."""
        if not keep and self._held_fd is not None:
            fd, self._held_fd = self._held_fd, None
            self._close_held(fd)
        self._dequeue()

    def _look(self, ticket: int, who: bool) -> tuple[bool, int | None]:
        """On the lock thread: take the lock if no live waiter is ahead; else (False, the
        holder or the first live waiter ahead, when `who`)."""
        ahead = self._first_live_waiter_before(ticket)
        if ahead is None and self.try_acquire(ticket):
            return True, None
        return False, (self.holder() or ahead) if who else None

    def release(self) -> None:
        """Release the lock (idempotent), on the lock thread: this process's waiters
        look after it; another process may see it held a moment longer."""
        fd, self._held_fd = self._held_fd, None
        if fd is not None:
            _FILES.submit(self._close_held, fd).add_done_callback(_logged)

    def _close_held(self, fd: int) -> None:
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
            _wake(self.dir)

    def _enqueue(self, ticket: int) -> None:
        # Lock under a temporary name, then rename: a file visible under its
        # final name is always locked while its owner lives.
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"wait-{ticket:020d}.lock"
        tmp = self.dir / f".tmp-{os.getpid()}-{ticket}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, final)
        self._wait_fd, self._wait_path = fd, final

    def _dequeue(self) -> None:
        path, fd = self._wait_path, self._wait_fd
        self._wait_fd = self._wait_path = None
        try:
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        finally:  # closed whatever unlink said: a closed waiter file is a dead one
            if fd is not None:
                os.close(fd)
                _wake(self.dir)  # the next in line may be the one behind us

    def _first_live_waiter_before(self, ticket: int) -> int | None:
        """The smallest ticket ahead of `ticket` whose waiter lives (dead ones are removed)."""
        # os.listdir, not Path.glob: this runs on the event loop at every look of a waiter.
        waiting = (n for n in os.listdir(self.dir) if n.startswith("wait-") and n.endswith(".lock"))
        for name in sorted(waiting):
            try:
                other = int(name[5:-5])
            except ValueError:
                continue
            if other >= ticket:
                break
            if self._alive(self.dir / name):
                return other
        return None

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
