"""Freezes against webhook deploys, and the API's actions, on a real `deployd serve`: signed
deliveries over HTTP, the real Engine and registry, freezes made by other processes
(`deployd freeze` / `unfreeze`) and by the config's freeze windows.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.http.test_webhook_server import (
    API_TOKEN,
    FakeGitHub,
    Hooked,
    github,
    request,
    rows,
    start_hooked,
    wait_state,
)
from tests.support.projects import git
from tests.support.testenv import Deployd, Infra

pytestmark = pytest.mark.integration
__all__ = ["github"]  # the fake GitHub fixture, from tests/http/test_webhook_server.py


@pytest.fixture
def hooked(tmp_path: Path, testenv: Infra, github: FakeGitHub) -> Iterator[Hooked]:
    h = start_hooked(tmp_path, testenv, github)
    yield h
    h.srv.stop()


def cli(h: Hooked) -> Deployd:
    """`deployd` on the build host, against the daemon's config: another process."""
    return Deployd(h.srv.config, h.srv.state_dir)


def api(h: Hooked, path: str, body: object = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
    return request(h.srv, "POST", path, data, headers)


def log(h: Hooked, deploy_id: int) -> list[str]:
    return [r["line"] for r in rows(h.srv, "log") if r["deploy_id"] == deploy_id]


def test_a_webhook_deploy_waits_for_a_freeze_that_ends_by_itself(hooked: Hooked) -> None:
    frozen = cli(hooked).run(
        "freeze", "prod", "--reason", "release freeze", "--until", "8s", "--json"
    )
    assert frozen.returncode == 0, frozen.stderr
    until = json.loads(frozen.stdout)["freeze"]["until"]
    commit = git(hooked.source, "rev-parse", "HEAD")
    status, answer = hooked.push(commit)
    assert status == 202, answer
    [queued] = answer["deploys"]
    assert answer["frozen"][0].startswith("prod is frozen by ")
    assert "it runs when the freeze ends" in answer["message"]
    time.sleep(2)
    assert [r["state"] for r in rows(hooked.srv) if r["id"] == queued["id"]] == ["queued"]
    assert any("this deploy waits for the freeze to end" in x for x in log(hooked, queued["id"]))
    rec = wait_state(hooked.srv, queued["id"])
    assert rec["state"] == "succeeded", rec
    assert rec["started_at"] >= until  # not before the freeze's end...
    assert rec["started_at"] - until < 5  # ... and at it (a timer), not much later
    assert "       prod is no longer frozen; this deploy goes on" in log(hooked, queued["id"])
    calls = hooked.github.wait_for(commit, "success")
    assert [c.body["state"] for c in calls] == ["pending", "success"]


def test_an_unfreeze_from_another_process_releases_the_waiting_deploy(hooked: Hooked) -> None:
    status, made = api(hooked, "/api/deployments/prod/freeze", {"reason": "incident"})
    assert status == 201, made
    assert (made["freeze"]["by"], made["freeze"]["until"]) == ("api", None)
    status, answer = hooked.push(git(hooked.source, "rev-parse", "HEAD"))
    [queued] = answer["deploys"]
    time.sleep(1.5)
    assert [r["state"] for r in rows(hooked.srv) if r["id"] == queued["id"]] == ["queued"]
    # A push is refused meanwhile; a CLI unfreeze (another process) lets the webhook deploy go.
    t0 = time.monotonic()
    ended = cli(hooked).run("unfreeze", "prod")
    assert ended.returncode == 0, ended.stderr
    assert ended.stdout == "prod unfrozen (frozen by api: incident)\n"
    wait_state(hooked.srv, queued["id"], ("running", "succeeded", "failed"))
    assert time.monotonic() - t0 < 3  # noticed within about a second
    assert wait_state(hooked.srv, queued["id"])["state"] == "succeeded"


def test_a_freeze_window_holds_pushes_and_webhook_deploys_until_it_ends(
    tmp_path: Path, testenv: Infra, github: FakeGitHub
) -> None:
    now = dt.datetime.now(dt.UTC)
    start = now.replace(second=0, microsecond=0)
    ends = now + dt.timedelta(seconds=15)
    window = {
        "cron": f"{start.minute} {start.hour} * * *",
        "duration_seconds": int((ends - start).total_seconds()),
        "timezone": "UTC",
    }
    h = start_hooked(tmp_path, testenv, github)
    h.srv.stop()
    staging = '\n[[deployment]]\nname = "staging"'
    text = h.srv.config.read_text()
    assert text.count(staging) == 1  # prod comes first: its window goes before staging
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in window.items())
    h.srv.config.write_text(
        text.replace(staging, f"\n[[deployment.freeze_window]]\n{lines}{staging}")
    )
    from daemon import config

    assert config.load(h.srv.config).deployment("prod").freeze_windows
    h.srv.notes.clear()  # the first start's READY=1
    h.srv.start()
    try:
        srv = h.srv
        status = srv.ssh("status", "prod")
        assert "  frozen:   by freeze_window since " in status.stdout, status.stdout
        refused = srv.ssh("unfreeze", "prod")
        assert refused.returncode == 2 and "a freeze window ends by itself" in refused.stderr
        clone = tmp_path / "clone"
        assert srv.git(tmp_path, "clone", "-q", str(h.source), str(clone)).returncode == 0
        pushed = srv.git(clone, "push", srv.url(), "HEAD:main")
        assert pushed.returncode != 0
        assert "prod is frozen by freeze_window since " in pushed.stderr
        assert 'freeze window "' in pushed.stderr
        code, answer = h.push(git(h.source, "rev-parse", "HEAD"))
        assert code == 202, answer
        [queued] = answer["deploys"]
        rec = wait_state(srv, queued["id"], timeout=60)
        assert rec["state"] == "succeeded", rec
        assert rec["started_at"] >= ends.timestamp() - 1
    finally:
        h.srv.stop()


