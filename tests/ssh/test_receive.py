"""The Receiver, called as the hook server calls it: `await receiver(request, say)`.

Real SQLite, real git (the server's bare repository made by repos.ensure, the
commit pushed into it), the FakeEngine and FakeCluster for the rest. The last
tests push with real git through the real hooks/pre-receive and hook socket, so
that the commit arrives in git's quarantine as it does over SSH.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.adapters import repos
from daemon.core.deploys import Deploy
from daemon.ssh.hookline import HookServer
from daemon.ssh.pushrules import ZERO
from daemon.ssh.receive import Receiver
from daemon.ssh.server import PushSession
from tests.support.projects import GIT_ENV, git
from tests.support.sshworld import SSHWorld

MAIN = "refs/heads/main"


@dataclass
class Push:
    """A push session of one key, with the receiver and what it said."""

    w: SSHWorld
    receiver: Receiver
    repo: Path
    commit: str
    lines: list[str] = field(default_factory=list)
    token: str = ""

    def session(self, key: str = "alice", deployment: str = "prod") -> str:
        """Register a live push session, as the SSH server does for git-receive-pack."""
        self.token = secrets.token_hex(16)
        done = asyncio.get_running_loop().create_future()
        self.w.state.sessions[self.token] = PushSession(key, deployment, done)
        return self.token

    async def send(
        self,
        updates: list[list[str]] | None = None,
        options: list[str] | None = None,
        env: dict[str, str] | None = None,
        session: str | None = None,
    ) -> int:
        """Hand the receiver a hook request; then let git "finish" as the SSH server would."""
        request: dict[str, Any] = {
            "session": self.token if session is None else session,
            "updates": [[ZERO, self.commit, MAIN]] if updates is None else updates,
            "options": options or [],
            "env": env or {},
        }
        status = await self.receiver(request, self.lines.append)
        finish(self.w)
        await asyncio.gather(*self.w.pipeline.releases)
        return status

    def only_deploy(self) -> Deploy:
        (rec,) = self.w.records.list_deploys(None, 100)
        return rec


def finish(w: SSHWorld) -> None:
    """git-receive-pack ended: what the SSH server does when git exits."""
    for token, session in list(w.state.sessions.items()):
        if not session.done.done():
            session.done.set_result(None)
        w.state.sessions.pop(token)


def push_objects(project: Path, repo: Path) -> None:
    """Push the project's HEAD into `repo` without its pre-receive hook (a side ref)."""
    git(
        project,
        "push",
        "-q",
        "--receive-pack=git -c core.hooksPath=/dev/null receive-pack",
        str(repo),
        "HEAD:refs/seed/main",
    )


@pytest.fixture
async def push(tmp_path: Path) -> AsyncIterator[Push]:
    w = SSHWorld(tmp_path)
    repo = repos.ensure(w.state_dir, "prod", "main")
    commit = git(w.project, "rev-parse", "HEAD")
    push_objects(w.project, repo)
    p = Push(w, Receiver(w.state, w.pipeline), repo, commit)
    p.session()
    yield p
    finish(w)
    w.close()


async def test_a_good_push_deploys_and_is_accepted(push: Push) -> None:
    assert await push.send() == 0
    rec = push.only_deploy()
    assert (rec.state, rec.trigger, rec.action, rec.actor) == (
        "succeeded",
        "ssh",
        "deploy",
        "alice",
    )
    assert (rec.commit, rec.ref) == (push.commit, MAIN)
    assert rec.description == "Initial project"  # the commit's subject
    assert push.lines[0] == f"-----> deploy #{rec.id} of prod: {push.commit[:12]} (Initial project)"
    assert push.lines[-1].startswith(f"-----> deployed registry.test/airflow/prod:{rec.tag} (")
    assert [image for _, image in push.w.cluster.patched] == [rec.image_ref] * 2
    # git moves the branch once the hook says yes; deployd does not.
    assert git(push.repo, "for-each-ref", "--format=%(refname)", "refs/heads") == ""
    assert push.w.pipeline.releases == set() and push.receiver.running == set()


async def test_a_push_with_dag_import_errors_is_rejected(push: Push) -> None:
    push.w.engine.dag_errors = {"dags/example_dag.py": "No module named 'nope'"}
    assert await push.send() == 1
    rec = push.only_deploy()
    assert (rec.state, rec.step, rec.trigger, rec.actor) == ("failed", "parse", "ssh", "alice")
    said = "\n".join(push.lines)
    assert "No module named 'nope'" in said
    assert any("dags/example_dag.py" in line and "nope" in line for line in push.lines)
    assert "1 DAG file(s) failed to import" in push.lines[-1]
    assert push.w.cluster.patched == [] and push.w.engine.pushed == ["deployd-staging"]


