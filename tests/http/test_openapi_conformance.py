"""The HTTP API against its own OpenAPI description, with schemathesis: every operation, with
the token, all of schemathesis's checks (no server error, every status, content type, header
and body as described, invalid input refused, auth not ignored, ...).

The API is served by a real aiohttp server on loopback (in a thread of its own: schemathesis
calls it synchronously) over real SQLite records seeded with deploys in each state (the
queued and running ones of a process that is gone: listings mark them interrupted), and a
Pipeline over the fake engine and cluster, so promotions really queue and run.

The schema is made from `openapi.description()`, which test_openapi.py checks is what
/api/openapi.json serves: schemathesis's lazy `from_fixture` loader, which would read it from
the server, fails on pytest 9 (it reads the removed `Function._nodeid`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import web
from schemathesis.checks import not_a_server_error

from daemon.adapters.locks import DeploymentLock
from daemon.adapters.records import Records
from daemon.core.deploys import Options
from daemon.http import openapi
from daemon.http.api import Api
from daemon.http.webhooks import MAX_BODY
from tests.core.test_release import World

TOKEN = "api-t0ken-for-schemathesis"
DEAD_PID = 2**22 + 1  # above Linux's largest pid: no such process, ever
EXAMPLES = 50  # per operation and phase: the whole run takes about 20 s


@schemathesis.deserializer("application/x-ndjson")
def ndjson(_ctx: schemathesis.DeserializationContext, response: schemathesis.Response) -> Any:
    """The log stream as the description reads it: an array of its lines' objects."""
    return [json.loads(line) for line in response.text.splitlines() if line]


def seed(records: Records) -> None:
    """A deploy in each state the records keep, with log lines, steps and a report."""

    def deploy(state: str, **fields: Any) -> int:
        ident = records.create_deploy(
            deployment="prod",
            trigger="cli",
            actor="ada@host",
            ref="refs/heads/main",
            options=Options(force=True, description="seeded"),
            pid=DEAD_PID,
            commit="c" * 40,
        )
        records.append_log(ident, "checkout", [f"-----> deploy #{ident}", "line \u00e9 \u2603"])
        if state == "superseded":
            records.transition(ident, "queued", state, error="superseded by a newer push")
        elif state != "queued":
            records.transition(ident, "queued", "running", step="checkout")
            records.step_started(ident, "checkout")
        if state not in ("queued", "running", "superseded"):
            records.step_finished(ident, "checkout", "succeeded", "checked out")
            records.transition(ident, "running", state, **fields)
        return ident

    deploy("queued")
    deploy("running")
    report = {"parse": {"files": [{"path": "dags/a.py", "ok": False, "error": "Traceback"}]}}
    deploy("failed", error="DAG import errors in 1 file", report=json.dumps(report))
    deploy("rolled_back", error="the rollout did not finish")
    deploy("cancelled", error="cancelled by api while queued", cancelled_by="api")
    deploy("interrupted", error="the deploying process stopped during checkout")
    deploy("superseded")
    records.create_deploy(
        deployment="staging",
        trigger="webhook",
        actor="github",
        ref="refs/heads/main",
        options=Options(),
        pid=DEAD_PID,
        kind="dags",  # both kinds in the answers the description is checked against
    )


