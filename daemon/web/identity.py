"""Who is looking: sign-in with an SSH key, browser sessions, signed status links, CSRF.

`ssh ... login` asks Identity.login_url for a one-time URL; GET /login/TOKEN
redeems it (once, within LOGIN_SECONDS) for a session cookie that carries the
key's permissions. No user database: on every request the session's key must
still be in the *current* config with the same public key, so removing a key
(and SIGHUP) ends its sessions. Commit statuses link to `/deploys/ID?exp=&sig=`,
an HMAC over the deploy id and expiry with a key kept in `state_dir/web.key`:
such a link shows that one deploy (and its event stream) and allows nothing
else. The same key makes each session's CSRF token.

Everything a browser sends is hostile until checked: tokens and cookies are
matched by shape before any lookup, secrets are compared in constant time, and
no token, cookie or signature is ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from daemon.adapters import websessions
from daemon.adapters.records import Records, now
from daemon.config import Key, ServerSettings, Settings
from daemon.errors import DeploydError
from daemon.web.viewer import VIEWER, Viewer

log = logging.getLogger(__name__)

COOKIE = "deployd_session"
LOGIN_SECONDS = 300
SECRET_BYTES = 32
SECRET_FILE = "web.key"  # noqa: S105 (a file name) in state_dir: signs sessions' CSRF tokens and status links
MAX_FORM = 4096
CSRF_REFUSED = "the form's CSRF token is missing or wrong; reload the page and try again."
LINKS_OFF = "signed status links are turned off; sign in."
LINK_ONLY = "a status link shows only its deploy's page; sign in to see more or to act."
LINK_BAD = "this status link is not valid (it was changed or cut short); use the link as given."
LINK_EXPIRED = "this status link has expired; sign in to see the deploy."
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
_LINK_PATH = re.compile(r"/deploys/([1-9][0-9]{0,17})(/events)?")
_EXP = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SecretError(DeploydError):
    """state_dir/web.key cannot be made or read."""


def ensure_secret(path: Path) -> bytes:
    """The dashboard's signing key: read it, or make it (0600, atomically) on first start.

    Made under a temporary name and linked into place, so that two processes
    starting at once both end up with the one that won, never with half a file.
    """
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(secrets.token_bytes(SECRET_BYTES))
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another process made it first: use it
            os.link(tmp, path)
    except OSError as exc:
        raise SecretError(f"cannot create {path}: {exc.strerror or exc}.") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    data = path.read_bytes()
    if len(data) != SECRET_BYTES:
        raise SecretError(
            f"{path} holds {len(data)} bytes, not {SECRET_BYTES}: delete it to make a new "
            "key (sessions and signed links made with the old one stop working)."
        )
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return data


def _mac(secret: bytes, message: str) -> str:
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, deploy_id: int, expires: int) -> str:
    """The query of a signed link to one deploy: "exp=UNIX&sig=HEX"."""
    return f"exp={expires}&sig={_mac(secret, f'link:{deploy_id}:{expires}')}"


def signed_query(server: ServerSettings, secret: bytes, deploy_id: int, at: float) -> str:
    """The query of a read-only link to one deploy's page, valid status_link_seconds from
    `at` ('' when [server] signed_status_links is off)."""
    if not server.signed_status_links:
        return ""
    return sign(secret, deploy_id, int(at) + server.status_link_seconds)


def page_url(public_url: str, deploy_id: int, query: str = "") -> str:
    """The deploy's dashboard page under public_url, with a signed link's query ('' when
    no public_url is configured: nobody outside could open it)."""
    if not public_url:
        return ""
    return f"{public_url.rstrip('/')}/deploys/{deploy_id}" + (f"?{query}" if query else "")


def deploy_url(server: ServerSettings, secret: bytes, deploy_id: int, at: float) -> str:
    """The link a commit status or a notification gives: the deploy's page under
    public_url, signed read-only when status links are on ('' without a public_url)."""
    if not server.public_url:
        return ""
    return page_url(server.public_url, deploy_id, signed_query(server, secret, deploy_id, at))


def check_link(secret: bytes, deploy_id: int, exp: str, sig: str, at: float) -> str | None:
    """Why a signed link is refused (tampered, expired), or None if it holds."""
    if not (_EXP.fullmatch(exp) and _SIG.fullmatch(sig)):
        return LINK_BAD
    want = _mac(secret, f"link:{deploy_id}:{exp}")
    if not hmac.compare_digest(want.encode(), sig.encode()):
        return LINK_BAD
    return LINK_EXPIRED if int(exp) <= at else None


def csrf_token(secret: bytes, session_id: str) -> str:
    """What every form of this session must send back: HMAC(secret, "csrf:" + id)."""
    return _mac(secret, f"csrf:{session_id}")


def key_blob(public_key: str) -> str:
    """A public key without its comment ("TYPE BASE64"): what a session is bound to."""
    return " ".join(public_key.split()[:2])


def refusal(reason: str, status: int = 403) -> web.Response:
    """A one-line refusal."""
    return web.Response(status=status, text=reason + "\n", headers={"Cache-Control": "no-store"})


async def read_form(request: web.Request) -> dict[str, str] | None:
    """A small urlencoded form's fields (first value of each); None when over MAX_FORM."""
    body = await request.content.read(MAX_FORM + 1)
    if len(body) > MAX_FORM:
        return None
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=32)
    return {k: v[0] for k, v in fields.items() if v}