def test_promote_freeze_and_unfreeze_through_the_api(hooked: Hooked, testenv: Infra) -> None:
    srv = hooked.srv
    clone = hooked.source
    staged = srv.git(clone, "push", srv.url("staging"), "HEAD:main", key="bob")
    assert staged.returncode == 0, staged.stderr
    [source] = rows(srv)
    status, rec = api(hooked, "/api/deployments/prod/promote", {"from": "staging"})
    assert status == 202, rec
    assert rec["state"] == "queued" and rec["promoted_from"]["deploy_id"] == source["id"]
    done = wait_state(srv, rec["id"])
    assert (done["state"], done["digest"], done["actor"]) == ("succeeded", source["digest"], "api")
    prod = cli(hooked).record(rec["id"])
    assert testenv.manifest_digest(str(prod["image"]), str(prod["tag"])) == source["digest"]
    code, deps = hooked.api("/api/deployments")
    assert code == 200
    by_name = {d["name"]: d for d in deps}
    assert by_name["prod"]["freeze"] is None and by_name["prod"]["deployed"]["id"] == rec["id"]
    assert by_name["prod"]["deployed"]["promoted_from"] == {
        "deployment": "staging",
        "deploy_id": source["id"],
    }
    status, made = api(hooked, "/api/deployments/prod/freeze", {"reason": "audit", "until": "1h"})
    assert status == 201, made
    code, deps = hooked.api("/api/deployments")
    assert {d["name"]: d["freeze"] for d in deps}["prod"] == made["freeze"]
    status, refused = api(hooked, "/api/deployments/prod/promote", {"from": "staging"})
    assert status == 409 and refused["error"].endswith(": audit. Nothing was promoted.")
    status, ended = api(hooked, "/api/deployments/prod/unfreeze")
    assert status == 200 and ended["ended"]["reason"] == "audit"
    assert api(hooked, "/api/deployments/prod/unfreeze")[0] == 409
