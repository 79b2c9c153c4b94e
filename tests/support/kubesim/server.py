"""The HTTP face of the simulator: discovery, CRUD, watch, patch, auth, faults."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from tests.support.kubesim import codec, discovery, openapi
from tests.support.kubesim import patch as patching
from tests.support.kubesim.controllers import Controllers
from tests.support.kubesim.store import (
    BY_PATH,
    ApiError,
    Resource,
    Store,
    Watcher,
    dumps,
    field_matcher,
    label_matcher,
)

USER = web.RequestKey("user", tuple)
DROP_AFTER = web.RequestKey("drop_after", int)
PATCH_TYPES = {
    "application/strategic-merge-patch+json": patching.strategic_merge,
    "application/merge-patch+json": patching.merge_patch,
    "application/json-patch+json": patching.json_patch,
}


@dataclass
class Fault:
    """Answer `status` to the next `count` requests whose path contains `path` (and method)."""

    status: int = 500
    count: int = 1
    path: str = ""
    method: str = ""
    delay: float = 0.0
    drop_watch_after: int | None = None  # for watches: close the stream after N events


@dataclass
class Sim:
    """The simulated API server; `tokens` maps a bearer token to (user, verbs or {"*"})."""

    tokens: dict[str, tuple[str, set[str]]] = field(default_factory=dict)
    latency: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    store: Store = field(default_factory=Store)
    requests: list[tuple[str, str]] = field(default_factory=list)
    controllers: Controllers | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=3 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._route)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.controllers = Controllers(self.store)
        self.controllers.start()

    async def _stop(self, app: web.Application) -> None:
        if self.controllers is not None:
            await self.controllers.stop()

    # -- auth and faults -----------------------------------------------------

    def _user(self, request: web.Request) -> tuple[str, set[str]]:
        if not self.tokens:
            return "anonymous", {"*"}
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return self.tokens[token.strip()]

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        if self.latency:
            await asyncio.sleep(self.latency)
        for fault in list(self.faults):
            if fault.path not in request.path or fault.method not in ("", request.method):
                continue
            is_watch = bool(request.query.get("watch"))
            if (fault.drop_watch_after is not None) != is_watch:
                continue  # a watch fault waits for a watch, a status fault for a request
            fault.count -= 1
            if fault.count <= 0:
                self.faults.remove(fault)
            if fault.drop_watch_after is not None:
                request[DROP_AFTER] = fault.drop_watch_after
                break
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.status:
                err = ApiError(fault.status, _reason(fault.status), "injected fault")
                return web.json_response(err.status(), status=fault.status)
            break
        try:
            # Discovery and /version are open to everyone, as RBAC's system:discovery makes them.
            open_path = (
                request.path.rstrip("/") in discovery.PATHS
                or request.path == "/version"
                or request.path.startswith("/openapi/")
            )
            request[USER] = ("anonymous", set()) if open_path else self._user(request)
            return await handler(request)
        except ApiError as exc:
            return codec.answer(request, exc.status(), exc.code)

    # -- routing -------------------------------------------------------------

    async def _route(self, request: web.Request) -> web.StreamResponse:
        parts = [unquote(p) for p in request.path.strip("/").split("/") if p]
        answer = discovery.answer(request, parts) or openapi.answer(parts)
        if answer is not None:
            return answer
        res, ns, name, sub = _locate(parts, request.method)
        verb = _verb(request, name)
        self._authorize(request, res, verb, ns, name, sub)
        if res.plural == "selfsubjectaccessreviews":
            return await self._access_review(request)
        if sub == "scale":
            assert name is not None
            return await self._scale(request, res, verb, ns, name)
        if verb == "watch":
            return await self._watch(request, res, ns)
        if verb in ("list", "get"):
            return self._read(request, res, verb, ns, name)
        return await self._write(request, res, verb, ns, name, sub)

    def _read(
        self, request: web.Request, res: Resource, verb: str, ns: str | None, name: str | None
    ) -> web.Response:
        if verb == "list":
            items = self.store.list(
                res, ns, request.query.get("labelSelector"), request.query.get("fieldSelector")
            )
            body = {
                "kind": f"{res.kind}List",
                "apiVersion": res.group_version,
                "metadata": {"resourceVersion": str(self.store.rv)},
                "items": items,
            }
            return _answer(request, res, body)
        assert name is not None
        return _answer(request, res, self.store.get(res, ns, name))

    async def _write(
        self,
        request: web.Request,
        res: Resource,
        verb: str,
        ns: str | None,
        name: str | None,
        sub: str,
    ) -> web.Response:
        dry = request.query.get("dryRun") == "All"
        if verb == "create":
            obj, warnings = codec.validate(
                request, res.group_version, res.kind, await codec.read_body(request)
            )
            if not dry:
                obj = self.store.create(res, ns, obj)
            return codec.answer(request, obj, 201, warnings)
        assert name is not None
        if verb == "delete":
            obj = self.store.get(res, ns, name)
            if not dry:
                self.store.delete(res, ns, name)
                if self.controllers is not None:
                    self.controllers.deleted(res, obj)
            return codec.answer(request, obj)
        if verb == "update":
            obj, warnings = codec.validate(
                request, res.group_version, res.kind, await codec.read_body(request)
            )
            if not dry:
                obj = self.store.replace(res, ns, name, obj, subresource=sub)
            return codec.answer(request, obj, 200, warnings)
        return await self._patch(request, res, ns, name, sub, dry)

    def _authorize(
        self,
        request: web.Request,
        res: Resource,
        verb: str,
        ns: str | None,
        name: str | None,
        sub: str,
    ) -> None:
        user, verbs = request[USER]
        if "*" in verbs or verb in verbs or res.plural == "selfsubjectaccessreviews":
            return
        what = f'{res.qualified} "{name}" is forbidden' if name else f"{res.qualified} is forbidden"
        where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
        resource = f"{res.plural}/{sub}" if sub else res.plural
        raise ApiError(
            403,
            "Forbidden",
            f'{what}: User "{user}" cannot {verb} resource '
            f'"{resource}" in API group "{res.group}"{where}',
            {"name": name or "", "group": res.group, "kind": res.plural},
        )

    async def _access_review(self, request: web.Request) -> web.Response:
        body = await codec.read_body(request)
        attrs = (body.get("spec") or {}).get("resourceAttributes") or {}
        _, verbs = request[USER]
        allowed = "*" in verbs or attrs.get("verb") in verbs
        body["status"] = {"allowed": allowed}  # RBAC gives no reason for a denial
        body.setdefault("metadata", {})
        body["apiVersion"], body["kind"] = "authorization.k8s.io/v1", "SelfSubjectAccessReview"
        return codec.answer(request, body, 201)

    async def _patch(
        self, request: web.Request, res: Resource, ns: str | None, name: str, sub: str, dry: bool
    ) -> web.Response:
        current = self.store.get(res, ns, name)
        new, body = await _patched(request, res, current, name)
        new, warnings = codec.validate(request, res.group_version, res.kind, new)
        _validate(res, name, new)
        want_rv = (
            (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        )
        if want_rv and want_rv != current["metadata"]["resourceVersion"]:
            new["metadata"]["resourceVersion"] = want_rv  # a precondition: 409 when stale
        else:
            new["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if not dry:
            new = self.store.replace(res, ns, name, new, subresource=sub)
        return codec.answer(request, new, 200, warnings)

    async def _scale(
        self, request: web.Request, res: Resource, verb: str, ns: str | None, name: str
    ) -> web.Response:
        """The scale subresource: an autoscaling/v1 Scale read from and written to spec.replicas."""
        obj = self.store.get(res, ns, name)
        current = scale_of(obj)
        if verb == "get":
            return codec.answer(request, current)
        if verb == "update":
            body = await codec.read_body(request)
        elif verb == "patch":
            body, _ = await _patched(request, res, current, name)
        else:
            raise ApiError(405, "MethodNotAllowed", f"{verb} is not supported on scale")
        scale, warnings = codec.validate(request, "autoscaling/v1", "Scale", body)
        new = copy.deepcopy(obj)
        new.setdefault("spec", {})["replicas"] = (scale.get("spec") or {}).get("replicas", 0)
        # A resourceVersion in the Scale is a precondition on the workload, as in kube-apiserver.
        want_rv = (scale.get("metadata") or {}).get("resourceVersion")
        new["metadata"]["resourceVersion"] = want_rv or obj["metadata"]["resourceVersion"]
        if request.query.get("dryRun") != "All":
            new = self.store.replace(res, ns, name, new)
        return codec.answer(request, scale_of(new), 200, warnings)

    async def _watch(
        self, request: web.Request, res: Resource, ns: str | None
    ) -> web.StreamResponse:
        if codec.wants_protobuf(request):  # kube-apiserver streams protobuf; this one does not
            raise ApiError(406, "NotAcceptable", "watches are served as JSON only")
        watcher = Watcher(
            res,
            ns,
            label_matcher(request.query.get("labelSelector")),
            field_matcher(request.query.get("fieldSelector")),
        )
        rv_text = request.query.get("resourceVersion", "")
        timeout = float(request.query.get("timeoutSeconds") or 1800)
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        drop_after = request.get(DROP_AFTER)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        initial = self._initial_events(request, res, ns, watcher, rv_text)
        if initial is None:
            gone = ApiError(
                410, "Expired", f"too old resource version: {rv_text} ({self.store.rv})"
            )
            await resp.write(dumps({"type": "ERROR", "object": gone.status()}) + b"\n")
            await resp.write_eof()
            return resp
        self.store.watchers.add(watcher)
        try:
            await self._stream(resp, res, watcher, initial, timeout, bookmarks, drop_after)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.watchers.discard(watcher)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    def _initial_events(
        self, request: web.Request, res: Resource, ns: str | None, watcher: Watcher, rv_text: str
    ) -> list[dict[str, Any]] | None:
        """What a watch from `rv_text` sends first; None when that version is too old."""
        if rv_text in ("", "0"):
            return [
                {"type": "ADDED", "object": o}
                for o in self.store.list(
                    res, ns, request.query.get("labelSelector"), request.query.get("fieldSelector")
                )
            ]
        try:
            since = self.store.events_since(int(rv_text))
        except ValueError:
            since = None
        if since is None:
            return None
        return [{"type": kind, "object": obj} for _, r, kind, obj in since if watcher.wants(r, obj)]

    async def _stream(
        self,
        resp: web.StreamResponse,
        res: Resource,
        watcher: Watcher,
        initial: list[dict[str, Any]],
        timeout: float,
        bookmarks: bool,
        drop_after: int | None,
    ) -> None:
        """Send the initial events, then the watcher's, until the timeout or `drop_after`."""
        sent = 0
        deadline = time.monotonic() + timeout
        for event in initial:
            await resp.write(dumps(event) + b"\n")
            sent += 1
        while time.monotonic() < deadline:
            if drop_after is not None and sent >= drop_after:
                break
            try:
                queued = await asyncio.wait_for(watcher.queue.get(), timeout=1.0)
            except TimeoutError:
                if bookmarks:
                    await self._bookmark(resp, res)
                continue
            if queued is None:
                break
            await resp.write(dumps(queued) + b"\n")
            sent += 1

    async def _bookmark(self, resp: web.StreamResponse, res: Resource) -> None:
        mark = {
            "kind": res.kind,
            "apiVersion": res.group_version,
            "metadata": {"resourceVersion": str(self.store.rv)},
        }
        await resp.write(dumps({"type": "BOOKMARK", "object": mark}) + b"\n")


