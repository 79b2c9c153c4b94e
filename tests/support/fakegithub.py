"""A local fake of the GitHub REST API's commit-status endpoint that records requests.

Runs an aiohttp server on loopback in a thread of the test process. `faults`
holds answers to give before the normal 201 (e.g. a 502, a rate limit with
Retry-After), one per request, to exercise deployd's retries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.threadserver import ThreadServer


@dataclass
class Call:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float
    answered: int


@dataclass
class FakeGitHub:
    token: str = "gh-test-token"
    calls: list[Call] = field(default_factory=list)
    faults: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    _server: ThreadServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _status(self, request: web.Request) -> web.Response:
        body = await request.json()
        answer = 201
        headers: dict[str, str] = {}
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            answer = 401
        elif self.faults:
            answer, headers = self.faults.pop(0)
        self.calls.append(
            Call(request.method, request.path, dict(request.headers), body, time.time(), answer)
        )
        if answer >= 300:
            return web.json_response({"message": "fake fault"}, status=answer, headers=headers)
        return web.json_response({"id": len(self.calls), **body}, status=201)

    def start(self) -> FakeGitHub:
        app = web.Application()
        app.router.add_post("/repos/{owner}/{repo}/statuses/{sha}", self._status)
        self._server = ThreadServer(app).start()
        self.port = self._server.port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def statuses(self, sha: str) -> list[Call]:
        """Requests for commit `sha` that the fake accepted, in order."""
        return [c for c in self.calls if c.path.endswith(f"/statuses/{sha}") and c.answered == 201]

    def wait_for(self, sha: str, state: str, timeout: float = 60) -> list[Call]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            calls = self.statuses(sha)
            if any(c.body["state"] == state for c in calls):
                return calls
            time.sleep(0.05)
        raise AssertionError(f"no {state} status for {sha[:12]}; calls: {self.calls}")
