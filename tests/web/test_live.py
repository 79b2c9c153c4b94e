"""The live log as server-sent events, in process: aiohttp's real test server, real SQLite
records and a real DeployLog pushing lines (as the pipeline's does while a deploy runs).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.core.logs import DeployLog
from daemon.web import live as live_mod
from tests.core.test_release import until
from tests.web.test_pages import Site, open_site, seed


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path) as s:
        yield s


class Events:
    """A browser's EventSource, by hand: the events of one response, one at a time."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float = 5) -> dict[str, Any]:
        """The next event or comment: {"event", "id", "data"} or {"comment"}."""
        out: dict[str, Any] = {}
        while True:
            raw = await asyncio.wait_for(self.resp.content.readline(), timeout)
            if raw == b"":
                return {"closed": True}
            line = raw.decode().rstrip("\n")
            if line == "":
                if out.keys() - {"retry"}:
                    return out
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "":
                return {"comment": value}
            if field == "data":
                out["data"] = json.loads(value)
            else:
                out[field] = value

    async def until(self, event: str, timeout: float = 5) -> dict[str, Any]:
        while True:
            got = await self.next(timeout)
            if got.get("event") == event or got.get("closed"):
                return got


async def open_events(site: Site, path: str, **headers: str) -> Events:
    resp = await site.client.get(path, headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Content-Security-Policy"] == "default-src 'self'"
    return Events(resp)


async def test_stored_lines_then_pushed_ones_then_the_end(site: Site) -> None:
    i = seed(site.records, state="running", lines=(("build", "one"), ("build", "two")))
    dlog = DeployLog(site.records, i)
    site.logs[i] = dlog
    stream = await open_events(site, f"/deploys/{i}/events")
    first = await stream.next()
    assert first["event"] == "deploy" and first["data"]["state"] == "running"
    assert first["data"]["id"] == i and first["retry"] == "2000"  # reconnect after 2 s
    stored = [await stream.next(), await stream.next()]
    rows = site.records.log_lines(i)
    assert [(e["event"], int(e["id"])) for e in stored] == [("line", r.id) for r in rows]
    assert [e["data"]["line"] for e in stored] == ["one", "two"]
    assert stored[0]["data"] == {"id": rows[0].id, "ts": rows[0].ts, "step": "build", "line": "one"}
    # A line written now is pushed (no poll of the log: the DeployLog hands it over).
    written = time.monotonic()
    dlog.write("<three>", "parse")
    pushed = await stream.next()
    delay = time.monotonic() - written
    assert pushed["event"] == "line" and pushed["data"]["line"] == "<three>"
    assert pushed["data"]["step"] == "parse"
    print(f"\nline written -> event received: {delay * 1000:.1f} ms")
    assert delay < 1.0
    # A state change: a `deploy` event, then `end` when the log closes.
    site.records.step_started(i, "parse")
    changed = await stream.until("deploy")
    assert changed["data"]["step"] == "parse"
    site.records.transition(i, "running", "succeeded")
    dlog.close()
    last = await stream.until("deploy")
    assert last["data"]["state"] == "succeeded"
    assert (await stream.next())["event"] == "end"
    assert (await stream.next())["closed"]
    await until(lambda: site.dash.live.streams == 0)


async def test_a_reconnect_resumes_after_the_last_line_it_had(site: Site) -> None:
    lines = tuple(("build", f"line {n}") for n in range(5))
    i = seed(site.records, state="failed", lines=lines)
    rows = site.records.log_lines(i)
    for how in ({"headers": {"Last-Event-ID": str(rows[1].id)}}, {"query": f"?after={rows[1].id}"}):
        path = f"/deploys/{i}/events{how.get('query', '')}"
        stream = await open_events(site, path, **how.get("headers", {}))
        assert (await stream.next())["event"] == "deploy"
        got = [await stream.next() for _ in range(3)]
        assert [int(e["id"]) for e in got] == [r.id for r in rows[2:]]
        assert (await stream.next())["event"] == "end"
    # Last-Event-ID (what EventSource sends on reconnect) wins over the URL's ?after=.
    stream = await open_events(
        site, f"/deploys/{i}/events?after={rows[0].id}", **{"Last-Event-ID": str(rows[3].id)}
    )
    await stream.next()
    assert int((await stream.next())["id"]) == rows[4].id


@pytest.mark.parametrize("after", ["-1", "abc", "1.5", "9" * 30])
async def test_a_bad_resume_point_is_refused_in_one_line(site: Site, after: str) -> None:
    i = seed(site.records, state="failed")
    resp = await site.client.get(f"/deploys/{i}/events?after={after}")
    assert resp.status == 400
    assert "must be a whole number" in await resp.text()


async def test_a_quiet_stream_sends_heartbeats(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_mod, "HEARTBEAT_SECONDS", 0.1)
    monkeypatch.setattr(live_mod, "STATE_SECONDS", 0.05)
    i = seed(site.records, state="running")
    site.logs[i] = DeployLog(site.records, i)
    stream = await open_events(site, f"/deploys/{i}/events")
    assert (await stream.next())["event"] == "deploy"
    assert await stream.next(timeout=2) == {"comment": "keepalive"}
    site.logs[i].close()


async def test_a_client_that_stops_reading_is_dropped_and_can_resume(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live_mod, "MAX_PENDING", 50)
    monkeypatch.setattr(live_mod, "WRITE_TIMEOUT_SECONDS", 0.5)
    i = seed(site.records, state="running")
    dlog = DeployLog(site.records, i)
    site.logs[i] = dlog
    stalled = await site.client.get(f"/deploys/{i}/events")  # and never read from
    assert stalled.status == 200
    await until(lambda: site.dash.live.streams == 1)
    # Far more than loopback's socket buffers hold (about 20 MB of events).
    for n in range(10_000):
        dlog.write(f"{n} " + "y" * 1990)
    await asyncio.to_thread(dlog.flush)
    await until(lambda: site.dash.live.streams == 0, timeout=20)
    stalled.close()
    # What it missed is in the records: a reconnect resumes from its last line.
    rows = site.records.log_lines(i)
    assert len(rows) == 10_000
    stream = await open_events(site, f"/deploys/{i}/events", **{"Last-Event-ID": str(rows[-2].id)})
    assert (await stream.next())["event"] == "deploy"
    assert int((await stream.next())["id"]) == rows[-1].id
    dlog.close()
    assert (await stream.until("end"))["event"] == "end"
