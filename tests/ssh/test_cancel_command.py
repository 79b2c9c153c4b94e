"""`ssh ... cancel DEPLOY_ID` in process: the real asyncssh server on port 0, asyncssh's
client, a Pipeline over the fakes running the deploy being cancelled. Against a real
`deployd serve`, the Engine and the simulator: tests/core/test_cancel_e2e.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from daemon.core import cancel, usecases
from daemon.core.deploys import Options
from daemon.ssh import server
from tests.support.sshworld import SSHWorld


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SSHWorld]:
    monkeypatch.setattr(cancel, "POLL_SECONDS", 0.02)
    w = SSHWorld(tmp_path)
    host_key = w.state_dir / "ssh_host_ed25519_key"
    server.ensure_host_key(host_key)
    acceptor = await server.start(w.state, "127.0.0.1", 0, host_key)
    w.port = acceptor.get_port()
    yield w
    acceptor.close()
    await acceptor.wait_closed()
    w.close()


async def run(w: SSHWorld, command: str, key: str = "alice") -> Any:
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


async def building(w: SSHWorld) -> tuple[asyncio.Task[Any], int]:
    """A deploy of prod, started and held in its build; (its task, its id)."""
    w.engine.block_build = threading.Event()
    request = usecases.deploy_checkout(
        w.dep("prod"), w.project, Options(), trigger="ssh", actor="alice"
    )
    task = asyncio.create_task(w.pipeline.run(request, w.lines.append))
    deadline = time.monotonic() + 5
    while not any(call.startswith("build ") for call in w.engine.calls):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    (rec,) = w.records.list_deploys("prod", 1)
    return task, rec.id


async def test_a_key_cancels_a_deploy_of_its_deployment_and_follows_it(world: SSHWorld) -> None:
    task, ident = await building(world)
    result = await run(world, f"cancel {ident}")
    assert result.exit_status == 0, result.stderr
    assert result.stdout == f"deploy #{ident} cancelled by alice during build\n"
    err = result.stderr.splitlines()
    assert (
        err[0]
        == f"deployd: deploy #{ident} of prod (in build): cancel asked; waiting for it to stop"
    )
    assert "-----> cancel asked by alice during build: stopping" in err
    assert err[-1] == f"-----> deploy #{ident} cancelled: cancelled by alice during build"
    outcome = await task
    assert (outcome.record.state, outcome.record.cancelled_by) == ("cancelled", "alice")
    # The one waiting on it (a pusher) saw the same line, and gets a failed outcome: rejected.
    assert f"-----> deploy #{ident} cancelled: cancelled by alice during build" in world.lines
    assert outcome.exit_code == 1


async def test_an_admin_key_cancels_any_deploy(world: SSHWorld) -> None:
    task, ident = await building(world)
    result = await run(world, f"cancel {ident}", "root")
    assert result.exit_status == 0, result.stderr
    assert result.stdout == f"deploy #{ident} cancelled by root during build\n"
    await task


async def test_refusals_exit_2_with_one_line(world: SSHWorld) -> None:
    task, ident = await building(world)
    # Another deployment's deploy is refused as if it did not exist.
    other = await run(world, f"cancel {ident}", "bob")
    assert (other.exit_status, other.stdout) == (2, "")
    assert other.stderr == f"deployd: there is no deploy #{ident} that key bob may cancel.\n"
    unknown = await run(world, "cancel 999")
    assert (unknown.exit_status, unknown.stderr) == (
        2,
        "deployd: there is no deploy #999 that key alice may cancel.\n",
    )
    assert world.records.get(ident).state == "running"  # type: ignore[union-attr]
    assert (await run(world, f"cancel {ident}")).exit_status == 0
    await task
    ended = await run(world, f"cancel {ident}")
    assert (ended.exit_status, ended.stderr) == (
        2,
        f"deployd: deploy #{ident} has already ended (cancelled by alice); "
        "there is nothing to cancel.\n",
    )
    world.engine.block_build = None
    done = await world.deploy("prod")
    late = await run(world, f"cancel {done.id}")
    assert late.exit_status == 2
    assert "has already ended (succeeded)" in late.stderr


async def test_help_names_cancel(world: SSHWorld) -> None:
    result = await run(world, "help")
    assert "git@HOST cancel DEPLOY_ID       stop a queued or running deploy" in result.stdout
