"""The dashboard's pages in process: aiohttp's real test server on loopback, real SQLite
records seeded through Records, the real pipeline over the fake engine and cluster
(tests/core/test_release.World). The viewer is put in place by a test middleware: the
unit-tier stand-in for identity.py's sign-in.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon.adapters.records import Records
from daemon.config import AirflowApi, Deployment, Key
from daemon.core.deploys import Options
from daemon.core.logs import DeployLog
from daemon.steps.checks.pytest import JUNIT_NAME, SUMMARY_NAME
from daemon.web.pages import CSRF_REFUSED, LINK_REFUSED, Dashboard
from daemon.web.viewer import VIEWER, Viewer
from tests.core.test_release import World, until

ALICE = Key("alice", "ssh-ed25519 AAAA alice", deployments=("prod",))
STAGER = Key("stager", "ssh-ed25519 AAAA stager", deployments=("staging",))
READER = Key("airflow", "ssh-ed25519 AAAA airflow", deployments=("prod",), access="read")
CSRF = "c" * 43
DIGEST = "sha256:" + "d" * 64
OTHER_DIGEST = "sha256:" + "e" * 64
PROD_IMAGE = "registry.test/airflow/prod"


def session(key: Key) -> Viewer:
    return Viewer(key, session="s-" + key.name, csrf=CSRF)


@dataclass
class Site:
    """The dashboard over a World, and who is looking."""

    w: World
    client: TestClient[Any, Any]
    dash: Dashboard
    viewer: Viewer | None = field(default_factory=lambda: session(ALICE))
    cluster: dict[str, list[dict[str, Any]] | str] = field(default_factory=dict)
    logs: dict[int, DeployLog] = field(default_factory=dict)

    @property
    def records(self) -> Records:
        return self.w.records

    async def get(self, path: str, **kw: Any) -> tuple[int, str]:
        resp = await self.client.get(path, allow_redirects=False, **kw)
        return resp.status, await resp.text()


@contextlib.asynccontextmanager
async def open_site(tmp_path: Path) -> AsyncIterator[Site]:
    """The dashboard over a World, served on loopback by aiohttp's test server."""
    w = World(tmp_path)
    holder: list[Site] = []

    @web.middleware
    async def as_viewer(request: web.Request, handler: Any) -> web.StreamResponse:
        request[VIEWER] = holder[0].viewer
        return await handler(request)

    def cluster_status(dep: Deployment) -> list[dict[str, Any]] | str:
        return holder[0].cluster.get(dep.name, "cluster status not loaded yet")

    def live(deploy_id: int) -> DeployLog | None:
        return holder[0].logs.get(deploy_id) or w.pipeline.live.get(deploy_id)

    dash = Dashboard(lambda: w.settings, w.records, live, w.pipeline, cluster_status)
    app = web.Application(middlewares=[as_viewer])
    app.add_routes(dash.routes())
    dash.setup(app)
    client = TestClient(TestServer(app))
    await client.start_server()
    holder.append(Site(w, client, dash))
    try:
        yield holder[0]
    finally:
        await client.close()
        await until(lambda: not w.pipeline.commands)
        w.records.close()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with open_site(tmp_path) as s:
        yield s


def seed(
    records: Records,
    deployment: str = "prod",
    state: str = "succeeded",
    *,
    trigger: str = "ssh",
    actor: str = "ada",
    description: str = "add the sales DAG",
    commit: str = "0123456789abcdef0123456789abcdef01234567",
    steps: tuple[str, ...] = ("checkout", "build", "parse"),
    lines: tuple[tuple[str | None, str], ...] = (),
    report: dict[str, Any] | None = None,
    error: str | None = None,
    digest: str = DIGEST,
    kind: str = "image",
) -> int:
    """One deploy recorded the way the pipeline records it."""
    i = records.create_deploy(
        deployment=deployment,
        trigger=trigger,
        actor=actor,
        ref="refs/heads/main",
        options=Options(force=True),
        pid=0,
        commit=commit,
        description=description,
        kind=kind,
    )
    records.plan_steps(i, [(s, "") for s in steps])
    if state == "queued":
        return i
    records.transition(i, "queued", "running")
    for s in steps:
        records.step_started(i, s)
        records.step_finished(i, s, "succeeded", f"{s} done")
    for step, line in lines:
        records.append_log(i, step, [line])
    if report is not None:
        records.update(i, report=json.dumps(report))
    if state != "running":
        image = {"image": PROD_IMAGE, "tag": f"deploy-{i}", "digest": digest}
        records.transition(i, "running", state, error=error, **image)
    return i


