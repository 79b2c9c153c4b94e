"""The HTTP API: deployments, deploys and live logs in the CLI's `--json` shape, and the
release-management actions.

Every route but the description needs `Authorization: Bearer <api_token_file's
token>`, compared in constant time; without a configured token the API is closed. The token
acts as an admin key.

    GET  /api/openapi.json                   this API's OpenAPI description (no token)
    GET  /api/deployments                    each with its freeze (or null)
    GET  /api/deploys?deployment=NAME[&limit=N]
    GET  /api/deploys/{id}
    GET  /api/deploys/{id}/log[?follow=0]    NDJSON lines, live while the deploy runs
    POST /api/deployments/{name}/promote     {"from": SOURCE, "deploy_id": N?, "force": false?}
                                             202 with the queued deploy; it runs in the daemon
    POST /api/deployments/{name}/freeze      {"reason": TEXT, "until": TIME?}  201
    POST /api/deployments/{name}/unfreeze    200
    POST /api/deploys/{id}/cancel            200 cancelled (it was queued), 202 asked (running:
                                             the process running it stops it within 2 s)

Refusals (a freeze, promote_from) answer 409, an unknown deployment 404,
other bad requests 400, each as {"error": one line}.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from daemon import names, views
from daemon.adapters.records import Records
from daemon.config import Deployment, Settings
from daemon.core import usecases
from daemon.core.context import DeployRequest
from daemon.core.logs import DeployLog
from daemon.errors import DeploydError, Refusal, UnknownDeployment, UsageError
from daemon.http import openapi
from daemon.http.auth import bearer_ok

if TYPE_CHECKING:
    from daemon.core.pipeline import Pipeline

ACTOR = "api"  # who the token is, in the records

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
        pipeline: Pipeline | None = None,
    ) -> None:
        self._settings = settings
        self.records = records
        self._live = live
        self.pipeline = pipeline  # runs the promotions asked for (absent: 503)

    def routes(self) -> list[web.RouteDef]:
        """The API's routes, each behind the token check but the description."""
        return [
            web.get("/api/openapi.json", self.openapi),
            web.get("/api/deployments", self._guard(self.deployments)),
            web.get("/api/deploys", self._guard(self.deploys)),
            web.get("/api/deploys/{id}", self._guard(self.deploy)),
            web.get("/api/deploys/{id}/log", self._guard(self.log)),
            web.post("/api/deployments/{name}/promote", self._guard(self.promote)),
            web.post("/api/deployments/{name}/freeze", self._guard(self.freeze)),
            web.post("/api/deployments/{name}/unfreeze", self._guard(self.unfreeze)),
            web.post("/api/deploys/{id}/cancel", self._guard(self.cancel)),
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
            except Refusal as exc:
                return _error(409, exc.message)
            except DeploydError as exc:
                return _error(400, exc.message)

        return guarded

    async def openapi(self, request: web.Request) -> web.Response:
        """The API's OpenAPI description. Served without the token: it holds no data (no
        deployment, no record), only what every client of deployd may know."""
        return web.json_response(openapi.description())

    async def deployments(self, request: web.Request) -> web.Response:
        """Every configured deployment with its last successful and its unfinished deploys."""
        # The records are read and the JSON is made in a thread: not on the event loop.
        return web.json_response(text=await asyncio.to_thread(self._deployments_json))

    def _deployments_json(self) -> str:
        out = []
        for dep in self._settings().deployments:
            deployed, in_flight = usecases.summary(self.records, dep)
            out.append(
                {
                    "name": dep.name,
                    "branch": dep.branch,
                    "image": dep.image,
                    "github_repo": dep.github_repo,
                    "promote_from": dep.promote_from,
                    "freeze": views.freeze_json(usecases.freeze_of(self.records, dep)),
                    "deployed": views.deploy_json(deployed) if deployed else None,
                    "in_flight": [views.deploy_json(d) for d in in_flight],
                }
            )
        return json.dumps(out)

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

        def page() -> str:  # in a thread: up to 1,000 records read and made JSON
            rows = usecases.history(settings, self.records, names_, max(1, min(limit, 1000)))
            return json.dumps([views.deploy_json(r) for r in rows])

        return web.json_response(text=await asyncio.to_thread(page))

    async def deploy(self, request: web.Request) -> web.Response:
        """One deploy record."""
        rec = await asyncio.to_thread(self.records.get, names.deploy_id(request.match_info["id"]))
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
        # With the settings, a deploy whose process died is marked interrupted, so
        # following it ends (as for `deployd logs`) instead of polling forever.
        lines = usecases.follow_log(
            self.records, ident, live=self._live(ident), follow=follow, settings=self._settings()
        )
        async for row in lines:
            await resp.write((json.dumps(views.log_json(row)) + "\n").encode())
        await resp.write_eof()
        return resp

    # -- actions ---------------------------------------------------------------

    def _deployment(self, name: str) -> Deployment | web.Response:
        try:
            return self._settings().deployment(name)
        except UnknownDeployment as exc:
            return _error(404, exc.message)

    async def promote(self, request: web.Request) -> web.Response:
        """Queue a promotion of the body's `from` deployment's image to this one (202)."""
        target = self._deployment(request.match_info["name"])
        if isinstance(target, web.Response):
            return target
        body = await _body(request)
        source_name, wanted = body.get("from"), body.get("deploy_id")
        if not isinstance(source_name, str):
            raise UsageError('the body needs "from": the deployment to promote from.')
        if wanted is not None and (isinstance(wanted, bool) or not isinstance(wanted, int | str)):
            raise UsageError('"deploy_id" must be a deploy id.')
        if not isinstance(body.get("force", False), bool):
            raise UsageError('"force" must be true or false.')
        if self.pipeline is None:
            return _error(503, "promotions run in deployd serve; this server has no pipeline.")
        settings = self._settings()
        source = settings.deployment(source_name)
        promotion = await asyncio.to_thread(
            usecases.promote,
            settings,
            self.records,
            source,
            target,
            names.deploy_id(wanted) if wanted is not None else None,
            trigger="api",
            actor=ACTOR,
            force=body.get("force") is True,
        )
        deploy_id = await asyncio.to_thread(self.pipeline.enqueue, promotion)
        task: asyncio.Task[object] = asyncio.create_task(self._run(promotion, deploy_id))
        self.pipeline.commands.add(task)  # SIGTERM waits for it like for a push
        task.add_done_callback(self.pipeline.commands.discard)
        rec = self.records.get(deploy_id)
        assert rec is not None
        return web.json_response(
            views.deploy_json(rec), status=202, headers={"Location": f"/api/deploys/{deploy_id}"}
        )

    async def _run(self, promotion: DeployRequest, deploy_id: int) -> object:
        assert self.pipeline is not None
        return await self.pipeline.run(promotion, deploy_id=deploy_id)

    async def freeze(self, request: web.Request) -> web.Response:
        """Freeze this deployment: {"reason": TEXT, "until": TIME (optional)} (201)."""
        dep = self._deployment(request.match_info["name"])
        if isinstance(dep, web.Response):
            return dep
        body = await _body(request)
        reason, until = body.get("reason"), body.get("until")
        if not isinstance(reason, str) or not (until is None or isinstance(until, str)):
            raise UsageError('the body needs "reason" (text) and may have "until" (a TIME).')
        made = await asyncio.to_thread(
            usecases.freeze, self.records, dep, by=ACTOR, reason=reason, until=until
        )
        return web.json_response(
            {"deployment": dep.name, "freeze": views.freeze_json(made)}, status=201
        )

    async def unfreeze(self, request: web.Request) -> web.Response:
        """End this deployment's freeze; answer what ended and what (a window) still holds."""
        dep = self._deployment(request.match_info["name"])
        if isinstance(dep, web.Response):
            return dep
        ended = await asyncio.to_thread(usecases.unfreeze, self.records, dep, by=ACTOR)
        still = usecases.freeze_of(self.records, dep)
        return web.json_response(
            {
                "deployment": dep.name,
                "ended": views.freeze_json(ended),
                "freeze": views.freeze_json(still),
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        """Cancel a deploy: 200 with the record if it was queued (cancelled now), 202 if it
        runs (its process stops it; poll the record), 409 if it has ended."""
        ident = names.deploy_id(request.match_info["id"])
        if await asyncio.to_thread(self.records.get, ident) is None:
            return _error(404, f"there is no deploy #{ident}.")
        asked = await asyncio.to_thread(
            functools.partial(usecases.cancel, self.records, ident, by=ACTOR)
        )
        rec = asked.record
        return web.json_response(
            views.deploy_json(rec),
            status=200 if rec.final else 202,
            headers={"Location": f"/api/deploys/{ident}"},
        )


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} when it has no body)."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError, LookupError):  # LookupError: an unknown charset
        raise UsageError("the body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise UsageError("the body must be a JSON object.")
    return body
