"""The API's OpenAPI description: valid OpenAPI 3, in step with `Api.routes()`, served without
the token; and the API bugs the schemathesis run (test_openapi_conformance.py) turned up,
each pinned here by a plain request against a real aiohttp server over real SQLite.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from openapi_spec_validator import validate

from daemon.adapters.records import Records
from daemon.core.deploys import Options
from daemon.http import openapi
from daemon.http.api import Api
from tests.http.test_webhooks import _client, settings

TOKEN = "api-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def api(tmp_path: Path) -> Api:
    return Api(lambda: settings(tmp_path, token=TOKEN), Records(tmp_path / "d.db"))


def test_the_description_is_valid_openapi_3() -> None:
    described = openapi.description()
    assert described["openapi"].startswith("3.")
    validate(described)  # raises on any violation of the OpenAPI 3.1 schema


def test_every_route_is_described_and_every_description_is_a_route(tmp_path: Path) -> None:
    routes = {(r.method, r.path) for r in api(tmp_path).routes()}
    described = {
        (method.upper(), path)
        for path, item in openapi.description()["paths"].items()
        for method in item
    }
    assert routes == described
    assert len(routes) == 9


def test_only_the_description_itself_is_described_as_open() -> None:
    described = openapi.description()
    assert described["security"] == [{"bearer": []}]
    assert described["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    open_ = [
        path
        for path, item in described["paths"].items()
        for op in item.values()
        if op.get("security") == []
    ]
    assert open_ == ["/api/openapi.json"]
    for path, item in described["paths"].items():
        for op in item.values():
            if path != "/api/openapi.json":
                assert {"401", "403"} <= set(op["responses"]), path


async def test_the_description_is_served_without_the_token(tmp_path: Path) -> None:
    client = await _client(api(tmp_path))
    try:
        resp = await client.get("/api/openapi.json")
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == openapi.description()
        # ... while the data stays behind the token.
        assert (await client.get("/api/deployments")).status == 401
    finally:
        await client.close()


async def test_a_body_in_an_unknown_charset_is_a_bad_request(tmp_path: Path) -> None:
    """Was a 500: aiohttp decodes the body with the charset the request names."""
    client = await _client(api(tmp_path))
    try:
        resp = await client.post(
            "/api/deployments/prod/freeze",
            data=b'{"reason": "x"}',
            headers={**AUTH, "Content-Type": "application/json; charset=no-such-charset"},
        )
        assert (resp.status, await resp.json()) == (400, {"error": "the body is not valid JSON."})
    finally:
        await client.close()


async def test_force_must_be_a_boolean(tmp_path: Path) -> None:
    """Was silently taken as false: `"force": "yes"` promoted without forcing."""
    client = await _client(api(tmp_path))
    try:
        for force in ("yes", 1, None, {}):
            resp = await client.post(
                "/api/deployments/prod/promote",
                json={"from": "staging", "force": force},
                headers=AUTH,
            )
            answer: dict[str, Any] = await resp.json()
            assert (resp.status, answer) == (400, {"error": '"force" must be true or false.'})
    finally:
        await client.close()


async def test_following_the_log_of_a_dead_process_ends(tmp_path: Path) -> None:
    """Was an endless poll: a deploy left `running` by a process that died is marked
    interrupted (as `deployd logs` and the listing do) and its log stream ends."""
    served = api(tmp_path)
    records = served.records
    ident = records.create_deploy(
        deployment="prod",
        trigger="cli",
        actor="ada@host",
        ref="refs/heads/main",
        options=Options(),
        pid=2**22 + 1,  # no such process
    )
    records.append_log(ident, "checkout", ["-----> checkout"])
    records.transition(ident, "queued", "running", step="checkout")
    client = await _client(served)
    try:
        resp = await asyncio.wait_for(client.get(f"/api/deploys/{ident}/log", headers=AUTH), 10)
        text = await asyncio.wait_for(resp.text(), 10)
        assert resp.content_type == "application/x-ndjson"
        assert re.fullmatch(
            r'\{"ts": [0-9.]+, "step": "checkout", "line": "-----> checkout"\}\n', text
        )
        rec = records.get(ident)
        assert rec is not None and rec.state == "interrupted"
    finally:
        await client.close()


async def test_a_freeze_until_past_the_year_9999_is_a_bad_request(tmp_path: Path) -> None:
    """Were a 500 (a duration of thousands of digits) or a freeze no view could print (a
    date past 9999: `status` failed on it)."""
    client = await _client(api(tmp_path))
    try:
        for until in ("9" * 5000 + "d", "99999999999w", "9999-12-31T23:59:59-23:59"):
            resp = await client.post(
                "/api/deployments/prod/freeze", json={"reason": "x", "until": until}, headers=AUTH
            )
            answer = await resp.json()
            assert resp.status == 400, answer
            assert answer["error"].endswith(": a freeze ends before the year 10000.")
            assert len(answer["error"]) < 120  # the input is not echoed in full
        resp = await client.get("/api/deployments", headers=AUTH)
        assert [d["freeze"] for d in await resp.json()] == [None, None, None]
    finally:
        await client.close()
