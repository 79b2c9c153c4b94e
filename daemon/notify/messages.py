"""What a notification says: a Slack message, a Teams Adaptive Card, a signed JSON event.

Pure functions over the outbox event and the deploy's record as read at
delivery time. A final record never changes, so a retried notification says
the same thing; a "started" event shows only what was fixed when the deploy
started (commit, actor, trigger, description), whatever happened since.

Generic webhooks follow Flux's generic-hmac convention: `X-Signature:
sha256=<hex>` is HMAC-SHA256 over the exact body bytes with the target's
secret. Every request carries `X-Deployd-Event` and `X-Deployd-Delivery`, an
id stable per (target, event) that a receiver can de-duplicate on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from daemon import views
from daemon.config import NotifyTarget
from daemon.core import deploys, states
from daemon.core.deploys import Deploy, DeployEvent

USER_AGENT = "deployd"
# Delivery ids are UUIDv5 in this namespace, over the target and the event's row.
_DELIVERY_NS = uuid.UUID("5f0b6a52-35b8-4f57-9d5e-6f1c0a2e9d41")

_VERBS = {
    states.STARTED: "started",
    states.SUCCEEDED: "succeeded",
    states.FAILED: "failed",
    states.ROLLED_BACK: "rolled back",
    states.CANCELLED: "cancelled",
    states.SUPERSEDED: "superseded",
    states.INTERRUPTED: "interrupted",
}
_SLACK_EMOJI = {
    states.STARTED: ":rocket:",
    states.SUCCEEDED: ":white_check_mark:",
    states.FAILED: ":x:",
    states.ROLLED_BACK: ":leftwards_arrow_with_hook:",
    states.CANCELLED: ":no_entry_sign:",
    states.SUPERSEDED: ":fast_forward:",
    states.INTERRUPTED: ":warning:",
}
_TEAMS_COLOUR = {
    states.STARTED: "Accent",
    states.SUCCEEDED: "Good",
    states.FAILED: "Attention",
    states.ROLLED_BACK: "Warning",
    states.INTERRUPTED: "Warning",
}
# The events whose title names the step the deploy stopped in.
_STOPPED_IN = frozenset({states.FAILED, states.INTERRUPTED})


@dataclass(frozen=True)
class Request:
    """One HTTP POST: the exact body bytes and the headers."""

    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Summary:
    """What every kind of message shows, as text ('' where it does not apply)."""

    deploy_id: int
    event: str
    state: str  # "running" for a started deploy, else the final state
    title: str  # "prod: deploy #42 failed at parse"
    commit: str  # the first 7 hex digits
    subject: str
    actor: str
    trigger: str
    duration: str
    step: str
    error: str  # its first line
    image: str  # IMAGE:TAG of a success
    link: str


def render(target: NotifyTarget, event: DeployEvent, record: Deploy, link: str) -> Request:
    """The request that tells `target` about `event` of the deploy `record`.

    `link` is where a person reads the deploy: its dashboard page, signed
    read-only like a commit status's link ('' when no public_url is configured).
    """
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Deployd-Event": event.event,
        "X-Deployd-Delivery": delivery_id(target.name, event),
    }
    payload: dict[str, Any]
    if target.type == "slack":
        payload = slack(summarise(event, record, link))
    elif target.type == "msteams":
        payload = msteams(summarise(event, record, link))
    else:
        payload = webhook_event(event, record, link, headers["X-Deployd-Delivery"])
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    if target.secret is not None:
        headers["X-Signature"] = signature(target.secret, body)
    return Request(body, headers)


def signature(secret: str, body: bytes) -> str:
    """`sha256=<hex>`: HMAC-SHA256 of the exact body bytes (Flux's generic-hmac)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_id(target: str, event: DeployEvent) -> str:
    """The id of telling `target` about `event`: the same on every retry and restart."""
    return str(uuid.uuid5(_DELIVERY_NS, f"{target}/{event.id}/{event.deploy_id}/{event.at!r}"))


def summarise(event: DeployEvent, record: Deploy, link: str) -> Summary:
    """The facts of a notification, in words."""
    started = event.event == states.STARTED
    noun = {deploys.ROLLBACK: "rollback", deploys.PROMOTION: "promotion"}.get(
        record.action, "deploy"
    )
    title = f"{record.deployment}: {noun} #{record.id}"
    if record.rollback_of is not None:
        title += f" (to deploy #{record.rollback_of})"
    if record.promoted_from is not None:
        title += f" (from {record.promoted_from} #{record.promoted_from_id})"
    title += f" {_VERBS.get(event.event, event.event)}"
    step = "" if started else (record.step or "")
    if event.event in _STOPPED_IN and step:
        title += f" at {step}"
    return Summary(
        deploy_id=record.id,
        event=event.event,
        state=states.RUNNING if started else event.event,
        title=title,
        commit=(record.commit or "")[:7],
        subject=_cut(record.description, 200),
        actor=_cut(record.actor, 100),
        trigger=record.trigger,
        duration="" if started else _duration(record),
        step=step,
        error="" if started else first_line(record.error or ""),
        image=f"{record.image}:{record.tag}"
        if event.event == states.SUCCEEDED and record.tag
        else "",
        link=link,
    )


def first_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of an error (stored errors show newlines as ^J)."""
    for line in re.split(r"\n|\^J", text):
        if line.strip():
            return _cut(line.strip(), limit)
    return ""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _duration(record: Deploy) -> str:
    if record.started_at is None or record.finished_at is None:
        return ""
    seconds = max(0, round(record.finished_at - record.started_at))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _facts(s: Summary) -> list[tuple[str, str]]:
    commit = f"{s.commit} {s.subject}".strip()
    return [
        (label, value)
        for label, value in (
            ("Commit", commit),
            ("Actor", s.actor),
            ("Trigger", s.trigger),
            ("Duration", s.duration),
            ("Step", s.step if s.event in _STOPPED_IN else ""),
            ("Image", s.image),
        )
        if value
    ]


def _mrkdwn(text: str) -> str:
    """Text shown as itself in Slack mrkdwn: no links, mentions (<!channel>) or entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack(s: Summary) -> dict[str, Any]:
    """A Slack incoming-webhook message with Block Kit blocks (and `text` for alerts)."""
    emoji = _SLACK_EMOJI.get(s.event, ":information_source:")
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"{emoji} *{_mrkdwn(s.title)}*"}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*{label}*\n{_mrkdwn(value)}"}
                for label, value in _facts(s)
            ],
        },
    ]
    if s.error:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": f"```{_mrkdwn(s.error)}```"}}
        )
    if s.link:
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"<{s.link}|deploy #{s.deploy_id}>"}],
            }
        )
    text = s.title + (f": {s.error}" if s.error else "")
    return {"text": _mrkdwn(text), "blocks": blocks}