def _verb(request: web.Request, name: str | None) -> str:
    method = request.method
    if method == "GET":
        if request.query.get("watch") in ("true", "1"):
            return "watch"
        return "get" if name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, "unknown"
    )


def _locate(parts: list[str], method: str) -> tuple[Resource, str | None, str | None, str]:
    """A resource path's resource, namespace, name and subresource (404 if there is none)."""
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise _no_such_path()
    ns = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        ns, rest = rest[1], rest[2:]
    if not rest or (group, version, rest[0]) not in BY_PATH:
        raise _no_such_path()
    res = BY_PATH[(group, version, rest[0])]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else ""
    if sub and sub not in res.subresources:
        raise _no_such_path()
    if res.namespaced and ns is None and (name is not None or method != "GET"):
        raise _no_such_path()
    return res, ns, name, sub


def _no_such_path() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource")


def _reason(status: int) -> str:
    return {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        409: "Conflict",
        410: "Expired",
        422: "Invalid",
        429: "TooManyRequests",
        500: "InternalError",
        503: "ServiceUnavailable",
        504: "Timeout",
    }.get(status, "Unknown")


def _validate(res: Resource, name: str, obj: dict[str, Any]) -> None:
    if res.plural not in ("deployments", "statefulsets", "jobs", "replicasets"):
        return
    containers = (((obj.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
        "containers"
    )
    if not isinstance(containers, list) or not containers:
        raise ApiError(
            422,
            "Invalid",
            f'{res.kind}.{res.group} "{name}" is invalid: '
            "spec.template.spec.containers: Required value",
        )
    for i, c in enumerate(containers):
        if not isinstance(c, dict) or not c.get("name") or not c.get("image"):
            field_ = "name" if not (isinstance(c, dict) and c.get("name")) else "image"
            raise ApiError(
                422,
                "Invalid",
                f'{res.kind}.{res.group} "{name}" is invalid: '
                f"spec.template.spec.containers[{i}].{field_}: Required value",
            )


async def _patched(
    request: web.Request, res: Resource, current: dict[str, Any], name: str
) -> tuple[dict[str, Any], Any]:
    """`current` with the request's patch applied, and the patch."""
    ctype = request.content_type
    if ctype not in PATCH_TYPES:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an "
            "unknown format - accepted media types include: " + ", ".join(PATCH_TYPES),
        )
    body = await codec.read_body(request, any_json=True)
    try:
        new = PATCH_TYPES[ctype](current, body)
    except patching.PatchError as exc:
        raise ApiError(422, "Invalid", str(exc)) from exc
    if not isinstance(new, dict) or (new.get("metadata") or {}).get("name") != name:
        raise ApiError(
            422,
            "Invalid",
            f'{res.kind}.{res.group} "{name}" is invalid: '
            "metadata.name: Invalid value: the name may not change",
        )
    return new, body


def scale_of(obj: dict[str, Any]) -> dict[str, Any]:
    """A workload's autoscaling/v1 Scale, as its scale subresource answers it."""
    meta, spec = obj["metadata"], obj.get("spec") or {}
    keep = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
    status: dict[str, Any] = {"replicas": (obj.get("status") or {}).get("replicas", 0)}
    selector = _selector_text(spec.get("selector") or {})
    if selector:
        status["selector"] = selector
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {k: meta[k] for k in keep if k in meta},
        "spec": {"replicas": spec.get("replicas", 1)},
        "status": status,
    }


