"""Discovery: /version, /api, /apis and the resource lists kubectl reads first."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.support.kubesim.store import RESOURCES

VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-kubesim",
    "platform": "linux/amd64",
    "goVersion": "go1.23",
    "compiler": "gc",
    "gitCommit": "kubesim",
    "buildDate": "",
    "gitTreeState": "clean",
}

GROUP_VERSIONS = {(r.group, r.version) for r in RESOURCES if r.group}
PATHS = {"/api", "/apis", "/api/v1"} | {f"/apis/{g}/{v}" for g, v in GROUP_VERSIONS}


def answer(request: web.Request, parts: list[str]) -> web.Response | None:
    """The answer to /version or a discovery path; None for any other path."""
    if parts == ["version"]:
        return web.json_response(VERSION)
    if parts == ["api"]:
        return web.json_response(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}
                ],
            }
        )
    if parts == ["apis"]:
        return web.json_response(group_list())
    if parts == ["api", "v1"]:
        return web.json_response(resource_list("", "v1"))
    if len(parts) == 3 and parts[0] == "apis" and (parts[1], parts[2]) in GROUP_VERSIONS:
        return web.json_response(resource_list(parts[1], parts[2]))
    return None


def group_list() -> dict[str, Any]:
    groups = []
    for group in sorted({g for g, _ in GROUP_VERSIONS}):
        gv = {"groupVersion": f"{group}/v1", "version": "v1"}
        groups.append({"name": group, "versions": [gv], "preferredVersion": gv})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def resource_list(group: str, version: str) -> dict[str, Any]:
    resources = []
    for r in RESOURCES:
        if (r.group, r.version) != (group, version):
            continue
        resources.append(
            {
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": list(r.verbs),
                "shortNames": list(r.short),
            }
        )
        for sub in r.subresources:
            entry: dict[str, Any] = {
                "name": f"{r.plural}/{sub}",
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }
            if sub == "scale":  # another group's kind: client-go's scale client reads these
                entry.update(group="autoscaling", version="v1", kind="Scale")
            resources.append(entry)
    gv = f"{group}/{version}" if group else version
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }
