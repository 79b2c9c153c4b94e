"""The aiohttp application: /healthz, the GitHub webhook, the read-only API and /metrics."""

from __future__ import annotations

from aiohttp import web

from daemon.http.api import Api
from daemon.http.metrics import MetricsEndpoint
from daemon.http.webhooks import MAX_BODY, Webhooks
from daemon.web.identity import Identity
from daemon.web.pages import Dashboard


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"status": "ok"})


def make_app(
    webhooks: Webhooks,
    api: Api,
    metrics: MetricsEndpoint | None = None,
    *,
    identity: Identity | None = None,
    dashboard: Dashboard | None = None,
) -> web.Application:
    """Build the HTTP application (with /metrics unless it is served on its own).

    With `identity`, every request gets request[VIEWER] (the dashboard's sign-in);
    `dashboard` adds the pages that read it.
    """
    app = web.Application(
        client_max_size=MAX_BODY, middlewares=[identity.middleware] if identity else []
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/webhooks/github", webhooks.handle)
    app.add_routes(api.routes())
    if identity is not None:
        app.add_routes(identity.routes())
    if dashboard is not None:
        app.add_routes(dashboard.routes())
        dashboard.setup(app)
    if metrics is not None:
        app.add_routes(metrics.routes())
    return app
