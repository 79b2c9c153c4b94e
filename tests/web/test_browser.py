"""The dashboard in Debian's chromium (Playwright) against a real `deployd serve` with real
deploys: sign-in through `ssh … login`, the overview, a running deploy's live log, a failed
deploy's DAG report, a rollback from the page, signed status links, and the refusals.

One daemon and one browser serve the module; each test opens its own tabs (own cookies).
Screenshots: $DEPLOYD_ARTIFACTS/screenshots (default test-artifacts/screenshots).
"""

from __future__ import annotations

import html
import re
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.support.projects import commit_all
from tests.web.browser import CSRF_REFUSAL, Dashboard, Tab, Tabs

pytestmark = pytest.mark.integration

SLOW_TICKS = 30  # lines the slow build prints, 0.4 s apart


def cards(tab: Tab) -> list[str]:
    return [
        str(s.get_attribute("data-deployment"))
        for s in tab.page.locator("section.deployment").all()
    ]


def line_ids(tab: Tab) -> list[int]:
    ids = tab.page.eval_on_selector_all(
        "#log span.line", "spans => spans.map(s => Number(s.dataset.lineId))"
    )
    return [int(i) for i in ids]


def rows(tab: Tab) -> list[int]:
    ids = tab.page.eval_on_selector_all(
        "tr.deploy", "trs => trs.map(r => Number(r.dataset.deployId))"
    )
    return [int(i) for i in ids]


def refusal(tab: Tab, path: str, status: int, method: str = "GET", **form: str) -> str:
    """The one-line reason `path` answers with `status` (a request of the tab's own cookies)."""
    url = tab.url(path)
    tab.expect_refusal(url)
    if method == "GET":
        resp = tab.page.request.get(url, max_redirects=0)
    else:
        resp = tab.page.request.post(url, form=form, max_redirects=0)
    body = html.unescape(resp.text())
    assert resp.status == status, (path, resp.status, body[:500])
    return body


def succeeded(dash: Dashboard, deployment: str) -> list[dict[str, Any]]:
    return dash.world.rows(
        "SELECT * FROM deploys WHERE deployment = ? AND state = 'succeeded' ORDER BY id",
        (dash.name(deployment),),
    )


def confirmed(dash: Dashboard, tab: Tab, form: Any, deployment: str) -> dict[str, Any]:
    """Submit a confirmation `form` (a POST with the CSRF token): the new deploy it opens
    in `tab`, once that has ended."""
    assert form.get_attribute("method") == "post"
    assert form.locator("input[type=hidden][name=csrf]").count() == 1
    before = dash.newest_id(deployment)
    form.locator("[type=submit]").click()
    tab.page.wait_for_url(re.compile(re.escape(dash.base) + r"/deploys/\d+$"))
    new_id = int(tab.page.url.rsplit("/", 1)[1])
    assert new_id > before
    return dash.world.wait_state(new_id)  # type: ignore[no-any-return]


@contextmanager
def slow_push(dash: Dashboard, message: str) -> Iterator[tuple[subprocess.Popen[str], Any]]:
    """A push whose build prints a line every 0.4 s: (the push, its deploy, in build)."""
    w = dash.world
    nonce = uuid.uuid4().hex  # no layer cache: the RUN prints its lines every time
    (w.local / "Dockerfile").write_text(
        f"FROM {w.infra.airflow_image}\n"
        f"RUN echo {nonce} && for i in $(seq 1 {SLOW_TICKS}); do echo tick-$i; sleep 0.4; done\n"
    )
    commit_all(w.local, message)
    before = dash.newest_id("push")
    proc = dash.push()
    try:
        yield proc, w.wait_deploy("push", before, step="build", while_alive=proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        (w.local / "Dockerfile").write_text(f"FROM {w.infra.airflow_image}\n")
        commit_all(w.local, "A quick build again")


# -- sign-in ---------------------------------------------------------------------------


def test_sign_in_through_the_login_link(dash: Dashboard, tabs: Tabs) -> None:
    nobody = tabs.open("nobody")
    nobody.goto("/")
    assert nobody.page.url == dash.base + "/signin"  # a 303 for anyone without a session
    assert "login" in nobody.text()
    nobody.shot("signin")

    url = dash.login_url("alice")
    assert url.startswith(dash.base + "/login/"), url
    alice = tabs.open("alice")
    alice.goto(url)
    assert alice.page.url == dash.base + "/"
    cookie = alice.cookie("deployd_session")
    assert cookie is not None
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["secure"], cookie["path"]) == (
        True,
        "Lax",
        False,  # public_url is http here
        "/",
    )
    assert cards(alice) == [dash.name("push")]
    alice.shot("overview")

    # The link was for one use: a second browser opening it gets no session.
    again = tabs.open("again")
    again.expect_refusal(url)
    again.page.goto(url)
    assert again.cookie("deployd_session") is None
    assert cards(again) == []

    # Logging out needs the session's CSRF token, then ends the session.
    assert CSRF_REFUSAL in refusal(alice, "/logout", 403, "POST")
    alice.page.goto(dash.base + "/")
    assert cards(alice) == [dash.name("push")]  # still signed in
    alice.page.locator("form[action$='/logout'] [type=submit]").click()
    alice.page.wait_for_load_state("load")
    alice.goto("/")
    assert alice.page.url == dash.base + "/signin"


