"""Bodies in and answers out: JSON or protobuf, and kube-apiserver's field validation.

kubectl's typed commands (`create deployment`, `create job`, `auth can-i`, `scale`) send
protobuf and accept `application/vnd.kubernetes.protobuf,application/json`: they are answered in
JSON, as anything that accepts JSON is; only a client that accepts protobuf alone gets protobuf.

A JSON body is decoded as Go decodes it into the kind's struct (protobuf.check): unknown fields
are dropped, and `fieldValidation` says what else happens: `Warn` (the default since 1.23) sends
a `Warning: 299` header per field, `Strict` answers 400 naming them all, `Ignore` says nothing.
A protobuf body cannot carry unknown fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.support.kubesim import protobuf
from tests.support.kubesim.store import ApiError

FIELD_VALIDATION = ("Ignore", "Warn", "Strict")


async def read_body(request: web.Request, any_json: bool = False) -> Any:
    """A request body: protobuf decoded to its JSON, or JSON (any value if `any_json`)."""
    raw = await request.read()
    # No Content-Type is JSON, kube-apiserver's first media type (kubectl scale sends none).
    ctype = request.content_type if "Content-Type" in request.headers else "application/json"
    if ctype == protobuf.MEDIA_TYPE:
        return protobuf.decode(raw)
    if ctype not in ("application/json", "") and "json" not in ctype:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: "
            f"application/json, application/yaml, {protobuf.MEDIA_TYPE}",
        )
    try:
        body = protobuf.loads(raw)
    except ValueError as exc:
        raise ApiError(400, "BadRequest", f"the body could not be decoded: {exc}") from exc
    if not any_json and not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the body must be a JSON object")
    return body


def validate(
    request: web.Request, api_version: str, kind: str, obj: dict[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """`obj` as decoding into the kind's struct leaves it, and the warnings to send."""
    directive = request.query.get("fieldValidation") or "Warn"
    if directive not in FIELD_VALIDATION:
        raise ApiError(
            400,
            "BadRequest",
            f'fieldValidation: Unsupported value: "{directive}": supported values: '
            + ", ".join(f'"{d}"' for d in FIELD_VALIDATION),
        )
    desc = protobuf.message_for(api_version, kind)
    if desc is None:
        return obj, []
    kept, findings = protobuf.check(obj, desc)
    version = api_version.rpartition("/")[2]
    cannot = f'{kind} in version "{version}" cannot be handled as a {kind}'
    if findings.type_error:
        raise ApiError(400, "BadRequest", f"{cannot}: {findings.type_error}")
    errors = findings.strict_errors()
    if errors and directive == "Strict":
        raise ApiError(400, "BadRequest", f"{cannot}: strict decoding error: {', '.join(errors)}")
    return kept, errors if directive == "Warn" else []


def wants_protobuf(request: web.Request) -> bool:
    """Whether the client accepts protobuf and no JSON (then it gets protobuf)."""
    accepted = [t.split(";")[0].strip() for t in request.headers.get("Accept", "").split(",")]
    accepted = [t for t in accepted if t]
    if protobuf.MEDIA_TYPE not in accepted:
        return False
    return not any(t in ("*/*", "application/*") or "json" in t for t in accepted)


def answer(
    request: web.Request, obj: dict[str, Any], status: int = 200, warnings: Iterable[str] = ()
) -> web.Response:
    """An API object in the encoding the client asked for, with `Warning` headers."""
    headers: CIMultiDict[str] = CIMultiDict()
    for text in warnings:
        headers.add("Warning", '299 - "' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    if wants_protobuf(request):
        try:
            body = protobuf.encode(obj)
        except ValueError as exc:  # a stored object its schema does not hold
            raise ApiError(500, "InternalError", f"cannot encode as protobuf: {exc}") from exc
        return web.Response(
            body=body,
            status=status,
            content_type=protobuf.MEDIA_TYPE,
            headers=headers,
        )
    return web.json_response(obj, status=status, headers=headers)