async def test_push_options_reach_the_record(push: Push) -> None:
    push.w.engine.dag_errors = {"dags/example_dag.py": "No module named 'nope'"}
    options = ["force", "pytest", "description=hotfix for the nightly run"]
    assert await push.send(options=options) == 0
    rec = push.only_deploy()
    assert (rec.options.force, rec.options.pytest) == (True, True)
    assert rec.description == "hotfix for the nightly run"
    assert "pytest" in push.w.engine.calls  # -o pytest ran the project's tests
    parse = next(s for s in rec.steps if s.name == "parse")
    assert "deployed anyway: force" in (parse.summary or "")


async def test_an_unknown_push_option_is_refused(push: Push) -> None:
    assert await push.send(options=["yolo"]) == 1
    assert push.lines == [
        "deployd: unknown push option 'yolo': use -o force, -o pytest, "
        "-o image, -o description=TEXT or -o override-freeze."
    ]
    assert push.w.records.list_deploys(None, 100) == []


@pytest.mark.parametrize("session", ["", "0" * 32, "not-a-session"])
async def test_a_push_without_a_live_session_is_refused(push: Push, session: str) -> None:
    assert await push.send(session=session) == 1
    assert push.lines == ["deployd: this push did not come through deployd's SSH server."]
    assert push.w.records.list_deploys(None, 100) == []


async def test_a_session_ends_with_its_push(push: Push) -> None:
    token = push.token
    assert await push.send() == 0
    push.lines.clear()
    assert await push.send(session=token) == 1  # git-receive-pack is gone: so is the token
    assert push.lines == ["deployd: this push did not come through deployd's SSH server."]


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (
            [ZERO, "C", "refs/tags/v1.0"],
            "deployd: tags are not deployed; push the branch instead: git push astro main",
        ),
        (
            [ZERO, "C", "refs/heads/feature"],
            "deployd: this deployment deploys branch main, not feature; "
            "to deploy feature: git push astro feature:main",
        ),
        (
            ["C", ZERO, MAIN],
            "deployd: deleting main is not allowed: it names what was deployed.",
        ),
        (
            [ZERO, "C", "HEAD"],
            "deployd: 'HEAD' is not a ref.",
        ),
    ],
)
async def test_pushes_that_are_not_a_deploy_are_refused_with_what_to_push(
    push: Push, update: list[str], message: str
) -> None:
    update = [push.commit if part == "C" else part for part in update]
    assert await push.send(updates=[update]) == 1
    assert push.lines == [message]
    assert push.w.records.list_deploys(None, 100) == []


async def test_two_refs_in_one_push_are_refused(push: Push) -> None:
    updates = [[ZERO, push.commit, MAIN], [ZERO, push.commit, "refs/heads/other"]]
    assert await push.send(updates=updates) == 1
    assert push.lines == ["deployd: push one branch at a time: git push astro main"]


async def test_a_malformed_update_is_refused(push: Push) -> None:
    assert await push.send(updates=[[ZERO, "nope", MAIN]]) == 1
    assert len(push.lines) == 1 and push.lines[0].startswith("deployd: ")
    assert push.w.records.list_deploys(None, 100) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GIT_QUARANTINE_PATH", "/tmp/elsewhere"),
        ("GIT_OBJECT_DIRECTORY", "{repo}/../staging.git/objects"),
        ("GIT_ALTERNATE_OBJECT_DIRECTORIES", "{repo}/objects:/var/lib/other/objects"),
    ],
)
async def test_quarantine_env_outside_the_repository_is_refused(
    push: Push, name: str, value: str
) -> None:
    env = {name: value.format(repo=push.repo)}
    assert await push.send(env=env) == 1
    assert push.lines == [f"deployd: {name} points outside the repository."]
    assert push.w.records.list_deploys(None, 100) == []


async def test_quarantine_env_inside_the_repository_is_used(push: Push) -> None:
    # The objects are in the repository itself, so naming its object directory works.
    env = {"GIT_OBJECT_DIRECTORY": str(push.repo / "objects")}
    assert await push.send(env=env) == 0
    assert push.only_deploy().state == "succeeded"


