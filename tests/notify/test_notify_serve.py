"""Notifications of real deploys: a real `deployd serve` (SSH pushes) or `deployd deploy`,
and local receivers standing in for Slack, Teams and a webhook consumer."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.adapters.records import Records
from daemon.core.deploys import Options
from tests.support.projects import commit_all, make_project
from tests.support.receivers import SECRET, Answer, Got, Receiver, add_notify
from tests.support.sshserver import Server, make_server
from tests.support.testenv import Deployd, Infra
from tests.support.threadserver import ThreadServer

pytestmark = pytest.mark.integration

PUBLIC = "https://deployd.example.com"


class Receivers:
    """One Receiver app on loopback, for every target (a path each)."""

    def __init__(self) -> None:
        self.receiver = Receiver()
        self.server = ThreadServer(self.receiver.app()).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.port}/{path}"


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    r = Receivers()
    yield r
    r.server.stop()


def wait_for(cond: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def rows(state_dir: Path, sql: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(state_dir / "deployd.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def title(got: Got) -> str:
    body = got.json
    if "blocks" in body:
        return str(body["blocks"][0]["text"]["text"])
    if "attachments" in body:
        return str(body["attachments"][0]["content"]["body"][0]["text"])
    return f"{body['deployment']}: #{body['deploy_id']} {body['event']}"


def verified(got: Got) -> dict[str, Any]:
    """The webhook body, once its signature checks out."""
    want = "sha256=" + hmac.new(SECRET.encode(), got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(got.headers["X-Signature"], want)
    body: dict[str, Any] = got.json
    assert body["delivery"] == got.headers["X-Deployd-Delivery"]
    assert body["event"] == got.headers["X-Deployd-Event"]
    return body


def pushed_project(tmp_path: Path, testenv: Infra, srv: Server) -> Path:
    repo = make_project(tmp_path / "proj", testenv.airflow_image, message="Add the sales DAG")
    subprocess.run(["git", "-C", str(repo), "remote", "add", "astro", srv.url()], check=True)
    return repo


def test_real_deploys_tell_slack_teams_and_a_webhook(
    tmp_path: Path, testenv: Infra, receivers: Receivers
) -> None:
    srv = make_server(tmp_path / "srv", testenv)
    add_notify(
        srv.config,
        [
            {"name": "chat", "type": "slack", "url": receivers.url("slack/T01/B02/XyzSlackToken")},
            {
                "name": "ops",
                "type": "msteams",
                "url": receivers.url("teams/workflows/abc?sig=TeamsSigSecret"),
                "events": ["failed", "rolled_back"],
            },
            {
                "name": "audit",
                "type": "webhook",
                "url": receivers.url("hook"),
                "events": ["started", "succeeded", "failed"],
                "deployments": ["prod"],
            },
        ],
        public_url=PUBLIC,
    )
    srv.start()
    r = receivers.receiver
    try:
        repo = pushed_project(tmp_path, testenv, srv)
        push = srv.git(repo, "push", "astro", "main")
        assert push.returncode == 0, push.stderr
        (repo / "dags" / "broken.py").write_text("from airflow.sdk import DAG\nimport nowhere\n")
        broken = commit_all(repo, "Break the DAGs")
        push = srv.git(repo, "push", "astro", "main")
        assert push.returncode != 0
        wait_for(lambda: len(r.delivered("slack/T01/B02/XyzSlackToken")) == 2, "slack")
        wait_for(lambda: len(r.delivered("teams/workflows/abc")) == 1, "teams")
        wait_for(lambda: len(r.delivered("hook")) == 4, "the webhook")
        # Slack's link is the failed deploy's page, signed: it opens with no sign-in.
        link = r.requests("slack/T01/B02/XyzSlackToken")[1].json["blocks"][3]["elements"][0]
        url = re.fullmatch(r"<(.*)\|deploy #2>", link["text"])
        assert url is not None and url[1].startswith(f"{PUBLIC}/deploys/2?exp="), link
        local = url[1].replace(PUBLIC, f"http://127.0.0.1:{srv.http_port}")
        with urllib.request.urlopen(local, timeout=10) as page:
            assert page.status == 200 and "Break the DAGs" in page.read().decode()
        # SIGHUP with a target more; then a deploy that ends in another process.
        add_notify(srv.config, [{"name": "late", "type": "webhook", "url": receivers.url("late")}])
        srv.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded:" in srv.log(), "the reload")
        other = Records(srv.state_dir / "deployd.db")
        third = other.create_deploy(
            deployment="staging",
            trigger="cli",
            actor="ci@host",
            ref="refs/heads/main",
            options=Options(),
            pid=1,
            commit="c" * 40,
        )
        assert other.transition(third, "queued", "running")
        assert other.transition(third, "running", "succeeded")
        wait_for(lambda: r.delivered("late"), "the new target")
        wait_for(lambda: len(r.delivered("slack/T01/B02/XyzSlackToken")) == 3, "slack again")
        time.sleep(1)  # nothing more comes
    finally:
        assert srv.stop() == 0
    assert [(b["deploy_id"], b["event"]) for b in map(verified, r.requests("late"))] == [
        (third, "succeeded")
    ]
    ok, bad, _ = rows(srv.state_dir, "SELECT * FROM deploys ORDER BY id")
    assert (ok["state"], bad["state"], bad["step"]) == ("succeeded", "failed", "parse")

    slack = r.requests("slack/T01/B02/XyzSlackToken")
    assert [title(g) for g in slack] == [
        ":white_check_mark: *prod: deploy #1 succeeded*",
        ":x: *prod: deploy #2 failed at parse*",
        ":white_check_mark: *staging: deploy #3 succeeded*",
    ]
    fields = [f["text"] for f in slack[1].json["blocks"][1]["fields"]]
    assert fields[:3] == [
        f"*Commit*\n{broken[:7]} Break the DAGs",
        "*Actor*\nalice",
        "*Trigger*\nssh",
    ]
    assert "dags/broken.py" in slack[1].json["blocks"][2]["text"]["text"]
    assert "Image" in json.dumps(slack[0].json) and ok["tag"] in json.dumps(slack[0].json)

    (teams,) = r.requests("teams/workflows/abc")
    card = teams.json["attachments"][0]["content"]
    assert teams.json["type"] == "message" and card["type"] == "AdaptiveCard"
    assert title(teams) == "prod: deploy #2 failed at parse"

    hooks = [verified(g) for g in r.requests("hook")]
    assert [(h["deploy_id"], h["event"]) for h in hooks] == [
        (1, "started"),
        (1, "succeeded"),
        (2, "started"),
        (2, "failed"),
    ]
    assert hooks[1]["digest"] == ok["digest"] and hooks[1]["commit"] == ok["commit_sha"]
    assert hooks[1]["tag"] == ok["tag"] and hooks[1]["finished_at"] == ok["finished_at"]
    assert (hooks[3]["step"], hooks[3]["state"], hooks[3]["kind"]) == ("parse", "failed", "image")
    assert hooks[2]["state"] == "running" and hooks[2]["error"] is None
    assert len({h["delivery"] for h in hooks}) == 4
    # The URLs are secrets: never in the daemon's log.
    log = (srv.root / "serve.log").read_text()
    assert "notified chat: deploy #2 failed" in log
    for secret in ("XyzSlackToken", "TeamsSigSecret", str(receivers.server.port)):
        assert secret not in log


def notifications(srv: Server, target: str) -> dict[str, float]:
    """deployd_notifications_total of `target` by outcome, as the daemon's /metrics says."""
    url = f"http://127.0.0.1:{srv.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "deployd_notifications_total" and sample.labels["target"] == target
    }


