"""Sign-in with an SSH key, sessions, signed status links and CSRF, in process: real SQLite
records in tmp_path, the real aiohttp server on loopback (pytest-aiohttp's client) around
the identity middleware and its routes, and the real asyncssh server for `login`.

What the real OpenSSH client and `deployd serve` do is in test_identity_server.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from aiohttp import DummyCookieJar, web
from aiohttp.test_utils import TestClient

from daemon.adapters import websessions
from daemon.config import Settings
from daemon.core.deploys import Options
from daemon.ssh import server
from daemon.web import identity
from daemon.web.identity import Identity
from daemon.web.viewer import VIEWER, Viewer
from tests.support.sshworld import SSHWorld

Client = TestClient[web.Request, web.Application]


@dataclasses.dataclass
class Rig:
    """An Identity over SSHWorld's settings and records, the settings swappable (SIGHUP)."""

    world: SSHWorld
    settings: Settings
    secret: bytes
    identity: Identity
    client: Client
    deploy_id: int  # a webhook deploy of prod

    def login(self, key: str = "alice") -> str:
        """The token of a fresh sign-in link for `key`."""
        url, seconds = self.identity.login_url(self._key(key))
        assert seconds == 300
        return url.rsplit("/", 1)[1]

    def _key(self, name: str) -> Any:
        return next(k for k in self.settings.keys if k.name == name)

    async def signed_in(self, key: str = "alice") -> str:
        """Sign `key` in; the session cookie's value."""
        answer = await self.client.get(f"/login/{self.login(key)}", allow_redirects=False)
        assert answer.status == 303, await answer.text()
        return answer.cookies[identity.COOKIE].value

    async def who(self, path: str = "/whoami", cookie: str | None = None) -> Any:
        headers = {"Cookie": f"{identity.COOKIE}={cookie}"} if cookie is not None else {}
        answer = await self.client.get(path, headers=headers)
        assert answer.status == 200, await answer.text()
        return await answer.json()

    def swap(self, **server: Any) -> None:
        """Change [server] settings the way a restart would."""
        self.settings = dataclasses.replace(
            self.settings, server=dataclasses.replace(self.settings.server, **server)
        )


def _viewer_json(request: web.Request) -> web.Response:
    viewer: Viewer | None = request[VIEWER]
    if viewer is None:
        return web.json_response(None)
    return web.json_response(
        {
            "name": viewer.name,
            "key": viewer.key.name if viewer.key else None,
            "session": viewer.session,
            "csrf": viewer.csrf,
            "link_deploy": viewer.link_deploy,
            "link_deployment": viewer.link_deployment,
            "link_query": viewer.link_query,
        }
    )


async def _probe(request: web.Request) -> web.Response:
    return _viewer_json(request)


