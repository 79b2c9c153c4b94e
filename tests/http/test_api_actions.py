"""The API's actions (promote, freeze, unfreeze) and the freeze in its deployment objects, in
process: aiohttp's test server, real SQLite and git, a Pipeline over the fakes. A webhook
delivery to a frozen or promotion-only deployment, through the real handler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon import views
from daemon.adapters import repos
from daemon.core import usecases
from daemon.http.api import Api
from daemon.http.webhooks import Webhooks, decide
from tests.core.test_release import World, until
from tests.support.projects import git

TOKEN = "api-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[World, TestClient[Any, Any]]]:
    w = World(tmp_path)
    w.settings = dataclasses.replace(
        w.settings, server=dataclasses.replace(w.settings.server, api_token=TOKEN)
    )
    w.services.settings = w.settings
    app = web.Application()
    app.add_routes(Api(lambda: w.settings, w.records, pipeline=w.pipeline).routes())
    client = TestClient(TestServer(app))
    await client.start_server()
    yield w, client
    await client.close()
    w.records.close()


async def call(client: TestClient[Any, Any], path: str, body: object = None) -> tuple[int, Any]:
    resp = await client.post(path, json=body, headers=AUTH)
    return resp.status, await resp.json()


async def test_promote_queues_the_promotion_and_answers_202(
    api: tuple[World, TestClient[Any, Any]],
) -> None:
    w, client = api
    source = await w.deployed("staging")
    status, rec = await call(client, "/api/deployments/prod/promote", {"from": "staging"})
    assert status == 202, rec
    assert (rec["state"], rec["action"], rec["trigger"], rec["actor"]) == (
        "queued",
        "promotion",
        "api",
        "api",
    )
    assert rec["promoted_from"] == {"deployment": "staging", "deploy_id": source.id}
    await until(lambda: w.records.state(rec["id"]) == "succeeded")
    done = w.records.get(rec["id"])
    assert done is not None and done.digest == source.digest
    await until(lambda: not w.pipeline.commands)
    # A chosen deploy, by id (a number or a string).
    w.commit("second")
    await w.deployed("staging")
    status, again = await call(
        client, "/api/deployments/prod/promote", {"from": "staging", "deploy_id": str(source.id)}
    )
    assert status == 202 and again["promoted_from"]["deploy_id"] == source.id
    await until(lambda: w.records.state(again["id"]) == "succeeded")


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/deployments/nope/promote", {"from": "staging"}, 404, "no deployment named 'nope'"),
        ("/api/deployments/prod/promote", {}, 400, '"from"'),
        ("/api/deployments/prod/promote", {"from": "nope"}, 400, "no deployment named 'nope'"),
        ("/api/deployments/prod/promote", {"from": "staging"}, 400, "no successful deploy"),
        ("/api/deployments/prod/promote", {"from": "staging", "deploy_id": True}, 400, "deploy id"),
        ("/api/deployments/prod/promote", [1], 400, "JSON object"),
        ("/api/deployments/prod/freeze", {}, 400, '"reason"'),
        ("/api/deployments/prod/freeze", {"reason": " "}, 400, "needs a reason"),
        ("/api/deployments/prod/freeze", {"reason": "x", "until": "soon"}, 400, "neither"),
        ("/api/deployments/nope/freeze", {"reason": "x"}, 404, "no deployment named"),
        ("/api/deployments/prod/unfreeze", None, 409, "prod is not frozen."),
    ],
)
async def test_bad_requests_get_one_line_and_change_nothing(
    api: tuple[World, TestClient[Any, Any]], path: str, body: object, status: int, error: str
) -> None:
    w, client = api
    got, answer = await call(client, path, body)
    assert (got, list(answer)) == (status, ["error"]), answer
    assert error in answer["error"]
    assert w.records.list_deploys(None, 10) == []
    assert usecases.freeze_of(w.records, w.dep("prod")) is None


async def test_actions_need_the_token(api: tuple[World, TestClient[Any, Any]]) -> None:
    _, client = api
    for path in ("promote", "freeze", "unfreeze"):
        resp = await client.post(f"/api/deployments/prod/{path}", json={"reason": "x"})
        assert resp.status == 401


async def test_freeze_and_unfreeze_and_the_deployments_show_it(
    api: tuple[World, TestClient[Any, Any]],
) -> None:
    w, client = api
    await w.deployed("staging")
    status, made = await call(
        client, "/api/deployments/prod/freeze", {"reason": "release freeze", "until": "2h"}
    )
    assert status == 201, made
    freeze = made["freeze"]
    assert (made["deployment"], freeze["by"], freeze["reason"]) == ("prod", "api", "release freeze")
    assert abs(freeze["until"] - freeze["since"] - 7200) < 1
    deps = await (await client.get("/api/deployments", headers=AUTH)).json()
    shown = {d["name"]: (d["freeze"], d["promote_from"]) for d in deps}
    assert shown == {"staging": (None, None), "prod": (freeze, None)}
    # Frozen: a second freeze and a promotion are refused (409), and nothing is queued.
    status, again = await call(client, "/api/deployments/prod/freeze", {"reason": "other"})
    assert status == 409 and "unfreeze first" in again["error"]
    status, refused = await call(client, "/api/deployments/prod/promote", {"from": "staging"})
    assert status == 409 and refused["error"].endswith(": release freeze. Nothing was promoted.")
    assert w.records.list_deploys("prod") == []
    status, ended = await call(client, "/api/deployments/prod/unfreeze")
    assert status == 200 and ended["ended"]["reason"] == "release freeze"
    assert ended["freeze"] is None
    assert views.freeze_json(None) is None


async def test_a_webhook_into_a_frozen_deployment_is_queued_and_says_it_waits(
    tmp_path: Path,
) -> None:
    secret = "s3cret"
    w = World(tmp_path, prod=f'github_repo = "acme/dags"\nfetch_url = "{tmp_path / "project"}"\n')
    w.settings = dataclasses.replace(
        w.settings,
        github=dataclasses.replace(w.settings.github, webhook_secrets=(secret,)),
    )
    w.services.settings = w.settings
    repos.ensure(w.settings.server.state_dir, "prod", "main")  # as deployd serve does at start
    usecases.freeze(w.records, w.dep("prod"), by="alice", reason="release freeze")
    hooks = Webhooks(lambda: w.settings, w.records, w.pipeline)
    app = web.Application()
    app.router.add_post("/webhooks/github", hooks.handle)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        commit = git(w.project, "rev-parse", "HEAD")
        body = json.dumps(
            {
                "ref": "refs/heads/main",
                "after": commit,
                "repository": {"full_name": "acme/dags"},
                "pusher": {"name": "ada"},
            }
        ).encode()
        resp = await client.post(
            "/webhooks/github",
            data=body,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": "push",
                "X-GitHub-Delivery": str(uuid.uuid4()),
                "X-Hub-Signature-256": "sha256="
                + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
            },
        )
        answer = await resp.json()
        assert resp.status == 202, answer
        [queued] = answer["deploys"]
        [why] = answer["frozen"]
        assert why.startswith("prod is frozen by alice since ")
        assert answer["message"].endswith("; it runs when the freeze ends)")
        await until(lambda: any("waits for the freeze" in r.line for r in w.records.log_lines(1)))
        assert w.records.state(queued["id"]) == "queued"
        usecases.unfreeze(w.records, w.dep("prod"), by="alice")
        await asyncio.wait_for(asyncio.gather(*hooks.running), 15)
        assert w.records.state(queued["id"]) == "succeeded"
    finally:
        await client.close()


def test_a_webhook_for_a_promotion_only_deployment_deploys_nothing(tmp_path: Path) -> None:
    w = World(
        tmp_path,
        prod=f'github_repo = "acme/dags"\nfetch_url = "{tmp_path}"\npromote_from = "staging"\n',
        staging=f'github_repo = "acme/dags"\nfetch_url = "{tmp_path}"\nbranch = "develop"\n',
    )
    payload = {
        "ref": "refs/heads/main",
        "after": "a" * 40,
        "repository": {"full_name": "acme/dags"},
    }
    verdict = decide("push", payload, w.settings)
    assert (verdict.status, verdict.requests) == (200, [])
    assert verdict.answer == {
        "deployed": False,
        "reason": "prod takes promotions from staging: deployd promote staging prod.",
    }
    develop = decide("push", {**payload, "ref": "refs/heads/develop"}, w.settings)
    assert [r.deployment.name for r in develop.requests] == ["staging"]
