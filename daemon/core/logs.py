"""The log stream of a deploy: every step's output, stored and fanned out.

A deploy writes lines here from any thread; each line is stored in the
records, printed by the local sink (stderr for the CLI, `remote:` lines for a
push) and handed to live subscribers (followers in this process: see
core/usecases.follow_log).
Floods are capped per step so that a build or test that prints megabytes
floods nobody: the first lines and the last lines are kept.

Lines are stored on one thread of the process's (`_WRITER`), in order, and so
are the deploys' other record changes (`record`): a line written before a
state change is stored before it, and nobody waits for SQLite, which another
writer (an operator's `sqlite3` session) may hold for seconds. Lines written
while the writer is busy are stored together, in one transaction. The sink sees
each line at once.

One thread for every deploy, started once: a thread per deploy was started by
the deploy's first line, on the event loop, and starting a thread waits until
it runs (160 ms on a busy machine, measured by bench/webhook_load's phase 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from daemon import threads
from daemon.adapters.records import Records
from daemon.core.deploys import LogLine
from daemon.printable import printable

log = logging.getLogger(__name__)

MAX_LINE_CHARS = 2000
HEAD_LINES = 1500
TAIL_LINES = 200

Sink = Callable[[str], None]
T = TypeVar("T")

# Stores every deploy's lines and record changes, in the order they were written.
# `deployd serve` starts its thread before it listens (daemon/threads.py); at exit it
# finishes its queue.
_WRITER = threads.pool(1, "deployd-log-writer")


class DeployLog:
    """One deploy's log stream."""

    def __init__(self, records: Records, deploy_id: int, sink: Sink | None = None) -> None:
        self.records = records
        self.deploy_id = deploy_id
        self.sink = sink
        self._lock = threading.Lock()
        self._subscribers: list[
            tuple[asyncio.AbstractEventLoop, asyncio.Queue[LogLine | None]]
        ] = []
        self._counts: dict[str, int] = {}
        self._tails: dict[str, deque[str]] = {}
        self._closed = False  # on the writer: every line is stored, subscribers told
        self._shut = False  # `close` was called: later lines are dropped
        # Lines written but not yet taken by the writer; a task to store them is queued
        # once it holds one. `record` starts a new batch, stored after its change.
        self._batch: list[tuple[str | None, str]] = []
        self._unstored = 0  # lines the records refused (a full disk): warned about once

    def subscribe(self) -> asyncio.Queue[LogLine | None]:
        """A queue that receives every later line, then None when the log closes."""
        queue: asyncio.Queue[LogLine | None] = asyncio.Queue()
        with self._lock:
            if self._closed:
                queue.put_nowait(None)
            else:
                self._subscribers.append((asyncio.get_running_loop(), queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[LogLine | None]) -> None:
        """Stop feeding `queue` (its follower went away: a browser closed its page)."""
        with self._lock:
            self._subscribers = [(lp, q) for lp, q in self._subscribers if q is not queue]

    def write(self, line: str, step: str | None = None) -> None:
        """Add one line (thread-safe); beyond the step's cap it is only counted."""
        line = printable(line.rstrip("\r\n"))
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + f" [... {len(line) - MAX_LINE_CHARS} chars cut]"
        key = step or ""
        with self._lock:
            n = self._counts.get(key, 0) + 1
            self._counts[key] = n
            if step is not None and n > HEAD_LINES:
                self._tails.setdefault(key, deque(maxlen=TAIL_LINES)).append(line)
                return
            self._emit(line, step)

    def end_step(self, step: str) -> None:
        """Flush the kept tail of a step whose output was capped."""
        with self._lock:
            tail = self._tails.pop(step, None)
            if not tail:
                return
            hidden = self._counts.get(step, 0) - HEAD_LINES - len(tail)
            if hidden > 0:
                self._emit(f"[... {hidden} lines of {step} output not shown ...]", step)
            for line in tail:
                self._emit(line, step)

    def _emit(self, line: str, step: str | None) -> None:
        """Show the line and queue it for storing (called holding self._lock)."""
        if self.sink is not None:
            with contextlib.suppress(Exception):
                self.sink(line)
        if self._shut:  # an abandoned step's late output
            return
        self._batch.append((step, line))
        if len(self._batch) == 1:
            with contextlib.suppress(RuntimeError):  # the interpreter is shutting down
                _WRITER.submit(self._store, self._batch)

    def _store(self, batch: list[tuple[str | None, str]]) -> None:
        """On the writer: store a batch of lines, then hand them to the subscribers."""
        with self._lock:
            if self._batch is batch:  # later lines go to a batch of their own
                self._batch = []
        stored: list[LogLine] = []
        for step, entries in itertools.groupby(batch, key=lambda entry: entry[0]):
            lines = [line for _, line in entries]
            try:
                stored += self.records.append_log(self.deploy_id, step, lines)
            except Exception as exc:  # the lines were shown; the deploy's outcome matters
                self._unstored += len(lines)
                if self._unstored == len(lines):
                    log.warning(
                        "deploy #%s: log lines are not being stored: %s", self.deploy_id, exc
                    )
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            for row in stored:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, row)

    async def record(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a Records call on the writer, after every line written before it.

        Once submitted it completes even if the caller is cancelled meanwhile.
        """
        with self._lock:
            self._batch = []  # the lines so far are queued ahead; later ones come after
            future = _WRITER.submit(functools.partial(fn, *args, **kwargs))
        return await asyncio.shield(asyncio.wrap_future(future))

    def flush(self) -> None:
        """Wait (blocking) until every line written so far is stored."""
        _WRITER.submit(lambda: None).result()

    def close(self) -> None:
        """Tell subscribers the stream has ended (after its last line is stored)."""
        with self._lock:
            self._shut = True
            _WRITER.submit(self._end)

    def _end(self) -> None:
        with self._lock:
            self._closed = True
            for loop, queue in self._subscribers:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, None)
            self._subscribers.clear()
