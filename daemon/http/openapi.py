"""The OpenAPI 3.1 description of the HTTP API (daemon/http/api.py), served at
`/api/openapi.json`.

It says what the API promises, so clients can be generated from it and the API
can be tested against it (tests/http/test_openapi*.py run schemathesis over every
operation and check that each route of `Api.routes()` is described here, and only
those). Enumerations come from the core's own constants, so a new state, trigger
or action cannot leave the description behind.
"""

from __future__ import annotations

import copy
from typing import Any

from daemon.core import deploys, states

Schema = dict[str, Any]

_NAME = "^[a-z0-9][a-z0-9-]{0,62}$"  # names.deployment_name
_DEPLOY_ID_MAX = 10**18 - 1  # names.deploy_id: 1 to 18 decimal digits, not 0
_ID_TEXT = "^(?!0+$)[0-9]{1,18}$"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: Schema) -> Schema:
    return {"oneOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Schema], description: str = "") -> Schema:
    """A JSON object that always carries every one of `properties` (views.py makes them)."""
    out: Schema = {"type": "object", "required": list(properties), "properties": properties}
    if description:
        out["description"] = description
    return out


_STRING: Schema = {"type": "string"}
_NULLABLE_STRING: Schema = {"type": ["string", "null"]}
_TIME: Schema = {"type": "number", "description": "Unix time, seconds."}
_NULLABLE_TIME: Schema = {"type": ["number", "null"], "description": "Unix time, seconds."}
_NULLABLE_ID: Schema = {"type": ["integer", "null"], "minimum": 1}


def _deploy() -> Schema:
    """views.deploy_json."""
    return _object(
        {
            "id": {"type": "integer", "minimum": 1},
            "deployment": {"type": "string", "pattern": _NAME},
            "state": {"enum": [states.QUEUED, states.RUNNING, *sorted(states.FINAL_STATES)]},
            "trigger": {"enum": list(deploys.TRIGGERS)},
            "action": {"enum": list(deploys.ACTIONS)},
            "kind": {
                "enum": list(deploys.KINDS),
                "description": "What it ships: an image built and rolled out, or DAGs only.",
            },
            "actor": _STRING,
            "ref": _STRING,
            "commit": _NULLABLE_STRING,
            "tree": _NULLABLE_STRING,
            "description": _STRING,
            "options": _object(
                {
                    "force": {"type": "boolean"},
                    "pytest": {"type": "boolean"},
                    "allow_dirty": {"type": "boolean"},
                    "override_freeze": {"type": "boolean"},
                    "image": {
                        "type": "boolean",
                        "description": "An image deploy was asked for (-o image, --image).",
                    },
                }
            ),
            "image": _NULLABLE_STRING,
            "tag": _NULLABLE_STRING,
            "digest": _NULLABLE_STRING,
            "step": {**_NULLABLE_STRING, "description": "The step it is in (or ended in)."},
            "pid": {"type": ["integer", "null"], "description": "The process running it."},
            "error": _NULLABLE_STRING,
            "rollback_of": _NULLABLE_ID,
            "promoted_from": _nullable(
                _object(
                    {
                        "deployment": {"type": "string", "pattern": _NAME},
                        "deploy_id": _NULLABLE_ID,
                    },
                    "Where a promotion took its image from.",
                )
            ),
            "cancelled_by": _NULLABLE_STRING,
            "report": {
                "type": ["object", "null"],
                "description": "The DAG check's and pytest's report, when they ran.",
            },
            "created_at": _TIME,
            "started_at": _NULLABLE_TIME,
            "finished_at": _NULLABLE_TIME,
            "steps": {
                "type": "array",
                "items": _object(
                    {
                        "name": {"enum": list(deploys.STEPS)},
                        "state": _STRING,
                        "started_at": _NULLABLE_TIME,
                        "finished_at": _NULLABLE_TIME,
                        "summary": _NULLABLE_STRING,
                    }
                ),
            },
        },
        "A deploy record, in the shape `deployd deploys --json` prints.",
    )


def _schemas() -> dict[str, Schema]:
    freeze = _object(
        {"by": _STRING, "reason": _STRING, "since": _TIME, "until": _NULLABLE_TIME},
        "A freeze: no deploys (but rollbacks) until it ends.",
    )
    deployment = _object(
        {
            "name": {"type": "string", "pattern": _NAME},
            "branch": _STRING,
            "image": _STRING,
            "github_repo": _NULLABLE_STRING,
            "promote_from": _NULLABLE_STRING,
            "freeze": _nullable(_ref("Freeze")),
            "deployed": _nullable(_ref("Deploy")),
            "in_flight": {"type": "array", "items": _ref("Deploy")},
        },
        "A configured deployment, its last successful deploy and those under way.",
    )
    return {
        "Error": _object({"error": _STRING}, "Why the request was refused, in one line."),
        "Deploy": _deploy(),
        "Freeze": freeze,
        "Deployment": deployment,
        "LogLine": _object({"ts": _TIME, "step": _NULLABLE_STRING, "line": _STRING}),
        "Frozen": _object({"deployment": _STRING, "freeze": _ref("Freeze")}),
        "Unfrozen": _object(
            {
                "deployment": _STRING,
                "ended": _ref("Freeze"),
                "freeze": {**_nullable(_ref("Freeze")), "description": "A window still holding."},
            }
        ),
    }


def _json(schema: Schema, description: str, **headers: Schema) -> Schema:
    out: Schema = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = {name: {"schema": s, "required": True} for name, s in headers.items()}
    return out


def _error(description: str) -> Schema:
    return _json(_ref("Error"), description)


_LOCATION: Schema = {"type": "string", "pattern": "^/api/deploys/[0-9]+$"}
# What every guarded route may answer before its handler runs.
_GUARD = {
    "401": {
        **_error("No valid bearer token."),
        "headers": {
            "WWW-Authenticate": {"schema": {"const": 'Bearer realm="deployd"'}, "required": True}
        },
    },
    "403": _error("The API is closed: no [server] api_token_file is configured."),
}
_TOO_LARGE = {
    "413": {
        "description": "The body is larger than the server accepts.",
        "content": {"text/plain": {"schema": _STRING}},
    }
}

_DEPLOY_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1, "maximum": _DEPLOY_ID_MAX},
    "example": 1,
}
_DEPLOYMENT = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "A configured deployment.",
    "schema": {"type": "string", "pattern": _NAME},
    "example": "prod",
}
_BAD_ID = _error("The id is not a deploy id (1 to 18 decimal digits).")
_NO_DEPLOY = _error("There is no such deploy.")
_BAD_NAME = _error("The name is not a valid deployment name, or the body is wrong.")
_NO_DEPLOYMENT = _error("No deployment of that name is configured.")


