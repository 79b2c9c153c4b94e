"""Blocking calls that a cancelled deploy must be able to walk away from.

A Docker build or push streams over a connection that no other thread can
interrupt. `asyncio.to_thread` would make the process wait for it at exit
(the default executor is joined), so a Ctrl-C during `RUN sleep 600` would
hang. These calls run in daemon threads instead: a cancelled deploy stops
waiting at once, and when the process exits the Engine sees the connection
close and cancels the build or push itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_abandonable(fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` in a daemon thread; cancelling the await abandons the thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle_result(value: T) -> None:
        if not future.done():
            future.set_result(value)

    def settle_error(exc: BaseException) -> None:
        if not future.done():
            future.set_exception(exc)

    def work() -> None:
        # RuntimeError from call_soon_threadsafe: the loop is gone, nobody is waiting.
        try:
            value = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle_error, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle_result, value)

    threading.Thread(
        target=work, name=f"deployd-{getattr(fn, '__name__', 'call')}", daemon=True
    ).start()
    return await future
