"""GET /metrics: the Prometheus text exposition, behind a bearer token when one is set.

Served on http_listen, or alone on [server] metrics_listen when that is set (and
then not on http_listen). Open unless [server] metrics_token_file names a token,
as Prometheus endpoints usually are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from daemon.config import Settings
from daemon.http.auth import bearer_ok
from daemon.metrics import Metrics

# What generate_latest writes: the text format 0.0.4 (prometheus_client's own server says
# so too; its CONTENT_TYPE_LATEST names version 1.0.0 in recent releases, for UTF-8 names).
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
UNAUTHORIZED = "401: /metrics needs Authorization: Bearer <the token in metrics_token_file>.\n"


class MetricsEndpoint:
    """The /metrics handler over one Metrics."""

    def __init__(self, settings: Callable[[], Settings], metrics: Metrics) -> None:
        self._settings = settings
        self.metrics = metrics

    def routes(self) -> list[web.RouteDef]:
        """GET /metrics."""
        return [web.get("/metrics", self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        """The exposition, collected in a thread (it reads the records)."""
        token = self._settings().server.metrics_token
        if token is not None and not bearer_ok(request, token):
            return web.Response(
                status=401,
                text=UNAUTHORIZED,
                headers={"WWW-Authenticate": 'Bearer realm="deployd metrics"'},
            )
        body = await asyncio.to_thread(self.metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": TEXT_FORMAT})


async def serve_alone(endpoint: MetricsEndpoint, host: str, port: int) -> web.AppRunner:
    """Serve /metrics, and nothing else, on HOST:PORT; the caller cleans the runner up."""
    app = web.Application()
    app.add_routes(endpoint.routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