def csrf_ok(request: web.Request, form: dict[str, str] | None) -> bool:
    """Whether `form` carries the CSRF token of the request's session."""
    viewer: Viewer | None = request.get(VIEWER)
    return viewer is not None and form is not None and viewer.csrf_ok(form.get("csrf", ""))


NOT_DASHBOARD = ("/api/", "/webhooks/")  # paths the middleware leaves alone


class Identity:
    """Sign-in, sessions and signed links over one state_dir's records and key."""

    def __init__(self, settings: Callable[[], Settings], records: Records, secret: bytes) -> None:
        self._settings = settings
        self.records = records
        self._secret = secret

    # -- what other parts call ------------------------------------------------

    def base_url(self) -> str:
        """Where the dashboard is: public_url, else http://http_listen."""
        server = self._settings().server
        return server.public_url or f"http://{server.http_listen}"

    def login_url(self, key: Key) -> tuple[str, int]:
        """A one-time sign-in URL for `key` and how many seconds it is valid (blocking)."""
        token = secrets.token_urlsafe(SECRET_BYTES)
        websessions.add_login(
            self.records, token, key.name, key_blob(key.public_key), LOGIN_SECONDS
        )
        log.info("dashboard: sign-in link made for key %s", key.name)
        return f"{self.base_url()}/login/{token}", LOGIN_SECONDS

    def status_query(self, deploy_id: int) -> str:
        """The signed query of a commit status's link to `deploy_id` ('' when turned off)."""
        return signed_query(self._settings().server, self._secret, deploy_id, now())

    def deploy_url(self, deploy_id: int) -> str:
        """The link a commit status or a notification gives: the deploy's page, signed."""
        return deploy_url(self._settings().server, self._secret, deploy_id, now())

    def routes(self) -> list[web.RouteDef]:
        """Sign-in, the explanation of it, and sign-out."""
        return [
            # GET only: a HEAD (a link checker's) must not use the token up.
            web.get("/login/{token}", self.login, allow_head=False),
            web.get("/signin", self.signin),
            web.post("/logout", self.logout),
        ]

    # -- the middleware ---------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Put request[VIEWER]: a signed-in key, a signed link's viewer, or None.

        The API, the webhook, /metrics and /healthz have credentials of their own: a
        cookie or a link's query means nothing to them (and costs them no lookup)."""
        if request.path.startswith(NOT_DASHBOARD) or request.path in ("/healthz", "/metrics"):
            request[VIEWER] = None
            return await handler(request)
        link = "exp" in request.query or "sig" in request.query
        viewer = await self._session_viewer(request)
        if link:
            answer = await self._link_viewer(request, viewer)
            if isinstance(answer, web.Response):
                return answer
            viewer = answer
        request[VIEWER] = viewer
        return await handler(request)

    async def _session_viewer(self, request: web.Request) -> Viewer | None:
        cookie = request.cookies.get(COOKIE, "")
        if not _TOKEN.fullmatch(cookie):
            return None
        row = await asyncio.to_thread(websessions.session, self.records, cookie)
        if row is None:
            return None
        key = next((k for k in self._settings().keys if k.name == row.key_name), None)
        if key is None or not hmac.compare_digest(
            key_blob(key.public_key).encode(), row.public_key.encode()
        ):
            log.info(
                "dashboard: a session of key %s ended: that key is no longer configured",
                row.key_name,
            )
            await asyncio.to_thread(websessions.end_session, self.records, row.id)
            return None
        return Viewer(key, session=row.id, csrf=csrf_token(self._secret, row.id))

    async def _link_viewer(
        self, request: web.Request, session: Viewer | None
    ) -> Viewer | web.Response:
        """The viewer of a signed status link, or the refusal of it."""
        m = _LINK_PATH.fullmatch(request.path)
        if m is None or request.method not in ("GET", "HEAD"):
            return refusal(LINK_ONLY)
        deploy_id = int(m.group(1))
        if not self._settings().server.signed_status_links:
            return session if session is not None else refusal(LINKS_OFF)
        exps, sigs = request.query.getall("exp", []), request.query.getall("sig", [])
        if len(exps) != 1 or len(sigs) != 1:  # two of either: which one was meant?
            return refusal(LINK_BAD)
        exp, sig = exps[0], sigs[0]
        reason = check_link(self._secret, deploy_id, exp, sig, now())
        if reason is not None:
            return refusal(reason)
        rec = await asyncio.to_thread(self.records.get, deploy_id)
        deployment = rec.deployment if rec is not None else ""
        if session is not None and session.may_read(deployment):
            return session  # a signed-in key that may read it sees its full page
        return Viewer(
            None,
            link_deploy=deploy_id,
            link_deployment=deployment,
            link_query=f"exp={exp}&sig={sig}",
        )

    # -- the routes ---------------------------------------------------------------

    async def login(self, request: web.Request) -> web.StreamResponse:
        """GET /login/TOKEN: redeem a one-time link for a session cookie, then 303 to /."""
        token = request.match_info["token"]
        if not _TOKEN.fullmatch(token):
            return refusal(self._login_again("this sign-in link is not valid"))
        used = await asyncio.to_thread(websessions.redeem_login, self.records, token)
        if used is None:
            return refusal(self._login_again("this sign-in link was used already or expired"))
        key_name, blob = used
        key = next((k for k in self._settings().keys if k.name == key_name), None)
        if key is None or not hmac.compare_digest(key_blob(key.public_key).encode(), blob.encode()):
            return refusal(f"key {key_name} is no longer configured; it cannot sign in.")
        server = self._settings().server
        cookie, session_id = secrets.token_urlsafe(SECRET_BYTES), secrets.token_hex(16)
        await asyncio.to_thread(
            websessions.add_session,
            self.records,
            session_id,
            cookie,
            key.name,
            blob,
            server.session_seconds,
        )
        log.info("dashboard: key %s signed in", key.name)
        answer = _see_other(self._home())
        answer.set_cookie(
            COOKIE,
            cookie,
            max_age=server.session_seconds,
            path="/",
            secure=self.base_url().startswith("https://"),
            httponly=True,
            samesite="Lax",
        )
        return answer

    async def signin(self, request: web.Request) -> web.Response:
        """GET /signin: how to sign in (there is no password to type here)."""
        viewer: Viewer | None = request.get(VIEWER)
        command = html.escape(self.login_command())
        if viewer is not None and viewer.key is not None:
            state = (
                f"<p>You are signed in as <strong>{html.escape(viewer.name)}</strong>. "
                f'<a href="{html.escape(self._home())}">Go to the overview</a>.</p>'
            )
        else:
            state = ""
        body = _SIGNIN.format(
            command=command,
            minutes=LOGIN_SECONDS // 60,
            state=state,
            home=html.escape(self._home()),
        )
        return web.Response(text=body, content_type="text/html", headers=_PRIVATE)

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """POST /logout (CSRF-checked): end the session, clear the cookie, 303 to /signin."""
        viewer: Viewer | None = request.get(VIEWER)
        form = await read_form(request)
        if viewer is None or viewer.key is None:
            return refusal("you are not signed in.")
        if not csrf_ok(request, form):
            return refusal(CSRF_REFUSED)
        await asyncio.to_thread(websessions.end_session, self.records, viewer.session)
        log.info("dashboard: key %s signed out", viewer.name)
        answer = _see_other(self._home() + "signin")
        answer.del_cookie(COOKIE, path="/")
        return answer

    # -- helpers ----------------------------------------------------------------

    def login_command(self) -> str:
        """The command that prints a sign-in link, with this server's port and host."""
        server = self._settings().server
        port = server.ssh_listen.rpartition(":")[2]
        host = urlsplit(server.public_url).hostname if server.public_url else None
        return f"ssh -p {port} git@{host or 'HOST'} login"

    def _login_again(self, what: str) -> str:
        return f"{what}; run `{self.login_command()}` for a new one."

    def _home(self) -> str:
        """The overview's path: "/" under public_url's path (a reverse proxy's prefix)."""
        prefix = urlsplit(self._settings().server.public_url).path.rstrip("/")
        return prefix + "/"


_PRIVATE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **_PRIVATE})


_SIGNIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · deployd</title><link rel="stylesheet" href="{home}static/app.css"></head>
<body><main class="signin">
<h1>Sign in to deployd</h1>
{state}
<p>deployd signs you in with your SSH key: there is no password. Run</p>
<pre><code>{command}</code></pre>
<p>with a key configured in deployd, and open the link it prints within {minutes} minutes.
The link works once; the session carries that key's permissions.</p>
</main></body></html>
"""
