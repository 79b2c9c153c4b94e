"""Signing in to the dashboard of a real `deployd serve`: the real OpenSSH client runs
`login`, an aiohttp client follows the link it prints, keeps the session cookie, and
the session ends when the key is removed and the daemon gets SIGHUP.

(The commit status's signed link of a real webhook deploy is checked in
tests/http/test_webhook_server.py; the browser's view in test_browser.py.)
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from daemon.web import identity
from tests.support.sshserver import Server, make_server
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration

URL = re.compile(r"^  (http://127\.0\.0\.1:\d+/login/[A-Za-z0-9_-]{43})$", re.MULTILINE)


@pytest.fixture
def server(tmp_path: Path, testenv: Infra) -> Iterator[Server]:
    srv = make_server(tmp_path / "srv", testenv)
    srv.start()
    yield srv
    srv.stop()


def login_url(srv: Server, key: str) -> str:
    """What `ssh -p PORT git@HOST login` prints for `key`: its link."""
    proc = srv.ssh("login", key=key)
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout.startswith(
        f"Open this link within 5 minutes to sign in to the dashboard as {key}\n"
    )
    found = URL.search(proc.stdout)
    assert found, proc.stdout
    assert found.group(1).startswith(f"http://127.0.0.1:{srv.http_port}/login/")
    return found.group(1)


async def signed_in_as(http: aiohttp.ClientSession, srv: Server, cookie: str) -> str | None:
    """Who /signin says is signed in with `cookie` (None: nobody)."""
    async with http.get(
        f"http://127.0.0.1:{srv.http_port}/signin",
        headers={"Cookie": f"{identity.COOKIE}={cookie}"},
    ) as answer:
        assert answer.status == 200
        found = re.search(r"You are signed in as <strong>([^<]+)</strong>", await answer.text())
        return found.group(1) if found else None


async def overview(
    http: aiohttp.ClientSession, srv: Server, cookie: str | None
) -> tuple[int, str | None]:
    """The overview's status with `cookie` (None: without one), and where it redirects."""
    headers = {"Cookie": f"{identity.COOKIE}={cookie}"} if cookie is not None else {}
    async with http.get(
        f"http://127.0.0.1:{srv.http_port}/", headers=headers, allow_redirects=False
    ) as answer:
        location = answer.headers.get("Location")
        return answer.status, urllib.parse.urlsplit(location).path if location else None


def db(srv: Server) -> sqlite3.Connection:
    return sqlite3.connect(srv.state_dir / "deployd.db")


async def test_login_link_session_single_use_and_key_removal(server: Server) -> None:
    key_file = server.state_dir / "web.key"
    assert len(key_file.read_bytes()) == 32 and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    url = await asyncio.to_thread(login_url, server, "alice")
    token = url.rsplit("/", 1)[1]
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(url, allow_redirects=False) as answer:
            assert answer.status == 303 and answer.headers["Location"] == "/"
            raw = answer.headers["Set-Cookie"]
            cookie = answer.cookies[identity.COOKIE].value
        attrs = {a.strip().lower() for a in raw.split(";")[1:]}
        assert attrs == {"httponly", "max-age=43200", "path=/", "samesite=lax"}
        assert await signed_in_as(http, server, cookie) == "alice"
        assert await overview(http, server, cookie) == (200, None)
        assert await overview(http, server, None) == (303, "/signin")
        # The link works once.
        async with http.get(url, allow_redirects=False) as again:
            assert again.status == 403 and "Set-Cookie" not in again.headers
            assert "used already or expired" in await again.text()
        # A second key's session, for after alice's removal.
        async with http.get(
            await asyncio.to_thread(login_url, server, "bob"), allow_redirects=False
        ) as answer:
            bob = answer.cookies[identity.COOKIE].value
        # Nothing secret reached the daemon's log.
        log = server.log()
        assert "dashboard: key alice signed in" in log
        assert token not in log and cookie not in log and bob not in log

        # alice's key is removed; SIGHUP.
        text = server.config.read_text()
        without = re.sub(r'\[\[key\]\]\nname = "alice"\n.*?(?=\n\[|\Z)', "", text, flags=re.DOTALL)
        assert without != text and 'name = "bob"' in without
        server.config.write_text(without)
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(server.ssh, "help", key="alice")).returncode != 255:
            assert time.monotonic() < deadline, server.log()
            await asyncio.sleep(0.2)
        assert await signed_in_as(http, server, cookie) is None
        assert await overview(http, server, cookie) == (303, "/signin")
        assert await signed_in_as(http, server, bob) == "bob"
        with db(server) as conn:
            assert [r[0] for r in conn.execute("SELECT key_name FROM web_sessions")] == ["bob"]


async def test_expired_and_garbage_links_and_cookies_are_refused(server: Server) -> None:
    url = await asyncio.to_thread(login_url, server, "bob")
    with db(server) as conn:
        conn.execute("UPDATE web_logins SET expires_at = ?", [time.time() - 1])
    base = f"http://127.0.0.1:{server.http_port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(url, allow_redirects=False) as answer:
            assert answer.status == 403 and "Set-Cookie" not in answer.headers
            assert await answer.text() == (
                "this sign-in link was used already or expired; "
                f"run `ssh -p {server.ssh_port} git@HOST login` for a new one.\n"
            )
        for path in ("/login/" + "A" * 3000, "/login/%ff%fe", "/login/" + "A" * 43):
            async with http.get(base + path, allow_redirects=False) as answer:
                assert answer.status == 403, path[:40]
        for cookie in ("A" * 43, "x" * 6000, '"\\\\;,'):
            assert await signed_in_as(http, server, cookie) is None
        # A signed link that was tampered with, or has expired; one used on another page.
        secret = (server.state_dir / "web.key").read_bytes()
        expired = identity.sign(secret, 1, int(time.time()) - 60)
        good = identity.sign(secret, 1, int(time.time()) + 60)
        for path, reason in (
            (f"/deploys/1?{expired}", identity.LINK_EXPIRED),
            (f"/deploys/2?{good}", identity.LINK_BAD),
            (f"/?{good}", identity.LINK_ONLY),
        ):
            async with http.get(base + path, allow_redirects=False) as answer:
                assert (answer.status, await answer.text()) == (403, reason + "\n"), path
        async with http.get(base + "/healthz") as answer:
            assert answer.status == 200  # still serving


async def test_sessions_and_the_signing_key_survive_a_restart(server: Server) -> None:
    secret = (server.state_dir / "web.key").read_bytes()
    url = await asyncio.to_thread(login_url, server, "root")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(url, allow_redirects=False) as answer:
            cookie = answer.cookies[identity.COOKIE].value
        assert await asyncio.to_thread(server.stop) == 0
        server.notes.clear()
        await asyncio.to_thread(server.start)
        assert (server.state_dir / "web.key").read_bytes() == secret
        assert await signed_in_as(http, server, cookie) == "root"