# -- what runs -------------------------------------------------------------------------


def test_the_overview_has_a_card_per_deployment_the_viewer_may_read(
    dash: Dashboard, tabs: Tabs
) -> None:
    push, hook = dash.name("push"), dash.name("hook")
    root = tabs.open("root")
    dash.sign_in(root, "root")
    assert sorted(cards(root)) == sorted([push, hook])
    deployed = succeeded(dash, "push")[-1]
    card = root.page.locator(f"section.deployment[data-deployment='{push}']")
    text = card.inner_text()
    assert deployed["commit_sha"][:7] in text, text
    assert deployed["tag"] in text, text
    assert "push-scheduler" in text, text  # the cluster's status per workload
    root.shot("overview")

    alice = tabs.open("alice")
    dash.sign_in(alice, "alice")
    assert cards(alice) == [push]
    assert hook not in alice.text()

    phone = tabs.open("phone", width=390, height=844)
    dash.sign_in(phone, "alice")
    overflow = phone.page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= 390, f"the overview is {overflow} px wide on a 390 px phone"
    phone.shot("overview")


def test_the_history_is_newest_first_and_filters_by_state_and_trigger(
    dash: Dashboard, tabs: Tabs
) -> None:
    push = dash.name("push")
    alice = tabs.open("alice")
    dash.sign_in(alice, "alice")
    alice.goto(f"/deployments/{push}")
    ids = [
        r["id"]
        for r in dash.world.rows(
            "SELECT id FROM deploys WHERE deployment = ? ORDER BY id DESC", (push,)
        )
    ]
    assert rows(alice) == ids[:50]
    alice.shot("history")
    first = alice.page.locator(f"tr.deploy[data-deploy-id='{ids[0]}'] a[href$='/deploys/{ids[0]}']")
    first.first.click()
    alice.page.wait_for_url(f"{dash.base}/deploys/{ids[0]}")

    alice.goto(f"/deployments/{push}?state=succeeded&trigger=ssh")
    want = [
        r["id"]
        for r in dash.world.rows(
            "SELECT id FROM deploys WHERE deployment = ? AND state = 'succeeded' "
            "AND trigger = 'ssh' "
            "ORDER BY id DESC",
            (push,),
        )
    ]
    assert want and rows(alice) == want[:50]
    alice.goto(f"/deployments/{push}?trigger=webhook")
    assert rows(alice) == []


# -- a deploy ----------------------------------------------------------------------------


