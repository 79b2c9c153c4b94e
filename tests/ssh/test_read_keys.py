"""Read keys (`[[key]] access = "read"`) with the real OpenSSH client and git against the
real asyncssh server on 127.0.0.1 port 0 (no Docker: the SSHWorld's fakes deploy).

A read key is what Airflow's GitDagBundle or git-sync is given: it may clone, fetch and
ls-remote its deployments and run the read commands, and is refused everything that
changes what runs, in one line that says it is read-only.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon.core import usecases
from tests.support.projects import commit_all, git
from tests.support.sshserver import SSH_OPTS
from tests.support.sshworld import SSHWorld, serving

READ_ONLY = "deployd: key airflow is read-only: it may fetch and read, not change deployment {}."


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[SSHWorld]:
    async with serving(SSHWorld(tmp_path)) as w:
        yield w


def ssh_command(w: SSHWorld, key: str) -> list[str]:
    return ["ssh", *SSH_OPTS, "-i", str(w.root / "keys" / key), "-p", str(w.port)]


async def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> Ran:
    # Asynchronously: the server answering runs on this test's event loop.
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def ssh(w: SSHWorld, command: str, key: str = "airflow") -> Ran:
    """`ssh -p PORT git@127.0.0.1 COMMAND` with OpenSSH, as `key`."""
    return await _run([*ssh_command(w, key), "git@127.0.0.1", *command.split()])


async def git_as(w: SSHWorld, key: str, *args: str, cwd: Path | None = None) -> Ran:
    """git with OpenSSH as its transport, as `key`."""
    env = {
        **os.environ,
        "GIT_SSH_COMMAND": shlex.join(ssh_command(w, key)),
        "GIT_TERMINAL_PROMPT": "0",
    }
    return await _run(["git", *args], cwd=cwd, env=env)


def url(w: SSHWorld, deployment: str) -> str:
    return f"ssh://git@127.0.0.1:{w.port}/{deployment}"


async def test_a_read_key_lists_clones_and_fetches_its_deployment(
    world: SSHWorld, tmp_path: Path
) -> None:
    first = await world.deploy("prod")
    listed = await git_as(world, "airflow", "ls-remote", url(world, "prod"))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == f"{first.commit}\tHEAD\n{first.commit}\trefs/heads/main\n"
    clone = tmp_path / "dags"
    cloned = await git_as(world, "airflow", "clone", "-q", url(world, "prod"), str(clone))
    assert cloned.returncode == 0, cloned.stderr
    assert git(clone, "rev-parse", "HEAD") == first.commit
    assert (clone / "dags").is_dir()
    world.commit("second")
    second = await world.deploy("prod")
    fetched = await git_as(world, "airflow", "fetch", "-q", "origin", cwd=clone)
    assert fetched.returncode == 0, fetched.stderr
    assert git(clone, "rev-parse", "origin/main") == second.commit


async def test_a_read_key_runs_the_read_commands_of_its_deployment(world: SSHWorld) -> None:
    rec = await world.deploy("prod")
    await world.deploy("staging")
    listed = await ssh(world, "deploys")
    assert (listed.returncode, listed.stderr) == (0, "")
    assert [row.split()[:2] for row in listed.stdout.splitlines()[1:]] == [[str(rec.id), "prod"]]
    status = await ssh(world, "status prod")
    assert (status.returncode, status.stderr) == (0, "")
    assert f"#{rec.id}" in status.stdout
    logs = await ssh(world, f"logs {rec.id}")
    assert (logs.returncode, logs.stderr) == (0, "")
    assert logs.stdout.splitlines() == [row.line for row in world.records.log_lines(rec.id)]
    helped = await ssh(world, "help")
    assert helped.returncode == 0 and "git push" in helped.stdout


async def test_a_read_key_may_not_push_and_git_never_starts(
    world: SSHWorld, tmp_path: Path
) -> None:
    first = await world.deploy("prod")
    clone = tmp_path / "work"
    cloned = await git_as(world, "airflow", "clone", "-q", url(world, "prod"), str(clone))
    assert cloned.returncode == 0, cloned.stderr
    (clone / "dags" / "new.py").write_text("x = 2\n")
    new = commit_all(clone, "a DAG change")
    pushed = await git_as(world, "airflow", "push", "origin", "HEAD:main", cwd=clone)
    assert pushed.returncode != 0
    assert pushed.stderr.splitlines()[0] == READ_ONLY.format("prod")
    repo = world.state_dir / "repos" / "prod.git"
    assert git(repo, "rev-parse", "refs/heads/main") == first.commit
    # Refused before git-receive-pack ran: not one object of the push was stored.
    assert (await _run(["git", "-C", str(repo), "cat-file", "-e", new])).returncode != 0
    assert world.state.sessions == {}
    assert [d.id for d in world.records.list_deploys("prod")] == [first.id]


@pytest.mark.parametrize(
    "command",
    [
        "rollback prod",
        "rollback prod --freeze --reason bad DAG",
        "promote staging prod",
        "freeze prod --reason release",
        "unfreeze prod",
    ],
)
async def test_a_read_key_may_not_change_what_runs(world: SSHWorld, command: str) -> None:
    await world.deploy("prod")
    world.commit("second")
    await world.deploy("prod")
    before = len(world.records.list_deploys(None, 100))
    refused = await ssh(world, command)
    assert (refused.returncode, refused.stdout) == (
        1 if command == "rollback prod" else 2,
        "",
    )
    assert refused.stderr == READ_ONLY.format("prod") + "\n"
    assert len(world.records.list_deploys(None, 100)) == before  # nothing was queued
    assert usecases.freeze_of(world.records, world.dep("prod")) is None


async def test_a_read_key_may_not_cancel_a_deploy_of_its_deployment(world: SSHWorld) -> None:
    rec = await world.deploy("prod")
    refused = await ssh(world, f"cancel {rec.id}")
    assert (refused.returncode, refused.stdout) == (2, "")
    assert refused.stderr == READ_ONLY.format("prod") + "\n"
    # A deploy key of prod is told the deploy has ended: it got past the permission.
    mine = await ssh(world, f"cancel {rec.id}", "alice")
    assert f"deploy #{rec.id} has already ended" in mine.stderr


async def test_another_deployment_is_refused_to_a_read_key_like_an_unknown_one(
    world: SSHWorld,
) -> None:
    other = await world.deploy("staging")
    for command in ("deploys {}", "status {}", "rollback {}", "freeze {} --reason x"):
        forbidden = await ssh(world, command.format("staging"))
        unknown = await ssh(world, command.format("nowhere"))
        assert forbidden.returncode != 0 and forbidden.stdout == "", command
        assert (unknown.returncode, unknown.stdout) == (forbidden.returncode, ""), command
        assert unknown.stderr == forbidden.stderr.replace("staging", "nowhere"), command
    assert (await ssh(world, "deploys staging")).stderr == (
        "deployd: key airflow may not use deployment staging.\n"
    )
    assert (await ssh(world, "rollback staging")).stderr == READ_ONLY.format("staging") + "\n"
    for verb, said in (
        ("ls-remote", "deployd: key airflow may not use deployment {}."),
        ("push", READ_ONLY),
    ):
        for name in ("staging", "nowhere"):
            # From the project's work tree, which has commits to push.
            tail = ("HEAD:main",) if verb == "push" else ()
            ran = await git_as(world, "airflow", verb, url(world, name), *tail, cwd=world.project)
            assert ran.returncode != 0
            assert ran.stderr.splitlines()[0] == said.format(name), (verb, name)
    logs = await ssh(world, f"logs {other.id}")
    missing = await ssh(world, "logs 999")
    assert logs.stderr == f"deployd: there is no deploy #{other.id} that key airflow may read.\n"
    assert missing.stderr == logs.stderr.replace(f"#{other.id}", "#999")
    cancel = await ssh(world, f"cancel {other.id}")
    nothing = await ssh(world, "cancel 999")
    assert cancel.stderr == (
        f"deployd: there is no deploy #{other.id} that key airflow may cancel.\n"
    )
    assert nothing.stderr == cancel.stderr.replace(f"#{other.id}", "#999")
