"""GitHub webhooks against a real `deployd serve`: deliveries over HTTP, deploys, statuses.

The GitHub side is a local fake API (tests/support/fakegithub.py) that records the
commit statuses; the repository a webhook deploy fetches from is a real git
repository (a local path, or deployd's own SSH server with a deploy key).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.web import identity
from tests.support.fakegithub import FakeGitHub
from tests.support.projects import GOOD_DAG, commit_all, git, make_project
from tests.support.sshserver import Server, make_server
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration

SECRET = "hook-s3cret"
API_TOKEN = "api-t0ken-for-tests"
SLOW_DAG = "# airflow dag\nimport time\ntime.sleep(4)\n" + GOOD_DAG.format(dag_id="slow")


@dataclass
class Hooked:
    """A running deployd serve with webhooks on, its fake GitHub and its source repository."""

    srv: Server
    github: FakeGitHub
    source: Path

    def post(
        self,
        event: str,
        payload: object = None,
        *,
        raw: bytes | None = None,
        delivery: str | None = None,
        secret: str | None = SECRET,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        body = raw if raw is not None else json.dumps(payload).encode()
        sent = {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-GitHub-Hook-ID": "4242",
            "User-Agent": "GitHub-Hookshot/test",
        }
        if secret is not None:
            sent["X-Hub-Signature-256"] = (
                "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            )
        sent.update(headers or {})
        return request(self.srv, "POST", "/webhooks/github", body, sent)

    def push(
        self,
        commit: str,
        *,
        branch: str = "main",
        repo: str = "acme/dags",
        delivery: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        return self.post(
            "push",
            {
                "ref": f"refs/heads/{branch}",
                "before": "0" * 40,
                "after": commit,
                "deleted": False,
                "repository": {
                    "full_name": repo,
                    "clone_url": "ext::sh -c touch% /tmp/deployd-pwned",
                },
                "head_commit": {"id": commit, "message": "Change the DAGs"},
                "pusher": {"name": "ada"},
            },
            delivery=delivery,
        )

    def api(self, path: str, token: str = API_TOKEN) -> tuple[int, Any]:
        return request(self.srv, "GET", path, None, {"Authorization": f"Bearer {token}"})


def request(
    srv: Server, method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, {"raw": data.decode(errors="replace")}
    finally:
        conn.close()


def branch(server_repo: Path, expected: str, timeout: float = 10) -> str:
    """The server branch once it names `expected` (or what it names at the deadline).

    A deploy is recorded `succeeded` the moment it is true; the branch follows.
    """
    deadline = time.monotonic() + timeout
    while (now := git(server_repo, "rev-parse", "refs/heads/main")) != expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return now


def rows(srv: Server, table: str = "deploys") -> list[dict[str, Any]]:
    conn = sqlite3.connect(srv.state_dir / "deployd.db")
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]
    finally:
        conn.close()


def wait_state(
    srv: Server,
    deploy_id: int,
    states: tuple[str, ...] = ("succeeded", "failed", "superseded", "cancelled", "interrupted"),
    timeout: float = 120,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in rows(srv):
            if r["id"] == deploy_id and r["state"] in states:
                return r
        time.sleep(0.1)
    raise AssertionError(f"deploy #{deploy_id} never reached {states}: {rows(srv)}\n{srv.log()}")


def start_hooked(
    root: Path,
    infra: Infra,
    github: FakeGitHub,
    *,
    grace: int = 600,
    extra: dict[str, object] | None = None,
) -> Hooked:
    source = make_project(root / "github-repo", infra.airflow_image)
    srv = make_server(
        root / "srv",
        infra,
        grace=grace,
        extra={"github_repo": "acme/dags", "fetch_url": str(source), **(extra or {})},
    )
    (root / "secrets").mkdir()
    (root / "secrets" / "webhook").write_text(f"an-old-secret\n{SECRET}\n")
    (root / "secrets" / "github-token").write_text(github.token + "\n")
    (root / "secrets" / "api-token").write_text(API_TOKEN + "\n")
    text = srv.config.read_text().replace(
        "[docker]",
        (
            f'api_token_file = "{root}/secrets/api-token"\n'
            'public_url = "https://deployd.example.com"\n\n'
            f'[github]\nwebhook_secret_file = "{root}/secrets/webhook"\n'
            f'token_file = "{root}/secrets/github-token"\napi_url = "{github.url}"\n\n[docker]'
        ),
        1,
    )
    srv.config.write_text(text)
    srv.start()
    return Hooked(srv, github, source)


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    fake = FakeGitHub().start()
    yield fake
    fake.stop()


@pytest.fixture
def hooked(tmp_path: Path, testenv: Infra, github: FakeGitHub) -> Iterator[Hooked]:
    h = start_hooked(tmp_path, testenv, github)
    yield h
    h.srv.stop()


def test_signed_push_deploys_and_reports_statuses(hooked: Hooked) -> None:
    commit = git(hooked.source, "rev-parse", "HEAD")
    # The status API fails twice (a 502, then a rate limit) before it accepts.
    hooked.github.faults[:] = [(502, {}), (429, {"Retry-After": "1"})]
    delivery = str(uuid.uuid4())
    t0 = time.monotonic()
    status, answer = hooked.push(commit, delivery=delivery)
    assert time.monotonic() - t0 < 2
    assert status == 202, answer
    [queued] = answer["deploys"]
    assert (queued["deployment"], queued["commit"]) == ("prod", commit)
    rec = wait_state(hooked.srv, queued["id"])
    assert rec["state"] == "succeeded", rec
    assert (rec["trigger"], rec["actor"], rec["description"]) == (
        "webhook",
        "github:ada",
        "Change the DAGs",
    )
    calls = hooked.github.wait_for(commit, "success")
    assert [c.body["state"] for c in calls] == ["pending", "success"]
    assert all(c.path == f"/repos/acme/dags/statuses/{commit}" for c in calls)
    assert calls[1].body["context"] == "deployd/prod"
    assert calls[1].body["description"] == f"deployed {rec['tag']}"
    # The link is the deploy's page, signed with the daemon's key (daemon/web/identity.py).
    link = urllib.parse.urlsplit(calls[1].body["target_url"])
    assert link.netloc == "deployd.example.com" and link.path == f"/deploys/{rec['id']}"
    query = dict(urllib.parse.parse_qsl(link.query))
    secret = (hooked.srv.state_dir / "web.key").read_bytes()
    assert identity.check_link(secret, rec["id"], query["exp"], query["sig"], time.time()) is None
    assert int(query["exp"]) > time.time() + 29 * 86400  # status_link_seconds: 30 days
    assert [c.answered for c in hooked.github.calls][:2] == [502, 429]
    # The server repository's branch now names the deployed commit.
    server_repo = hooked.srv.state_dir / "repos" / "prod.git"
    assert branch(server_repo, commit) == commit
    # GitHub's "Redeliver" keeps the delivery id: the original deploy, nothing new.
    again, replay = hooked.push(commit, delivery=delivery)
    assert again == 200 and replay["redelivery"] is True
    assert replay["deploys"][0]["id"] == rec["id"]
    assert replay["deploys"][0]["state"] == "succeeded"
    assert len(rows(hooked.srv)) == 1
    assert not Path("/tmp/deployd-pwned").exists()
    # The API shows the deploy in the CLI's record shape.
    code, listed = hooked.api("/api/deploys?deployment=prod")
    assert code == 200 and [d["id"] for d in listed] == [rec["id"]]
    checkout = next(s for s in listed[0]["steps"] if s["name"] == "checkout")
    assert "fetched" in checkout["summary"]
    code, deps = hooked.api("/api/deployments")
    assert code == 200 and deps[0]["deployed"]["id"] == rec["id"]
    assert hooked.api("/api/deployments", token="wrong")[0] == 401


def test_bad_input_gets_a_clear_answer_and_deploys_nothing(hooked: Hooked) -> None:
    commit = git(hooked.source, "rev-parse", "HEAD")
    payload = {"ref": "refs/heads/main", "after": commit, "repository": {"full_name": "acme/dags"}}
    body = json.dumps(payload).encode()
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"secret": None}, 401, "X-Hub-Signature-256"),
        ({"secret": "wrong"}, 401, "does not match"),
        (
            {
                "headers": {
                    "X-Hub-Signature-256": "sha256="
                    + hmac.new(
                        SECRET.encode(), json.dumps(payload, indent=1).encode(), hashlib.sha256
                    ).hexdigest()
                }
            },
            401,
            "does not match",
        ),  # signed over re-serialised JSON
        (
            {
                "secret": None,
                "headers": {
                    "X-Hub-Signature": "sha1="
                    + hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
                },
            },
            401,
            "X-Hub-Signature-256",
        ),
        (
            {"headers": {"Content-Type": "application/x-www-form-urlencoded"}},
            415,
            "application/json",
        ),
        ({"raw": b"{not json", "secret": SECRET}, 400, "not valid JSON"),
        (
            {
                "raw": json.dumps(
                    {"after": commit, "repository": {"full_name": "acme/dags"}}
                ).encode()
            },
            400,
            "no ref",
        ),
        (
            {"raw": json.dumps({"ref": "refs/heads/main", "after": commit}).encode()},
            400,
            "no repository",
        ),
        ({"headers": {"X-GitHub-Delivery": "../../etc"}}, 400, "X-GitHub-Delivery"),
    ]
    for kwargs, want, text in cases:
        raw = kwargs.pop("raw", body)
        status, answer = hooked.post("push", raw=raw, **kwargs)
        assert status == want, (kwargs, answer)
        assert text in json.dumps(answer), (kwargs, answer)
        assert hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest() not in json.dumps(answer)
    for payload_, reason in (
        ({**payload, "ref": "refs/tags/v1.0"}, "tags are not deployed"),
        ({**payload, "ref": "refs/heads/feature"}, "not a deployed branch"),
        ({**payload, "deleted": True, "after": "0" * 40}, "was deleted"),
        ({**payload, "repository": {"full_name": "mallory/dags"}}, "no deployment follows"),
    ):
        status, answer = hooked.post("push", payload_)
        assert status == 200 and reason in answer["reason"], answer
    assert hooked.post("ping", {"zen": "Design for failure.", "hook_id": 4242})[0] == 200
    assert hooked.post("pull_request", {"action": "opened"})[1]["deployed"] is False
    assert rows(hooked.srv) == []
    assert not Path("/tmp/deployd-pwned").exists()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_huge_and_random_bodies_keep_the_daemon_serving(hooked: Hooked) -> None:
    assert hooked.srv.proc is not None
    pid = hooked.srv.proc.pid
    before = _rss_kb(pid)
    # 30 MiB announced and sent: refused by its length, before it is read or hashed.
    conn = http.client.HTTPConnection("127.0.0.1", hooked.srv.http_port, timeout=60)
    conn.putrequest("POST", "/webhooks/github")
    for k, v in {
        "Content-Type": "application/json",
        "Content-Length": str(30 * 1024 * 1024),
        "X-GitHub-Event": "push",
        "X-Hub-Signature-256": "sha256=" + "0" * 64,
    }.items():
        conn.putheader(k, v)
    conn.endheaders()
    chunk = b"x" * (1024 * 1024)
    try:
        for _ in range(30):
            conn.send(chunk)
    except OSError:
        pass  # the server may close the connection once it has answered
    resp = conn.getresponse()
    assert resp.status == 413 and b"25 MiB" in resp.read()
    conn.close()
    # The same without a length (chunked): refused when the cap is reached.
    conn = http.client.HTTPConnection("127.0.0.1", hooked.srv.http_port, timeout=60)

    def chunks() -> Iterator[bytes]:
        for _ in range(30):
            yield chunk

    try:
        conn.request(
            "POST",
            "/webhooks/github",
            body=chunks(),
            encode_chunked=True,
            headers={
                "Content-Type": "application/json",
                "X-GitHub-Event": "push",
                "X-Hub-Signature-256": "sha256=" + "0" * 64,  # read, to be checked
            },
        )
        status = conn.getresponse().status
    except OSError:
        status = 413  # closed on us after the answer: also a refusal
    assert status == 413
    conn.close()
    assert _rss_kb(pid) - before < 80 * 1024, (before, _rss_kb(pid))
    # 1,000 random byte strings, each validly signed: no 5xx, nothing deployed.
    rng = __import__("random").Random(7)
    statuses = set()
    for i in range(1000):
        raw = rng.randbytes(rng.randrange(0, 2048))
        if i % 3 == 0:
            raw = b'{"ref": ' + raw  # almost JSON
        status, _ = hooked.post(rng.choice(["push", "ping", "create", "push"]), raw=raw)
        statuses.add(status)
    assert statuses <= {200, 400}, statuses
    assert rows(hooked.srv) == []
    assert len(rows(hooked.srv, "deliveries")) == 1000
    assert request(hooked.srv, "GET", "/healthz", None, {})[0] == 200


def test_the_same_delivery_twice_at_once_deploys_once(hooked: Hooked) -> None:
    commit = git(hooked.source, "rev-parse", "HEAD")
    delivery = str(uuid.uuid4())
    answers: list[tuple[int, dict[str, Any]]] = []
    barrier = threading.Barrier(4)

    def send() -> None:
        barrier.wait()
        answers.append(hooked.push(commit, delivery=delivery))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for s, _ in answers) == [200, 200, 200, 202], answers
    ids = {a["deploys"][0]["id"] for _, a in answers}
    assert len(ids) == 1 and len(rows(hooked.srv)) == 1
    assert wait_state(hooked.srv, ids.pop())["state"] == "succeeded"


def test_a_commit_that_is_not_the_branch_tip_at_fetch_url_is_not_deployed(
    hooked: Hooked,
) -> None:
    missing = "b" * 40
    tip = git(hooked.source, "rev-parse", "HEAD")
    status, answer = hooked.push(missing)
    assert status == 202  # not known here: checked against fetch_url when fetched
    rec = wait_state(hooked.srv, answer["deploys"][0]["id"])
    assert rec["state"] == "cancelled" and rec["step"] == "checkout", rec
    assert f"main at fetch_url is at {tip[:12]}, not {missing[:12]}" in rec["error"]
    calls = hooked.github.wait_for(missing, "error")
    assert (
        calls[-1].body["description"] == f"cancelled: at the checkout step; see deploy #{rec['id']}"
    )
    server_repo = hooked.srv.state_dir / "repos" / "prod.git"
    assert git(server_repo, "for-each-ref", "refs/heads") == ""  # nothing deployed, no branch


def test_a_fetch_url_that_cannot_be_read_fails_with_the_reason(
    tmp_path: Path, testenv: Infra, github: FakeGitHub
) -> None:
    h = start_hooked(tmp_path, testenv, github)
    try:
        commit = git(h.source, "rev-parse", "HEAD")
        shutil.rmtree(h.source)
        status, answer = h.push(commit)
        assert status == 202
        rec = wait_state(h.srv, answer["deploys"][0]["id"])
        assert rec["state"] == "failed" and rec["step"] == "checkout", rec
        assert "could not read refs/heads/main at the deployment's fetch_url" in rec["error"]
        calls = github.wait_for(commit, "failure")
        assert calls[-1].body["description"] == (
            f"failed: at the checkout step; see deploy #{rec['id']}"
        )
    finally:
        h.srv.stop()


def test_a_replayed_delivery_never_moves_a_deployment_back(hooked: Hooked) -> None:
    srv, source = hooked.srv, hooked.source
    server_repo = srv.state_dir / "repos" / "prod.git"
    c1 = git(source, "rev-parse", "HEAD")
    status, answer = hooked.push(c1)
    assert wait_state(srv, answer["deploys"][0]["id"])["state"] == "succeeded"
    (source / "dags" / "second.py").write_text(GOOD_DAG.format(dag_id="second"))
    c2 = commit_all(source, "A second DAG")
    status, answer = hooked.push(c2)
    d2 = wait_state(srv, answer["deploys"][0]["id"])
    assert d2["state"] == "succeeded"
    before, delivered = len(rows(srv)), len(rows(srv, "deliveries"))
    # c1's exact body and signature again, under a new delivery id: recorded, not deployed.
    status, answer = hooked.push(c1, delivery=str(uuid.uuid4()))
    assert (status, answer["deployed"]) == (200, False), answer
    assert (
        f"{c1[:12]} is older than what prod runs ({c2[:12]}, deploy #{d2['id']})"
        in (answer["reason"])
    )
    status, answer = hooked.push(c2, delivery=str(uuid.uuid4()))
    assert (status, answer["deployed"]) == (200, False), answer
    assert f"prod runs {c2[:12]} already" in answer["reason"]
    assert len(rows(srv)) == before  # no deploy was created
    assert len(rows(srv, "deliveries")) == delivered + 2  # every delivery recorded
    assert branch(server_repo, c2) == c2
    # A force-push on GitHub: the new tip does not descend from what runs. It is the
    # tip at fetch_url (read when fetched, which a replay cannot change): deployed.
    git(source, "reset", "-q", "--hard", c1)
    (source / "dags" / "rewritten.py").write_text(GOOD_DAG.format(dag_id="rewritten"))
    c3 = commit_all(source, "History rewritten")
    status, answer = hooked.push(c3)
    rec = wait_state(srv, answer["deploys"][0]["id"])
    assert rec["state"] == "succeeded", rec
    log = "\n".join(r["line"] for r in rows(srv, "log") if r["deploy_id"] == rec["id"])
    assert "was force-pushed at fetch_url; deploying its tip" in log
    assert branch(server_repo, c3) == c3


def test_waiting_webhook_deploys_coalesce_but_ssh_pushes_do_not(
    tmp_path: Path, hooked: Hooked
) -> None:
    source = hooked.source
    (source / "dags" / "slow.py").write_text(SLOW_DAG)
    commit_all(source, "A slow DAG")
    first = git(source, "rev-parse", "HEAD")
    status, answer = hooked.push(first)
    assert status == 202
    first_id = answer["deploys"][0]["id"]
    wait_state(hooked.srv, first_id, ("running",))
    later = []
    for n in range(3):
        (source / "dags" / f"extra_{n}.py").write_text(GOOD_DAG.format(dag_id=f"extra_{n}"))
        commit_all(source, f"Extra DAG {n}")
        later.append(git(source, "rev-parse", "HEAD"))
    ids = [hooked.push(c)[1]["deploys"][0]["id"] for c in later[:2]]
    # An SSH push to the same deployment joins the queue between webhook deploys.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(source), str(clone)], check=True)
    srv = hooked.srv
    subprocess.run(["git", "-C", str(clone), "remote", "add", "astro", srv.url()], check=True)
    push = subprocess.Popen(
        ["git", "-C", str(clone), "push", "astro", "HEAD:main"],
        stderr=subprocess.PIPE,
        text=True,
        env=srv.git_env(),
    )
    deadline = time.monotonic() + 30
    while not any(r["trigger"] == "ssh" for r in rows(srv)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ids.append(hooked.push(later[2])[1]["deploys"][0]["id"])
    push.communicate(timeout=180)
    finals = {i: wait_state(srv, i) for i in [first_id, *ids]}
    ssh = next(r for r in rows(srv) if r["trigger"] == "ssh")
    ssh = wait_state(srv, ssh["id"])
    assert finals[first_id]["state"] == "succeeded"
    assert [finals[i]["state"] for i in ids] == ["superseded", "superseded", "succeeded"]
    # Each newer delivery supersedes the one waiting before it, at once.
    assert f"superseded by deploy #{ids[1]}" in finals[ids[0]]["error"]
    assert f"superseded by deploy #{ids[2]}" in finals[ids[1]]["error"]
    assert ssh["state"] != "superseded"
    server_repo = srv.state_dir / "repos" / "prod.git"
    assert branch(server_repo, later[2]) == later[2]
    superseded = hooked.github.wait_for(later[0], "error")
    assert superseded[-1].body["description"].startswith("superseded")


def test_live_log_stream_over_the_api(hooked: Hooked) -> None:
    (hooked.source / "dags" / "slow.py").write_text(SLOW_DAG)
    commit_all(hooked.source, "A slow DAG")
    _, answer = hooked.push(git(hooked.source, "rev-parse", "HEAD"))
    ident = answer["deploys"][0]["id"]
    wait_state(hooked.srv, ident, ("running",))
    conn = http.client.HTTPConnection("127.0.0.1", hooked.srv.http_port, timeout=60)
    conn.request(
        "GET", f"/api/deploys/{ident}/log", headers={"Authorization": f"Bearer {API_TOKEN}"}
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/x-ndjson"
    first = json.loads(resp.readline())
    assert first["line"].startswith(f"-----> deploy #{ident} of prod")
    running_when_first_line_came = rows(hooked.srv)[0]["state"] == "running"
    lines = [json.loads(x)["line"] for x in resp.read().splitlines()]
    conn.close()
    assert running_when_first_line_came
    assert any(x.startswith("-----> deployed") for x in lines), lines
    assert wait_state(hooked.srv, ident)["state"] == "succeeded"


def test_fetch_over_ssh_with_a_deploy_key(
    tmp_path: Path, testenv: Infra, github: FakeGitHub
) -> None:
    # The "GitHub" here is deployd's own SSH server: staging's repository, read with bob's key.
    h = start_hooked(tmp_path, testenv, github)
    try:
        srv = h.srv
        clone = tmp_path / "staging-src"
        subprocess.run(["git", "clone", "-q", str(h.source), str(clone)], check=True)
        pushed = srv.git(clone, "push", srv.url("staging"), "HEAD:main", key="bob")
        assert pushed.returncode == 0, pushed.stderr
        text = srv.config.read_text().replace(
            f'fetch_url = "{h.source}"',
            f'fetch_url = "ssh://git@127.0.0.1:{srv.ssh_port}/staging"\n'
            f'fetch_key_file = "{srv.key("bob")}"',
        )
        srv.config.write_text(text)
        srv.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reloaded" not in srv.log().split("listening")[-1]:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        commit = git(clone, "rev-parse", "HEAD")
        status, answer = h.push(commit)
        assert status == 202
        rec = wait_state(srv, answer["deploys"][0]["id"])
        assert rec["state"] == "succeeded", (rec, srv.log())
        # The host key was learned on first use into deployd's own known_hosts.
        found = subprocess.run(
            [
                "ssh-keygen",
                "-F",
                f"[127.0.0.1]:{srv.ssh_port}",
                "-f",
                str(srv.state_dir / "known_hosts"),
            ],
            capture_output=True,
        )
        assert found.returncode == 0
    finally:
        h.srv.stop()


def test_accepted_deliveries_survive_a_restart(
    tmp_path: Path, testenv: Infra, github: FakeGitHub
) -> None:
    h = start_hooked(tmp_path, testenv, github, grace=1)
    srv = h.srv
    (h.source / "dags" / "slow.py").write_text(SLOW_DAG.replace("(4)", "(60)"))
    commit_all(h.source, "A very slow DAG")
    slow = git(h.source, "rev-parse", "HEAD")
    slow_id = h.push(slow)[1]["deploys"][0]["id"]
    wait_state(srv, slow_id, ("running",))
    (h.source / "dags" / "slow.py").unlink()
    commit_all(h.source, "Not slow any more")  # pushed to GitHub while the slow one runs
    fixed = git(h.source, "rev-parse", "HEAD")
    fixed_id = h.push(fixed)[1]["deploys"][0]["id"]
    srv.signal(signal.SIGTERM)
    assert srv.stop() == 0
    by_id = {r["id"]: r for r in rows(srv)}
    assert by_id[slow_id]["state"] == "interrupted"
    assert by_id[fixed_id]["state"] == "queued"  # accepted: it waits for the daemon
    try:
        srv.start()
        rec = wait_state(srv, fixed_id)
        assert rec["state"] == "succeeded", (rec, srv.log())
        assert "resuming webhook deploys" in srv.log()
        assert os.getpid() != rec["pid"]
    finally:
        srv.stop()


def test_a_flood_of_large_missigned_bodies_is_bounded_and_others_are_served(
    hooked: Hooked,
) -> None:
    pid = hooked.srv.proc.pid  # type: ignore[union-attr]
    before = _rss_kb(pid)
    body = b"x" * (25 * 1024 * 1024)
    headers = {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": "flood",
        "X-Hub-Signature-256": "sha256=" + "0" * 64,  # well-formed, wrong
    }
    peak, health = [before], []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak.append(_rss_kb(pid))
            t0 = time.monotonic()
            assert request(hooked.srv, "GET", "/healthz", None, {})[0] == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.05)

    def post(_: int) -> int:
        return request(hooked.srv, "POST", "/webhooks/github", body, headers)[0]

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(40) as pool:
            statuses = list(pool.map(post, range(40)))
    finally:
        stop.set()
        watcher.join()
    assert statuses == [401] * 40
    # At most a few bodies are held at once (4 x 25 MiB), and the memory comes back.
    assert max(peak) - before < 200 * 1024, (before, max(peak))
    time.sleep(1)
    assert _rss_kb(pid) - before < 100 * 1024, (before, _rss_kb(pid))
    assert max(health) < 1.0, max(health)  # everyone else is still served
    # The same bodies without a signature are answered before a byte of them is read.
    conn = http.client.HTTPConnection("127.0.0.1", hooked.srv.http_port, timeout=10)
    conn.putrequest("POST", "/webhooks/github")
    for k, v in {**headers, "Content-Length": str(len(body))}.items():
        if k != "X-Hub-Signature-256":
            conn.putheader(k, v)
    conn.endheaders()  # and no body sent at all
    assert conn.getresponse().status == 401
    conn.close()
