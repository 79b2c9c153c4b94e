"""A deploy's log pushed to the browser as it is written: server-sent events.

    GET /deploys/{id}/events[?after=N]      (or the `Last-Event-ID` header)

    event: deploy   data: the deploy's JSON (views.deploy_json), first and whenever
                    its state or step changes
    id: N           one per log line (so that a reconnect resumes after it)
    event: line     data: {"id", "ts", "step", "line"}
    event: end      the deploy has ended; nothing follows
    : keepalive     a comment after HEARTBEAT_SECONDS of silence (proxies drop idle streams)

The lines come from usecases.follow_log: pushed by the in-process DeployLog
when this daemon runs the deploy, read from the records as they grow when
another process does. What one slow client can hold is bounded: at most
MAX_PENDING lines wait for it, and a write that does not complete within
WRITE_TIMEOUT_SECONDS ends its stream. Either way the browser reconnects with
the id of the last line it got and resumes from the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

from aiohttp import web

from daemon import views
from daemon.adapters.records import Records
from daemon.config import Settings
from daemon.core import usecases
from daemon.core.deploys import Deploy, LogLine
from daemon.core.logs import DeployLog
from daemon.errors import UsageError

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 15.0
STATE_SECONDS = 1.0  # how often the record is read for a state or step change
MAX_PENDING = 2000  # log lines that may wait for one client
WRITE_TIMEOUT_SECONDS = 30.0
RETRY_MS = 2000  # what the browser waits before it reconnects
_LINE_ID = re.compile(r"[0-9]{1,18}")
_END = object()  # the log has ended
_OVERFLOW = object()  # the client fell MAX_PENDING lines behind


def resume_after(request: web.Request) -> int:
    """The id of the last line the client has (Last-Event-ID, else ?after=N, else 0).

    Raises UsageError for anything but a whole number.
    """
    text = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
    if not _LINE_ID.fullmatch(text.strip()):
        raise UsageError("the last line id (Last-Event-ID or ?after=) must be a whole number.")
    return int(text)


def frame(event: str, data: dict[str, Any], ident: int | None = None) -> bytes:
    """One server-sent event (the JSON has no newlines, so one `data:` line)."""
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def line_frame(row: LogLine) -> bytes:
    """The event of one log line."""
    return frame("line", {"id": row.id, **views.log_json(row)}, row.id)


class LiveLog:
    """Serves the event streams of deploys (one handler call per browser)."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        records: Records,
        live: Callable[[int], DeployLog | None],
    ) -> None:
        self._settings = settings
        self.records = records
        self._live = live
        self.streams = 0  # open streams now (for the benchmark's figures)

    async def stream(
        self, request: web.Request, rec: Deploy, after: int, headers: dict[str, str]
    ) -> web.StreamResponse:
        """The event stream of deploy `rec` (access already checked) from line `after` on."""
        resp = web.StreamResponse(
            headers={
                **headers,
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # nginx: do not hold the stream back
            }
        )
        await resp.prepare(request)
        self.streams += 1
        pending: asyncio.Queue[object] = asyncio.Queue(MAX_PENDING + 1)
        pump = asyncio.create_task(self._pump(rec.id, after, pending))
        try:
            await self._send(resp, rec, pending)
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass  # the browser went away (or stalled): it resumes on reconnect
        finally:
            self.streams -= 1
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        return resp

    async def _pump(self, deploy_id: int, after: int, pending: asyncio.Queue[object]) -> None:
        """Move the log's lines to `pending`; stop (for a reconnect) if the client lags."""
        lines = cast(  # an async generator: closed here, not whenever it is collected
            AsyncGenerator[LogLine, None],
            usecases.follow_log(
                self.records,
                deploy_id,
                live=self._live(deploy_id),
                settings=self._settings(),
                after=after,
            ),
        )
        try:
            async for row in lines:
                if pending.qsize() >= MAX_PENDING:
                    pending.put_nowait(_OVERFLOW)
                    return
                pending.put_nowait(row)
            pending.put_nowait(_END)
        except Exception as exc:  # the records failed: end the stream; the browser retries
            log.warning("deploy #%s: its event stream ended: %s", deploy_id, exc)
            pending.put_nowait(_OVERFLOW)
        finally:
            await lines.aclose()

    async def _send(
        self, resp: web.StreamResponse, rec: Deploy, pending: asyncio.Queue[object]
    ) -> None:
        loop = asyncio.get_running_loop()
        await self._write(resp, f"retry: {RETRY_MS}\n\n".encode() + frame("deploy", _shown(rec)))
        shown, quiet_since, checked = _state(rec), loop.time(), loop.time()
        while True:
            try:
                item = await asyncio.wait_for(pending.get(), STATE_SECONDS)
            except TimeoutError:
                item = None
            batch, ended = [], item is _END
            while isinstance(item, LogLine):
                batch.append(line_frame(item))
                item = pending.get_nowait() if not pending.empty() and len(batch) < 500 else None
                ended = item is _END
            if item is _OVERFLOW:
                await self._write(resp, b"".join(batch))
                return  # the browser reconnects from its last line
            if ended or loop.time() - checked >= STATE_SECONDS:
                checked = loop.time()
                now = await asyncio.to_thread(self.records.get, rec.id)
                if now is not None and _state(now) != shown:
                    shown = _state(now)
                    batch.append(frame("deploy", _shown(now)))
            if ended:
                batch.append(b"event: end\ndata: {}\n\n")
            if not batch and loop.time() - quiet_since >= HEARTBEAT_SECONDS:
                batch.append(b": keepalive\n\n")
            if batch:
                await self._write(resp, b"".join(batch))
                quiet_since = loop.time()
            if ended:
                return

    async def _write(self, resp: web.StreamResponse, data: bytes) -> None:
        await asyncio.wait_for(resp.write(data), WRITE_TIMEOUT_SECONDS)


def _state(rec: Deploy) -> tuple[str, str | None, tuple[tuple[str, str], ...]]:
    return rec.state, rec.step, tuple((s.name, s.state) for s in rec.steps)


def _shown(rec: Deploy) -> dict[str, Any]:
    """The deploy's JSON, as the API shows it."""
    return views.deploy_json(rec)
