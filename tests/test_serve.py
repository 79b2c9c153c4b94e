"""`deployd serve`'s own parts that need no servers: the event loop's error handler."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from daemon.serve import LoopErrors


async def test_out_of_descriptors_is_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    handler = LoopErrors()
    emfile = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.ERROR, logger="daemon.serve"):
        for _ in range(1000):
            handler(
                loop, {"message": "socket.accept() out of system resource", "exception": emfile}
            )
    assert [r.getMessage() for r in caplog.records] == [
        "out of file descriptors (Too many open files); new connections wait"
    ]
    handler._last -= LoopErrors.INTERVAL  # an interval later
    with caplog.at_level(logging.ERROR, logger="daemon.serve"):
        handler(loop, {"message": "accept", "exception": emfile})
    assert "999 more like it" in caplog.records[-1].getMessage()


async def test_other_loop_errors_go_to_the_default_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    with caplog.at_level(logging.ERROR):
        LoopErrors()(loop, {"message": "something else", "exception": ValueError("x")})
    assert any("something else" in r.getMessage() for r in caplog.records)