def test_a_running_deploys_log_arrives_without_reloading(dash: Dashboard, tabs: Tabs) -> None:
    w = dash.world
    with slow_push(dash, "A slow build") as (proc, running):
        alice = tabs.open("alice")
        dash.sign_in(alice, "alice")
        alice.goto(f"/deploys/{running['id']}")
        alice.page.evaluate("window.__notReloaded = true")
        navigations = alice.navigations
        had = len(line_ids(alice))
        alice.page.wait_for_function(
            "n => document.querySelectorAll('#log span.line').length >= n", arg=had + 5
        )
        alice.page.wait_for_function(
            "() => [...document.querySelectorAll('#log span.line')]"
            ".some(s => s.textContent.includes('tick-3'))"
        )
        alice.shot("running")
        assert alice.page.evaluate("window.__notReloaded") is True
        assert alice.navigations == navigations
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        done = w.wait_state(running["id"])
        assert done["state"] == "succeeded", done
        # Every stored line arrives once, in order, without a reload.
        stored = dash.log_ids(running["id"])
        alice.page.wait_for_function(
            "n => document.querySelectorAll('#log span.line').length >= n", arg=len(stored)
        )
        assert line_ids(alice) == stored
        assert alice.page.evaluate("window.__notReloaded") is True
        texts = alice.page.locator("#log").inner_text()
        assert f"tick-{SLOW_TICKS}" in texts
        # The deploy's end reaches the page too.
        alice.page.wait_for_selector("#state[data-state='succeeded']")

    # The finished deploy's timeline: a bar per step, the build's the widest (it took longest).
    alice.goto(f"/deploys/{running['id']}")
    widths = {}
    for bar in alice.page.locator("#timeline .step-bar").all():
        drawn = bar.locator("rect")  # the bar as drawn: its width on the screen
        box = drawn.bounding_box() if drawn.count() else None
        widths[str(bar.get_attribute("data-step"))] = box["width"] if box else 0.0
    assert {"checkout", "build", "parse", "push", "roll"} <= set(widths), widths
    assert max(widths, key=lambda n: widths[n]) == "build", widths
    assert re.search(r"\d+(\.\d+)?\s*(s|ms|min)", alice.page.locator("#timeline").inner_text())
    alice.shot("finished")


def test_a_failed_deploy_shows_its_dag_errors_per_file(dash: Dashboard, tabs: Tabs) -> None:
    w = dash.world
    broken = w.local / "dags" / "broken_import.py"
    broken.write_text("# airflow dag\nimport not_a_module_at_all  # noqa\n")
    commit_all(w.local, "A DAG with an import error")
    try:
        failed = dash.pushed(ok=False)
    finally:
        broken.unlink()
        commit_all(w.local, "Without the broken DAG")
    assert failed["state"] == "failed", failed
    alice = tabs.open("alice")
    dash.sign_in(alice, "alice")
    alice.goto(f"/deploys/{failed['id']}")
    bad = alice.page.locator("#dag-report .dag-file[data-file='dags/broken_import.py']")
    assert bad.get_attribute("data-ok") == "false"
    trace = bad.locator("pre.traceback").inner_text()
    assert "not_a_module_at_all" in trace and "ModuleNotFoundError" in trace, trace
    good = alice.page.locator("#dag-report .dag-file[data-file='dags/example_dag.py']")
    assert good.get_attribute("data-ok") == "true"
    # Only a successful deploy can be rolled back to.
    assert alice.page.locator("a[href$='/rollback']").count() == 0
    alice.shot("failed")


# -- actions -----------------------------------------------------------------------------


def test_roll_back_from_the_page(dash: Dashboard, tabs: Tabs) -> None:
    target = dash.first
    alice = tabs.open("alice")
    dash.sign_in(alice, "alice")
    alice.goto(f"/deploys/{target['id']}")
    alice.shot("deploy")
    alice.page.locator(f"a[href$='/deploys/{target['id']}/rollback']").click()
    alice.page.wait_for_url(f"{dash.base}/deploys/{target['id']}/rollback")
    form = alice.page.locator("form#rollback")
    assert form.get_attribute("action") == f"/deploys/{target['id']}/rollback"
    alice.shot("confirm")
    done = confirmed(dash, alice, form, "push")
    new_id = done["id"]
    assert (done["state"], done["trigger"], done["actor"], done["action"]) == (
        "succeeded",
        "dashboard",
        "alice",
        "rollback",
    ), done
    assert done["digest"] == target["digest"]
    alice.shot("rolled-back")
    alice.goto(f"/deployments/{dash.name('push')}")
    assert rows(alice)[0] == new_id


