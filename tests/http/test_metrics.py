"""GET /metrics in process: the exposition, the bearer token, and /metrics alone on its own port.

The real aiohttp application (daemon/http/app.py) over real SQLite records; what a real
Prometheus makes of a real `deployd serve` is in tests/http/test_metrics_server.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from daemon import config
from daemon.adapters.records import Records
from daemon.config import Settings
from daemon.core import deploys
from daemon.core.context import Services
from daemon.core.deploys import Options
from daemon.core.pipeline import Pipeline
from daemon.http import app as web_mod
from daemon.http.api import Api
from daemon.http.metrics import MetricsEndpoint, serve_alone
from daemon.http.webhooks import Webhooks
from daemon.metrics import Metrics
from tests.support.fakes import FakeEngine

TOKEN = "metrics-t0ken"


def make_settings(tmp_path: Path, token: str | None = None) -> Settings:
    server: dict[str, Any] = {"state_dir": str(tmp_path / "state")}
    if token is not None:
        (tmp_path / "metrics-token").write_text(token + "\n")
        server["metrics_token_file"] = str(tmp_path / "metrics-token")
    return config.parse(
        {"server": server, "deployment": [{"name": "prod", "image": "r.example/a/prod"}]},
        base=tmp_path,
        path=tmp_path / "deployd.toml",
    )


def application(tmp_path: Path, s: Settings, *, with_metrics: bool = True) -> web.Application:
    """The daemon's HTTP application, wired as `deployd serve` wires it."""
    records = Records(s.server.state_dir / "deployd.db")
    metrics = Metrics(lambda: s, Records(s.server.state_dir / "deployd.db"))
    webhooks = Webhooks(
        lambda: s, records, Pipeline(Services(s, records, FakeEngine())), metrics.webhook_delivery
    )
    endpoint = MetricsEndpoint(lambda: s, metrics)
    return web_mod.make_app(webhooks, Api(lambda: s, records), endpoint if with_metrics else None)


@pytest.fixture
async def client_for(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Any]]:
    clients: list[TestClient[Any, Any]] = []

    async def make(s: Settings, **kwargs: bool) -> TestClient[Any, Any]:
        client = TestClient(TestServer(application(tmp_path, s, **kwargs)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def finished_deploy(s: Settings) -> int:
    records = Records(s.server.state_dir / "deployd.db")
    did = records.create_deploy(
        deployment="prod", trigger="cli", actor="ada", ref="r", options=Options(), pid=1
    )
    records.transition(did, deploys.QUEUED, deploys.RUNNING)
    records.transition(did, deploys.RUNNING, deploys.SUCCEEDED)
    return did


async def test_metrics_are_open_without_a_token_in_the_text_format(
    tmp_path: Path, client_for: Callable[..., Any]
) -> None:
    s = make_settings(tmp_path)
    finished_deploy(s)
    client = await client_for(s)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    [sample] = families["deployd_deploys"].samples
    assert sample.labels["state"] == "succeeded" and sample.value == 1
    assert {"deployd_deploy_info", "deployd_queue_depth", "process_open_fds"} <= set(families)


async def test_a_token_guards_the_metrics(tmp_path: Path, client_for: Callable[..., Any]) -> None:
    s = make_settings(tmp_path, TOKEN)
    client = await client_for(s)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer \udcff"},  # undecodable bytes
    ):
        resp = await client.get("/metrics", headers=headers)
        text = await resp.text()
        assert resp.status == 401, headers
        assert text.count("\n") == 1 and "metrics_token_file" in text and TOKEN not in text
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200 and "deployd_deploys_in_flight" in await resp.text()
    # The token guards /metrics only: /healthz stays open.
    assert (await client.get("/healthz")).status == 200


async def test_metrics_alone_on_their_own_listener(
    tmp_path: Path, client_for: Callable[..., Any]
) -> None:
    s = make_settings(tmp_path)
    main = await client_for(s, with_metrics=False)
    assert (await main.get("/metrics")).status == 404
    assert (await main.get("/healthz")).status == 200
    metrics = Metrics(lambda: s, Records(s.server.state_dir / "deployd.db"))
    runner = await serve_alone(MetricsEndpoint(lambda: s, metrics), "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{host}:{port}/metrics") as resp:
                assert resp.status == 200 and "deployd_queue_depth" in await resp.text()
            async with session.get(f"http://{host}:{port}/healthz") as resp:
                assert resp.status == 404  # only /metrics there
    finally:
        await runner.cleanup()


async def test_the_token_is_read_from_the_settings_of_the_moment(
    tmp_path: Path, client_for: Callable[..., Any]
) -> None:
    current = [make_settings(tmp_path)]
    metrics = Metrics(lambda: current[0], Records(tmp_path / "state" / "deployd.db"))
    endpoint = MetricsEndpoint(lambda: current[0], metrics)
    app = web.Application()
    app.add_routes(endpoint.routes())
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        assert (await client.get("/metrics")).status == 200
        with_token = make_settings(tmp_path, TOKEN)
        current[0] = dataclasses.replace(current[0], server=with_token.server)
        assert (await client.get("/metrics")).status == 401
    finally:
        await client.close()
