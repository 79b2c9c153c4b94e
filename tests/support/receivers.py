"""Local stand-ins for Slack, Teams and a webhook consumer: an aiohttp app that records
every POST and answers from a script (tests and bench/notify_latency)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

# The HMAC key of the webhook targets add_notify writes.
SECRET = "webhook-hmac-s3cret"


@dataclass(frozen=True)
class Got:
    """One request a receiver got, and what it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float  # time.time() on arrival

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class Answer:
    """What to answer: a status, headers, a body, after a pause."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = "ok"
    delay: float = 0.0


class Receiver:
    """POST /{name}: recorded in `got`; answered by the next scripted Answer for that name."""

    def __init__(self) -> None:
        self.got: list[Got] = []
        self.script: dict[str, list[Answer]] = {}
        self.always: dict[str, Answer] = {}  # once a name's script is used up
        self._lock = threading.Lock()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{name:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        name = request.match_info["name"]
        with self._lock:
            queue = self.script.get(name)
            answer = queue.pop(0) if queue else self.always.get(name, Answer())
            self.got.append(Got(name, dict(request.headers), body, answer.status, time.time()))
        if answer.delay:
            await asyncio.sleep(answer.delay)
        return web.Response(status=answer.status, headers=answer.headers, text=answer.body)

    def requests(self, name: str) -> list[Got]:
        with self._lock:
            return [g for g in self.got if g.path == name]

    def delivered(self, name: str) -> list[Got]:
        """The requests for `name` that were answered 2xx, in arrival order."""
        return [g for g in self.requests(name) if g.ok]


def add_notify(config: Path, targets: list[dict[str, Any]], public_url: str = "") -> None:
    """Append [[notify]] tables to a deployd.toml: each target a dict of name, type, url
    and optionally events and deployments (the URL, and a webhook's SECRET, in files)."""
    text = config.read_text()
    if public_url:
        text = text.replace("[docker]", f'public_url = "{public_url}"\n\n[docker]', 1)
    for t in targets:
        url_file = config.with_name(f"{t['name']}.url")
        url_file.write_text(t["url"] + "\n")
        text += f'\n[[notify]]\nname = "{t["name"]}"\ntype = "{t["type"]}"\n'
        text += f'url_file = "{url_file}"\n'
        if t["type"] == "webhook":
            secret_file = config.with_name(f"{t['name']}.secret")
            secret_file.write_text(SECRET + "\n")
            text += f'secret_file = "{secret_file}"\n'
        for key in ("events", "deployments"):
            if key in t:
                text += f"{key} = {json.dumps(t[key])}\n"
    config.write_text(text)