def test_exactly_once_across_a_restart_and_a_failing_receiver(
    tmp_path: Path, testenv: Infra, receivers: Receivers
) -> None:
    r = receivers.receiver
    r.script["hook"] = [
        Answer(500, body="down"),
        Answer(500, body="down"),
        Answer(500, body="down"),
        Answer(429, {"Retry-After": "1"}, "slow down"),
    ]
    srv = make_server(tmp_path / "srv", testenv)
    add_notify(
        srv.config,
        [
            {
                "name": "hook",
                "type": "webhook",
                "url": receivers.url("hook"),
                "events": ["succeeded"],
            }
        ],
    )
    srv.start()
    repo = pushed_project(tmp_path, testenv, srv)
    try:
        push = srv.git(repo, "push", "astro", "main")
        assert push.returncode == 0, push.stderr
        wait_for(lambda: r.requests("hook"), "the first attempt")
        assert srv.stop() == 0  # SIGTERM while the receiver keeps failing
        attempts_at_stop = len(r.requests("hook"))
        assert 1 <= attempts_at_stop <= 2
        (state,) = rows(srv.state_dir, "SELECT * FROM notify_targets")
        assert state["attempts"] == attempts_at_stop and state["holder"] is None
        assert state["last_error"] == "HTTP 500: down"
        srv.notes.clear()
        srv.start()
        wait_for(lambda: r.delivered("hook"), "the delivery after the restart")
        commit_all(repo, "Second deploy")
        push = srv.git(repo, "push", "astro", "main")
        assert push.returncode == 0, push.stderr
        wait_for(lambda: len(r.delivered("hook")) == 2, "the second deploy's")
        # A `deployd deploy` while the daemon runs: the daemon sends its notification.
        cli = Deployd(srv.config, srv.state_dir).run("deploy", "prod", str(repo), "--json")
        assert cli.returncode == 0, cli.stderr
        wait_for(lambda: len(r.delivered("hook")) == 3, "the CLI deploy's")
        # This process sent the 4th attempt's failure and three deliveries.
        assert notifications(srv, "hook") == {
            "delivered": 3.0,
            "failed": 4.0 - attempts_at_stop,
            "dropped": 0.0,
        }
        # A restart after the last 2xx sends nothing again.
        assert srv.stop() == 0
        srv.start()
        time.sleep(2)
    finally:
        assert srv.stop() == 0
    got = r.requests("hook")
    assert [g.status for g in got] == [500, 500, 500, 429, 200, 200, 200]
    bodies = [verified(g) for g in got]
    assert [b["deploy_id"] for b in bodies] == [1, 1, 1, 1, 1, 2, 3]
    assert len({g.headers["X-Deployd-Delivery"] for g in got[:5]}) == 1
    assert len({g.headers["X-Deployd-Delivery"] for g in got}) == 3
    # Backoff from 1 s, across the restart; then the 429's Retry-After (1 s), not 8 s.
    gaps = [b.at - a.at for a, b in itertools.pairwise(got[:5])]
    assert gaps[0] >= 0.95 and gaps[1] >= 1.95 and gaps[2] >= 3.95, gaps
    assert 0.95 <= gaps[3] < 3, gaps
    log = (srv.root / "serve.log").read_text()
    assert "notified hook: deploy #3 succeeded" in log  # the daemon's, not the CLI's
    assert log.count("notifications to hook failing") == 2  # first failure, once per process
    (state,) = rows(srv.state_dir, "SELECT * FROM notify_targets")
    assert (state["attempts"], state["holder"]) == (0, None)