@pytest.fixture
async def rig(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> AsyncIterator[Rig]:
    w = SSHWorld(tmp_path)
    secret = identity.ensure_secret(w.state_dir / "web.key")
    holder: list[Rig] = []
    ident = Identity(lambda: holder[0].settings, w.records, secret)
    app = web.Application(middlewares=[ident.middleware])
    app.add_routes(ident.routes())
    app.add_routes(
        [
            web.get("/whoami", _probe),
            web.get("/deploys/{id}", _probe),
            web.get("/deploys/{id}/events", _probe),
            web.post("/deploys/{id}/rollback", _probe),
            web.get("/api/deploys/{id}", _probe),
        ]
    )
    deploy_id = w.records.create_deploy(
        deployment="prod",
        trigger="webhook",
        actor="github:ada",
        ref="refs/heads/main",
        options=Options(),
        pid=os.getpid(),
    )
    client = await aiohttp_client(app, cookie_jar=DummyCookieJar())  # cookies sent by hand
    holder.append(Rig(w, w.settings, secret, ident, client, deploy_id))
    yield holder[0]
    w.close()


# -- the signing key ------------------------------------------------------------


def test_the_signing_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "web.key"
    first = identity.ensure_secret(path)
    assert len(first) == 32 and path.read_bytes() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert identity.ensure_secret(path) == first
    assert [p.name for p in tmp_path.iterdir()] == ["web.key"]  # no temporary file left


def test_processes_starting_at_once_end_up_with_one_key(tmp_path: Path) -> None:
    path = tmp_path / "web.key"
    got: list[bytes] = []
    barrier = threading.Barrier(8)

    def make() -> None:
        barrier.wait()
        got.append(identity.ensure_secret(path))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1 and got[0] == path.read_bytes()


def test_a_damaged_key_stops_start_up_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "web.key"
    path.write_bytes(b"short")
    with pytest.raises(identity.SecretError, match=r"holds 5 bytes, not 32: delete it"):
        identity.ensure_secret(path)


def test_a_key_readable_by_others_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "web.key"
    path.write_bytes(b"k" * 32)
    path.chmod(0o644)
    assert identity.ensure_secret(path) == b"k" * 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- signed links and CSRF tokens (pure) ------------------------------------------


def test_a_signed_link_holds_for_its_deploy_until_it_expires() -> None:
    secret = b"s" * 32
    query = identity.sign(secret, 41, 2000)
    exp, sig = re.fullmatch(r"exp=(\d+)&sig=([0-9a-f]{64})", query).groups()  # type: ignore[union-attr]
    assert exp == "2000"
    assert identity.check_link(secret, 41, exp, sig, 1999.0) is None
    assert identity.check_link(secret, 41, exp, sig, 2000.0) == identity.LINK_EXPIRED
    assert identity.check_link(secret, 42, exp, sig, 1999.0) == identity.LINK_BAD
    assert identity.check_link(secret, 41, "2001", sig, 1999.0) == identity.LINK_BAD
    assert identity.check_link(b"t" * 32, 41, exp, sig, 1999.0) == identity.LINK_BAD
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    assert identity.check_link(secret, 41, exp, flipped, 1999.0) == identity.LINK_BAD


@pytest.mark.parametrize(
    ("exp", "sig"),
    [
        ("", ""),
        ("2000", "x" * 64),
        ("2000", "A" * 64),
        ("2000", "a" * 63),
        ("2000", "a" * 100000),
        ("9" * 5000, "a" * 64),
        ("-1", "a" * 64),
        ("20e3", "a" * 64),
        ("\uff12\uff10\uff10\uff10", "a" * 64),  # fullwidth digits: int() would take them
    ],
)
def test_malformed_links_are_refused_by_shape(exp: str, sig: str) -> None:
    assert identity.check_link(b"s" * 32, 41, exp, sig, 0.0) == identity.LINK_BAD


def test_csrf_tokens_are_per_session_and_per_key() -> None:
    one = identity.csrf_token(b"s" * 32, "session-1")
    assert re.fullmatch(r"[0-9a-f]{64}", one)
    assert one == identity.csrf_token(b"s" * 32, "session-1")
    assert one != identity.csrf_token(b"s" * 32, "session-2")
    assert one != identity.csrf_token(b"t" * 32, "session-1")


def test_a_session_is_bound_to_the_key_not_its_comment() -> None:
    assert identity.key_blob("ssh-ed25519 AAAAC3Nz alice@laptop") == "ssh-ed25519 AAAAC3Nz"
    assert identity.key_blob("  ssh-ed25519   AAAAC3Nz  ") == "ssh-ed25519 AAAAC3Nz"


# -- tokens and sessions in SQLite ----------------------------------------------------


@pytest.fixture
def world(tmp_path: Path) -> Iterator[SSHWorld]:
    w = SSHWorld(tmp_path)
    yield w
    w.close()


def _db(w: SSHWorld) -> sqlite3.Connection:
    return sqlite3.connect(w.state_dir / "deployd.db")


def test_only_hashes_of_tokens_and_cookies_are_stored(world: SSHWorld) -> None:
    websessions.add_login(world.records, "T" * 43, "alice", "ssh-ed25519 AAAA", 300)
    websessions.add_session(world.records, "sid", "C" * 43, "alice", "ssh-ed25519 AAAA", 60)
    with _db(world) as conn:
        dump = "\n".join(conn.iterdump())
    assert "T" * 43 not in dump and "C" * 43 not in dump
    assert websessions.digest("T" * 43) in dump and websessions.digest("C" * 43) in dump


def test_a_token_is_redeemed_once(world: SSHWorld) -> None:
    websessions.add_login(world.records, "T" * 43, "alice", "ssh-ed25519 AAAA", 300)
    assert websessions.redeem_login(world.records, "U" * 43) is None
    assert websessions.redeem_login(world.records, "T" * 43) == ("alice", "ssh-ed25519 AAAA")
    assert websessions.redeem_login(world.records, "T" * 43) is None


def test_of_many_redeeming_one_token_at_once_exactly_one_gets_in(world: SSHWorld) -> None:
    websessions.add_login(world.records, "T" * 43, "alice", "ssh-ed25519 AAAA", 300)
    # Another connection to the same file, as a second process would have.
    other = type(world.records)(world.state_dir / "deployd.db")
    barrier = threading.Barrier(8)
    wins: list[object] = []

    def redeem(i: int) -> None:
        barrier.wait()
        got = websessions.redeem_login(world.records if i % 2 else other, "T" * 43)
        if got is not None:
            wins.append(got)

    threads = [threading.Thread(target=redeem, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert wins == [("alice", "ssh-ed25519 AAAA")]


def test_an_expired_token_is_refused_and_pruned(world: SSHWorld) -> None:
    websessions.add_login(world.records, "T" * 43, "alice", "ssh-ed25519 AAAA", 0.05)
    time.sleep(0.1)
    assert websessions.redeem_login(world.records, "T" * 43) is None
    with _db(world) as conn:
        assert conn.execute("SELECT COUNT(*) FROM web_logins").fetchone() == (0,)


def test_sessions_expire_and_are_pruned(world: SSHWorld) -> None:
    websessions.add_session(world.records, "old", "O" * 43, "alice", "ssh-ed25519 AAAA", 0.05)
    websessions.add_session(world.records, "new", "N" * 43, "bob", "ssh-ed25519 BBBB", 60)
    time.sleep(0.1)
    assert websessions.session(world.records, "O" * 43) is None
    live = websessions.session(world.records, "N" * 43)
    assert live is not None and (live.id, live.key_name) == ("new", "bob")
    websessions.add_login(world.records, "T" * 43, "alice", "ssh-ed25519 AAAA", 300)  # prunes
    with _db(world) as conn:
        assert conn.execute("SELECT id FROM web_sessions").fetchall() == [("new",)]


# -- the middleware and the routes, over a real aiohttp server ----------------------------


async def test_a_login_link_starts_a_session_with_the_keys_permissions(rig: Rig) -> None:
    answer = await rig.client.get(f"/login/{rig.login('alice')}", allow_redirects=False)
    assert answer.status == 303 and answer.headers["Location"] == "/"
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    [raw] = answer.headers.getall("Set-Cookie")
    attrs = [a.strip() for a in raw.split(";")]
    name, value = attrs[0].split("=", 1)
    assert name == "deployd_session" and re.fullmatch(r"[A-Za-z0-9_-]{43}", value)
    assert {a.lower() for a in attrs[1:]} == {
        "httponly",
        "max-age=43200",
        "path=/",
        "samesite=lax",
    }  # and not Secure: public_url is not https
    me = await rig.who(cookie=value)
    assert (me["key"], me["name"], me["link_deploy"]) == ("alice", "alice", None)
    assert me["csrf"] == identity.csrf_token(rig.secret, me["session"])
    # No cookie: nobody.
    assert await rig.who() is None


async def test_the_cookie_is_secure_under_an_https_public_url(rig: Rig) -> None:
    rig.swap(public_url="https://deploy.example.com/deployd", session_seconds=600)
    answer = await rig.client.get(f"/login/{rig.login()}", allow_redirects=False)
    assert answer.status == 303 and answer.headers["Location"] == "/deployd/"
    raw = answer.headers["Set-Cookie"].lower()
    assert "; secure" in raw and "max-age=600" in raw and "path=/" in raw


async def test_a_login_link_works_once(rig: Rig) -> None:
    token = rig.login()
    first = await rig.client.get(f"/login/{token}", allow_redirects=False)
    assert first.status == 303
    again = await rig.client.get(f"/login/{token}", allow_redirects=False)
    assert again.status == 403 and "Set-Cookie" not in again.headers
    assert await again.text() == (
        "this sign-in link was used already or expired; "
        "run `ssh -p 2222 git@HOST login` for a new one.\n"
    )


async def test_a_head_request_does_not_use_the_link_up(rig: Rig) -> None:
    token = rig.login()
    assert (await rig.client.head(f"/login/{token}", allow_redirects=False)).status == 405
    assert (await rig.client.get(f"/login/{token}", allow_redirects=False)).status == 303


async def test_an_expired_login_link_is_refused(rig: Rig) -> None:
    token = rig.login()
    with _db(rig.world) as conn:
        conn.execute("UPDATE web_logins SET expires_at = ?", [time.time() - 1])
    answer = await rig.client.get(f"/login/{token}", allow_redirects=False)
    assert answer.status == 403 and "used already or expired" in await answer.text()


@pytest.mark.parametrize(
    "token",
    [
        "x",
        "A" * 42,
        "A" * 44,
        "A" * 5000,
        "%00" * 20,
        "..%2F..%2Fetc%2Fpasswd",
        "é" * 43,
        "A" * 42 + "=",
    ],
)
async def test_malformed_login_tokens_get_a_clean_refusal(rig: Rig, token: str) -> None:
    answer = await rig.client.get(f"/login/{token}", allow_redirects=False)
    assert answer.status in (403, 404), await answer.text()
    text = await answer.text()
    assert text.count("\n") <= 1 and "Traceback" not in text
    assert (await rig.client.get("/whoami")).status == 200  # still serving


async def test_removing_the_key_ends_its_sessions(rig: Rig) -> None:
    alice, bob = await rig.signed_in("alice"), await rig.signed_in("bob")
    rig.settings = dataclasses.replace(
        rig.settings, keys=tuple(k for k in rig.settings.keys if k.name != "alice")
    )  # what SIGHUP installs
    assert await rig.who(cookie=alice) is None
    assert (await rig.who(cookie=bob))["key"] == "bob"
    with _db(rig.world) as conn:
        assert [r[0] for r in conn.execute("SELECT key_name FROM web_sessions")] == ["bob"]


async def test_a_key_name_given_to_another_public_key_ends_the_session(rig: Rig) -> None:
    alice = await rig.signed_in("alice")
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    rig.settings = dataclasses.replace(
        rig.settings,
        keys=tuple(
            dataclasses.replace(k, public_key=other) if k.name == "alice" else k
            for k in rig.settings.keys
        ),
    )
    assert await rig.who(cookie=alice) is None


async def test_a_login_link_of_a_key_removed_since_signs_nobody_in(rig: Rig) -> None:
    token = rig.login("alice")
    rig.settings = dataclasses.replace(
        rig.settings, keys=tuple(k for k in rig.settings.keys if k.name != "alice")
    )
    answer = await rig.client.get(f"/login/{token}", allow_redirects=False)
    assert answer.status == 403 and "Set-Cookie" not in answer.headers
    assert await answer.text() == "key alice is no longer configured; it cannot sign in.\n"


@pytest.mark.parametrize(
    "cookie",
    [
        "",
        "x",
        "A" * 43,  # the right shape, no such session
        "A" * 7000,
        '"quoted;value"',
        "\\x00\\xff",
        "Ω" * 43,
    ],
)
async def test_garbage_cookies_are_nobody(rig: Rig, cookie: str) -> None:
    assert await rig.who(cookie=cookie) is None


async def test_a_cookie_too_big_for_a_header_is_refused_cleanly(rig: Rig) -> None:
    answer = await rig.client.get(
        "/whoami", headers={"Cookie": f"{identity.COOKIE}={'A' * 100_000}"}
    )
    assert answer.status in (400, 431)
    assert await rig.who() is None  # still serving


async def test_logout_needs_the_sessions_csrf_token(rig: Rig) -> None:
    cookie = await rig.signed_in()
    me = await rig.who(cookie=cookie)
    headers = {"Cookie": f"{identity.COOKIE}={cookie}"}
    for body in (
        {},
        {"csrf": ""},
        {"csrf": "0" * 64},
        {"csrf": identity.csrf_token(rig.secret, "x")},
    ):
        answer = await rig.client.post("/logout", data=body, headers=headers, allow_redirects=False)
        assert answer.status == 403
        assert await answer.text() == identity.CSRF_REFUSED + "\n"
    assert (await rig.who(cookie=cookie))["key"] == "alice"
    big = await rig.client.post(
        "/logout", data={"csrf": me["csrf"], "pad": "x" * 10000}, headers=headers
    )
    assert big.status == 403  # too big a form is no form
    answer = await rig.client.post(
        "/logout", data={"csrf": me["csrf"]}, headers=headers, allow_redirects=False
    )
    assert answer.status == 303 and answer.headers["Location"] == "/signin"
    assert answer.cookies[identity.COOKIE].value == ""
    assert await rig.who(cookie=cookie) is None


async def test_logout_without_a_session_is_refused(rig: Rig) -> None:
    answer = await rig.client.post("/logout", data={"csrf": "x"}, allow_redirects=False)
    assert (answer.status, await answer.text()) == (403, "you are not signed in.\n")


async def test_signin_says_how_and_who(rig: Rig) -> None:
    rig.swap(public_url="https://deploy.example.com", ssh_listen="0.0.0.0:2299")
    page = await rig.client.get("/signin")
    text = await page.text()
    assert page.status == 200 and page.content_type == "text/html"
    assert "<code>ssh -p 2299 git@deploy.example.com login</code>" in text
    assert "signed in as" not in text
    cookie = await rig.signed_in()
    page = await rig.client.get("/signin", headers={"Cookie": f"{identity.COOKIE}={cookie}"})
    assert "You are signed in as <strong>alice</strong>" in await page.text()


async def test_a_signed_link_shows_one_deploy_and_its_events(rig: Rig) -> None:
    query = rig.identity.status_query(rig.deploy_id)
    expires = int(re.search(r"exp=(\d+)", query).group(1))  # type: ignore[union-attr]
    assert abs(expires - (time.time() + 30 * 86400)) < 5
    for path in (f"/deploys/{rig.deploy_id}", f"/deploys/{rig.deploy_id}/events"):
        me = await rig.who(f"{path}?{query}")
        assert me == {
            "name": "status link",
            "key": None,
            "session": "",
            "csrf": "",
            "link_deploy": rig.deploy_id,
            "link_deployment": "prod",
            "link_query": query,
        }
    viewer = Viewer(None, link_deploy=rig.deploy_id, link_deployment="prod")
    assert viewer.may_read("prod", rig.deploy_id) and not viewer.may_read("prod", 999)
    assert not viewer.may_rollback("prod") and not viewer.csrf_ok("")


async def test_a_signed_link_opens_nothing_else(rig: Rig) -> None:
    query = rig.identity.status_query(rig.deploy_id)
    for method, path in (
        ("GET", "/whoami"),
        ("GET", "/signin"),
        ("GET", f"/deploys/{rig.deploy_id}/rollback"),
        ("POST", f"/deploys/{rig.deploy_id}/rollback"),
        ("POST", f"/deploys/{rig.deploy_id}"),
        ("GET", "/deployments/prod"),
    ):
        answer = await rig.client.request(method, f"{path}?{query}")
        assert answer.status == 403, (method, path)
        assert await answer.text() == identity.LINK_ONLY + "\n"


async def test_tampered_and_expired_links_are_refused(rig: Rig) -> None:
    good = rig.identity.status_query(rig.deploy_id)
    other = rig.identity.status_query(rig.deploy_id + 1)
    expired = identity.sign(rig.secret, rig.deploy_id, int(time.time()) - 60)
    path = f"/deploys/{rig.deploy_id}"
    cases = {
        f"{path}?{other}": identity.LINK_BAD,  # another deploy's signature
        f"{path}?{good.replace('exp=', 'exp=1')}": identity.LINK_BAD,
        f"{path}?{good[:-2]}": identity.LINK_BAD,
        f"{path}?exp=1": identity.LINK_BAD,
        f"{path}?sig={'0' * 64}": identity.LINK_BAD,
        f"{path}?{good}&sig={'0' * 64}": identity.LINK_BAD,  # two: neither counts
        f"{path}?{good}&{good}": identity.LINK_BAD,
        f"{path}?{expired}": identity.LINK_EXPIRED,
        f"{path}?exp={'9' * 5000}&sig=x": identity.LINK_BAD,
        f"{path}?exp=%ff&sig=%00": identity.LINK_BAD,
        f"{path}?exp=&sig=": identity.LINK_BAD,
    }
    for url, reason in cases.items():
        answer = await rig.client.get(url)
        assert (answer.status, await answer.text()) == (403, reason + "\n"), url[:80]


async def test_turned_off_links_ask_for_a_sign_in(rig: Rig) -> None:
    query = rig.identity.status_query(rig.deploy_id)
    rig.swap(signed_status_links=False)
    assert rig.identity.status_query(rig.deploy_id) == ""
    answer = await rig.client.get(f"/deploys/{rig.deploy_id}?{query}")
    assert (answer.status, await answer.text()) == (403, identity.LINKS_OFF + "\n")
    cookie = await rig.signed_in()  # signed in, the link's query is no matter
    me = await rig.who(f"/deploys/{rig.deploy_id}?{query}", cookie=cookie)
    assert me["key"] == "alice"


async def test_a_signed_in_key_that_may_read_it_gets_its_full_page(rig: Rig) -> None:
    query = rig.identity.status_query(rig.deploy_id)
    alice, bob = await rig.signed_in("alice"), await rig.signed_in("bob")
    assert (await rig.who(f"/deploys/{rig.deploy_id}?{query}", cookie=alice))["key"] == "alice"
    # bob may not read prod: the link shows him what it shows anyone.
    as_bob = await rig.who(f"/deploys/{rig.deploy_id}?{query}", cookie=bob)
    assert (as_bob["key"], as_bob["link_deploy"]) == (None, rig.deploy_id)


async def test_nothing_secret_is_logged(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    token = rig.login()
    answer = await rig.client.get(f"/login/{token}", allow_redirects=False)
    cookie = answer.cookies[identity.COOKIE].value
    me = await rig.who(cookie=cookie)
    await rig.client.post(
        "/logout", data={"csrf": me["csrf"]}, headers={"Cookie": f"{identity.COOKIE}={cookie}"}
    )
    # (The daemon's own loggers: `deployd serve` runs aiohttp without an access log.)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("daemon"))
    assert "key alice signed in" in text and "key alice signed out" in text
    for secret in (token, cookie, me["csrf"], me["session"]):
        assert secret not in text


# -- `ssh ... login` ----------------------------------------------------------------


@pytest.fixture
async def ssh_rig(rig: Rig) -> AsyncIterator[Rig]:
    rig.world.state.login = rig.identity.login_url
    host_key = rig.world.state_dir / "ssh_host_ed25519_key"
    server.ensure_host_key(host_key)
    acceptor = await server.start(rig.world.state, "127.0.0.1", 0, host_key)
    rig.world.port = acceptor.get_port()
    yield rig
    acceptor.close()
    await acceptor.wait_closed()


async def _ssh(w: SSHWorld, command: str, key: str) -> Any:
    async with asyncssh.connect(
        "127.0.0.1",
        w.port,
        username="git",
        client_keys=[w.keys[key]],
        known_hosts=None,
        config=None,
        agent_path=None,
    ) as conn:
        return await conn.run(command)


async def test_any_configured_key_gets_a_login_link_over_ssh(ssh_rig: Rig) -> None:
    for key in ("alice", "bob", "root"):
        result = await _ssh(ssh_rig.world, "login", key)
        assert (result.exit_status, result.stderr) == (0, "")
        lines = result.stdout.splitlines()
        assert lines[0] == (f"Open this link within 5 minutes to sign in to the dashboard as {key}")
        [url] = re.findall(r"http://\S+", result.stdout)
        assert url.startswith("http://127.0.0.1:8080/login/")
        answer = await ssh_rig.client.get("/login/" + url.rsplit("/", 1)[1], allow_redirects=False)
        me = await ssh_rig.who(cookie=answer.cookies[identity.COOKIE].value)
        assert me["key"] == key
    refused = await _ssh(ssh_rig.world, "login now", "alice")
    assert refused.exit_status == 1 and "unknown command 'login'" in refused.stderr


def test_help_mentions_login() -> None:
    from daemon import views

    assert "  ssh -p 2222 git@HOST login                  a one-time link to the dashboard" in (
        views.help_lines("2222")
    )


def test_the_server_settings_have_their_defaults_and_checks(tmp_path: Path) -> None:
    from daemon import config
    from daemon.errors import ConfigError

    base = f'[server]\nstate_dir = "{tmp_path / "state"}"\n'
    path = tmp_path / "deployd.toml"
    path.write_text(base)
    s = config.load(path).server
    assert (s.session_seconds, s.status_link_seconds, s.signed_status_links) == (
        43200,
        30 * 86400,
        True,
    )
    path.write_text(
        base + "session_seconds = 3600\nstatus_link_seconds = 86400\nsigned_status_links = false\n"
    )
    s = config.load(path).server
    assert (s.session_seconds, s.status_link_seconds, s.signed_status_links) == (
        3600,
        86400,
        False,
    )
    for bad, message in (
        ("session_seconds = 0", "server.session_seconds: must be at least 60, not 0."),
        ('status_link_seconds = "1d"', "server.status_link_seconds"),
        ('signed_status_links = "yes"', "server.signed_status_links"),
    ):
        path.write_text(base + bad + "\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            config.load(path)


async def test_the_api_is_left_alone(rig: Rig) -> None:
    """The API has its own token: a session cookie or a link's query means nothing there."""
    cookie = await rig.signed_in("alice")
    assert await rig.who("/api/deploys/1", cookie) is None
    answer = await rig.client.get("/api/deploys/1?exp=1&sig=00")
    assert answer.status == 200 and await answer.json() is None
