"""Blocking Engine calls that a stopped deploy must stop for real, not walk away from.

A Docker build or push streams over a connection that no other thread can
interrupt, and a check container runs until it is killed. Each such call takes
the deploy's `stop` event and, once it is set, cuts its stream (the Engine
then cancels the build or push) or kills its container, and returns soon
after. `run_stoppable` runs one in a daemon thread: when the awaiting task is
cancelled (a cancel, Ctrl-C, a failed step beside it) it sets `stop` and
waits for the thread to end, so that nothing of a stopped deploy is still
running when the pipeline cleans up after it. `StreamCutter` is how the
Engine's streaming calls (adapters/images.py) see `stop`. Daemon threads, not
`asyncio.to_thread`: a process that exits without waiting (a second Ctrl-C)
is never held by one. They are started by daemon/threads.py's starter, so that
the event loop does not wait for them to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import requests

from daemon import threads

T = TypeVar("T")

log = logging.getLogger(__name__)

# How long a stopped call may take to end before it is left to finish alone
# (a cut stream ends in milliseconds, a killed container in about a second).
STOP_GRACE_SECONDS = 30.0


async def run_stoppable(
    fn: Callable[..., T], stop: threading.Event, *args: object, grace: float = STOP_GRACE_SECONDS
) -> T:
    """Run `fn(*args)` (which honours `stop`) in a thread and return its result.

    If the await is cancelled, `stop` is set and the thread is waited for (up to
    `grace` seconds) before the cancellation goes on.
    """
    loop = asyncio.get_running_loop()
    result: asyncio.Future[T] = loop.create_future()
    ended: asyncio.Future[None] = loop.create_future()

    def settle(value: T | None, exc: BaseException | None) -> None:
        if not ended.done():
            ended.set_result(None)
        if result.done():
            return
        if exc is not None:
            result.set_exception(exc)
        else:
            result.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        value: T | None = None
        error: BaseException | None = None
        try:
            value = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        # RuntimeError: the loop is gone, nobody is waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, error)

    name = f"deployd-{getattr(fn, '__name__', 'call')}"

    def unstarted(exc: BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone, nobody is waiting
            loop.call_soon_threadsafe(settle, None, exc)

    threads.start(threading.Thread(target=work, name=name, daemon=True), unstarted)
    try:
        return await result
    except asyncio.CancelledError:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(ended), grace)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; it is left to end alone", name, grace)
        raise


class StreamCutter:
    """Cuts the open streams of a client (a docker.APIClient) once `stop` is set.

    The Engine cancels a build or push whose connection closes (and removes the
    build step's container); a thread blocked reading the stream gets an error
    at once. Closing the requests session would not do: a connection in use is
    not closed by it, so the socket is shut down.
    """

    def __init__(
        self, client: requests.Session, stop: threading.Event, on_cut: Callable[[], None] | None
    ) -> None:
        self.stop = stop
        self.on_cut = on_cut
        self._responses: list[requests.Response] = []
        self._closed = threading.Event()
        client.hooks["response"].append(self._seen)
        self._thread = threading.Thread(
            target=self._watch, name="deployd-stream-cutter", daemon=True
        )
        self._thread.start()

    def _seen(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._responses.append(response)
        if self.stop.is_set():  # stopped before the Engine answered
            _shut(response)

    def _watch(self) -> None:
        while not self._closed.is_set():
            if self.stop.wait(0.1):
                for response in list(self._responses):
                    _shut(response)
                if self.on_cut is not None:
                    self.on_cut()
                return

    def close(self) -> None:
        """The stream ended: stop watching (after a cut under way, and `on_cut`, are done)."""
        self._closed.set()
        if self.stop.is_set() and self._thread is not threading.current_thread():
            self._thread.join(STOP_GRACE_SECONDS)


def _shut(response: requests.Response) -> None:
    """Shut down the connection a streamed response is read from."""
    fp = getattr(getattr(response.raw, "_fp", None), "fp", None)
    raw = getattr(fp, "raw", None)
    sock = getattr(raw, "_sock", None)  # socket.SocketIO's socket (an SSLSocket for TLS)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        response.close()