def test_cancel_a_running_deploy_from_its_page(dash: Dashboard, tabs: Tabs) -> None:
    w = dash.world
    with slow_push(dash, "A slow build to cancel") as (proc, running):
        alice = tabs.open("alice")
        dash.sign_in(alice, "alice")
        alice.goto(f"/deploys/{running['id']}")
        form = alice.page.locator("form#cancel")
        assert form.get_attribute("method") == "post"
        assert form.locator("input[type=hidden][name=csrf]").count() == 1
        form.locator("[type=submit]").click()
        alice.page.wait_for_url(f"{dash.base}/deploys/{running['id']}")
        alice.page.wait_for_selector("#state[data-state='cancelled']")
        assert alice.page.locator("form#cancel").count() == 0  # nothing left to cancel
        alice.shot("cancelled")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "cancelled by alice during build" in err, err
        done = w.wait_state(running["id"])
        assert (done["state"], done["cancelled_by"], done["step"]) == (
            "cancelled",
            "alice",
            "build",
        ), done
    # An ended deploy has no cancel button, and a cancel posted anyway is refused in a line.
    alice.goto(f"/deploys/{running['id']}")
    assert alice.page.locator("form#cancel").count() == 0
    csrf = str(alice.page.locator("form.logout input[name=csrf]").get_attribute("value"))
    body = refusal(alice, f"/deploys/{running['id']}/cancel", 409, "POST", csrf=csrf)
    assert "has already ended (cancelled by alice); there is nothing to cancel." in body


def test_freeze_and_unfreeze_from_the_deployment_page(dash: Dashboard, tabs: Tabs) -> None:
    push = dash.name("push")
    alice = tabs.open("alice")
    dash.sign_in(alice, "alice")
    alice.goto(f"/deployments/{push}")
    form = alice.page.locator("form#freeze-form")
    assert form.locator("input[type=hidden][name=csrf]").count() == 1
    form.locator("input[name=reason]").fill("incident 42")
    form.locator("input[name=until]").fill("2h")
    form.locator("[type=submit]").click()
    alice.page.wait_for_url(f"{dash.base}/deployments/{push}")
    frozen = alice.page.locator("#freeze").inner_text()
    assert frozen.startswith(f"{push} is frozen by alice since ") and "incident 42" in frozen
    alice.shot("frozen")
    try:
        (held,) = dash.world.rows(
            "SELECT * FROM freezes WHERE deployment = ? AND ended_at IS NULL", (push,)
        )
        assert (held["frozen_by"], held["reason"]) == ("alice", "incident 42")
        assert 7190 < held["until"] - held["since"] <= 7200
        # While frozen, a push is refused at once with the reason, and nothing is deployed.
        before = dash.newest_id("push")
        commit_all(dash.world.local, "A change while frozen")
        proc = dash.push()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "incident 42" in err and "alice" in err, err
        assert dash.newest_id("push") == before
        # The overview shows it too.
        alice.goto("/")
        card = alice.page.locator(f"section.deployment[data-deployment='{push}']")
        assert "incident 42" in card.inner_text()
        alice.goto(f"/deployments/{push}")
    finally:
        alice.page.locator("form#unfreeze [type=submit]").click()
    alice.page.wait_for_url(f"{dash.base}/deployments/{push}")
    assert alice.page.locator("#freeze").count() == 0
    assert alice.page.locator("form#freeze-form").count() == 1
    (ended,) = dash.world.rows(
        "SELECT * FROM freezes WHERE deployment = ? ORDER BY id DESC LIMIT 1", (push,)
    )
    assert ended["ended_by"] == "alice" and ended["ended_at"] is not None
    # Unfreezing what is not frozen is refused in one line.
    csrf = str(alice.page.locator("form.logout input[name=csrf]").get_attribute("value"))
    body = refusal(alice, f"/deployments/{push}/unfreeze", 409, "POST", csrf=csrf)
    assert f"{push} is not frozen." in body


