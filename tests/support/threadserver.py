"""Run an aiohttp application on loopback in a thread of the test process (fakes, simulators)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading

from aiohttp import web


class ThreadServer:
    """One aiohttp app on 127.0.0.1, served from its own thread and event loop."""

    def __init__(
        self, app: web.Application, port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.app, self.ssl_context = app, ssl_context
        self.port = port or _free_port()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadServer:
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            # Open streams (watches) get a moment at stop, not the default minute.
            runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
            loop.run_until_complete(site.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"the server on port {self.port} did not start")
        return self

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