def cards(html: str) -> list[str]:
    return re.findall(r'<section class="deployment card" data-deployment="([^"]+)"', html)


# -- the overview -------------------------------------------------------------------------


async def test_the_overview_shows_what_runs_what_is_under_way_and_what_failed(
    site: Site,
) -> None:
    good = seed(site.records, actor="ada")
    bad = seed(site.records, state="failed", error="2 DAG file(s) failed to import")
    running = seed(site.records, state="running", steps=("checkout", "build"))
    site.records.step_started(running, "build")
    seed(site.records, "staging", description="staging work")
    site.cluster["prod"] = [
        {
            "workload": "deployment/airflow-scheduler",
            "managed_by": [],
            "deploy_id": str(good),
            "images": {"scheduler": f"{PROD_IMAGE}:deploy-{good}@{DIGEST}"},
            "rollout": "rolled out",
            "pods_running": {f"{PROD_IMAGE}@{DIGEST}": 2},
        },
        {
            "workload": "statefulset/airflow-worker",
            "managed_by": ["argocd"],
            "deploy_id": None,
            "images": {"worker": f"{PROD_IMAGE}:old"},
            "rollout": "rolled out",
            "pods_running": {f"{PROD_IMAGE}@{OTHER_DIGEST}": 1},
        },
    ]
    status, html = await site.get("/")
    assert status == 200
    assert cards(html) == ["prod"]  # alice may not read staging
    card = html.split('data-deployment="prod"')[1]
    assert f'href="/deploys/{good}">#{good}</a>' in card
    assert "0123456" in card and "add the sales DAG" in card
    assert f"deploy-{good}" in card and DIGEST[:19] in card
    assert "by ada (ssh)" in card and "s ago" in card
    assert f'data-deploy-id="{running}"' in card and "in build" in card
    assert "last failure: <a" in card and f"#{bad}" in card
    assert "2 DAG file(s) failed to import" in card
    # The worker's pods run another build than the records say: flagged, like `status`.
    assert 'class="workload flagged" data-workload="statefulset/airflow-worker"' in card
    assert 'class="workload" data-workload="deployment/airflow-scheduler"' in card
    assert f"not deploy #{good}'s image" in card
    assert "managed by argocd" in card
    # The deploy under way fails: it is the last failure now (the page's cache knows).
    site.records.transition(running, "running", "failed", error="the build failed: boom")
    status, html = await site.get("/")
    card = html.split('data-deployment="prod"')[1]
    assert f'last failure: <a href="/deploys/{running}">' in card and "boom" in card
    assert "in build" not in card


async def test_the_overview_shows_a_freeze_and_why_the_cluster_cannot_be_shown(
    site: Site,
) -> None:
    from daemon.core import usecases

    usecases.freeze(site.records, site.w.dep("prod"), by="ops", reason="quarter end")
    status, html = await site.get("/")
    assert status == 200
    assert "nothing deployed yet" in html
    assert re.search(r'class="freeze">prod is frozen[^<]*quarter end', html), html
    assert "cluster: cluster status not loaded yet" in html


async def test_an_admin_sees_every_deployment(site: Site) -> None:
    site.viewer = session(Key("root", "ssh-ed25519 AAAA root", admin=True))
    status, html = await site.get("/")
    assert status == 200 and cards(html) == ["staging", "prod"]
    staging = html.split('data-deployment="staging"')[1].split("</section>")[0]
    assert "cluster: no workloads configured" in staging


