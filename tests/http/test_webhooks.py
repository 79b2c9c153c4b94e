"""Webhook pieces without Docker: signatures, decisions, delivery records, statuses, the API."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from daemon import config, views
from daemon.adapters import git
from daemon.adapters.github import retry_after, status_for
from daemon.adapters.records import Records
from daemon.core.context import Services
from daemon.core.deploys import Deploy, Options
from daemon.core.pipeline import Pipeline
from daemon.core.policy import Lifecycle
from daemon.errors import GitError
from daemon.http.api import Api
from daemon.http.webhooks import Webhooks, decide, signature_ok
from daemon.metrics import Metrics
from daemon.web.identity import page_url
from tests.support.fakes import FakeEngine

SHA = "a" * 40


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def settings(tmp_path: Path, *, token: str | None = None) -> config.Settings:
    data: dict[str, Any] = {
        "server": {"state_dir": str(tmp_path / "state")},
        "deployment": [
            {
                "name": "prod",
                "image": "r.example/a/prod",
                "github_repo": "Acme/Dags",
                "fetch_url": str(tmp_path / "src"),
            },
            {
                "name": "staging",
                "image": "r.example/a/st",
                "branch": "develop",
                "github_repo": "acme/dags",
                "fetch_url": str(tmp_path / "src"),
            },
            {
                "name": "other",
                "image": "r.example/a/o",
                "github_repo": "acme/other",
                "fetch_url": str(tmp_path / "src"),
            },
        ],
    }
    if token:
        (tmp_path / "api-token").write_text(token + "\n")
        data["server"]["api_token_file"] = str(tmp_path / "api-token")
    return config.parse(data, base=tmp_path, path=tmp_path / "deployd.toml")


def push(ref: str = "refs/heads/main", repo: str = "acme/dags", **extra: Any) -> dict[str, Any]:
    return {
        "ref": ref,
        "after": SHA,
        "deleted": False,
        "repository": {"full_name": repo},
        "head_commit": {"message": "Add a DAG\n\nlong body"},
        "pusher": {"name": "ada"},
        **extra,
    }


# -- signatures --------------------------------------------------------------


def test_signature_over_the_raw_bytes_with_any_configured_secret() -> None:
    body = b'{"zen": "Keep it logically awesome.",  "hook_id": 1}'
    assert signature_ok(["s3cret"], body, sign("s3cret", body))
    assert signature_ok(["old", "new"], body, sign("new", body))  # rotation
    assert signature_ok(["s3cret"], body, sign("s3cret", body).upper().replace("SHA256", "sha256"))
    assert not signature_ok(["s3cret"], body, sign("wrong", body))
    assert not signature_ok(["s3cret"], body, None)
    assert not signature_ok(["s3cret"], body, "")
    assert not signature_ok(["s3cret"], body, sign("s3cret", body)[:-1])
    # Re-serialised JSON is other bytes: its signature does not cover this body.
    reserialised = json.dumps(json.loads(body)).encode()
    assert reserialised != body
    assert not signature_ok(["s3cret"], body, sign("s3cret", reserialised))
    # SHA-1 (X-Hub-Signature's format) is not accepted in the SHA-256 header.
    sha1 = "sha1=" + hmac.new(b"s3cret", body, hashlib.sha1).hexdigest()
    assert not signature_ok(["s3cret"], body, sha1)
    assert not signature_ok([], body, sign("s3cret", body))


# -- decisions ---------------------------------------------------------------


def test_push_to_a_followed_branch_queues_one_deploy_per_deployment(tmp_path: Path) -> None:
    s = settings(tmp_path)
    verdict = decide("push", push(), s)
    assert verdict.status == 202
    [req] = verdict.requests
    assert req.deployment.name == "prod"  # repository names compare case-insensitively
    assert (req.commit, req.ref, req.trigger, req.actor) == (
        SHA,
        "refs/heads/main",
        "webhook",
        "github:ada",
    )
    assert req.subject == "Add a DAG" and req.fetch and req.options == Options()
    assert req.repo == tmp_path / "state" / "repos" / "prod.git"
    [dev] = decide("push", push("refs/heads/develop"), s).requests
    assert dev.deployment.name == "staging"


@pytest.mark.parametrize(
    ("event", "payload", "status", "reason"),
    [
        ("ping", {"zen": "hi"}, 200, "pong"),
        ("issues", {"action": "opened"}, 200, "issues events do not deploy"),
        ("push", push("refs/tags/v1"), 200, "tags are not deployed"),
        (
            "push",
            push("refs/heads/feature"),
            200,
            "feature is not a deployed branch (prod deploys main, staging deploys develop)",
        ),
        ("push", push(deleted=True, after="0" * 40), 200, "branch main was deleted"),
        ("push", push(after="0" * 40), 200, "was deleted"),
        ("push", push(repo="mallory/dags"), 200, "no deployment follows mallory/dags"),
        ("push", {k: v for k, v in push().items() if k != "ref"}, 400, "has no ref"),
        ("push", {k: v for k, v in push().items() if k != "repository"}, 400, "no repository"),
        ("push", push(repository="acme/dags"), 400, "no repository.full_name"),
        ("push", push(after="HEAD~1"), 400, "not a commit id"),
        ("push", ["not", "an", "object"], 400, "not a JSON object"),
    ],
)
def test_everything_else_deploys_nothing(
    tmp_path: Path, event: str, payload: object, status: int, reason: str
) -> None:
    verdict = decide(event, payload, settings(tmp_path))
    assert verdict.requests == []
    assert verdict.status == status
    assert reason in json.dumps(verdict.answer)


def test_urls_in_the_payload_are_never_used(tmp_path: Path) -> None:
    hostile = push(
        repository={
            "full_name": "acme/dags",
            "clone_url": "ext::sh -c touch% /tmp/x",
            "ssh_url": "ext::sh -c touch% /tmp/x",
        }
    )
    [req] = decide("push", hostile, settings(tmp_path)).requests
    assert "ext::" not in repr(req)
    assert req.deployment.fetch_url == str(tmp_path / "src")


def test_fetch_refuses_ext_transport_and_keeps_the_token_out_of_argv(tmp_path: Path) -> None:
    repo = tmp_path / "repo.git"
    git.init_bare(repo, {})
    marker = tmp_path / "pwned"
    env = git.fetch_env(key_file=None, token="t0ken", known_hosts=tmp_path / "kh")
    with pytest.raises(GitError, match="could not fetch"):
        git.fetch_remote(repo, f"ext::sh -c touch% {marker}", SHA, env)
    assert not marker.exists()
    assert (
        "t0ken" not in json.dumps([k for k in env])
        and env["GIT_CONFIG_KEY_0"] == "http.extraHeader"
    )


def test_fetch_from_a_local_path_and_a_missing_commit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    env = {
        "GIT_AUTHOR_NAME": "a",
        "GIT_AUTHOR_EMAIL": "a@b",
        "GIT_COMMITTER_NAME": "a",
        "GIT_COMMITTER_EMAIL": "a@b",
    }
    import os
    import subprocess

    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(
        ["git", "-C", str(src), "commit", "-q", "--allow-empty", "-m", "x"],
        check=True,
        env={**os.environ, **env},
    )
    commit = git.resolve(src, "HEAD")
    assert commit
    repo = tmp_path / "repo.git"
    git.init_bare(repo, {})
    fenv = git.fetch_env(key_file=None, token=None, known_hosts=tmp_path / "kh")
    assert git.fetch_remote(repo, str(src), commit, fenv) is True
    assert git.resolve(repo, commit) == commit
    assert git.fetch_remote(repo, str(src), commit, fenv) is False  # already here
    with pytest.raises(GitError, match="could not fetch commit bbbbbbbbbbbb"):
        git.fetch_remote(repo, str(src), "b" * 40, fenv)


# -- delivery records --------------------------------------------------------


def _deploy_kwargs() -> dict[str, Any]:
    return {
        "deployment": "prod",
        "trigger": "webhook",
        "actor": "github:ada",
        "ref": "refs/heads/main",
        "options": Options(),
        "pid": 1,
        "commit": SHA,
        "description": "x",
    }


def test_a_delivery_is_recorded_once_with_its_deploys(tmp_path: Path) -> None:
    records = Records(tmp_path / "d.db")
    new, status, answer, ids = records.record_delivery(
        "7", "guid-1", "push", 202, {"deployed": True}, [_deploy_kwargs()]
    )
    assert (new, status, answer) == (True, 202, {"deployed": True}) and len(ids) == 1
    # A redelivery gets what the first arrival recorded, whatever it would decide now.
    again = records.record_delivery("7", "guid-1", "push", 400, {"x": 1}, [_deploy_kwargs()])
    assert again == (False, 202, {"deployed": True}, ids)
    # Same delivery id from another hook is another delivery.
    assert records.record_delivery("8", "guid-1", "push", 202, {}, [_deploy_kwargs()])[0]
    assert len(records.list_deploys("prod")) == 2
    # Deliveries that deploy nothing are recorded once too.
    assert records.record_delivery("7", "ping-1", "ping", 200, {"r": "pong"}, []) == (
        True,
        200,
        {"r": "pong"},
        [],
    )
    assert records.record_delivery("7", "ping-1", "ping", 200, {}, []) == (
        False,
        200,
        {"r": "pong"},
        [],
    )


def test_concurrent_duplicates_from_two_connections_make_one_deploy(tmp_path: Path) -> None:
    Records(tmp_path / "d.db").close()
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def deliver() -> None:
        records = Records(tmp_path / "d.db")  # a connection each, like two processes
        barrier.wait()
        new, *_ = records.record_delivery("7", "guid-2", "push", 202, {}, [_deploy_kwargs()])
        results.append(new)
        records.close()

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert len(Records(tmp_path / "d.db").list_deploys("prod")) == 1


def test_a_failing_deploy_insert_records_no_delivery(tmp_path: Path) -> None:
    records = Records(tmp_path / "d.db")
    with pytest.raises(TypeError):
        records.record_delivery("7", "guid-3", "push", 202, {}, [{"nonsense": 1}])
    assert records.list_deploys() == []
    new, *_ = records.record_delivery("7", "guid-3", "push", 200, {}, [])
    assert new


# -- commit statuses ---------------------------------------------------------


def _record(state: str, error: str = "", step: str | None = None, tag: str = "t1") -> Deploy:
    return Deploy(
        id=12,
        deployment="prod",
        state=state,
        trigger="webhook",
        action="deploy",
        actor="github:ada",
        ref="refs/heads/main",
        commit="a" * 40,
        created_at=0.0,
        error=error,
        tag=tag,
        step=step,
    )


@pytest.mark.parametrize(
    ("state", "error", "step", "gh", "text"),
    [
        ("running", "", "build", "pending", "deploy #12 running"),
        ("succeeded", "", None, "success", "deployed t1"),
        (
            "failed",
            "dags/x.py: SyntaxError at line 3",
            "parse",
            "failure",
            "failed: dags/x.py: SyntaxError at line 3",
        ),
        ("failed", "the tests failed: 1 failed", "pytest", "failure", "failed: the tests failed"),
        # Errors of other steps name hosts and clusters: only the step is said.
        (
            "rolled_back",
            "deployment/s on https://10.0.0.1:6443 ...",
            "roll",
            "failure",
            "rolled_back: at the roll step; see deploy #12",
        ),
        (
            "failed",
            "could not fetch from git@github.example:acme/x",
            "checkout",
            "failure",
            "failed: at the checkout step; see deploy #12",
        ),
        ("failed", "internal error: KeyError", "checkout", "error", "failed: at the checkout step"),
        (
            "superseded",
            "superseded by deploy #13",
            None,
            "error",
            "superseded: superseded by deploy #13",
        ),
        ("interrupted", "deployd shut down", "roll", "error", "interrupted: at the roll step"),
    ],
)
def test_status_for_each_outcome(
    state: str, error: str, step: str | None, gh: str, text: str
) -> None:
    link = page_url("https://deployd.example", 12)
    body = status_for(_record(state, error, step), link)
    assert body["state"] == gh and body["description"].startswith(text), body
    assert body["context"] == "deployd/prod"
    assert body["target_url"] == "https://deployd.example/deploys/12"
    signed_link = page_url("https://deployd.example/", 12, "exp=9&sig=ab")
    signed = status_for(_record(state, error, step), signed_link)
    assert signed["target_url"] == "https://deployd.example/deploys/12?exp=9&sig=ab"
    long = status_for(_record("failed", "x" * 500, "parse"), page_url("", 12))
    assert len(long["description"]) == 140 and "target_url" not in long


def test_retry_after_rules() -> None:
    assert retry_after(502, {}, 0) == 0.0
    assert retry_after(429, {"Retry-After": "3"}, 0) == 3.0
    assert retry_after(503, {"Retry-After": "9999"}, 0) == 60.0
    assert retry_after(403, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "105"}, 100) == 5.0
    assert retry_after(403, {"X-RateLimit-Remaining": "12"}, 0) is None
    assert retry_after(422, {}, 0) is None
    assert retry_after(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 1445412478) == 2.0
    assert retry_after(503, {"Retry-After": "garbage"}, 0) == 15.0


# -- the API -----------------------------------------------------------------


async def _client(api: Api) -> TestClient[Any, Any]:
    from aiohttp import web

    app = web.Application()
    app.add_routes(api.routes())
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_api_is_closed_without_a_token(tmp_path: Path) -> None:
    s = settings(tmp_path)
    client = await _client(Api(lambda: s, Records(tmp_path / "d.db")))
    try:
        resp = await client.get("/api/deployments", headers={"Authorization": "Bearer x"})
        assert resp.status == 403
        assert "api_token_file" in (await resp.json())["error"]
    finally:
        await client.close()


async def test_api_answers_with_the_cli_record_shape(tmp_path: Path) -> None:
    s = settings(tmp_path, token="api-t0ken")
    records = Records(tmp_path / "d.db")
    ident = records.create_deploy(**_deploy_kwargs())
    records.append_log(ident, None, ["-----> hello", "bye"])
    records.transition(ident, "queued", "cancelled", error="test")
    client = await _client(Api(lambda: s, records))
    auth = {"Authorization": "Bearer api-t0ken"}
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "api-t0ken"}):
            resp = await client.get("/api/deploys", headers=headers)
            assert resp.status == 401 and "api-t0ken" not in await resp.text()
        deps = await (await client.get("/api/deployments", headers=auth)).json()
        assert [d["name"] for d in deps] == ["prod", "staging", "other"]
        listed = await (await client.get("/api/deploys?deployment=prod", headers=auth)).json()
        assert listed == [views.deploy_json(d) for d in records.list_deploys("prod")]
        assert listed[0]["action"] == "deploy" and listed[0]["trigger"] == "webhook"
        one = await (await client.get(f"/api/deploys/{ident}", headers=auth)).json()
        assert one == views.deploy_json(records.get(ident))  # type: ignore[arg-type]
        log = await client.get(f"/api/deploys/{ident}/log", headers=auth)
        lines = [json.loads(x) for x in (await log.text()).splitlines()]
        assert [x["line"] for x in lines] == ["-----> hello", "bye"]
        assert (await client.get("/api/deploys/999", headers=auth)).status == 404
        assert (await client.get("/api/deploys/abc", headers=auth)).status == 400
        assert (await client.get("/api/deploys?deployment=nope", headers=auth)).status == 400
    finally:
        await client.close()


def test_a_new_delivery_supersedes_the_queued_ones_of_its_deployment(tmp_path: Path) -> None:
    records = Records(tmp_path / "d.db")
    ssh = records.create_deploy(**{**_deploy_kwargs(), "trigger": "ssh"})
    _, _, _, [first] = records.record_delivery("1", "a", "push", 202, {}, [_deploy_kwargs()])
    records.transition(first, "queued", "running")
    _, _, _, [second] = records.record_delivery("1", "b", "push", 202, {}, [_deploy_kwargs()])
    other = records.record_delivery(
        "1", "c", "push", 202, {}, [{**_deploy_kwargs(), "deployment": "staging"}]
    )[3][0]
    _, _, _, [third] = records.record_delivery("1", "d", "push", 202, {}, [_deploy_kwargs()])
    state = {i: records.state(i) for i in (ssh, first, second, other, third)}
    # The running one runs on, SSH pushes and other deployments are not touched.
    assert state == {
        ssh: "queued",
        first: "running",
        second: "superseded",
        other: "queued",
        third: "queued",
    }
    rec = records.get(second)
    assert rec is not None and (rec.error or "").startswith(f"superseded by deploy #{third}")
    assert rec.finished_at is not None


def test_a_github_repo_needs_a_fetch_url(tmp_path: Path) -> None:
    from daemon.errors import ConfigError

    with pytest.raises(ConfigError, match="fetch_url"):
        config.parse(
            {
                "server": {"state_dir": str(tmp_path)},
                "deployment": [{"name": "p", "image": "r.example/a/p", "github_repo": "acme/x"}],
            },
            base=tmp_path,
            path=tmp_path / "d.toml",
        )


async def test_api_answers_401_to_undecodable_tokens(tmp_path: Path) -> None:
    s = settings(tmp_path, token="api-t0ken")
    client = await _client(Api(lambda: s, Records(tmp_path / "d.db")))
    try:
        resp = await client.get(
            "/api/deployments", headers={"Authorization": "Bearer \udcff\udcfe"}
        )
        assert resp.status == 401
    finally:
        await client.close()


def test_github_host_key_is_pinned_once(tmp_path: Path) -> None:
    known = tmp_path / "state" / "known_hosts"
    git.seed_known_hosts(known)
    known.write_text(known.read_text() + "[127.0.0.1]:2222 ssh-ed25519 AAAAother")
    git.seed_known_hosts(known)
    lines = known.read_text().splitlines()
    assert lines.count(git.GITHUB_HOST_KEY) == 1 and len(lines) == 2
    # ssh itself accepts the line as github.com's key.
    import subprocess

    found = subprocess.run(
        ["ssh-keygen", "-F", "github.com", "-f", str(known)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert found.returncode == 0 and "ssh-ed25519" in found.stdout


async def test_each_answer_is_counted_by_event_and_outcome(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    s = config.parse(
        {
            "server": {"state_dir": str(tmp_path / "state")},
            "github": {"webhook_secret_file": str(tmp_path / "secret")},
            "deployment": [
                {
                    "name": "prod",
                    "image": "r.example/a/prod",
                    "github_repo": "acme/dags",
                    "fetch_url": str(tmp_path / "src"),
                }
            ],
        },
        base=tmp_path,
        path=tmp_path / "deployd.toml",
    )
    records = Records(s.server.state_dir / "deployd.db")
    pipeline = Pipeline(Services(s, records, FakeEngine()))
    pipeline.lifecycle = Lifecycle.DRAINING  # deploys stay queued: none runs here
    counted: list[tuple[str, str]] = []
    metrics = Metrics(lambda: s, Records(s.server.state_dir / "deployd.db"))

    def count(event: str, outcome: str) -> None:
        counted.append((event, outcome))
        metrics.webhook_delivery(event, outcome)  # refuses outcomes it does not know

    app = web.Application()
    app.router.add_post("/hook", Webhooks(lambda: s, records, pipeline, count).handle)
    client = TestClient(TestServer(app))
    await client.start_server()

    async def post(event: str, payload: object, **headers: str) -> int:
        body = json.dumps(payload).encode()
        sent = {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": headers.pop("delivery", f"d-{len(counted)}"),
            "X-Hub-Signature-256": sign("s3cret", body),
            **headers,
        }
        resp = await client.post("/hook", data=body, headers=sent)
        return resp.status

    try:
        assert await post("ping", {"zen": "hi"}) == 200
        assert await post("push", push(), delivery="once") == 202
        assert await post("push", push(), delivery="once") == 200  # GitHub's Redeliver
        assert await post("push", push(repo="someone/else")) == 200
        assert await post("evil_event", {}) == 200
        assert await post("push", push(), **{"X-Hub-Signature-256": "sha256=" + "0" * 64}) == 401
        assert await post("push", push(), **{"Content-Type": "text/plain"}) == 415
        assert await post("push", push(), delivery="../../etc") == 400
        assert await post("push", "not an object") == 400
    finally:
        await client.close()
    assert counted == [
        ("ping", "ignored"),
        ("push", "deployed"),
        ("push", "duplicate"),
        ("push", "ignored"),
        ("evil_event", "ignored"),
        ("push", "unauthorized"),
        ("push", "rejected"),
        ("push", "rejected"),
        ("push", "rejected"),
    ]
    text = metrics.exposition().decode()
    assert 'deployd_webhook_deliveries_total{event="other",outcome="ignored"} 1.0' in text
    assert 'deployd_webhook_deliveries_total{event="push",outcome="rejected"} 3.0' in text
