"""One notification POST over aiohttp: bounded in time and size, no redirects, no URL in errors.

A target's URL is its secret (Slack's and Teams' webhook URLs carry their
credentials), so what comes back says what happened without it: aiohttp's
exception texts can quote the URL, and a receiver's answer is not trusted to
leave it out either.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from daemon.printable import printable
from daemon.retry import retry_after_seconds

REQUEST_TIMEOUT = 10.0
# How much of an answer is read: enough for Slack's "invalid_payload" and the like.
MAX_ANSWER = 4096
# Answers whose Retry-After is honoured.
RETRY_AFTER_STATUSES = frozenset({429, 503})

_URLS = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")


@dataclass(frozen=True)
class Answer:
    """How a POST went: the status (None if no answer came) and why it failed, if it did."""

    status: int | None
    error: str = ""
    retry_after: float | None = None  # seconds the receiver asked us to wait

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def session() -> aiohttp.ClientSession:
    """The HTTP client of a Deliverer (one per process, closed with it)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=32),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
    )


async def post(
    client: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    timeout: float = REQUEST_TIMEOUT,
) -> Answer:
    """POST `body` to `url`; never raises for what the network or the receiver does."""
    try:
        async with client.post(
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            if 200 <= resp.status < 300:
                return Answer(resp.status)
            text = (await resp.content.read(MAX_ANSWER)).decode("utf-8", "replace")
            wait = (
                retry_after_seconds(resp.headers.get("Retry-After"), time.time())
                if resp.status in RETRY_AFTER_STATUSES
                else None
            )
            why = f"HTTP {resp.status}"
            if 300 <= resp.status < 400:
                why += " (a redirect: deployd does not follow them; fix the URL)"
            snippet = " ".join(text.split())[:200]
            if snippet:
                why += f": {snippet}"
            return Answer(resp.status, scrub(why, url), wait)
    except TimeoutError:
        return Answer(None, f"no answer within {round(timeout, 1):g} s")
    except aiohttp.ClientConnectorError as exc:
        # Its own text names host and port; the cause is what helps.
        reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        return Answer(None, scrub(f"cannot connect: {reason}", url))
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        return Answer(None, scrub(f"{type(exc).__name__}: {exc}", url))


def scrub(text: str, url: str) -> str:
    """`text` without the URL or any part of it that could be its secret; printable."""
    parts = urlsplit(url)
    secrets = [url, url.split("?", 1)[0]]
    if parts.query:
        secrets.append(parts.query)
    if len(parts.path) > 1:
        secrets.append(parts.path)
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "<url>")
    return printable(_URLS.sub("<url>", text))
