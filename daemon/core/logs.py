"""The log stream of a deploy: every step's output, stored and fanned out.

A deploy writes lines here from any thread; each line is stored in the
records, printed by the local sink (stderr for the CLI, `remote:` lines for a
push) and handed to live subscribers (followers in this process: see
core/usecases.follow_log).
Floods are capped per step so that a build or test that prints megabytes
floods nobody: the first lines and the last lines are kept.

Lines are stored on a thread of the log's own, in order, and so are the
deploy's other record changes (`record`): a line written before a state
change is stored before it, and nobody waits for SQLite, which another writer
(an operator's `sqlite3` session) may hold for seconds. The sink sees each
line at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from daemon.adapters.records import Records
from daemon.core.deploys import LogLine
from daemon.printable import printable

log = logging.getLogger(__name__)

MAX_LINE_CHARS = 2000
HEAD_LINES = 1500
TAIL_LINES = 200

Sink = Callable[[str], None]
T = TypeVar("T")


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
        self._closed = False
        self._unstored = 0  # lines the records refused (a full disk): warned about once
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"deploy-{deploy_id}-records")

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
        if self.sink is not None:
            with contextlib.suppress(Exception):
                self.sink(line)
        with contextlib.suppress(RuntimeError):  # closed: an abandoned step's late output
            self._writer.submit(self._store, line, step)

    def _store(self, line: str, step: str | None) -> None:
        """On the writer thread: store one line, then hand it to the subscribers."""
        try:
            stored = self.records.append_log(self.deploy_id, step, [line])
        except Exception as exc:  # the line was shown; the deploy's outcome is what matters
            self._unstored += 1
            if self._unstored == 1:
                log.warning("deploy #%s: log lines are not being stored: %s", self.deploy_id, exc)
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            for row in stored:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, row)

    async def record(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a Records call on the log's thread, after every line written before it.

        Once submitted it completes even if the caller is cancelled meanwhile.
        """
        future = self._writer.submit(functools.partial(fn, *args, **kwargs))
        return await asyncio.shield(asyncio.wrap_future(future))

    def flush(self) -> None:
        """Wait (blocking) until every line written so far is stored."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        """Tell subscribers the stream has ended (after its last line is stored)."""
        self._writer.submit(self._end)
        self._writer.shutdown(wait=False)

    def _end(self) -> None:
        with self._lock:
            self._closed = True
            for loop, queue in self._subscribers:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, None)
            self._subscribers.clear()