class Served:
    """The API on a loopback port, run by an event loop in a thread of its own."""

    def __init__(self, tmp_path: Path, *, token: str | None = TOKEN, pipeline: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.world: World = self.call(self._start(tmp_path, token, pipeline))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def _start(self, tmp_path: Path, token: str | None, pipeline: bool) -> World:
        tmp_path.mkdir(exist_ok=True)
        w = World(tmp_path)
        w.settings = dataclasses.replace(
            w.settings, server=dataclasses.replace(w.settings.server, api_token=token)
        )
        w.services.settings = w.settings
        await w.deployed("staging")
        await w.deployed("prod")
        seed(w.records)
        api = Api(
            lambda: w.settings, w.records, w.pipeline.live.get, w.pipeline if pipeline else None
        )
        app = web.Application(client_max_size=MAX_BODY)  # as daemon/http/app.py makes it
        app.add_routes(api.routes())
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return w

    async def _stop(self) -> None:
        deadline = self.loop.time() + 30
        while self.world.pipeline.commands:  # the promotions asked for run to their end
            assert self.loop.time() < deadline, "promotions still running after 30 s"
            await asyncio.sleep(0.01)
        await self.runner.cleanup()

    def close(self) -> None:
        self.call(self._stop())
        self.world.records.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for every operation's run: what one operation changes, the next one sees."""
    server = Served(tmp_path_factory.mktemp("api"))
    yield server
    server.close()


# Where well-formed requests are refused by what only the records know, with 400: a
# deployment name nobody configured in the query or the body, a promotion source without a
# successful deploy, a freeze `until` in the past or a reason of unprintable characters.
SEMANTIC_400 = ["listDeploys", "promote", "freeze"]
ACCEPTED = ["2xx", "401", "403", "404", "409"]
CONFIG = {
    "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
    "generation": {
        "max-examples": EXAMPLES,
        "mode": "all",  # valid and invalid requests
        "deterministic": True,
        "database": "none",
    },
    "request-timeout": 10,
    "checks": {"enabled": True, "positive_data_acceptance": {"expected-statuses": ACCEPTED}},
    "operations": [
        {
            "include-operation-id": name,
            "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "400"]}},
        }
        for name in SEMANTIC_400
    ],
}


# The description the server serves (test_openapi.py checks that it serves this one).
schema = schemathesis.openapi.from_dict(
    openapi.description(), config=schemathesis.Config.from_dict(CONFIG)
)


@schema.parametrize()
def test_the_api_answers_as_its_description_says(case: schemathesis.Case, served: Served) -> None:
    case.call_and_validate(base_url=served.url)


def documented(schema: Any) -> set[tuple[str, str, int]]:
    """Every (method, path, status) the description promises (413 aside: aiohttp's own)."""
    return {
        (method.upper(), path, int(status))
        for path, item in schema.raw_schema["paths"].items()
        for method, op in item.items()
        for status in op["responses"]
        if status != "413"
    }


def guarded(schema: Any) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Each operation behind the token, with path parameters that name something real."""
    for path, item in schema.raw_schema["paths"].items():
        for method in item:
            if path != "/api/openapi.json":
                real = {"id": 1, "name": "prod"}
                yield path, method.upper(), {k: v for k, v in real.items() if f"{{{k}}}" in path}


def test_every_documented_answer_happens_and_is_as_described(tmp_path: Path) -> None:
    """Each status the description lists for each operation, asked for on purpose, and
    checked with all of schemathesis's checks: so no documented answer is a guess."""
    seen: set[tuple[str, str, int]] = set()
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def ask(server: Served, path: str, method: str, *, status: int, **case: Any) -> Any:
        case.setdefault("headers", auth)
        made = schema[path][method].Case(**case)
        # A documented 503 is what the description promises, not a server error.
        skip = [not_a_server_error] if status == 503 else []
        response = made.call_and_validate(base_url=server.url, excluded_checks=skip)
        assert response.status_code == status, response.text
        seen.add((method, path, status))
        return response.json() if path != "/api/deploys/{id}/log" else response.text

    server = Served(tmp_path / "a")
    try:
        records = server.world.records
        cancel = "/api/deploys/{id}/cancel"
        # First: listing the deploys marks this one (of a process that is gone) interrupted.
        queued = next(d.id for d in records.list_deploys("prod", 100) if d.state == "queued")
        assert ask(server, cancel, "POST", status=200, path_parameters={"id": queued})
        ask(server, "/api/openapi.json", "GET", status=200)
        ask(server, "/api/deployments", "GET", status=200)
        ask(server, "/api/deployments", "GET", status=401, headers={"Authorization": "Bearer x"})
        ask(server, "/api/deploys", "GET", status=401, headers={"Authorization": TOKEN})
        ask(server, "/api/deploys", "GET", status=200, query={"deployment": "prod"})
        ask(server, "/api/deploys", "GET", status=400, query={"deployment": "nope"})
        for path in ("/api/deploys/{id}", "/api/deploys/{id}/log"):
            ask(server, path, "GET", status=200, path_parameters={"id": 1})
            ask(server, path, "GET", status=404, path_parameters={"id": 999})
            ask(server, path, "GET", status=400, path_parameters={"id": "0"})
        done = ask(server, cancel, "POST", status=409, path_parameters={"id": 1})
        assert "already ended" in done["error"]
        ask(server, cancel, "POST", status=404, path_parameters={"id": 999})
        ask(server, cancel, "POST", status=400, path_parameters={"id": "x"})
        promote = "/api/deployments/{name}/promote"
        body = {"from": "staging"}
        ask(server, promote, "POST", status=202, path_parameters={"name": "prod"}, body=body)
        ask(server, promote, "POST", status=404, path_parameters={"name": "nope"}, body=body)
        ask(server, promote, "POST", status=400, path_parameters={"name": "Prod!"}, body=body)
        freeze = "/api/deployments/{name}/freeze"
        unfreeze = "/api/deployments/{name}/unfreeze"
        why = {"reason": "release freeze", "until": "2h"}
        ask(server, freeze, "POST", status=201, path_parameters={"name": "prod"}, body=why)
        ask(server, freeze, "POST", status=409, path_parameters={"name": "prod"}, body=why)
        ask(server, promote, "POST", status=409, path_parameters={"name": "prod"}, body=body)
        ask(server, freeze, "POST", status=404, path_parameters={"name": "nope"}, body=why)
        ask(server, freeze, "POST", status=400, path_parameters={"name": "prod"}, body={})
        ask(server, unfreeze, "POST", status=200, path_parameters={"name": "prod"})
        ask(server, unfreeze, "POST", status=409, path_parameters={"name": "prod"})
        ask(server, unfreeze, "POST", status=404, path_parameters={"name": "nope"})
        ask(server, unfreeze, "POST", status=400, path_parameters={"name": "-"})
        # A running deploy (its process holds the deployment's lock): asked, 202.
        lock = DeploymentLock(server.world.settings.server.state_dir, "staging")
        assert lock.try_acquire()
        try:
            ident = records.create_deploy(
                deployment="staging",
                trigger="cli",
                actor="ada@host",
                ref="refs/heads/main",
                options=Options(),
                pid=DEAD_PID,
            )
            records.transition(ident, "queued", "running")
            ask(server, cancel, "POST", status=202, path_parameters={"id": ident})
        finally:
            lock.release()
        too_big = requests.post(
            f"{server.url}/api/deployments/prod/freeze",
            data=b"x" * (MAX_BODY + 1),
            headers={**auth, "Content-Type": "application/json"},
            timeout=30,
        )
        assert (too_big.status_code, too_big.headers["Content-Type"].split(";")[0]) == (
            413,
            "text/plain",
        )
        for path, method, params in guarded(schema):
            ask(server, path, method, status=401, path_parameters=params, headers={})
    finally:
        server.close()
    closed = Served(tmp_path / "b", token=None, pipeline=False)
    try:
        for path, method, params in guarded(schema):
            ask(closed, path, method, status=403, path_parameters=params)
    finally:
        closed.close()
    no_pipeline = Served(tmp_path / "c", pipeline=False)
    try:
        ask(no_pipeline, promote, "POST", status=503, path_parameters={"name": "prod"}, body=body)
    finally:
        no_pipeline.close()
    assert seen == documented(schema)
