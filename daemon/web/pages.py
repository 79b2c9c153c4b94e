"""The dashboard's pages: overview, a deployment's history, a deploy, the rollback action.

    GET  /                                   a card per deployment the viewer may read
    GET  /deployments/{name}?state=&trigger=&page=   its history, 50 a page, newest first
    GET  /deploys/{id}                       commit, steps as a timeline, DAG report,
                                             pytest, the full log (live while it runs)
    GET  /deploys/{id}/events                the log as server-sent events (live.py)
    GET  /deploys/{id}/rollback              the confirmation of a rollback to it
    POST /deploys/{id}/rollback              the rollback (CSRF-checked), 303 to the new deploy
    GET  /static/{app.css,app.js}

Every page reads through the shared use cases (daemon/core/usecases.py) and
answers only what `request[VIEWER]` (identity.py) may read: another
deployment's deploy gets the same 404 as a missing one. Refusals are one line.
Jinja2 autoescapes every value; the pages carry no inline script or style, so
the Content-Security-Policy is `default-src 'self'`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import aiohttp_jinja2
import jinja2
from aiohttp import web
from multidict import MultiDictProxy

from daemon import names, views
from daemon.adapters import freezes
from daemon.adapters.records import Records
from daemon.config import Deployment, Key, Settings
from daemon.core import access, deploys, usecases
from daemon.core.context import DeployRequest
from daemon.core.deploys import Deploy
from daemon.core.freezes import describe
from daemon.core.logs import DeployLog
from daemon.errors import DeploydError, Refusal, UsageError
from daemon.steps.checks.pytest import JUNIT_NAME, SUMMARY_NAME
from daemon.web import present
from daemon.web.live import LiveLog, resume_after
from daemon.web.viewer import VIEWER, Viewer

if TYPE_CHECKING:
    from daemon.core.pipeline import Pipeline

PAGE_SIZE = 50
MAX_PAGE = 1_000_000
STATES = (
    deploys.QUEUED,
    deploys.RUNNING,
    deploys.SUCCEEDED,
    deploys.FAILED,
    deploys.ROLLED_BACK,
    deploys.CANCELLED,
    deploys.SUPERSEDED,
    deploys.INTERRUPTED,
)
FAILURES = (deploys.FAILED, deploys.ROLLED_BACK, deploys.INTERRUPTED)
CSRF_REFUSED = "the form's CSRF token is missing or wrong; reload the page and try again."
LINK_REFUSED = "a signed status link shows its one deploy and nothing else; sign in to see more."
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATIC = {"app.css": "text/css", "app.js": "text/javascript", "favicon.svg": "image/svg+xml"}
CHUNK = 64 * 1024  # of a streamed page

ClusterStatus = Callable[[Deployment], "list[dict[str, Any]] | str"]
Handler = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]


class Shown(Exception):
    """An answer that is a one-line page: a refusal, an unknown deploy, a bad query."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Card:
    """One deployment on the overview."""

    dep: Deployment
    deployed: Deploy | None
    in_flight: list[Deploy]
    failure: Deploy | None
    freeze: str
    cluster_note: str  # why the cluster cannot be shown ('' when it can)
    workloads: list[present.WorkloadView]


