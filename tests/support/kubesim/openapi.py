"""/openapi/v3: the OpenAPI document kubectl reads, made from the kept schemas (schema.py).

kubectl 1.27+ reads /openapi/v3 first. `create -f` and `apply -f` look up whether the PATCH of
the kind takes the `fieldValidation` query parameter: it does here, as on kube-apiserver, so
kubectl sends `fieldValidation=Strict` and leaves the validation to the server (codec.validate)
instead of validating against /openapi/v2 itself (not served: kubectl never asks for it once v3
answers). Client-side `apply` computes its strategic merge patch from the component schemas'
`x-kubernetes-patch-strategy` and `x-kubernetes-patch-merge-key`, which come from the struct
tags of types.go, like the real document's; descriptions come from the .proto comments, so
`kubectl explain` works too. Paths list only what the simulator does: no server-side apply.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from aiohttp import web
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from tests.support.kubesim import protobuf, schema
from tests.support.kubesim.discovery import VERSION
from tests.support.kubesim.schema import META, Schemas
from tests.support.kubesim.store import RESOURCES, Resource

PATCH_BODIES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
)
BODIES = ("application/json", "application/yaml", protobuf.MEDIA_TYPE)
_SCALARS = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_INT64: {"type": "integer", "format": "int64"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}
# Types whose JSON is not their message's (protobuf.py), as kube-openapi describes them.
_SPECIAL: dict[str, dict[str, Any]] = {
    protobuf.TIME: {"type": "string", "format": "date-time"},
    protobuf.MICRO_TIME: {"type": "string", "format": "date-time"},
    protobuf.DURATION: {"type": "string"},
    protobuf.QUANTITY: {"oneOf": [{"type": "string"}, {"type": "number"}]},
    protobuf.INT_OR_STRING: {
        "format": "int-or-string",
        "oneOf": [{"type": "integer"}, {"type": "string"}],
    },
    protobuf.RAW_EXTENSION: {"type": "object"},
    protobuf.FIELDS_V1: {"type": "object"},
}


def group_versions() -> list[str]:
    """The documents' paths: `api/v1`, `apis/apps/v1`, ..."""
    return sorted({_prefix(r) for r in RESOURCES})


def answer(parts: list[str]) -> web.Response | None:
    """The answer to /openapi/v3 or one group-version's document; None for other paths."""
    if parts[:2] != ["openapi", "v3"]:
        return None
    if len(parts) == 2:
        paths = {
            gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={_digest(gv)}"}
            for gv in group_versions()
        }
        return web.json_response({"paths": paths})
    gv = "/".join(parts[2:])
    if gv not in group_versions():
        return web.json_response({"kind": "Status", "code": 404}, status=404)
    return web.Response(body=_document_bytes(gv), content_type="application/json")


@functools.cache
def _document_bytes(gv: str) -> bytes:
    return json.dumps(document(gv), separators=(",", ":")).encode()


@functools.cache
def _digest(gv: str) -> str:
    return hashlib.sha512(_document_bytes(gv)).hexdigest()[:128].upper()


def document(gv: str) -> dict[str, Any]:
    """The OpenAPI 3.0 document of one group-version (`apis/apps/v1`)."""
    s = schema.load()
    paths: dict[str, Any] = {}
    roots: list[Descriptor] = [s.message(f"{META}.Status"), s.message(f"{META}.Patch")]
    for res in RESOURCES:
        if _prefix(res) != gv:
            continue
        kind = protobuf.message_for(res.group_version, res.kind)
        assert kind is not None, res
        roots.append(kind)
        if "list" in res.verbs:
            roots.append(s.kind(res.group_version, f"{res.kind}List") or kind)
        if "scale" in res.subresources:
            roots.append(s.message("k8s.io.api.autoscaling.v1.Scale"))
        paths.update(_paths(res))
    schemas: dict[str, Any] = {}
    for desc in roots:
        _collect(s, desc, schemas)
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def ref(desc: Descriptor) -> str:
    """A message's schema name in Kubernetes' documents: io.k8s.api.apps.v1.Deployment."""
    return "io.k8s." + desc.full_name.removeprefix("k8s.io.")


# -- component schemas -----------------------------------------------------------