async def test_a_push_of_a_commit_git_does_not_have_fails_cleanly(push: Push) -> None:
    missing = "1" * 40
    assert await push.send(updates=[[ZERO, missing, MAIN]]) == 1
    assert len(push.lines) == 1 and push.lines[0].startswith("deployd: git log failed")
    assert push.w.records.list_deploys(None, 100) == []


async def test_a_push_whose_branch_moved_meanwhile_is_refused(push: Push) -> None:
    # Another push landed first: main is no longer what this push started from (nothing).
    git(push.repo, "update-ref", MAIN, push.commit)
    assert await push.send() == 1
    rec = push.only_deploy()
    assert rec.state == "cancelled"
    assert f"main moved to {push.commit[:12]} while you waited" in (rec.error or "")
    assert any(line.startswith("-----> refused: main moved") for line in push.lines)
    assert push.w.engine.calls == []


async def test_a_push_to_a_deployment_the_session_names(push: Push) -> None:
    """The deployment comes from the session (the SSH command), never from the request."""
    staging = repos.ensure(push.w.state_dir, "staging", "main")
    push_objects(push.w.project, staging)
    finish(push.w)
    push.session("bob", "staging")
    assert await push.send() == 0
    rec = push.only_deploy()
    assert (rec.deployment, rec.actor) == ("staging", "bob")
    assert push.w.cluster.patched == []  # staging names no workloads


# -- through the real hook --------------------------------------------------------


async def git_push(p: Push, socket: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`git push` of the project into the server repository, its hook talking to `socket`."""
    argv = ["git", "-C", str(p.w.project), "push", *(f"-o{o}" for o in options)]
    env = {**GIT_ENV, "DEPLOYD_HOOK_SOCKET": str(socket), "DEPLOYD_SESSION": p.token}
    return await asyncio.to_thread(
        subprocess.run,
        [*argv, str(p.repo), "main"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture
async def hook_socket(push: Push) -> AsyncIterator[Path]:
    path = push.w.state_dir / "hook.sock"
    hooks = HookServer(path, push.receiver)
    await hooks.start()
    yield path
    await hooks.close()


async def test_through_the_hook_a_deploy_from_quarantine_moves_the_branch(
    push: Push, hook_socket: Path
) -> None:
    new = push.w.commit("from quarantine")
    out = await git_push(push, hook_socket, "description=via the hook")
    finish(push.w)
    await asyncio.gather(*push.w.pipeline.releases)
    assert out.returncode == 0, out.stderr
    rec = push.only_deploy()
    assert (rec.state, rec.commit, rec.trigger, rec.actor) == ("succeeded", new, "ssh", "alice")
    assert rec.description == "via the hook"
    assert f"remote: -----> deploy #{rec.id} of prod: {new[:12]}" in out.stderr
    assert git(push.repo, "rev-parse", MAIN) == new  # git updated the ref after our yes


async def test_through_the_hook_a_failed_deploy_keeps_nothing(
    push: Push, hook_socket: Path
) -> None:
    new = push.w.commit("broken")
    push.w.engine.dag_errors = {"dags/broken.py": "No module named 'nope'"}
    out = await git_push(push, hook_socket)
    finish(push.w)
    await asyncio.gather(*push.w.pipeline.releases)
    assert out.returncode != 0
    assert "pre-receive hook declined" in out.stderr
    assert "No module named 'nope'" in out.stderr
    assert push.only_deploy().state == "failed"
    assert git(push.repo, "for-each-ref", "--format=%(refname)", "refs/heads") == ""
    # The quarantined objects were dropped with the refused push.
    gone = subprocess.run(
        ["git", "-C", str(push.repo), "cat-file", "-e", new], capture_output=True, check=False
    )
    assert gone.returncode != 0


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("airflow", "deployd: key airflow is read-only: it may fetch and read, not change"),
        ("ghost", "deployd: key ghost is no longer configured."),
    ],
)
async def test_a_push_whose_key_lost_its_rights_meanwhile_is_refused(
    push: Push, key: str, why: str
) -> None:
    """The settings are asked again when the hook arrives: a SIGHUP while git stored the
    push may have made the key read-only or removed it."""
    finish(push.w)
    push.session(key=key)
    assert await push.send() == 1
    assert push.lines and push.lines[0].startswith(why), push.lines
    assert push.w.records.list_deploys(None, 100) == []