class Dashboard:
    """The pages, over the records, the pipeline and the cluster status cache."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        records: Records,
        live: Callable[[int], DeployLog | None],
        pipeline: Pipeline | None,
        cluster_status: ClusterStatus,
    ) -> None:
        self._settings = settings
        self.records = records
        self.pipeline = pipeline  # runs the rollbacks asked for (absent: 503)
        self._cluster_status = cluster_status
        self.live = LiveLog(settings, records, live)
        # deployment -> ((its newest deploy, its unfinished ones), its last failure)
        self._failures: dict[str, tuple[tuple[int, tuple[int, ...]], Deploy | None]] = {}
        folder = resources.files("daemon.web") / "static"
        self._static = {name: (folder / name).read_bytes() for name in STATIC}

    def routes(self) -> list[web.RouteDef]:
        """The dashboard's routes (sign-in's are identity.py's)."""
        return [
            web.get("/", self._page(self.overview)),
            web.get("/deployments/{name}", self._page(self.history)),
            web.get("/deploys/{id}", self._page(self.deploy, link_ok=True)),
            web.get("/deploys/{id}/events", self._page(self.events, link_ok=True)),
            web.get("/deploys/{id}/rollback", self._page(self.confirm_rollback)),
            web.post("/deploys/{id}/rollback", self._page(self.rollback)),
            web.post("/deploys/{id}/cancel", self._page(self.cancel)),
            web.post("/deployments/{name}/freeze", self._page(self.freeze)),
            web.post("/deployments/{name}/unfreeze", self._page(self.unfreeze)),
            web.get("/deployments/{name}/promote", self._page(self.confirm_promotion)),
            web.post("/deployments/{name}/promote", self._page(self.promote)),
            web.get("/static/{name}", self.static),
            web.get("/favicon.ico", self.favicon),  # what browsers ask for by themselves
        ]

    def setup(self, app: web.Application) -> None:
        """Jinja2 over the package's templates, autoescaping every value."""
        aiohttp_jinja2.setup(
            app,
            loader=jinja2.PackageLoader("daemon.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    # -- the frame of every page ----------------------------------------------------

    def root(self) -> str:
        """The dashboard's path prefix: public_url's path (behind a reverse proxy), or ''."""
        return urlsplit(self._settings().server.public_url).path.rstrip("/")

    def _page(
        self, handler: Handler, *, link_ok: bool = False
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """`handler` for a viewer: nobody is sent to /signin, a signed link gets only its
        deploy, and refusals become one-line pages."""

        async def page(request: web.Request) -> web.StreamResponse:
            viewer: Viewer | None = request.get(VIEWER)
            try:
                if viewer is None:
                    if request.method in ("GET", "HEAD"):
                        raise web.HTTPSeeOther(self.root() + "/signin", headers=SECURITY_HEADERS)
                    raise Shown(403, "sign in first (see /signin).")
                if viewer.key is None and not link_ok:
                    raise Shown(403, LINK_REFUSED)
                return await handler(request, viewer)
            except Shown as exc:
                return self._refusal(request, exc.status, exc.reason)
            except access.Forbidden as exc:
                return self._refusal(request, 403, exc.message)
            except Refusal as exc:
                return self._refusal(request, 409, exc.message)
            except DeploydError as exc:
                return self._refusal(request, 400, exc.message)

        return page

    def _context(self, request: web.Request, title: str, **values: Any) -> dict[str, Any]:
        viewer: Viewer | None = request.get(VIEWER)
        return {
            "title": title,
            "root": self.root(),
            "viewer": viewer,
            "now": time.time(),
            "ago": present.ago,
            "when": views.when,
            "short_digest": present.short_digest,
            "options": present.options,
            "kind": present.kind,
            **values,
        }

    def _render(
        self, request: web.Request, template: str, title: str, status: int = 200, **values: Any
    ) -> web.Response:
        resp = aiohttp_jinja2.render_template(
            template, request, self._context(request, title, **values), status=status
        )
        resp.headers.update(SECURITY_HEADERS)
        return resp

    def _refusal(self, request: web.Request, status: int, reason: str) -> web.Response:
        return self._render(request, "error.html", f"{status}", status=status, reason=reason)

    async def static(self, request: web.Request) -> web.Response:
        """The CSS and the script, from the package (a fixed list: no path from the URL)."""
        name = request.match_info["name"]
        if name not in self._static:
            raise web.HTTPNotFound(text="no such file.")
        return web.Response(
            body=self._static[name],
            content_type=STATIC[name],
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=300"},
        )

    async def favicon(self, request: web.Request) -> web.Response:
        """The icon, also where a browser looks for it unasked (a 404 there is a console error)."""
        return web.Response(
            body=self._static["favicon.svg"],
            content_type=STATIC["favicon.svg"],
            headers={"Cache-Control": "max-age=86400"},
        )

    # -- lookups that answer the same 404 for missing and forbidden -------------------

    def _deployment(self, viewer: Viewer, name: str) -> Deployment:
        dep = next((d for d in self._settings().deployments if d.name == name), None)
        if dep is None or not viewer.may_read(dep.name):
            raise Shown(404, "there is no such deployment that you may see.")
        return dep

    async def _deploy(self, request: web.Request, viewer: Viewer) -> Deploy:
        text = request.match_info["id"]
        try:
            ident = names.deploy_id(text)
        except UsageError:
            raise Shown(404, "there is no such deploy.") from None
        rec = await asyncio.to_thread(self.records.get, ident)
        if rec is None or not viewer.may_read(rec.deployment, rec.id):
            raise Shown(404, f"there is no deploy #{ident} that you may see.")
        return rec

    # -- the overview -------------------------------------------------------------------

    async def overview(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """A card per deployment the viewer may read."""
        readable = [d for d in self._settings().deployments if viewer.may_read(d.name)]
        # From the watch cache, on the event loop that keeps it (not from the thread).
        clusters = {d.name: self._cluster_status(d) if d.workloads else [] for d in readable}
        cards = await asyncio.to_thread(self._cards, readable, clusters)
        return self._render(request, "overview.html", "deployd", cards=cards)

    def _cards(
        self, deployments: list[Deployment], clusters: dict[str, list[dict[str, Any]] | str]
    ) -> list[Card]:
        """The cards, in a thread: a few indexed reads of the records per deployment."""
        out = []
        with self.records.snapshot():
            for dep in deployments:
                deployed, in_flight = usecases.summary(self.records, dep)
                failure = self._last_failure(dep, in_flight)
                freeze = usecases.freeze_of(self.records, dep)
                cluster = clusters[dep.name]
                out.append(
                    Card(
                        dep,
                        deployed,
                        in_flight,
                        failure,
                        describe(freeze) if freeze is not None else "",
                        cluster if isinstance(cluster, str) else "",
                        present.cluster_view(cluster, deployed),
                    )
                )
        return out

    def _last_failure(self, dep: Deployment, in_flight: list[Deploy]) -> Deploy | None:
        """The deployment's newest failed deploy, found again only when a deploy was added
        or one ended: finding it can mean reading every deploy of the deployment."""
        newest, _ = self.records.find_deploys(dep.name, limit=1)
        key = (newest[0].id if newest else 0, tuple(d.id for d in in_flight))
        known = self._failures.get(dep.name)
        if known is not None and known[0] == key:
            return known[1]
        failed, _ = self.records.find_deploys(dep.name, FAILURES, limit=1)
        found = failed[0] if failed else None
        self._failures[dep.name] = (key, found)
        return found

    # -- a deployment's history ---------------------------------------------------------

    async def history(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """The deployment's deploys, newest first, 50 a page, by state and trigger."""
        dep = self._deployment(viewer, request.match_info["name"])
        state, trigger, page = _filters(request)
        rows, total = await asyncio.to_thread(
            self.records.find_deploys,
            dep.name,
            (state,) if state else (),
            trigger or None,
            limit=PAGE_SIZE,
            offset=(page - 1) * PAGE_SIZE,
            count=True,
        )
        pages = max(1, -(-total // PAGE_SIZE))

        def link(n: int) -> str:
            query = {k: v for k, v in (("state", state), ("trigger", trigger)) if v}
            return f"?{urlencode({**query, 'page': n})}"

        return self._render(
            request,
            "deployment.html",
            f"{dep.name} · deployd",
            dep=dep,
            rows=rows,
            total=total,
            page=page,
            pages=pages,
            state=state,
            trigger=trigger,
            states=STATES,
            triggers=deploys.TRIGGERS,
            newer=link(page - 1) if page > 1 else "",
            older=link(page + 1) if page < pages else "",
            **await asyncio.to_thread(self._release_facts, viewer, dep),
        )

    def _release_facts(self, viewer: Viewer, dep: Deployment) -> dict[str, Any]:
        """What the deployment page's release actions show (in a thread)."""
        freeze = usecases.freeze_of(self.records, dep)
        may = viewer.may_rollback(dep.name)
        sources = [
            d.name
            for d in self._settings().deployments
            if d.name != dep.name
            and viewer.may_read(d.name)
            and dep.promote_from in (None, d.name)
            and d.dag_source == dep.dag_source
        ]
        return {
            "may_act": may,
            "freeze": describe(freeze) if freeze is not None else "",
            "recorded_freeze": freezes.recorded(self.records, dep.name) is not None,
            "sources": sources if may else [],
        }

    # -- a deploy -----------------------------------------------------------------------

    async def deploy(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """The deploy's page, streamed: its log can be the largest deployd keeps."""
        rec = await self._deploy(request, viewer)
        lines, pytest = await asyncio.to_thread(self._deploy_facts, rec)
        last = lines[-1].id if lines else 0
        events = f"{self.root()}/deploys/{rec.id}/events?after={last}"
        if viewer.link_query:
            events += "&" + viewer.link_query
        context = self._context(
            request,
            f"deploy #{rec.id} · {rec.deployment} · deployd",
            rec=rec,
            bars=present.timeline(rec, time.time()),
            bar_scale=present.BAR_SCALE,
            report=present.dag_report(rec.report),
            pytest=pytest,
            lines=lines,
            events=events if not rec.final else "",
            may_rollback=viewer.may_rollback(rec.deployment)
            and rec.state == deploys.SUCCEEDED
            and bool(rec.digest),
            may_cancel=viewer.may_rollback(rec.deployment) and not rec.final,
            duration=present.duration,
        )
        template = aiohttp_jinja2.get_env(request.app).get_template("deploy.html")
        resp = web.StreamResponse(headers={**SECURITY_HEADERS})
        resp.content_type = "text/html"
        resp.charset = "utf-8"
        await resp.prepare(request)
        chunk: list[str] = []
        size = 0
        for piece in template.generate(context):
            chunk.append(piece)
            size += len(piece)
            if size >= CHUNK:
                await resp.write("".join(chunk).encode())
                chunk, size = [], 0
        await resp.write("".join(chunk).encode())
        await resp.write_eof()
        return resp

    def _deploy_facts(self, rec: Deploy) -> tuple[list[Any], present.PytestResult | None]:
        """The deploy's log and its pytest artifacts (in a thread)."""
        lines = self.records.log_lines(rec.id)
        pytest = present.pytest_result(
            self.records.artifact(rec.id, SUMMARY_NAME), self.records.artifact(rec.id, JUNIT_NAME)
        )
        return lines, pytest

    async def events(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """The deploy's log as server-sent events, live until it ends."""
        rec = await self._deploy(request, viewer)
        after = resume_after(request)
        return await self.live.stream(request, rec, after, SECURITY_HEADERS)

    # -- rollback -----------------------------------------------------------------------

    async def _rollback_target(self, request: web.Request, viewer: Viewer) -> Deploy:
        rec = await self._deploy(request, viewer)
        if not viewer.may_rollback(rec.deployment):
            raise Shown(403, f"key {viewer.name} may not roll back {rec.deployment}.")
        return rec

    async def confirm_rollback(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """What a rollback to this deploy would do, and the form that asks for it."""
        rec = await self._rollback_target(request, viewer)
        settings = self._settings()
        dep = settings.deployment(rec.deployment)
        # The same checks as the POST, so that a refused rollback is said before it is asked.
        await asyncio.to_thread(self._rollback_request, settings, dep, rec, viewer)
        current = await asyncio.to_thread(self.records.last_succeeded, dep.name)
        return self._render(
            request,
            "rollback.html",
            f"roll back {dep.name} to #{rec.id} · deployd",
            rec=rec,
            current=current,
        )

    async def rollback(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """Roll back to this deploy (as `deployd rollback DEPLOYMENT ID`), then 303 to it."""
        await self._form(request, viewer)
        rec = await self._rollback_target(request, viewer)
        settings = self._settings()
        dep = settings.deployment(rec.deployment)
        self._pipeline("rollbacks")
        req = await asyncio.to_thread(self._rollback_request, settings, dep, rec, viewer)
        return await self._start(req)

    # -- the actions' common parts ------------------------------------------------------

    async def _form(self, request: web.Request, viewer: Viewer) -> MultiDictProxy[Any]:
        """The posted form, if it carries this session's CSRF token (else 403)."""
        form = await request.post()
        sent = form.get("csrf")
        if not isinstance(sent, str) or not viewer.csrf_ok(sent):
            raise Shown(403, CSRF_REFUSED)
        return form

    def _pipeline(self, what: str) -> Pipeline:
        if self.pipeline is None:
            raise Shown(503, f"{what} run in deployd serve; this server has no pipeline.")
        return self.pipeline

    async def _start(self, req: DeployRequest) -> web.StreamResponse:
        """Queue and run `req` as `deployd serve` runs a push's deploy; 303 to its page."""
        pipeline = self._pipeline("deploys")
        deploy_id = await asyncio.to_thread(pipeline.enqueue, req)
        task: asyncio.Task[object] = asyncio.create_task(pipeline.run(req, deploy_id=deploy_id))
        pipeline.commands.add(task)  # SIGTERM waits for it like for a push
        task.add_done_callback(pipeline.commands.discard)
        raise web.HTTPSeeOther(f"{self.root()}/deploys/{deploy_id}", headers=SECURITY_HEADERS)

    def _acting(self, viewer: Viewer, deployment: str) -> Key:
        """The signed-in key, if it may change what `deployment` runs (else 403, one line)."""
        assert viewer.key is not None  # _page lets no signed link act
        access.require(viewer.key, deployment, access.DEPLOY)
        return viewer.key

    def _back_to(self, dep: Deployment) -> web.HTTPSeeOther:
        return web.HTTPSeeOther(f"{self.root()}/deployments/{dep.name}", headers=SECURITY_HEADERS)

    # -- cancel, freeze, unfreeze, promote: as `deployd …`, acting as the key --------------

    async def cancel(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """Cancel this deploy (as `deployd cancel ID`), then 303 to its page, which follows
        it until it stops."""
        await self._form(request, viewer)
        rec = await self._deploy(request, viewer)
        key = self._acting(viewer, rec.deployment)
        await asyncio.to_thread(
            functools.partial(usecases.cancel, self.records, rec.id, by=key.name)
        )
        raise web.HTTPSeeOther(f"{self.root()}/deploys/{rec.id}", headers=SECURITY_HEADERS)

    async def freeze(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """Freeze this deployment: the form's `reason` and `until` (as `deployd freeze`)."""
        form = await self._form(request, viewer)
        dep = self._deployment(viewer, request.match_info["name"])
        key = self._acting(viewer, dep.name)
        reason, until = form.get("reason"), form.get("until", "")
        if not isinstance(reason, str) or not isinstance(until, str):
            raise Shown(400, "the form needs a reason (text) and may have an until (a time).")
        await asyncio.to_thread(
            functools.partial(
                usecases.freeze,
                self.records,
                dep,
                by=key.name,
                reason=reason,
                until=until.strip() or None,
            )
        )
        raise self._back_to(dep)

    async def unfreeze(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """End this deployment's freeze (as `deployd unfreeze`)."""
        await self._form(request, viewer)
        dep = self._deployment(viewer, request.match_info["name"])
        key = self._acting(viewer, dep.name)
        await asyncio.to_thread(
            functools.partial(usecases.unfreeze, self.records, dep, by=key.name)
        )
        raise self._back_to(dep)

    def _promotion(
        self, viewer: Viewer, target: Deployment, values: Mapping[str, Any]
    ) -> DeployRequest:
        """The promotion `values` (from, deploy_id) ask for, checked as `deployd promote`
        checks it (in a thread); its `promote_from` is the source's deploy it ships."""
        key = self._acting(viewer, target.name)
        name, wanted = values.get("from"), values.get("deploy_id") or None
        if not isinstance(name, str) or not (wanted is None or isinstance(wanted, str)):
            raise Shown(400, "name the deployment to promote from.")
        source = self._deployment(viewer, name)  # read access, or the same 404 as unknown
        access.require_promotion(key, source.name, target.name)
        deploy_id = names.deploy_id(wanted) if wanted is not None else None
        return usecases.promote(
            self._settings(),
            self.records,
            source,
            target,
            deploy_id,
            trigger="dashboard",
            actor=key.name,
        )

    async def confirm_promotion(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """What promoting ?from=SOURCE[&deploy_id=N] to this deployment would run, and the
        form that asks for it."""
        target = self._deployment(viewer, request.match_info["name"])
        req = await asyncio.to_thread(self._promotion, viewer, target, request.query)
        shipped = req.promote_from
        assert shipped is not None
        current = await asyncio.to_thread(self.records.last_succeeded, target.name)
        return self._render(
            request,
            "promote.html",
            f"promote {shipped.deployment} to {target.name} · deployd",
            target=target,
            rec=shipped,
            current=current,
            pinned=bool(request.query.get("deploy_id")),
        )

    async def promote(self, request: web.Request, viewer: Viewer) -> web.StreamResponse:
        """Promote (as `deployd promote SOURCE TARGET [ID]`), then 303 to the new deploy."""
        form = await self._form(request, viewer)
        target = self._deployment(viewer, request.match_info["name"])
        self._pipeline("promotions")
        req = await asyncio.to_thread(self._promotion, viewer, target, form)
        return await self._start(req)

    def _rollback_request(
        self, settings: Settings, dep: Deployment, rec: Deploy, viewer: Viewer
    ) -> DeployRequest:
        return usecases.rollback(
            settings,
            self.records,
            dep,
            rec.id,
            trigger="dashboard",
            actor=viewer.name,
            force=False,
        )


def _filters(request: web.Request) -> tuple[str, str, int]:
    """The history's ?state=&trigger=&page= (Shown 400 for a value that is none of them)."""
    state = request.query.get("state", "")
    trigger = request.query.get("trigger", "")
    page_text = request.query.get("page", "1")
    if state and state not in STATES:
        raise Shown(400, f"state must be one of {', '.join(STATES)}.")
    if trigger and trigger not in deploys.TRIGGERS:
        raise Shown(400, f"trigger must be one of {', '.join(deploys.TRIGGERS)}.")
    if not (
        len(page_text) <= 7
        and page_text.isascii()
        and page_text.isdecimal()
        and 1 <= int(page_text) <= MAX_PAGE
    ):
        raise Shown(400, f"page must be a whole number from 1 to {MAX_PAGE}.")
    return state, trigger, int(page_text)
