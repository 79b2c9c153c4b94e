"""A TCP proxy on loopback, in a thread of the test process, that can play a faulty link or
server: hold the bytes clients send (a link that stalls: an upload to the registry that takes
as long as the test wants), refuse connections (the server stopped), answer every request
with an HTTP error (a server failing), or pass a few bytes a second (a slow server)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any


class TcpProxy:
    """Forwards 127.0.0.1:port to `upstream`; while `hold()` is in force, nothing a client
    sends goes on (its connection waits, as on a congested link)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.status: int | None = None  # answer every request with this HTTP status
        self.rate: int | None = None  # bytes a second, each way
        self.connections = 0  # accepted while a fault was in force (refused ones not counted)

    def start(self) -> TcpProxy:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._open = asyncio.Event()
            self._open.set()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._client, "127.0.0.1", 0)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            if self._server is not None:
                self._server.close()
                loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def hold(self) -> None:
        """Stop forwarding what clients send (until release)."""
        assert self._loop is not None and self._open is not None
        self._loop.call_soon_threadsafe(self._open.clear)

    def release(self) -> None:
        assert self._loop is not None and self._open is not None
        self._loop.call_soon_threadsafe(self._open.set)

    def refuse(self) -> None:
        """Stop listening and cut every open connection: the server is down."""
        self._run(self._refuse())

    def accept(self) -> None:
        """Listen again, on the same port: the server is back."""
        self._run(self._listen())

    def fail(self, status: int | None) -> None:
        """From now on answer each request with `status` (None: forward again); open
        connections are cut, so that clients reconnect and meet it."""
        self.status = status
        self._run(self._cut())

    def throttle(self, rate: int | None) -> None:
        """Pass at most `rate` bytes a second each way on every connection (None: no limit)."""
        self.rate = rate

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await self._cut()

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._client, "127.0.0.1", self.port, reuse_address=True
            )

    async def _cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.status is not None:
                self.connections += 1
                await self._answer(reader, writer, self.status)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                writer.close()
                return
            self._writers.add(up_writer)
            assert self._open is not None
            await asyncio.gather(
                self._pump(reader, up_writer, self._open),
                self._pump(up_reader, writer, None),
                return_exceptions=True,
            )
            self._writers.discard(up_writer)
        finally:
            self._writers.discard(writer)

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int
    ) -> None:
        """Read one request's head and answer it with `status`, then close."""
        with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
            first = await asyncio.wait_for(reader.readexactly(1), 30)
            if first == b"\x16":  # a TLS hello: answered as a plain-HTTP server does
                writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request\n")
                await writer.drain()
                writer.close()
                return
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            body = b'{"errors":[{"code":"UNKNOWN","message":"injected by the test"}]}'
            writer.write(
                f"HTTP/1.1 {status} Injected Fault\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        gate: asyncio.Event | None,
    ) -> None:
        try:
            while data := await reader.read(65536 if self.rate is None else 4096):
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
                if self.rate is not None:
                    await asyncio.sleep(len(data) / self.rate)
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