def _collect(s: Schemas, desc: Descriptor, out: dict[str, Any]) -> None:
    name = ref(desc)
    if name in out:
        return
    comment = s.comments.get((desc.full_name, -1), "")
    out[name] = body = dict(_SPECIAL.get(desc.full_name) or _object(s, desc))
    if comment:
        body["description"] = schema.describe(comment)
    gvk = _gvk(desc)
    if gvk is not None:
        body["x-kubernetes-group-version-kind"] = [gvk]
    if desc.full_name in _SPECIAL:
        return
    for fd in desc.fields:
        if fd.message_type is not None:
            target = fd.message_type
            if target.GetOptions().map_entry:
                target = target.fields_by_name["value"].message_type
            if target is not None:
                _collect(s, target, out)


def _object(s: Schemas, desc: Descriptor) -> dict[str, Any]:
    if desc.full_name in s.go_slices:
        return {"type": "array", "items": {"type": "string"}}
    properties: dict[str, Any] = {}
    required: list[str] = []
    if _gvk(desc) is not None:
        for key in ("apiVersion", "kind"):
            properties[key] = {"type": "string"}
    _properties(s, desc, properties, required)
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = sorted(required)
    return out


def _properties(
    s: Schemas, desc: Descriptor, properties: dict[str, Any], required: list[str]
) -> None:
    for fd in desc.fields:
        go = s.go_field(desc, fd)
        if go is not None and go.inline and fd.message_type is not None:
            _properties(s, fd.message_type, properties, required)  # Go JSON inlines it
            continue
        name = s.json_name(desc, fd)
        if go is not None and go.json == "-":
            continue
        comment = s.comments.get((desc.full_name, fd.number), "")
        prop = _field(fd)
        if comment:
            prop["description"] = schema.describe(comment)
        if go is not None and go.patch_strategy:
            prop["x-kubernetes-patch-strategy"] = go.patch_strategy
        if go is not None and go.patch_merge_key:
            prop["x-kubernetes-patch-merge-key"] = go.patch_merge_key
        marks = schema.markers(comment)
        if "listType" in marks:
            prop["x-kubernetes-list-type"] = marks["listType"]
        if "listMapKey" in marks:
            prop["x-kubernetes-list-map-keys"] = schema.marker_values(comment, "listMapKey")
        properties[name] = prop
        if go is not None and not go.omitempty and "+optional" not in comment:
            required.append(name)


def _field(fd: FieldDescriptor) -> dict[str, Any]:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        return {"type": "object", "additionalProperties": _single(fd.message_type.fields[1])}
    if fd.is_repeated:
        return {"type": "array", "items": _single(fd)}
    return _single(fd)


def _single(fd: FieldDescriptor) -> dict[str, Any]:
    if fd.message_type is not None:
        return {"allOf": [{"$ref": f"#/components/schemas/{ref(fd.message_type)}"}]}
    return dict(_SCALARS.get(fd.type, {"type": "string"}))


def _gvk(desc: Descriptor) -> dict[str, str] | None:
    """The group, version and kind a top-level message is served as, if it is."""
    for res in RESOURCES:
        for kind in (res.kind, f"{res.kind}List"):
            if protobuf.message_for(res.group_version, kind) is desc:
                return {"group": res.group, "version": res.version, "kind": kind}
    if desc.full_name == "k8s.io.api.autoscaling.v1.Scale":
        return {"group": "autoscaling", "version": "v1", "kind": "Scale"}
    if desc.full_name == f"{META}.Status":
        return {"group": "", "version": "v1", "kind": "Status"}
    return None


# -- paths -------------------------------------------------------------------------


def _prefix(res: Resource) -> str:
    return f"apis/{res.group}/{res.version}" if res.group else f"api/{res.version}"


