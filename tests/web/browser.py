"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright, against
a real `deployd serve` (tests/faults/world.py's World: SSH pushes, GitHub webhooks, the
Engine, the registry and the Kubernetes simulator).

Playwright is pointed at /usr/bin/chromium (scripts/testenv.sh installs it); it never
downloads a browser. Every tab collects the page's JavaScript errors and console errors:
a test fails on any it did not ask for. Screenshots go to `$DEPLOYD_ARTIFACTS/screenshots`
(default: test-artifacts/screenshots in the repository), one per page a test looks at.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Response,
    sync_playwright,
)

from tests.faults.world import World, make_world
from tests.support.projects import git
from tests.support.testenv import ROOT, Infra

CHROMIUM = "/usr/bin/chromium"
# As root chromium needs --no-sandbox; the rest keep it from calling out to Google's services
# (a closed network refuses them, and chromium logs each refusal).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
# What chromium logs for any answer >= 400, the main document's included.
REFUSED_LOAD = re.compile(r"^Failed to load resource: the server responded with a status of (\d+)")
LOGIN_URL = re.compile(r"(https?://\S+/login/[A-Za-z0-9_\-.~%]+)")
CSRF_REFUSAL = "the form's CSRF token is missing or wrong; reload the page and try again."


def artifacts() -> Path:
    """Where screenshots go (made on first use)."""
    base = Path(os.environ.get("DEPLOYD_ARTIFACTS") or ROOT / "test-artifacts")
    path = base / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless, under Playwright."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Tab:
    """One browser context (its own cookies) and its page, with the errors it has seen."""

    context: BrowserContext
    page: Page
    label: str  # for screenshot names
    base: str
    errors: list[str] = field(default_factory=list)
    refusals: set[str] = field(default_factory=set)  # URLs the test expects to answer >= 400
    navigations: int = 0

    def url(self, path: str) -> str:
        return path if path.startswith("http") else self.base + path

    def goto(self, path: str, status: int = 200) -> Response:
        """Open `path`; its final answer (after redirects) must be `status`."""
        url = self.url(path)
        if status >= 400:
            self.refusals.add(url)
        resp = self.page.goto(url, wait_until="load")
        assert resp is not None, url
        assert resp.status == status, (url, resp.status, self.text()[:500])
        return resp

    def expect_refusal(self, url: str) -> None:
        """An answer >= 400 from `url` is what the test wants (chromium logs it as an error)."""
        self.refusals.add(self.url(url))

    def text(self) -> str:
        return str(self.page.inner_text("body"))

    def shot(self, name: str, *, full_page: bool = True) -> Path:
        """Save a screenshot of the page (all of it, or what the window shows)."""
        path = artifacts() / f"{self.label}-{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def cookie(self, name: str) -> dict[str, Any] | None:
        for c in self.context.cookies():
            if c["name"] == name:
                return dict(c)
        return None

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type != "error":
            return
        where = str((msg.location or {}).get("url", ""))
        if REFUSED_LOAD.match(msg.text) and where in self.refusals:
            return
        self.errors.append(f"console error at {where}: {msg.text}")

    def _frame(self, frame: Any) -> None:
        if frame == self.page.main_frame:
            self.navigations += 1


class Tabs:
    """Opens tabs for one test; at its end, says which JavaScript errors they saw."""

    def __init__(self, browser: Browser, base: str, label: str) -> None:
        self.browser = browser
        self.base = base
        self.label = label
        self.opened: list[Tab] = []

    def open(self, name: str = "", *, width: int = 1280, height: int = 900) -> Tab:
        context = self.browser.new_context(viewport={"width": width, "height": height})
        page = context.new_page()
        page.set_default_timeout(30_000)
        label = f"{self.label}-{name}" if name else self.label
        tab = Tab(context, page, label, self.base)
        page.on("console", tab._console)
        page.on("pageerror", lambda exc: tab.errors.append(f"page error: {exc}"))
        page.on("framenavigated", tab._frame)
        self.opened.append(tab)
        return tab

    def errors(self) -> list[str]:
        """Every error the tabs saw (the sync API hands events over only while it is called:
        a short wait on each tab lets the last ones in)."""
        for tab in self.opened:
            if not tab.page.is_closed():
                tab.page.wait_for_timeout(100)
        return [e for tab in self.opened for e in tab.errors]

    def close(self) -> None:
        for tab in self.opened:
            tab.context.close()