def test_promote_from_the_deployment_page(dash: Dashboard, tabs: Tabs) -> None:
    push, hook = dash.name("push"), dash.name("hook")
    source = succeeded(dash, "push")[-1]
    # alice reads only push: no source to promote from, and hook's promotion is a 404.
    alice = tabs.open("alice")
    dash.sign_in(alice, "alice")
    alice.goto(f"/deployments/{push}")
    assert alice.page.locator("form#promote-form").count() == 0
    refusal(alice, f"/deployments/{hook}/promote?from={push}", 404)
    root = tabs.open("root")
    dash.sign_in(root, "root")
    root.goto(f"/deployments/{hook}")
    form = root.page.locator("form#promote-form")
    form.locator("select[name=from]").select_option(push)
    form.locator("[type=submit]").click()
    root.page.wait_for_url(f"{dash.base}/deployments/{hook}/promote?from={push}")
    assert f"#{source['id']}" in root.page.locator("section.confirm").inner_text()
    root.shot("promote")
    done = confirmed(dash, root, root.page.locator("form#promote"), "hook")
    new_id = done["id"]
    assert (done["state"], done["trigger"], done["actor"], done["action"]) == (
        "succeeded",
        "dashboard",
        "root",
        "promotion",
    ), done
    assert (done["promoted_from"], done["promoted_from_id"]) == (push, source["id"])
    assert (done["digest"], done["commit_sha"]) == (source["digest"], source["commit_sha"])
    assert done["image"] != source["image"]  # copied across repositories in the registry
    root.goto(f"/deploys/{new_id}")
    assert f"{push} #{source['id']}" in root.page.locator("#facts").inner_text()
    root.shot("promoted")


def test_a_missing_or_wrong_csrf_token_is_refused(dash: Dashboard, tabs: Tabs) -> None:
    target = dash.first
    alice = tabs.open("alice")
    dash.sign_in(alice, "alice")
    path = f"/deploys/{target['id']}/rollback"
    alice.goto(path)
    before = dash.newest_id("push")
    # The form without its hidden input, submitted from the page.
    alice.page.evaluate("document.querySelector('form#rollback input[name=csrf]').remove()")
    alice.expect_refusal(alice.url(path))
    with alice.page.expect_navigation() as nav:
        alice.page.locator("form#rollback [type=submit]").click()
    resp = nav.value
    assert resp is not None and resp.status == 403
    assert CSRF_REFUSAL in alice.text()
    alice.shot("refused")
    # A wrong token, and none at all, straight from the session's cookies.
    assert CSRF_REFUSAL in refusal(alice, path, 403, "POST", csrf="0" * 64)
    assert CSRF_REFUSAL in refusal(alice, path, 403, "POST")
    time.sleep(0.5)
    assert dash.newest_id("push") == before  # nothing was rolled back


def test_another_deployments_pages_answer_like_missing_ones(dash: Dashboard, tabs: Tabs) -> None:
    hooked = dash.hooked["id"]
    missing = hooked + 10_000
    alice = tabs.open("alice")
    dash.sign_in(alice, "alice")

    def same(path: str, nowhere: str) -> None:
        theirs = refusal(alice, path, 404)
        none = refusal(alice, nowhere, 404)
        assert theirs.replace(f"#{hooked}", "#N") == none.replace(f"#{missing}", "#N")

    same(f"/deploys/{hooked}", f"/deploys/{missing}")
    same(f"/deploys/{hooked}/events", f"/deploys/{missing}/events")
    same(f"/deploys/{hooked}/rollback", f"/deploys/{missing}/rollback")
    hook = dash.name("hook")
    theirs = refusal(alice, f"/deployments/{hook}", 404)
    none = refusal(alice, "/deployments/no-such-thing", 404)
    assert theirs.replace(hook, "N") == none.replace("no-such-thing", "N")
    alice.goto(f"/deploys/{hooked}", status=404)
    alice.shot("not-found")


# -- signed status links ---------------------------------------------------------------------