def _paths(res: Resource) -> dict[str, Any]:
    base = f"/{_prefix(res)}"
    where = f"{base}/namespaces/{{namespace}}/{res.plural}" if res.namespaced else base
    where = where if res.namespaced else f"{base}/{res.plural}"
    gvk = {"group": res.group, "version": res.version, "kind": res.kind}
    kind = protobuf.message_for(res.group_version, res.kind)
    assert kind is not None
    one = f"#/components/schemas/{ref(kind)}"
    ns_param = [_path_param("namespace")] if res.namespaced else []
    out: dict[str, Any] = {}
    collection: dict[str, Any] = {"parameters": ns_param}
    if "list" in res.verbs:
        listed = schema.load().kind(res.group_version, f"{res.kind}List")
        many = f"#/components/schemas/{ref(listed)}" if listed else one
        collection["get"] = _op("list", res, gvk, many, _LIST_PARAMS)
        if res.namespaced:
            out[f"{base}/{res.plural}"] = {
                "get": _op("list", res, gvk, many, _LIST_PARAMS, all_namespaces=True)
            }
    collection["post"] = _op("post", res, gvk, one, _WRITE_PARAMS, body=BODIES)
    out[where] = collection
    if res.verbs == ("create",):
        return out
    item: dict[str, Any] = {"parameters": [_path_param("name"), *ns_param]}
    item["get"] = _op("get", res, gvk, one, [])
    item["put"] = _op("put", res, gvk, one, _WRITE_PARAMS, body=BODIES)
    item["patch"] = _op("patch", res, gvk, one, [*_WRITE_PARAMS, "force"], body=PATCH_BODIES)
    item["delete"] = _op("delete", res, gvk, one, ["dryRun", "gracePeriodSeconds"])
    out[f"{where}/{{name}}"] = item
    for sub in res.subresources:
        sub_gvk, sub_ref = gvk, one
        if sub == "scale":
            sub_gvk = {"group": "autoscaling", "version": "v1", "kind": "Scale"}
            sub_ref = "#/components/schemas/io.k8s.api.autoscaling.v1.Scale"
        out[f"{where}/{{name}}/{sub}"] = {
            "parameters": [_path_param("name"), *ns_param],
            "get": _op("get", res, sub_gvk, sub_ref, [], sub=sub),
            "put": _op("put", res, sub_gvk, sub_ref, _WRITE_PARAMS, body=BODIES, sub=sub),
            "patch": _op(
                "patch",
                res,
                sub_gvk,
                sub_ref,
                [*_WRITE_PARAMS, "force"],
                body=PATCH_BODIES,
                sub=sub,
            ),
        }
    return out


_LIST_PARAMS = [
    "allowWatchBookmarks",
    "continue",
    "fieldSelector",
    "labelSelector",
    "limit",
    "resourceVersion",
    "timeoutSeconds",
    "watch",
]
_WRITE_PARAMS = ["dryRun", "fieldManager", "fieldValidation"]
_PARAM_DOCS = {
    "fieldValidation": (
        "fieldValidation instructs the server on how to handle objects in the request "
        "(POST/PUT/PATCH) containing unknown or duplicate fields: Ignore, Warn (the default) "
        "or Strict."
    ),
    "dryRun": "When present, indicates that modifications should not be persisted (All).",
}
_INT_PARAMS = {"limit", "timeoutSeconds", "gracePeriodSeconds"}
_BOOL_PARAMS = {"allowWatchBookmarks", "watch", "force", "pretty"}


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query_param(name: str) -> dict[str, Any]:
    kind = "integer" if name in _INT_PARAMS else "boolean" if name in _BOOL_PARAMS else "string"
    out: dict[str, Any] = {"name": name, "in": "query", "schema": {"type": kind}}
    if name in _PARAM_DOCS:
        out["description"] = _PARAM_DOCS[name]
    return out


def _op(
    action: str,
    res: Resource,
    gvk: dict[str, str],
    schema_ref: str,
    params: list[str],
    *,
    body: tuple[str, ...] = (),
    sub: str = "",
    all_namespaces: bool = False,
) -> dict[str, Any]:
    verb = {"list": "list", "post": "create", "put": "replace", "patch": "patch"}.get(
        action, "read" if action == "get" else "delete"
    )
    group = res.group.split(".")[0].capitalize() or "Core"
    scope = "Namespaced" if res.namespaced and not all_namespaces else ""
    suffix = "ForAllNamespaces" if all_namespaces else ""
    op: dict[str, Any] = {
        # as kube-apiserver names them: createAppsV1NamespacedDeployment
        "operationId": f"{verb}{group}{res.version.capitalize()}{scope}{res.kind}"
        f"{sub.capitalize()}{suffix}",
        "parameters": [_query_param(p) for p in ["pretty", *params]],
        "responses": {
            "201" if action == "post" else "200": {
                "description": "Created" if action == "post" else "OK",
                "content": {t: {"schema": {"$ref": schema_ref}} for t in BODIES},
            },
            "401": {"description": "Unauthorized"},
        },
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk,
    }
    if body:
        patch = ref(schema.load().message(f"{META}.Patch"))
        body_ref = f"#/components/schemas/{patch}" if action == "patch" else schema_ref
        op["requestBody"] = {
            "content": {t: {"schema": {"$ref": body_ref}} for t in body},
            "required": True,
        }
    return op
