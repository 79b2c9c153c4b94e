"""What notifications say: Slack blocks, the Teams Adaptive Card, the signed webhook event."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from pathlib import Path

from daemon.adapters.records import Records
from daemon.core.deploys import Deploy, DeployEvent, Options
from daemon.notify import messages
from tests.notify.conftest import SECRET, deploy, target

# Where a person reads the deploy (Identity.deploy_url makes it): messages carry it as given.
LINK = "https://deployd.example.com/deploys/1?exp=1767225600&sig=abababababababababababababababababababababababababababababababab"


def event_of(records: Records, deploy_id: int, name: str) -> DeployEvent:
    return next(e for e in records.events_after(0) if e.deploy_id == deploy_id and e.event == name)


def failed(records: Records) -> tuple[DeployEvent, Deploy]:
    did = deploy(
        records,
        "running",
        "failed",
        step="parse",
        error="dags/sales.py: ModuleNotFoundError at line 2^J  import pandas_extra^Jmore",
    )
    rec = records.get(did)
    assert rec is not None
    return event_of(records, did, "failed"), rec


def test_slack_message_of_a_failed_deploy(records: Records) -> None:
    event, rec = failed(records)
    req = messages.render(target("chat", "https://x", "slack"), event, rec, LINK)
    msg = json.loads(req.body)
    assert msg["text"] == (
        "prod: deploy #1 failed at parse: dags/sales.py: ModuleNotFoundError at line 2"
    )
    head, facts, error, link = msg["blocks"]
    assert head == {
        "type": "section",
        "text": {"type": "mrkdwn", "text": ":x: *prod: deploy #1 failed at parse*"},
    }
    assert [f["text"] for f in facts["fields"]] == [
        "*Commit*\n0123456 Fix the sales DAG",
        "*Actor*\nalice",
        "*Trigger*\nssh",
        "*Duration*\n0 s",
        "*Step*\nparse",
    ]
    assert error["text"]["text"] == "```dags/sales.py: ModuleNotFoundError at line 2```"
    assert link == {
        "type": "context",
        "elements": [{"type": "mrkdwn", "text": f"<{LINK}|deploy #1>"}],
    }
    assert "X-Signature" not in req.headers
    assert req.headers["X-Deployd-Event"] == "failed"


def test_slack_shows_text_from_outside_as_text(records: Records) -> None:
    # A commit subject could ping the channel or forge a link in Slack's mrkdwn.
    did = records.create_deploy(
        deployment="prod",
        trigger="ssh",
        actor="eve <!here>",
        ref="refs/heads/main",
        options=Options(description="<!channel> & <http://evil|ok>"),
        pid=1,
        commit="ab" * 20,
    )
    records.transition(did, "queued", "cancelled", error="cancelled while queued")
    rec = records.get(did)
    assert rec is not None
    msg = messages.slack(messages.summarise(event_of(records, did, "cancelled"), rec, ""))
    text = json.dumps(msg)
    assert "<!channel>" not in text and "<!here>" not in text and "<http://evil" not in text
    assert "&lt;!channel&gt; &amp; &lt;http://evil|ok&gt;" in text
    assert len(msg["blocks"]) == 3  # no link without a public_url
    assert "Duration" not in text  # it never ran


def test_a_started_event_shows_only_what_was_fixed_at_the_start(records: Records) -> None:
    # Delivered late, after the deploy failed: it still says started, not failed.
    _, rec = failed(records)
    started = event_of(records, rec.id, "started")
    msg = messages.slack(messages.summarise(started, rec, LINK))
    text = json.dumps(msg)
    assert msg["blocks"][0]["text"]["text"] == ":rocket: *prod: deploy #1 started*"
    assert "ModuleNotFound" not in text and "parse" not in text and "Duration" not in text
    body = messages.webhook_event(started, rec, LINK, "d")
    assert body["state"] == "running" and body["event"] == "started"
    assert (body["error"], body["step"], body["finished_at"], body["duration_seconds"]) == (
        None,
        None,
        None,
        None,
    )
    assert body["commit"] == rec.commit and body["started_at"] == rec.started_at


def test_teams_gets_an_adaptive_card_through_a_workflows_webhook(records: Records) -> None:
    event, rec = failed(records)
    msg = json.loads(messages.render(target("ops", "https://x", "msteams"), event, rec, LINK).body)
    assert msg["type"] == "message"
    (attachment,) = msg["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert (card["type"], card["version"]) == ("AdaptiveCard", "1.4")
    assert card["$schema"] == "http://adaptivecards.io/schemas/adaptive-card.json"
    title, facts, error = card["body"]
    assert title["type"] == "TextBlock" and title["text"] == "prod: deploy #1 failed at parse"
    assert title["color"] == "Attention"
    assert facts["type"] == "FactSet"
    assert {f["title"]: f["value"] for f in facts["facts"]} == {
        "Commit": "0123456 Fix the sales DAG",
        "Actor": "alice",
        "Trigger": "ssh",
        "Duration": "0 s",
        "Step": "parse",
    }
    assert error["text"] == "dags/sales.py: ModuleNotFoundError at line 2"
    assert card["actions"] == [{"type": "Action.OpenUrl", "title": "Deploy #1", "url": LINK}]
    no_link = messages.msteams(messages.summarise(event, rec, ""))
    assert "actions" not in no_link["attachments"][0]["content"]


def test_webhook_event_is_signed_over_its_exact_bytes(records: Records) -> None:
    did = deploy(
        records,
        "running",
        "succeeded",
        image="registry.local/airflow/prod",
        tag="deploy-1",
        digest="sha256:" + "f" * 64,
        step=None,
    )
    rec = records.get(did)
    assert rec is not None
    event = event_of(records, did, "succeeded")
    hook = target("consumer", "https://x")
    req = messages.render(hook, event, rec, LINK)
    want = "sha256=" + hmac.new(SECRET.encode(), req.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(req.headers["X-Signature"], want)
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["X-Deployd-Event"] == "succeeded"
    body = json.loads(req.body)
    assert body == {
        "delivery": req.headers["X-Deployd-Delivery"],
        "event_id": event.id,
        "event": "succeeded",
        "at": event.at,
        "deployment": "prod",
        "deploy_id": did,
        "state": "succeeded",
        "kind": "image",
        "trigger": "ssh",
        "action": "deploy",
        "rollback_of": None,
        "promoted_from": None,
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "subject": "Fix the sales DAG",
        "actor": "alice",
        "image": "registry.local/airflow/prod",
        "tag": "deploy-1",
        "digest": "sha256:" + "f" * 64,
        "created_at": rec.created_at,
        "started_at": rec.started_at,
        "finished_at": rec.finished_at,
        "duration_seconds": round(rec.finished_at - rec.started_at, 3),  # type: ignore[operator]
        "step": None,
        "error": None,
        "url": LINK,
    }
    # A different secret does not verify.
    other = "sha256=" + hmac.new(b"other", req.body, hashlib.sha256).hexdigest()
    assert not hmac.compare_digest(req.headers["X-Signature"], other)


def test_delivery_ids_are_stable_per_target_and_event(records: Records) -> None:
    event, rec = failed(records)
    started = event_of(records, rec.id, "started")
    hook = target("consumer", "https://x")
    first = messages.render(hook, event, rec, "").headers["X-Deployd-Delivery"]
    assert messages.render(hook, event, rec, "").headers["X-Deployd-Delivery"] == first
    other_target = target("audit", "https://y")
    assert messages.render(other_target, event, rec, "").headers["X-Deployd-Delivery"] != first
    assert messages.render(hook, started, rec, "").headers["X-Deployd-Delivery"] != first


def test_a_rollback_says_what_it_went_back_to(records: Records) -> None:
    did = records.create_deploy(
        deployment="prod",
        trigger="cli",
        actor="ada@host",
        ref="refs/heads/main",
        options=Options(),
        pid=1,
        action="rollback",
        commit="c" * 40,
        rollback_of=7,
    )
    records.transition(did, "queued", "running")
    records.transition(did, "running", "rolled_back", step="roll", error="deployment/x: timed out")
    rec = records.get(did)
    assert rec is not None
    s = messages.summarise(event_of(records, did, "rolled_back"), rec, "")
    assert s.title == "prod: rollback #1 (to deploy #7) rolled back"
    assert s.error == "deployment/x: timed out"


def test_a_promotion_says_where_its_image_came_from(records: Records) -> None:
    did = records.create_deploy(
        deployment="prod",
        trigger="cli",
        actor="ada@host",
        ref="refs/heads/main",
        options=Options(),
        pid=1,
        action="promotion",
        commit="c" * 40,
        promoted_from="staging",
        promoted_from_id=7,
    )
    records.transition(did, "queued", "running")
    records.transition(did, "running", "succeeded")
    rec = records.get(did)
    assert rec is not None
    event = event_of(records, did, "succeeded")
    assert messages.summarise(event, rec, "").title.startswith(
        "prod: promotion #1 (from staging #7) "
    )
    body = json.loads(messages.render(target("consumer", "https://x"), event, rec, "").body)
    assert body["promoted_from"] == {"deployment": "staging", "deploy_id": 7}
    assert body["action"] == "promotion"


def test_a_webhook_event_carries_the_recorded_kind(records: Records) -> None:
    did = records.create_deploy(
        deployment="prod", trigger="ssh", actor="alice", ref="refs/heads/main",
        options=Options(), pid=1, commit="c" * 40, kind="dags",
    )  # fmt: skip
    records.transition(did, "queued", "running")
    rec = records.get(did)
    assert rec is not None
    event = event_of(records, did, "started")
    body = json.loads(messages.render(target("consumer", "https://x"), event, rec, "").body)
    assert body["kind"] == "dags"


def test_long_texts_are_cut_to_fit_the_limits(records: Records, tmp_path: Path) -> None:
    did = deploy(records, "running", "failed", step="build", error="x" * 10_000)
    rec = records.get(did)
    assert rec is not None
    s = messages.summarise(event_of(records, did, "failed"), rec, "")
    assert len(s.error) == 300 and s.error.endswith("…")
    msg = messages.slack(s)
    assert all(len(f["text"]) <= 2000 for f in msg["blocks"][1]["fields"])
    assert all(len(b["text"]["text"]) <= 3000 for b in msg["blocks"] if "text" in b)


def test_durations_read_like_durations() -> None:
    base = Deploy(1, "prod", "succeeded", "ssh", "deploy", "a", "r", None, 0.0, started_at=100.0)
    for seconds, text in ((42, "42 s"), (185, "3 min 05 s"), (3 * 3600 + 120, "3 h 02 min")):
        rec = dataclasses.replace(base, finished_at=100.0 + seconds)
        event = DeployEvent(1, 1, "prod", "succeeded", 0.0)
        assert messages.summarise(event, rec, "").duration == text
