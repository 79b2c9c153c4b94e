"""Freezes and promotions against a real `deployd serve`, with the real OpenSSH client and git
push, the real Engine and registry (htpasswd auth). Keys: alice prod, bob staging, root admin.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ssh.test_server import SLOW_DAG, deploys, project
from tests.support.projects import GOOD_DAG, commit_all
from tests.support.sshserver import Server, make_server
from tests.support.testenv import Deployd, Infra

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path, testenv: Infra) -> Iterator[Server]:
    srv = make_server(tmp_path / "srv", testenv)
    srv.start()
    yield srv
    srv.stop()


def images(srv: Server) -> dict[str, str]:
    """The deployments' image repositories, from the server's config."""
    out, name = {}, ""
    for line in srv.config.read_text().splitlines():
        if line.startswith("name = "):
            name = json.loads(line.split(" = ", 1)[1])
        if line.startswith("image = "):
            out[name] = json.loads(line.split(" = ", 1)[1])
    return out


def test_a_frozen_deployment_refuses_pushes_and_an_admin_pushes_through(
    tmp_path: Path, testenv: Infra, server: Server
) -> None:
    repo = project(tmp_path, testenv, server)
    made = server.ssh("freeze", "prod", "--until", "1h", "--reason", "release", "freeze")
    assert (made.returncode, made.stderr) == (0, "")
    assert made.stdout.startswith("prod is frozen by alice since ")
    refused = server.git(repo, "push", "astro", "main")
    assert refused.returncode != 0 and "pre-receive hook declined" in refused.stderr
    assert "remote: deployd: prod is frozen by alice since " in refused.stderr
    assert (
        ": release freeze. Nothing was deployed; an admin key may push through it: "
        "git push -o override-freeze." in refused.stderr
    )
    assert deploys(server) == []
    not_admin = server.git(repo, "push", "-o", "override-freeze", "astro", "main")
    assert "only an admin key may push through a freeze" in not_admin.stderr
    status = server.ssh("status", "prod")
    assert "  frozen:   by alice since " in status.stdout and "release freeze" in status.stdout
    through = server.git(repo, "push", "-o", "override-freeze", "astro", "main", key="root")
    assert through.returncode == 0, through.stderr
    [rec] = deploys(server)
    assert (rec["state"], rec["actor"]) == ("succeeded", "root")
    assert json.loads(str(rec["options"]))["override_freeze"] is True
    # Keys act on their own deployments only; refusals exit 2.
    for key, command, message in (
        ("bob", ("unfreeze", "prod"), "deployd: key bob may not deploy to deployment prod.\n"),
        ("bob", ("freeze", "prod", "x"), "deployd: key bob may not deploy to deployment prod.\n"),
        ("alice", ("freeze", "prod", "again"), "unfreeze first: deployd unfreeze prod\n"),
    ):
        proc = server.ssh(*command, key=key)
        assert proc.returncode == 2 and proc.stderr.endswith(message), proc.stderr
    done = server.ssh("unfreeze", "prod")
    assert done.returncode == 0 and done.stdout.startswith("prod unfrozen (frozen by alice")
    # A freeze made by `deployd freeze` on the build host (another process) holds too.
    cli = Deployd(server.config, server.state_dir)
    assert cli.run("freeze", "prod", "--reason", "from the cli").returncode == 0
    (repo / "dags" / "new.py").write_text(GOOD_DAG.format(dag_id="new"))
    commit_all(repo, "New DAG")
    again = server.git(repo, "push", "astro", "main")
    assert again.returncode != 0 and "until unfrozen: from the cli. Nothing was" in again.stderr
    assert cli.run("unfreeze", "prod").returncode == 0
    assert server.git(repo, "push", "astro", "main").returncode == 0


def test_a_push_queued_when_the_freeze_starts_is_refused_at_its_turn(
    tmp_path: Path, testenv: Infra, server: Server
) -> None:
    first = project(tmp_path, testenv, server, "first")
    (first / "dags" / "slow.py").write_text(SLOW_DAG)
    commit_all(first, "Slow DAG")
    slow = subprocess.Popen(
        ["git", "-C", str(first), "push", "astro", "main"],
        stderr=subprocess.PIPE,
        text=True,
        env=server.git_env(),
    )
    deadline = time.monotonic() + 60
    while not any(r["state"] == "running" for r in deploys(server)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = project(tmp_path, testenv, server, "second")
    late = subprocess.Popen(
        ["git", "-C", str(second), "push", "astro", "main"],
        stderr=subprocess.PIPE,
        text=True,
        env=server.git_env(),
    )
    while len(deploys(server)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert server.ssh("freeze", "prod", "--reason", "incident").returncode == 0
    _, slow_err = slow.communicate(timeout=120)
    _, late_err = late.communicate(timeout=120)
    assert slow.returncode == 0, slow_err  # a freeze does not stop a deploy under way
    assert late.returncode != 0
    assert "queued behind deploy #1" in late_err
    assert "remote: -----> refused: prod is frozen by alice since " in late_err
    assert "until unfrozen: incident. Nothing was deployed." in late_err
    recs = deploys(server)
    assert recs[1]["state"] == "cancelled" and recs[1]["started_at"] is None


def test_promote_over_ssh_and_promote_from(tmp_path: Path, testenv: Infra, server: Server) -> None:
    repo = project(tmp_path, testenv, server)
    staged = server.git(repo, "push", server.url("staging"), "main", key="bob")
    assert staged.returncode == 0, staged.stderr
    [source] = deploys(server)
    for key, message in (
        ("alice", "deployd: key alice may not read deployment staging.\n"),
        ("bob", "deployd: key bob may not deploy to deployment prod.\n"),
    ):
        proc = server.ssh("promote", "staging", "prod", key=key)
        assert (proc.returncode, proc.stderr) == (2, message)
    done = server.ssh("promote", "staging", "prod", key="root", timeout=120)
    assert done.returncode == 0, done.stderr
    rec = deploys(server)[-1]
    assert (rec["action"], rec["trigger"], rec["promoted_from"], rec["promoted_from_id"]) == (
        "promotion",
        "ssh",
        "staging",
        source["id"],
    )
    assert rec["digest"] == source["digest"]
    repos = images(server)
    assert (
        done.stdout
        == f"deploy #{rec['id']} succeeded: {repos['prod']}:{rec['tag']}@{rec['digest']}\n"
    )
    assert testenv.manifest_digest(repos["prod"], str(rec["tag"])) == source["digest"]
    assert testenv.manifest_digest(repos["staging"], str(source["tag"])) == source["digest"]
    fetched = server.git(repo, "ls-remote", server.url("prod"), "refs/heads/main")
    assert fetched.stdout.split()[0] == source["commit_sha"]  # prod's branch moved with it
    assert f"(promoted from staging #{source['id']})" in server.ssh("deploys", "prod").stdout
    # promote_from, picked up on SIGHUP: pushes to prod are refused with the way in.
    line = f'image = "{repos["prod"]}"'
    text = server.config.read_text()
    assert text.count(line) == 1
    server.config.write_text(text.replace(line, line + '\npromote_from = "staging"'))
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in server.log().split("listening")[-1]:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    (repo / "dags" / "new.py").write_text(GOOD_DAG.format(dag_id="new"))
    commit_all(repo, "New DAG")
    refused = server.git(repo, "push", "astro", "main")
    assert refused.returncode != 0
    assert (
        "remote: deployd: prod takes promotions from staging: deployd promote staging prod"
        in refused.stderr
    )
    assert server.ssh("promote", "staging", "prod", key="root", timeout=120).returncode == 0
