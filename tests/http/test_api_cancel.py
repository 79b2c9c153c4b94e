"""`POST /api/deploys/{id}/cancel`, in process over real SQLite: what each state answers.

The process running a deploy stops it (tests/core/test_cancel.py); the API only asks, and
against a real `deployd serve` that is tested in tests/core/test_cancel_e2e.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon import views
from daemon.adapters.records import Records
from daemon.core.deploys import Options
from daemon.http.api import Api
from tests.http.test_webhooks import _client, settings

AUTH = {"Authorization": "Bearer api-t0ken"}


def queued(records: Records) -> int:
    return records.create_deploy(
        deployment="prod",
        trigger="cli",
        actor="ada@host",
        ref="refs/heads/main",
        options=Options(),
        pid=1,
        commit="a" * 40,
    )


async def test_cancel_answers_by_state(tmp_path: Path) -> None:
    records = Records(tmp_path / "d.db")
    client = await _client(Api(lambda: settings(tmp_path, token="api-t0ken"), records))
    try:

        async def post(ident: object, headers: dict[str, str] = AUTH) -> Any:
            return await client.post(f"/api/deploys/{ident}/cancel", headers=headers)

        # Queued: cancelled now, 200 with the record.
        waiting = queued(records)
        resp = await post(waiting)
        assert resp.status == 200
        body = await resp.json()
        assert body == views.deploy_json(records.get(waiting))  # type: ignore[arg-type]
        assert (body["state"], body["cancelled_by"], body["error"]) == (
            "cancelled",
            "api",
            "cancelled by api while queued",
        )
        # Running: asked, 202; the process running it stops it (the record says who asked).
        running = queued(records)
        records.transition(running, "queued", "running")
        resp = await post(running)
        assert resp.status == 202 and resp.headers["Location"] == f"/api/deploys/{running}"
        assert ((await resp.json())["state"], (await resp.json())["cancelled_by"]) == (
            "running",
            "api",
        )
        assert records.cancel_requested(running) == "api"
        assert (await post(running)).status == 202  # asked again: still under way
        # Ended: 409 naming the state; unknown 404; a bad id 400; no token 401.
        records.transition(running, "running", "succeeded")
        resp = await post(running)
        assert resp.status == 409
        assert (await resp.json())["error"] == (
            f"deploy #{running} has already ended (succeeded); there is nothing to cancel."
        )
        resp = await post(999)
        assert (resp.status, (await resp.json())["error"]) == (404, "there is no deploy #999.")
        assert (await post("abc")).status == 400
        assert (await post(waiting, {})).status == 401
    finally:
        await client.close()