@dataclass
class Dashboard:
    """The World, served with its dashboard at http://127.0.0.1:PORT, and what it has done."""

    world: World
    first: dict[str, Any]  # the first (succeeded) deploy of `push`
    hooked: dict[str, Any]  # the (succeeded) webhook deploy of `hook`
    hooked_commit: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.world.srv.http_port}"

    def name(self, deployment: str) -> str:
        return self.world.names[deployment]

    def login_url(self, key: str = "alice") -> str:
        """The one-time URL `ssh … login` prints for `key` (the real OpenSSH client)."""
        proc = self.world.srv.ssh("login", key=key)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        found = LOGIN_URL.search(proc.stdout)
        assert found, (proc.stdout, proc.stderr)
        return found.group(1)

    def sign_in(self, tab: Tab, key: str = "alice") -> None:
        """Sign `tab` in as `key` through its login link."""
        tab.goto(self.login_url(key))
        assert tab.page.url == self.base + "/", tab.page.url
        assert tab.cookie("deployd_session") is not None

    def push(self, *options: str) -> subprocess.Popen[str]:
        """`git push astro main` of alice's work tree (running: the push waits for the deploy)."""
        return self.world.start_push(*options)

    def pushed(self, *options: str, ok: bool = True) -> dict[str, Any]:
        """Push, wait for the push to end; the deploy it made."""
        before = self.newest_id("push")
        proc = self.push(*options)
        _, err = proc.communicate(timeout=300)
        assert (proc.returncode == 0) == ok, err
        rec = self.world.newest("push")
        assert rec is not None and rec["id"] > before, (rec, err)
        return rec

    def newest_id(self, deployment: str) -> int:
        rec = self.world.newest(deployment)
        return int(rec["id"]) if rec else 0

    def log_ids(self, deploy_id: int) -> list[int]:
        return [
            int(r["id"])
            for r in self.world.rows(
                "SELECT id FROM log WHERE deploy_id = ? ORDER BY id", (deploy_id,)
            )
        ]

    def status_link(self) -> str:
        """The target_url of the hook deploy's final commit status on (fake) GitHub."""
        calls = self.world.github.wait_for(self.hooked_commit, "success")
        url = str(calls[-1].body.get("target_url", ""))
        assert url.startswith(f"{self.base}/deploys/{self.hooked['id']}?"), url
        return url

    def expired_link(self) -> str:
        """A link to the hook deploy signed with the daemon's own key, expired a minute ago."""
        from daemon.web import identity

        secret = identity.ensure_secret(self.world.srv.state_dir / "web.key")
        query = identity.sign(secret, int(self.hooked["id"]), int(time.time()) - 60)
        return f"{self.base}/deploys/{self.hooked['id']}?{query}"


def start_dashboard(root: Path, infra: Infra) -> Dashboard:
    """The World with public_url on its own loopback address, started, with a first push
    deploy and a first webhook deploy done."""
    w = make_world(root, infra)
    text = w.srv.config.read_text()
    https = 'public_url = "https://deployd.example.com"'
    assert text.count(https) == 1
    w.srv.config.write_text(
        text.replace(https, f'public_url = "http://127.0.0.1:{w.srv.http_port}"')
    )
    try:
        w.start()
        proc = w.start_push()
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        first = w.newest("push")
        assert first is not None and first["state"] == "succeeded", first
        commit = git(w.source, "rev-parse", "HEAD")
        status, answer, _ = w.deliver(commit)
        assert status == 202, answer
        hooked = w.wait_state(answer["deploys"][0]["id"])
        assert hooked["state"] == "succeeded", (hooked, w.srv.log())
        return Dashboard(w, first, hooked, commit)
    except BaseException:
        w.stop()
        raise