def test_a_cli_deploy_with_no_daemon_notifies_before_it_exits(
    tmp_path: Path, testenv: Infra, make_deployd: Any, receivers: Receivers
) -> None:
    d: Deployd = make_deployd({"name": "ci", "image": f"{testenv.registry}/airflow/notify-cli"})
    add_notify(
        d.config,
        [
            {
                "name": "hook",
                "type": "webhook",
                "url": receivers.url("hook"),
                "events": ["started", "succeeded"],
            },
            {"name": "chat", "type": "slack", "url": receivers.url("slack")},
        ],
    )
    project = make_project(tmp_path / "proj", testenv.airflow_image, message="CI deploy")
    proc = d.run("deploy", "ci", str(project), "--json")
    exited = time.time()
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(proc.stdout)
    r = receivers.receiver
    hooks = [verified(g) for g in r.requests("hook")]
    assert [(h["deploy_id"], h["event"], h["trigger"]) for h in hooks] == [
        (rec["id"], "started", "cli"),
        (rec["id"], "succeeded", "cli"),
    ]
    assert hooks[1]["digest"] == rec["digest"]
    assert [title(g) for g in r.requests("slack")] == [
        f":white_check_mark: *ci: deploy #{rec['id']} succeeded*"
    ]
    assert all(g.at <= exited for g in r.got)
    assert "not sent yet" not in proc.stderr
    # The leases are let go: a daemon started later takes over at once.
    assert [
        (t["target"], t["holder"])
        for t in rows(d.state_dir, "SELECT * FROM notify_targets ORDER BY target")
    ] == [
        ("chat", None),
        ("hook", None),
    ]
    # A receiver that is down: the deploy's result is unchanged, the rest is left for later.
    r.always["hook"] = Answer(503, body="maintenance")
    again = d.run("deploy", "ci", str(project), "--json", "--description", "again")
    assert again.returncode == 0, again.stderr
    assert "2 notification(s) to hook not sent yet" in again.stderr
    assert re.search(r"notifications to hook failing for .*HTTP 503: maintenance", again.stderr)