async def test_pages_send_the_security_headers(site: Site) -> None:
    resp = await site.client.get("/")
    assert resp.headers["Content-Security-Policy"] == "default-src 'self'"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "same-origin"
    assert resp.headers["X-Frame-Options"] == "DENY"
    html = await resp.text()
    # No inline script or style that the policy would block.
    assert "<script>" not in html and "style=" not in html and "<style" not in html
    css = await site.client.get("/static/app.css")
    assert css.status == 200 and css.content_type == "text/css"
    js = await site.client.get("/static/app.js")
    assert js.status == 200 and "EventSource" in await js.text()
    for path in ("/favicon.ico", "/static/favicon.svg"):
        icon = await site.client.get(path)
        assert icon.status == 200 and icon.content_type == "image/svg+xml"
    for path in ("/static/../pages.py", "/static/pages.py", "/static/%2e%2e%2fpages.py"):
        assert (await site.client.get(path)).status == 404


async def test_nobody_is_sent_to_sign_in_and_a_link_sees_nothing_else(site: Site) -> None:
    site.viewer = None
    resp = await site.client.get("/deployments/prod", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/signin"
    resp = await site.client.post("/deploys/1/rollback", data={"csrf": CSRF})
    assert resp.status == 403
    i = seed(site.records)
    site.viewer = Viewer(None, link_deploy=i, link_deployment="prod", link_query="exp=1&sig=ab")
    for path in ("/", "/deployments/prod", f"/deploys/{i}/rollback"):
        status, html = await site.get(path)
        assert status == 403, path
        assert LINK_REFUSED in html
    status, html = await site.get(f"/deploys/{i}")
    assert status == 200
    assert "Roll back to this deploy" not in html  # a link allows no action
    assert 'href="/deployments/prod"' not in html
    other = seed(site.records)
    assert (await site.get(f"/deploys/{other}"))[0] == 404


# -- hostile text is text -----------------------------------------------------------------


async def test_subjects_log_lines_errors_and_reports_are_escaped(site: Site) -> None:
    evil = '<script>alert("x")</script>'
    i = seed(
        site.records,
        state="failed",
        description=evil,
        actor="<b>mallory</b>",
        lines=(("build", '<img src=x onerror="alert(1)">'), (None, "</pre><script>1</script>")),
        error=evil,
        report={
            "files": {
                '<svg onload="x">.py': {
                    "status": "error",
                    "dags": [],
                    "error": {"kind": "<i>", "message": evil, "traceback": evil, "line": 3},
                }
            }
        },
    )
    for path in ("/", f"/deploys/{i}", "/deployments/prod"):
        status, html = await site.get(path)
        assert status == 200, path
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>mallory" not in html
        assert "<svg onload" not in html and "</pre><script>" not in html
    status, html = await site.get(f"/deploys/{i}")
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html


# -- 404 the same for missing and forbidden -----------------------------------------------


async def test_another_deployments_deploy_is_not_found_like_a_missing_one(site: Site) -> None:
    theirs = seed(site.records, "staging")
    missing = theirs + 100
    pages = {}
    for ident in (theirs, missing):
        for suffix in ("", "/events", "/rollback"):
            resp = await site.client.get(f"/deploys/{ident}{suffix}")
            reason = re.search(r'<p class="reason">([^<]*)</p>', await resp.text())
            assert reason is not None
            pages[(ident, suffix)] = (resp.status, reason.group(1).replace(str(ident), "N"))
        resp = await site.client.post(f"/deploys/{ident}/rollback", data={"csrf": CSRF})
        pages[(ident, "post")] = (resp.status, "")
    for suffix in ("", "/events", "/rollback", "post"):
        assert pages[(theirs, suffix)] == pages[(missing, suffix)]
        assert pages[(theirs, suffix)][0] == 404
    for path in ("/deploys/abc", "/deploys/0", "/deploys/" + "9" * 40):
        assert (await site.get(path))[0] == 404
    assert (await site.get("/deployments/staging"))[0] == 404
    assert (await site.get("/deployments/nope"))[0] == 404
    assert (await site.get("/deployments/" + "x" * 300))[0] == 404


# -- history --------------------------------------------------------------------------------


async def test_the_history_is_paginated_newest_first_and_filtered(site: Site) -> None:
    made = []
    for n in range(120):
        state = "failed" if n % 10 == 0 else "succeeded"
        made.append(seed(site.records, state=state, trigger="webhook" if n % 3 == 0 else "ssh"))
    seed(site.records, "staging")

    def ids(html: str) -> list[int]:
        return [int(x) for x in re.findall(r'<tr class="deploy" data-deploy-id="(\d+)"', html)]

    status, html = await site.get("/deployments/prod")
    assert status == 200
    assert ids(html) == made[::-1][:50]
    assert f'<a href="/deploys/{made[-1]}">' in html
    assert "120 deploys; page 1 of 3" in html
    assert 'class="older" href="?page=2"' in html and "newer" not in html.split("</table>")[1]
    status, html = await site.get("/deployments/prod?page=3")
    assert ids(html) == made[::-1][100:]
    assert 'class="newer" href="?page=2"' in html and 'class="older"' not in html
    status, html = await site.get("/deployments/prod?state=failed&trigger=webhook")
    expected = [d for n, d in enumerate(made) if n % 10 == 0 and n % 3 == 0][
        ::-1
    ]  # n = 0, 30, 60, 90
    assert ids(html) == expected and len(expected) == 4
    assert '<option value="failed" selected>' in html
    status, html = await site.get("/deployments/prod?state=failed&page=9")
    assert status == 200 and ids(html) == [] and "no deploys match" in html


async def test_the_history_and_the_deploy_page_show_each_deploys_kind(site: Site) -> None:
    image = seed(site.records)
    dags = seed(site.records, kind="dags", steps=("checkout", "parse"))

    def kinds(html: str) -> list[tuple[int, str, str]]:
        rows = re.findall(
            r'<tr class="deploy" data-deploy-id="(\d+)">.*?'
            r'<td class="kind" data-kind="(\w+)">([^<]*)</td>',
            html,
            re.S,
        )
        return [(int(i), k, text) for i, k, text in rows]

    _, html = await site.get("/deployments/prod")
    assert "<th>kind</th>" in html
    assert kinds(html) == [(dags, "dags", "DAGs only"), (image, "image", "image")]
    for i, kind, text in ((image, "image", "image"), (dags, "dags", "DAGs only")):
        _, page = await site.get(f"/deploys/{i}")
        assert f'<dt>kind</dt><dd class="kind" data-kind="{kind}">{text}</dd>' in page


async def test_the_overview_shows_the_dag_version_of_a_git_dag_source(site: Site) -> None:
    settings = site.w.settings
    prod = replace(
        settings.deployment("prod"),
        dag_source="git",
        airflow=AirflowApi("http://airflow:8080", "prod-dags", token="t"),
    )
    site.w.settings = replace(
        settings, deployments=tuple(prod if d.name == "prod" else d for d in settings.deployments)
    )
    seed(site.records)
    _, html = await site.get("/")
    assert "deployed with the image" in html and "bundle <code>prod-dags</code>" in html
    dags_commit = "fedcba9876543210fedcba9876543210fedcba98"
    seed(site.records, kind="dags", commit=dags_commit, steps=("checkout", "parse"))
    _, html = await site.get("/")
    found = re.search(r'<p class="dags" data-dag-commit="(\w+)">(.*?)</p>', html, re.S)
    assert found is not None and found[1] == dags_commit, html
    assert "fedcba9" in found[2] and "a DAG deploy: the image above ran before it" in found[2]
    site.w.settings = settings  # an image-only deployment shows no DAG line
    _, html = await site.get("/")
    assert 'class="dags"' not in html


@pytest.mark.parametrize(
    "query",
    [
        "state=bogus",
        "trigger=x",
        "page=0",
        "page=-1",
        "page=abc",
        "page=" + "9" * 30,
        "page=\u0661",
    ],
)
async def test_bad_history_queries_answer_400_in_one_line(site: Site, query: str) -> None:
    status, html = await site.get(f"/deployments/prod?{query}")
    assert status == 400
    reason = re.search(r'<p class="reason">([^<]*)</p>', html)
    assert reason is not None and "\n" not in reason.group(1)
    assert reason.group(1).split(" ")[0] in ("state", "trigger", "page")


# -- the deploy page ----------------------------------------------------------------------


REPORT = {
    "airflow_version": "3.3.2",
    "fatal": None,
    "files": {
        "dags/sales.py": {
            "status": "ok",
            "dags": ["sales_daily"],
            "seconds": 0.41,
            "lookups": [{"kind": "variable", "name": "sales_bucket"}],
        },
        "dags/broken.py": {
            "status": "error",
            "dags": [],
            "seconds": 0.02,
            "error": {
                "kind": "ModuleNotFoundError",
                "message": "No module named 'pandas_extra'",
                "line": 3,
                "traceback": 'Traceback (most recent call last):\n  File "dags/broken.py", '
                "line 3\nModuleNotFoundError: No module named 'pandas_extra'",
            },
        },
        "dags/allowed.py": {"status": "allowed", "dags": [], "error": {"kind": "X"}},
        "dags/weird.py": "not a dict",
    },
}
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_dags" name="test_ok" time="0.1"/>
<testcase classname="tests.test_dags" name="test_sales_owner" time="0.2">
<failure message="AssertionError: owner is &lt;nobody&gt;">def test_sales_owner():
&gt;       assert dag.owner == "data"
E       AssertionError</failure></testcase></testsuite></testsuites>"""


async def test_the_deploy_page_shows_facts_timeline_report_pytest_and_log(site: Site) -> None:
    i = seed(
        site.records,
        state="failed",
        steps=("checkout", "build", "parse", "pytest"),
        lines=(("build", "Step 1/2 : FROM runtime"), ("parse", "ok dags/sales.py")),
        report=REPORT,
        error="the tests failed",
    )
    # Steps of 1 s, 6 s, 2 s and 1 s, back to back.
    t0 = 1_700_000_000.0
    for name, start, end in (
        ("checkout", 0, 1),
        ("build", 1, 7),
        ("parse", 7, 9),
        ("pytest", 9, 10),
    ):
        site.records.write(
            "UPDATE steps SET started_at = ?, finished_at = ? WHERE deploy_id = ? AND name = ?",
            [t0 + start, t0 + end, i, name],
        )
    site.records.put_artifact(
        i,
        SUMMARY_NAME,
        json.dumps(
            {"passed": 1, "failed": 1, "failing": ["tests/test_dags.py::x"], "exit_code": 1}
        ),
    )
    site.records.put_artifact(i, JUNIT_NAME, JUNIT)
    status, html = await site.get(f"/deploys/{i}")
    assert status == 200
    assert "0123456" in html and "refs/heads/main" in html and "ssh (deploy)" in html
    assert '<dd class="options">force</dd>' in html
    bars = dict(
        (m[0], (int(m[1]), int(m[2])))
        for m in re.findall(
            r'data-step="(\w+)" data-state="succeeded" data-offset="(\d+)" data-width="(\d+)"', html
        )
    )
    assert bars == {
        "checkout": (0, 100),
        "build": (100, 600),
        "parse": (700, 200),
        "pytest": (900, 100),
    }
    assert re.search(
        r'data-step="build".*?<span class="step-duration"[^>]*>6.0 s</span>', html, re.S
    )
    report = html.split('<section id="dag-report">')[1].split("</section>")[0]
    assert '"dags/sales.py" data-ok="true"' in report
    assert '"dags/broken.py" data-ok="false"' in report
    assert '"dags/allowed.py" data-ok="false"' in report
    assert "ModuleNotFoundError at line 3: No module named &#39;pandas_extra&#39;" in report
    assert '<pre class="traceback">Traceback (most recent call last):' in report
    assert "answered with placeholders at parse time: variable sales_bucket" in report
    assert "1 entries of the report could not be read." in report
    assert report.index("dags/broken.py") < report.index("dags/sales.py")  # errors first
    pytest_part = html.split('<section id="pytest">')[1].split("</section>")[0]
    assert "1 passed" in pytest_part and "1 failed" in pytest_part
    assert 'data-test="tests/test_dags.py::test_sales_owner"' in pytest_part
    assert "AssertionError: owner is &lt;nobody&gt;" in pytest_part
    assert "assert dag.owner == &#34;data&#34;" in pytest_part
    log_ids = re.findall(r'<span class="line" data-line-id="(\d+)"', html)
    assert [int(x) for x in log_ids] == [r.id for r in site.records.log_lines(i)]
    assert "data-events=" not in html  # it has ended: no live stream
    assert "Roll back to this deploy" not in html  # a failed deploy is no rollback target


async def test_a_running_deploy_page_opens_its_event_stream(site: Site) -> None:
    i = seed(site.records, state="running", lines=(("build", "one"), ("build", "two")))
    last = site.records.log_lines(i)[-1].id
    status, html = await site.get(f"/deploys/{i}")
    assert status == 200
    assert f'data-events="/deploys/{i}/events?after={last}"' in html
    site.viewer = Viewer(None, link_deploy=i, link_deployment="prod", link_query="exp=9&sig=ab")
    status, html = await site.get(f"/deploys/{i}")
    assert status == 200
    assert f'data-events="/deploys/{i}/events?after={last}&amp;exp=9&amp;sig=ab"' in html


async def test_a_succeeded_deploy_offers_a_rollback_to_a_key_that_may(site: Site) -> None:
    i = seed(site.records)
    status, html = await site.get(f"/deploys/{i}")
    assert status == 200
    assert f'href="/deploys/{i}/rollback">Roll back to this deploy</a>' in html


async def test_malformed_reports_and_junit_make_a_note_not_an_error(site: Site) -> None:
    i = seed(site.records, state="failed", report={"files": ["not", "a", "dict"], "fatal": 3})
    site.records.put_artifact(i, SUMMARY_NAME, "{not json")
    site.records.put_artifact(
        i, JUNIT_NAME, '<!DOCTYPE x [<!ENTITY a "aaaa">]><testsuite>&a;</testsuite>'
    )
    status, html = await site.get(f"/deploys/{i}")
    assert status == 200
    assert "the report lists no files." in html
    assert "the pytest summary could not be read." in html
    assert "the JUnit report declares a DTD; it was not read." in html
    j = seed(site.records, state="failed")
    site.records.put_artifact(j, JUNIT_NAME, "<testsuite><testcase")
    status, html = await site.get(f"/deploys/{j}")
    assert status == 200 and "the JUnit report is not well-formed XML" in html


async def test_the_largest_log_deployd_keeps_renders_quickly(site: Site) -> None:
    from daemon.core import deploys
    from daemon.core.logs import HEAD_LINES, MAX_LINE_CHARS, TAIL_LINES

    steps = deploys.STEPS
    i = seed(site.records, state="succeeded", steps=steps)
    per_step = HEAD_LINES + 1 + TAIL_LINES  # the head, the "lines not shown" note, the tail
    line = "x" * (MAX_LINE_CHARS - 20)
    for step in steps:
        site.records.append_log(i, step, [f"{step} {n} <{line}>" for n in range(per_step)])
    total = per_step * len(steps)
    started = time.perf_counter()
    resp = await site.client.get(f"/deploys/{i}")
    body = await resp.read()
    took = time.perf_counter() - started
    assert resp.status == 200
    assert body.count(b'<span class="line" data-line-id=') == total
    print(f"\nlargest log: {total} lines, {len(body) / 1e6:.1f} MB page in {took * 1000:.0f} ms")
    assert took < 5.0  # a generous bound on a shared 2-CPU machine; the note has the figure


# -- rollback -----------------------------------------------------------------------------


async def test_a_rollback_is_confirmed_then_run_as_a_dashboard_deploy(site: Site) -> None:
    w = site.w
    first = await w.deployed("prod")
    w.commit("second")
    await w.deployed("prod")
    status, html = await site.get(f"/deploys/{first.id}/rollback")
    assert status == 200
    assert f'<form id="rollback" method="post" action="/deploys/{first.id}/rollback">' in html
    assert f'<input type="hidden" name="csrf" value="{CSRF}">' in html
    resp = await site.client.post(
        f"/deploys/{first.id}/rollback", data={"csrf": CSRF}, allow_redirects=False
    )
    assert resp.status == 303
    new_id = int(resp.headers["Location"].rpartition("/")[2])
    assert resp.headers["Location"] == f"/deploys/{new_id}"
    await until(lambda: w.records.state(new_id) == "succeeded")
    rec = w.records.get(new_id)
    assert rec is not None
    assert (rec.trigger, rec.actor, rec.action, rec.rollback_of) == (
        "dashboard",
        "alice",
        "rollback",
        first.id,
    )
    assert rec.digest == first.digest


@pytest.mark.parametrize("form", [{}, {"csrf": ""}, {"csrf": "wrong"}, {"csrf": CSRF + "x"}])
async def test_a_rollback_without_the_right_csrf_token_is_refused(
    site: Site, form: dict[str, str]
) -> None:
    i = seed(site.records)
    before = len(site.records.list_deploys("prod"))
    resp = await site.client.post(f"/deploys/{i}/rollback", data=form, allow_redirects=False)
    assert resp.status == 403
    assert CSRF_REFUSED in unescape(await resp.text())
    assert len(site.records.list_deploys("prod")) == before


async def test_a_rollback_by_a_viewer_without_deploy_access_is_refused(site: Site) -> None:
    i = seed(site.records)
    before = len(site.records.list_deploys("prod"))
    # A signed status link may read the deploy, never act on it.
    site.viewer = Viewer(None, link_deploy=i, link_deployment="prod", link_query="exp=1&sig=a")
    resp = await site.client.post(f"/deploys/{i}/rollback", data={"csrf": CSRF})
    assert resp.status == 403 and LINK_REFUSED in unescape(await resp.text())
    # A key of another deployment learns nothing of this one.
    site.viewer = session(STAGER)
    resp = await site.client.post(f"/deploys/{i}/rollback", data={"csrf": CSRF})
    assert resp.status == 404
    assert len(site.records.list_deploys("prod")) == before


async def test_a_read_key_sees_its_deployment_but_may_not_roll_it_back(site: Site) -> None:
    w = site.w
    first = await w.deployed("prod")
    w.commit("second")
    await w.deployed("prod")
    before = len(site.records.list_deploys("prod"))
    site.viewer = session(READER)
    status, html = await site.get(f"/deploys/{first.id}")
    assert status == 200 and f"deploy #{first.id}" in html
    assert 'id="rollback-link"' not in html and "Roll back to this deploy" not in html
    status, html = await site.get(f"/deploys/{first.id}/rollback")
    assert status == 403 and "key airflow may not roll back prod." in unescape(html)
    resp = await site.client.post(f"/deploys/{first.id}/rollback", data={"csrf": CSRF})
    assert resp.status == 403
    assert "key airflow may not roll back prod." in unescape(await resp.text())
    assert len(site.records.list_deploys("prod")) == before  # nothing was queued
    # The same deploy page offers the rollback to a deploy key of prod.
    site.viewer = session(ALICE)
    assert 'id="rollback-link"' in (await site.get(f"/deploys/{first.id}"))[1]


async def test_a_refused_rollback_is_one_line(site: Site) -> None:
    failed = seed(site.records, state="failed")
    for method in ("get", "post"):
        resp = await getattr(site.client, method)(
            f"/deploys/{failed}/rollback", data={"csrf": CSRF}
        )
        assert resp.status == 400
        reason = re.search(r'<p class="reason">([^<]*)</p>', await resp.text())
        assert reason is not None
        assert reason.group(1) == (
            f"deploy #{failed} is failed: only a successful deploy can be rolled back to."
        )