def _operation(summary: str, responses: dict[str, Schema], **more: Any) -> Schema:
    return {"summary": summary, **more, "responses": {**responses, **_GUARD}}


def _body(schema: Schema, example: Schema) -> Schema:
    return {
        "required": True,
        "content": {"application/json": {"schema": schema, "example": example}},
    }


def _paths() -> dict[str, Schema]:
    return {
        "/api/openapi.json": {
            "get": {
                "summary": "This description (served without the token: it holds no data).",
                "operationId": "openapi",
                "security": [],
                "responses": {
                    "200": _json({"type": "object", "required": ["openapi", "paths"]}, "OpenAPI")
                },
            }
        },
        "/api/deployments": {
            "get": _operation(
                "Every configured deployment with its freeze, deployed and in-flight deploys.",
                {"200": _json({"type": "array", "items": _ref("Deployment")}, "The deployments.")},
                operationId="listDeployments",
            )
        },
        "/api/deploys": {
            "get": _operation(
                "The newest deploys, of one deployment if asked.",
                {
                    "200": _json({"type": "array", "items": _ref("Deploy")}, "Newest first."),
                    "400": _error("Not a configured deployment, or limit is not a number."),
                },
                operationId="listDeploys",
                parameters=[
                    {
                        "name": "deployment",
                        "in": "query",
                        "description": "Only this deployment's deploys.",
                        "schema": {"type": "string", "pattern": _NAME},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "description": "How many (at least 1, at most 1000; others are clamped).",
                        "schema": {"type": "integer", "default": 50},
                    },
                ],
            )
        },
        "/api/deploys/{id}": {
            "get": _operation(
                "One deploy.",
                {"200": _json(_ref("Deploy"), "The deploy."), "400": _BAD_ID, "404": _NO_DEPLOY},
                operationId="getDeploy",
                parameters=[_DEPLOY_ID],
            )
        },
        "/api/deploys/{id}/log": {
            "get": _operation(
                "The deploy's log, one JSON object a line; live until the deploy ends.",
                {
                    "200": {
                        "description": (
                            "NDJSON: each line one LogLine object, written as the deploy "
                            "writes it. The schema describes the whole stream read as an array."
                        ),
                        "content": {
                            "application/x-ndjson": {
                                "schema": {"type": "array", "items": _ref("LogLine")}
                            }
                        },
                    },
                    "400": _BAD_ID,
                    "404": _NO_DEPLOY,
                },
                operationId="getDeployLog",
                parameters=[
                    _DEPLOY_ID,
                    {
                        "name": "follow",
                        "in": "query",
                        "description": (
                            '"0", "false" or "no": only the lines written so far; anything '
                            "else (the default): then each new line until the deploy ends."
                        ),
                        "schema": {"type": "string", "default": "1"},
                    },
                ],
            )
        },
        "/api/deployments/{name}/promote": {
            "post": _operation(
                "Queue a promotion of another deployment's image to this one; it runs in "
                "the daemon.",
                {
                    "202": _json(_ref("Deploy"), "Queued.", Location=_LOCATION),
                    "400": _BAD_NAME,
                    "404": _NO_DEPLOYMENT,
                    "409": _error("Refused: a freeze, or promote_from does not allow it."),
                    **_TOO_LARGE,
                    "503": _error("This server runs no pipeline (not deployd serve)."),
                },
                operationId="promote",
                parameters=[_DEPLOYMENT],
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["from"],
                        "properties": {
                            "from": {
                                "type": "string",
                                "description": "The deployment to promote from.",
                            },
                            "deploy_id": {
                                "description": "Its deploy to promote (default: its latest "
                                "successful one).",
                                "oneOf": [
                                    {"type": "integer", "minimum": 1, "maximum": _DEPLOY_ID_MAX},
                                    {"type": "string", "pattern": _ID_TEXT},
                                    {"type": "null"},
                                ],
                            },
                            "force": {"type": "boolean", "default": False},
                        },
                    },
                    {"from": "staging"},
                ),
            )
        },
        "/api/deployments/{name}/freeze": {
            "post": _operation(
                "Freeze this deployment: deploys wait (rollbacks do not) until it ends.",
                {
                    "201": _json(_ref("Frozen"), "Frozen."),
                    "400": _BAD_NAME,
                    "404": _NO_DEPLOYMENT,
                    "409": _error("It is frozen already."),
                    **_TOO_LARGE,
                },
                operationId="freeze",
                parameters=[_DEPLOYMENT],
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["reason"],
                        "properties": {
                            "reason": {
                                "type": "string",
                                "description": "One line of printable text, up to 500 "
                                "characters once its runs of white space are one space each.",
                                "pattern": "\\S",
                            },
                            "until": {
                                "type": ["string", "null"],
                                "description": "A duration (2h, 30m, 1d) or an RFC 3339 time, "
                                "in the future and before the year 10000.",
                            },
                        },
                    },
                    {"reason": "release freeze", "until": "2h"},
                ),
            )
        },
        "/api/deployments/{name}/unfreeze": {
            "post": _operation(
                "End this deployment's freeze.",
                {
                    "200": _json(_ref("Unfrozen"), "What ended, and what still holds."),
                    "400": _BAD_NAME,
                    "404": _NO_DEPLOYMENT,
                    "409": _error("It is not frozen, or only a freeze window holds it."),
                },
                operationId="unfreeze",
                parameters=[_DEPLOYMENT],
            )
        },
        "/api/deploys/{id}/cancel": {
            "post": _operation(
                "Cancel a queued or running deploy.",
                {
                    "200": _json(_ref("Deploy"), "It was queued: cancelled.", Location=_LOCATION),
                    "202": _json(
                        _ref("Deploy"),
                        "It runs: its process stops it within 2 s (poll the record).",
                        Location=_LOCATION,
                    ),
                    "400": _BAD_ID,
                    "404": _NO_DEPLOY,
                    "409": _error("It has ended already."),
                },
                operationId="cancel",
                parameters=[_DEPLOY_ID],
            )
        },
    }


def description() -> Schema:
    """The API's OpenAPI 3.1 description, as served at /api/openapi.json (a fresh copy: its
    parts are shared constants, and tools such as schemathesis change what they are given)."""
    return copy.deepcopy(_description())


def _description() -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "deployd HTTP API",
            "version": "1",
            "description": (
                "Deployments, deploys and live logs in the CLI's --json shape, and the "
                "release-management actions. The bearer token (the file [server] "
                "api_token_file names) acts as an admin key. Refusals answer 409, unknown "
                "deployments and deploys 404, other bad requests 400, each as "
                '{"error": one line}.'
            ),
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The token in [server] api_token_file.",
                }
            },
        },
    }
