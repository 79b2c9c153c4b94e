"""The Unix-socket protocol between hooks/pre-receive and the daemon.

    hook → daemon   one JSON line: {"session", "updates": [[old, new, ref]],
                                    "options": [...], "env": {quarantine vars}}
    daemon → hook   "L <text>" per progress line, then "V <exit status>"

The socket lives in state_dir with mode 0600: only the daemon's user (git's
receive-pack, started by the daemon, runs as that user) can connect, and a
request is honoured only with the token of a live SSH push session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
Say = Callable[[str], None]
Handler = Callable[[dict[str, Any], Say], Awaitable[int]]


class HookServer:
    """Serves hook connections on a Unix socket; each runs `handler(request, say)`."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen (replacing a stale socket file)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)
        self.path.chmod(0o600)

    async def close(self) -> None:
        """Stop accepting hook connections."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def say(line: str) -> None:
            # Called from deploy threads as well as the loop.
            loop.call_soon_threadsafe(queue.put_nowait, line)

        async def relay() -> None:
            alive = True
            while (line := await queue.get()) is not None:
                if not alive:
                    continue
                try:
                    writer.write(("L " + line.replace("\n", " ") + "\n").encode())
                    await writer.drain()
                except (ConnectionError, RuntimeError):
                    alive = False  # the hook is gone; the deploy goes on

        relayer = asyncio.create_task(relay())
        verdict = 1
        try:
            raw = await reader.readline()
            request = json.loads(raw)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            verdict = await self.handler(request, say)
        except (ValueError, asyncio.LimitOverrunError, UnicodeDecodeError) as exc:
            say(f"deployd: the hook sent a malformed request ({exc}).")
        finally:
            # After every line already scheduled by say(): the loop runs callbacks in order.
            loop.call_soon(queue.put_nowait, None)
            await relayer
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.write(f"V {verdict}\n".encode())
                await writer.drain()
                writer.close()