def _selector_text(selector: dict[str, Any]) -> str:
    """A LabelSelector as a selector string, sorted by key as labels.Selector.String() is."""
    parts = [(k, f"{k}={v}") for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key", ""), expr.get("operator", ""), expr.get("values") or []
        text = {
            "In": f"{key} in ({','.join(sorted(values))})",
            "NotIn": f"{key} notin ({','.join(sorted(values))})",
            "Exists": key,
            "DoesNotExist": f"!{key}",
        }.get(op, key)
        parts.append((key, text))
    return ",".join(text for _, text in sorted(parts))


def _answer(request: web.Request, res: Resource, body: dict[str, Any]) -> web.Response:
    if "as=Table" in request.headers.get("Accept", ""):
        return web.json_response(_table(res, body))
    return codec.answer(request, body)


def _table(res: Resource, body: dict[str, Any]) -> dict[str, Any]:
    items = body.get("items", [body]) if "items" in body else [body]
    cols = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
    extra = res.plural in ("deployments", "statefulsets")
    if extra:
        cols.append(
            {"name": "Ready", "type": "string", "format": "", "description": "", "priority": 0}
        )
    rows = []
    for obj in items:
        cells: list[Any] = [obj["metadata"]["name"]]
        if extra:
            st = obj.get("status") or {}
            cells.append(
                f"{st.get('readyReplicas', 0)}/{(obj.get('spec') or {}).get('replicas', 1)}"
            )
        rows.append(
            {
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                },
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": body["metadata"].get("resourceVersion", "")},
        "columnDefinitions": cols,
        "rows": rows,
    }