def msteams(s: Summary) -> dict[str, Any]:
    """An Adaptive Card 1.4 in the message shape a Teams Workflows webhook takes."""
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": s.title,
            "size": "Medium",
            "weight": "Bolder",
            "color": _TEAMS_COLOUR.get(s.event, "Default"),
            "wrap": True,
        },
        {"type": "FactSet", "facts": [{"title": k, "value": v} for k, v in _facts(s)]},
    ]
    if s.error:
        body.append(
            {
                "type": "TextBlock",
                "text": s.error,
                "fontType": "Monospace",
                "color": "Attention",
                "wrap": True,
            }
        )
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "msteams": {"width": "Full"},
        "body": body,
    }
    if s.link:
        card["actions"] = [
            {"type": "Action.OpenUrl", "title": f"Deploy #{s.deploy_id}", "url": s.link}
        ]
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": None,
                "content": card,
            }
        ],
    }


def webhook_event(event: DeployEvent, record: Deploy, link: str, delivery: str) -> dict[str, Any]:
    """The JSON event a generic webhook receives (fields of a later moment are null)."""
    started = event.event == states.STARTED
    final = None if started else record
    duration = (
        round(record.finished_at - record.started_at, 3)
        if final is not None and record.started_at is not None and record.finished_at is not None
        else None
    )
    return {
        "delivery": delivery,
        "event_id": event.id,
        "event": event.event,
        "at": event.at,
        "deployment": record.deployment,
        "deploy_id": record.id,
        "state": states.RUNNING if started else event.event,
        "kind": record.kind,
        "trigger": record.trigger,
        "action": record.action,
        "rollback_of": record.rollback_of,
        "promoted_from": views.promoted_from_json(record),
        "commit": record.commit,
        "subject": record.description,
        "actor": record.actor,
        "image": final.image if final else None,
        "tag": final.tag if final else None,
        "digest": final.digest if final else None,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": final.finished_at if final else None,
        "duration_seconds": duration,
        "step": final.step if final else None,
        "error": final.error if final else None,
        "url": link or None,
    }
