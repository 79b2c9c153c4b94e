"""Commit statuses on GitHub for webhook deploys: pending → success / failure / error.

The pipeline tells the reporter when a deploy starts running and when it ends;
the reporter posts in the background, in order per deploy, retrying 5xx
answers, rate limits (honouring Retry-After) and network errors. A status that
cannot be posted is logged; it never blocks or fails the deploy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from daemon.config import Settings
from daemon.core import deploys
from daemon.core.deploys import Deploy
from daemon.retry import retry_after_seconds

log = logging.getLogger(__name__)

ATTEMPTS = 5
# Steps whose errors are about the repository's own content (its Dockerfile, DAGs,
# tests): shown in commit statuses. Other steps' errors stay in the deploy log.
PUBLIC_STEPS = frozenset({"build", "parse", "pytest"})
MAX_WAIT = 60.0
TIMEOUT = aiohttp.ClientTimeout(total=15)


def status_for(record: Deploy, link: str = "") -> dict[str, str]:
    """The commit status body for a deploy record.

    Its link (`link`, made by daemon/web/identity.py: '' without a public_url) leads to
    the deploy's dashboard page, signed so that whoever sees the status can open it
    without signing in; unsigned, the page asks for a sign-in.
    """
    state = record.state
    error = (record.error or "").strip()
    step = record.step or ""
    internal = error.startswith("internal")
    if step not in PUBLIC_STEPS and state != deploys.SUPERSEDED:
        # Errors of the other steps name hosts, registries and clusters: they stay in
        # the deploy's log; the status says where it stopped.
        error = (
            f"at the {step} step; see deploy #{record.id}" if step else f"see deploy #{record.id}"
        )
    if state == deploys.RUNNING:
        gh, text = "pending", f"deploy #{record.id} running"
    elif state == deploys.SUCCEEDED:
        gh, text = "success", f"deployed {record.tag}"
    elif state in (deploys.FAILED, deploys.ROLLED_BACK) and not internal:
        gh, text = "failure", f"{state}: {error}"
    else:  # cancelled, interrupted, superseded, internal errors: not a verdict on the code
        gh, text = "error", f"{state}: {error}"
    body = {
        "state": gh,
        "context": f"deployd/{record.deployment}",
        "description": text if len(text) <= 140 else text[:139] + "…",
    }
    if link:
        body["target_url"] = link
    return body


def retry_after(status: int, headers: Any, now: float) -> float | None:
    """Seconds to wait before retrying an answer, or None if it must not be retried."""
    value = headers.get("Retry-After")
    if value is not None:
        seconds = retry_after_seconds(value, now)
        # Unreadable: wait a while rather than hammer.
        return MAX_WAIT / 4 if seconds is None else min(MAX_WAIT, seconds)
    limited = headers.get("X-RateLimit-Remaining") == "0"
    if status in (403, 429) and limited:
        try:
            return min(MAX_WAIT, max(0.0, float(headers.get("X-RateLimit-Reset", "")) - now))
        except ValueError:
            return MAX_WAIT
    if status == 429 or status >= 500:
        return 0.0  # the caller's backoff decides
    return None


class StatusReporter:
    """Posts commit statuses for webhook deploys of deployments with a `github_repo`."""

    def __init__(
        self, settings: Callable[[], Settings], link: Callable[[int], str] | None = None
    ) -> None:
        self._settings = settings
        # A deploy id's page, signed ('' for none): Identity.deploy_url.
        self._link = link or (lambda _deploy_id: "")
        self._session: aiohttp.ClientSession | None = None
        self._last: dict[int, asyncio.Task[None]] = {}
        self.pending: set[asyncio.Task[None]] = set()

    def observe(self, event: str, record: Deploy) -> None:
        """Pipeline observer: schedule the status for this moment of the deploy."""
        if record.trigger != "webhook" or not record.commit:
            return
        settings = self._settings()
        token = settings.github.token
        dep = next((d for d in settings.deployments if d.name == record.deployment), None)
        if token is None or dep is None or dep.github_repo is None:
            return
        url = f"{settings.github.api_url}/repos/{dep.github_repo}/statuses/{record.commit}"
        body = status_for(record, self._link(record.id))
        previous = self._last.get(record.id)
        task = asyncio.get_running_loop().create_task(self._post(previous, url, token, body))
        self._last[record.id] = task
        self.pending.add(task)

        def done(t: asyncio.Task[None], deploy_id: int = record.id) -> None:
            self.pending.discard(t)
            if self._last.get(deploy_id) is t:
                del self._last[deploy_id]

        task.add_done_callback(done)

    async def _post(
        self, previous: asyncio.Task[None] | None, url: str, token: str, body: dict[str, str]
    ) -> None:
        if previous is not None:  # statuses of one deploy go out in order
            await asyncio.gather(previous, return_exceptions=True)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=TIMEOUT)
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "User-Agent": "deployd",
        }
        why = ""
        for attempt in range(ATTEMPTS):
            wait: float | None
            try:
                async with self._session.post(url, json=body, headers=headers) as resp:
                    if resp.status < 300:
                        return
                    why = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    wait = retry_after(resp.status, resp.headers, time.time())
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
                # (RuntimeError: the session was closed at shutdown)
                why, wait = f"{type(exc).__name__}: {exc}", 0.0
            if wait is None or attempt == ATTEMPTS - 1:
                break
            await asyncio.sleep(max(wait, 0.5 * 2**attempt))
        log.warning("commit status %s for %s not posted: %s", body["state"], url, why)

    async def close(self, timeout: float) -> None:
        """Give posts in flight `timeout` seconds, then close the HTTP session."""
        if self.pending:
            await asyncio.wait(set(self.pending), timeout=timeout)
        for task in self.pending:
            task.cancel()
        if self._session is not None:
            await self._session.close()