def test_a_signed_status_link_opens_its_deploy_and_nothing_else(
    dash: Dashboard, tabs: Tabs
) -> None:
    link = dash.status_link()
    query = urllib.parse.urlsplit(link).query
    assert set(urllib.parse.parse_qs(query)) == {"exp", "sig"}, link
    anyone = tabs.open("link")
    anyone.goto(link)
    assert anyone.page.url == link
    assert anyone.page.locator("#log span.line").count() == len(dash.log_ids(dash.hooked["id"]))
    assert anyone.page.locator("a[href*='/rollback']").count() == 0
    assert anyone.page.locator("form").count() == 0  # no action of any kind
    anyone.shot("deploy")
    events = anyone.page.request.get(f"{dash.base}/deploys/{dash.hooked['id']}/events?{query}")
    assert events.status == 200 and events.headers["content-type"].startswith("text/event-stream")

    # Its query opens nothing else.
    for other in (
        "/",
        f"/deployments/{dash.name('hook')}",
        f"/deploys/{dash.first['id']}",
        f"/deploys/{dash.first['id']}/events",
        f"/deploys/{dash.hooked['id']}/rollback",
    ):
        reason = refusal(anyone, f"{other}?{query}", 403)
        assert reason.strip() and "\n" not in reason.strip(), reason
    refusal(anyone, f"/deploys/{dash.hooked['id']}/rollback?{query}", 403, "POST")
    assert anyone.cookie("deployd_session") is None


def test_a_tampered_or_expired_status_link_is_refused(dash: Dashboard, tabs: Tabs) -> None:
    link = dash.status_link()
    parts = urllib.parse.urlsplit(link)
    q = {k: v[0] for k, v in urllib.parse.parse_qs(parts.query).items()}
    path = parts.path
    sig = q["sig"]
    flipped = sig[:-1] + ("0" if sig[-1] != "0" else "1")
    anyone = tabs.open("link")
    for query in (
        f"exp={q['exp']}&sig={flipped}",  # a changed signature
        f"exp={int(q['exp']) + 86400}&sig={sig}",  # a later expiry, the same signature
        f"exp={q['exp']}",  # no signature
    ):
        reason = refusal(anyone, f"{path}?{query}", 403)
        assert reason.strip() and "\n" not in reason.strip(), reason
    expired = dash.expired_link()
    reason = refusal(anyone, expired, 403)
    assert "expired" in reason.lower(), reason
    anyone.goto(expired, status=403)
    anyone.shot("expired")


def test_the_largest_log_deployd_keeps_opens_quickly(dash: Dashboard, tabs: Tabs) -> None:
    """A deploy whose every step printed past its cap: HEAD_LINES + the note + TAIL_LINES each."""
    deploy_id, stored = seed_capped_deploy(dash)
    alice = tabs.open("alice")
    dash.sign_in(alice, "alice")
    t0 = time.monotonic()
    alice.goto(f"/deploys/{deploy_id}")
    took = time.monotonic() - t0
    assert alice.page.locator("#log span.line").count() == stored
    assert took < 4.0, f"the deploy page with {stored} log lines took {took:.2f} s to load"
    alice.shot("largest-log", full_page=False)  # all of it: too tall to draw


def seed_capped_deploy(dash: Dashboard) -> tuple[int, int]:
    """Record (from outside the daemon, as `deployd deploy` would) a failed deploy of `push`
    with the largest log deployd keeps, written through DeployLog; (its id, lines stored)."""
    from daemon.adapters.records import Records
    from daemon.core.deploys import Options
    from daemon.core.logs import HEAD_LINES, TAIL_LINES, DeployLog

    steps = ["preflight", "checkout", "build", "parse", "pytest", "push", "roll"]
    records = Records(dash.world.db)
    try:
        deploy_id = records.create_deploy(
            deployment=dash.name("push"),
            trigger="cli",
            actor="ada@host",
            ref="refs/heads/main",
            options=Options(description="a very chatty deploy"),
            pid=1,
        )
        records.plan_steps(deploy_id, [(s, "") for s in steps])
        records.transition(deploy_id, "queued", "running")
        out = DeployLog(records, deploy_id)
        for step in steps:
            records.step_started(deploy_id, step)
            for i in range(HEAD_LINES + TAIL_LINES + 500):
                out.write(f"{step} output line {i}: " + "x" * 80, step)
            out.end_step(step)
            records.step_finished(deploy_id, step, "succeeded", "done")
        out.flush()
        out.close()
        records.transition(deploy_id, "running", "failed", error="it talked too much")
        return deploy_id, len(records.log_lines(deploy_id))
    finally:
        records.close()
