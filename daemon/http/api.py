"""The read-only HTTP API: deployments, deploys and live logs, in the CLI's `--json` shape.

Every route needs `Authorization: Bearer <api_token_file's token>`, compared
in constant time; without a configured token the API is closed.

    GET /api/deployments
    GET /api/deploys?deployment=NAME[&limit=N]
    GET /api/deploys/{id}
    GET /api/deploys/{id}/log[?follow=0]   NDJSON lines, live while the deploy runs
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from daemon import names, views
from daemon.adapters.records import Records
from daemon.config import Settings
from daemon.core import usecases
from daemon.core.logs import DeployLog
from daemon.errors import DeploydError
from daemon.http.auth import bearer_ok

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class Api:
    """Handlers over the records, guarded by the bearer token."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        records: Records,
        live: Callable[[int], DeployLog | None] = lambda _id: None,
    ) -> None:
        self._settings = settings
        self.records = records
        self._live = live

    def routes(self) -> list[web.RouteDef]:
        """The API's routes, each behind the token check."""
        return [
            web.get("/api/deployments", self._guard(self.deployments)),
            web.get("/api/deploys", self._guard(self.deploys)),
            web.get("/api/deploys/{id}", self._guard(self.deploy)),
            web.get("/api/deploys/{id}/log", self._guard(self.log)),
        ]

    def _guard(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            token = self._settings().server.api_token
            if token is None:
                return _error(403, "the HTTP API is closed: set [server] api_token_file.")
            if not bearer_ok(request, token):
                return _error(
                    401,
                    "a valid bearer token is required.",
                    **{"WWW-Authenticate": 'Bearer realm="deployd"'},
                )
            try:
                return await handler(request)
            except DeploydError as exc:
                return _error(400, exc.message)

        return guarded

    async def deployments(self, request: web.Request) -> web.Response:
        """Every configured deployment with its last successful and its unfinished deploys."""
        out = []
        for dep in self._settings().deployments:
            deployed, in_flight = usecases.summary(self.records, dep)
            out.append(
                {
                    "name": dep.name,
                    "branch": dep.branch,
                    "image": dep.image,
                    "github_repo": dep.github_repo,
                    "deployed": views.deploy_json(deployed) if deployed else None,
                    "in_flight": [views.deploy_json(d) for d in in_flight],
                }
            )
        return web.json_response(out)

    async def deploys(self, request: web.Request) -> web.Response:
        """The newest deploys, of one deployment if asked."""
        name = request.query.get("deployment")
        if name is not None:
            self._settings().deployment(name)  # unknown → UsageError → 400
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            return _error(400, "limit must be a whole number.")
        settings = self._settings()
        names_ = [name] if name is not None else None
        rows = usecases.history(settings, self.records, names_, max(1, min(limit, 1000)))
        return web.json_response([views.deploy_json(r) for r in rows])

    async def deploy(self, request: web.Request) -> web.Response:
        """One deploy record."""
        rec = self.records.get(names.deploy_id(request.match_info["id"]))
        if rec is None:
            return _error(404, f"there is no deploy #{request.match_info['id']}.")
        return web.json_response(views.deploy_json(rec))

    async def log(self, request: web.Request) -> web.StreamResponse:
        """The deploy's log as NDJSON; followed until the deploy ends unless follow=0."""
        ident = names.deploy_id(request.match_info["id"])
        if self.records.get(ident) is None:
            return _error(404, f"there is no deploy #{ident}.")
        follow = request.query.get("follow", "1") not in ("0", "false", "no")
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        lines = usecases.follow_log(self.records, ident, live=self._live(ident), follow=follow)
        async for row in lines:
            await resp.write((json.dumps(views.log_json(row)) + "\n").encode())
        await resp.write_eof()
        return resp
