"""The aiohttp application: /healthz now; the webhook and the API arrive with their issue."""

from __future__ import annotations

from aiohttp import web


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


def make_app() -> web.Application:
    """Build the HTTP application."""
    app = web.Application(client_max_size=25 * 1024 * 1024)
    app.router.add_get("/healthz", healthz)
    return app
