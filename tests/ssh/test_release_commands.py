"""promote, freeze, unfreeze and rollback --freeze over SSH, and pushes into a frozen or
promotion-only deployment, in process: the real asyncssh server and client, the Receiver
as the hook calls it, a Pipeline over the fakes (tests/ssh/test_commands.py's set-up).

Keys: alice may use prod, bob staging, root all; carol (added here) prod and staging.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from daemon import config
from daemon.adapters import repos
from daemon.config import Key
from daemon.core import usecases
from daemon.errors import InvalidName
from daemon.ssh import pushrules, server
from daemon.ssh.pushrules import Command, Refused
from daemon.ssh.receive import Receiver
from tests.ssh.test_receive import Push, finish, push_objects
from tests.support.projects import git
from tests.support.sshworld import SSHWorld


def reconfigure(w: SSHWorld, **changes: Any) -> None:
    """Settings changed as a SIGHUP would: for the SSH server and the pipeline alike."""
    w.settings = dataclasses.replace(w.settings, **changes)
    w.state.load_keys(w.settings)
    w.services.settings = w.settings


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[SSHWorld]:
    w = SSHWorld(tmp_path)
    carol = asyncssh.generate_private_key("ssh-ed25519", comment="carol")
    w.keys["carol"] = carol
    public = carol.export_public_key().decode().strip()
    reconfigure(w, keys=(*w.settings.keys, Key("carol", public, ("prod", "staging"))))
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


# -- parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("promote staging prod", Command("promote", ("staging", "prod"))),
        ("promote staging prod 12", Command("promote", ("staging", "prod", "12"))),
        ("freeze prod release freeze", Command("freeze", ("prod",), reason="release freeze")),
        (
            "freeze prod --reason release freeze --until 2h",
            Command("freeze", ("prod",), reason="release freeze", until="2h"),
        ),
        (
            "freeze prod --until 2026-12-24T08:00:00Z 'db upgrade'",
            Command("freeze", ("prod",), reason="db upgrade", until="2026-12-24T08:00:00Z"),
        ),
        ("freeze prod", Command("freeze", ("prod",), reason="")),
        ("unfreeze prod", Command("unfreeze", ("prod",))),
        ("rollback prod --freeze", Command("rollback", ("prod",), reason="")),
        (
            "rollback prod 41 --freeze --reason bad release",
            Command("rollback", ("prod", "41"), reason="bad release"),
        ),
        ("rollback prod 41", Command("rollback", ("prod", "41"))),
    ],
)
def test_release_commands_parse(line: str, command: Command) -> None:
    assert pushrules.parse_command(line) == command


@pytest.mark.parametrize(
    "line",
    [
        "promote staging",
        "promote staging prod 1 2",
        "promote staging prod x",
        "promote Staging prod",
        "unfreeze",
        "unfreeze prod now",
        "freeze prod --until",
        "rollback prod --reason no freeze",
        "rollback prod 1 2 --freeze",
    ],
)
def test_malformed_release_commands_are_refused(line: str) -> None:
    with pytest.raises((Refused, InvalidName)):
        pushrules.parse_command(line)


def test_override_freeze_is_a_push_option() -> None:
    assert pushrules.parse_options(["override-freeze"]).override_freeze
    assert not pushrules.parse_options(["force"]).override_freeze


# -- promote ------------------------------------------------------------------------


async def test_promote_needs_deploy_on_the_target_and_read_on_the_source(
    world: SSHWorld,
) -> None:
    source = await world.deploy("staging")
    count = len(world.records.list_deploys(None, 100))
    for key, message in (
        ("alice", "deployd: key alice may not read deployment staging.\n"),
        ("bob", "deployd: key bob may not deploy to deployment prod.\n"),
    ):
        refused = await run(world, "promote staging prod", key)
        assert (refused.exit_status, refused.stdout, refused.stderr) == (2, "", message)
    unknown = await run(world, "promote nowhere prod", "carol")
    assert (unknown.exit_status, unknown.stderr) == (
        2,
        "deployd: key carol may not read deployment nowhere.\n",
    )
    assert len(world.records.list_deploys(None, 100)) == count
    done = await run(world, "promote staging prod", "carol")
    assert done.exit_status == 0, done.stderr
    (rec, *_) = world.records.list_deploys("prod")
    assert (rec.action, rec.trigger, rec.actor, rec.promoted_from) == (
        "promotion",
        "ssh",
        "carol",
        "staging",
    )
    assert rec.promoted_from_id == source.id and rec.digest == source.digest
    assert done.stdout == f"deploy #{rec.id} succeeded: {rec.image_ref}\n"
    assert f"-----> deploy #{rec.id} of prod" in done.stderr and "-----> push" in done.stderr
    # history and status show where it came from
    listing = (await run(world, "deploys prod", "carol")).stdout
    assert f"(promoted from staging #{source.id})" in listing
    status = (await run(world, "status prod", "carol")).stdout
    assert f"deployed: deploy #{rec.id} (promoted from staging #{source.id}) of" in status
    assert world.pipeline.commands == set()


async def test_promote_refusals_exit_2_with_the_reason(world: SSHWorld) -> None:
    nothing = await run(world, "promote staging prod", "root")
    assert (nothing.exit_status, nothing.stderr) == (
        2,
        "deployd: staging has no successful deploy to promote.\n",
    )
    prod = await world.deploy("prod")
    other = await run(world, f"promote staging prod {prod.id}", "root")
    assert (other.exit_status, other.stderr) == (
        2,
        f"deployd: there is no deploy #{prod.id} of staging.\n",
    )


# -- freeze, unfreeze -------------------------------------------------------------------


async def test_freeze_and_unfreeze_over_ssh(world: SSHWorld) -> None:
    made = await run(world, "freeze prod --until 2h --reason release freeze")
    assert (made.exit_status, made.stderr) == (0, "")
    assert made.stdout.startswith("prod is frozen by alice since ")
    assert made.stdout.endswith(" UTC: release freeze\n") and " until 20" in made.stdout
    held = usecases.freeze_of(world.records, world.dep("prod"))
    assert held is not None and (held.by, held.reason) == ("alice", "release freeze")
    again = await run(world, "freeze prod other reason", "root")
    assert again.exit_status == 2
    assert "to change it, unfreeze first: deployd unfreeze prod" in again.stderr
    status = (await run(world, "status prod")).stdout.splitlines()
    assert status[1].startswith("  frozen:   by alice since ") and "release freeze" in status[1]
    listing = (await run(world, "deploys prod")).stdout.splitlines()
    assert listing[0] == made.stdout.strip() and listing[1] == "no deploys yet"
    refused = await run(world, "unfreeze prod", "bob")
    assert (refused.exit_status, refused.stderr) == (
        2,
        "deployd: key bob may not deploy to deployment prod.\n",
    )
    done = await run(world, "unfreeze prod", "root")
    assert (done.exit_status, done.stdout) == (
        0,
        "prod unfrozen (frozen by alice: release freeze)\n",
    )
    gone = await run(world, "unfreeze prod")
    assert (gone.exit_status, gone.stderr) == (2, "deployd: prod is not frozen.\n")


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("freeze prod", "a freeze needs a reason"),
        ("freeze prod --until soon x", "--until 'soon' is neither an RFC 3339 time"),
        ("freeze prod --until 2020-01-01T00:00:00Z x", "is in the past"),
        ("freeze staging x", "key alice may not deploy to deployment staging."),
    ],
)
async def test_freeze_refusals_exit_2(world: SSHWorld, command: str, message: str) -> None:
    result = await run(world, command)
    assert result.exit_status == 2 and message in result.stderr, result.stderr
    assert usecases.freeze_of(world.records, world.dep("prod")) is None


async def test_rollback_freeze_freezes_then_rolls_back(world: SSHWorld) -> None:
    first = await world.deploy("prod")
    world.commit("second")
    await world.deploy("prod")
    result = await run(world, "rollback prod --freeze --reason bad release")
    assert result.exit_status == 0, result.stderr
    assert result.stderr.startswith("deployd: froze prod is frozen by alice since ")
    (latest, *_) = world.records.list_deploys("prod")
    assert (latest.action, latest.rollback_of, latest.state) == ("rollback", first.id, "succeeded")
    held = usecases.freeze_of(world.records, world.dep("prod"))
    assert held is not None and (held.by, held.reason, held.until) == ("alice", "bad release", None)
    # Frozen: a second rollback --freeze keeps the freeze and still rolls back.
    kept = await run(world, f"rollback prod {first.id} --freeze", "root")
    assert kept.exit_status == 0 and "deployd: kept the freeze: prod is frozen by alice" in (
        kept.stderr
    )
    assert usecases.freeze_of(world.records, world.dep("prod")) == held
    refused = await run(world, "rollback prod --freeze", "bob")
    assert (refused.exit_status, refused.stderr) == (
        2,
        "deployd: key bob may not deploy to deployment prod.\n",
    )


# -- pushes -------------------------------------------------------------------------


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


async def test_a_push_into_a_frozen_deployment_is_refused_at_once(push: Push) -> None:
    usecases.freeze(push.w.records, push.w.dep("prod"), by="bob", reason="release freeze")
    assert await push.send() == 1
    [line] = push.lines
    assert line.startswith("deployd: prod is frozen by bob since ")
    assert line.endswith(
        "until unfrozen: release freeze. Nothing was deployed; an admin key may push "
        "through it: git push -o override-freeze."
    )
    assert push.w.records.list_deploys(None, 100) == [] and push.w.engine.calls == []


async def test_only_an_admin_pushes_through_a_freeze_and_it_is_recorded(push: Push) -> None:
    usecases.freeze(push.w.records, push.w.dep("prod"), by="bob", reason="release freeze")
    assert await push.send(options=["override-freeze"]) == 1
    assert push.lines == [
        "deployd: only an admin key may push through a freeze (-o override-freeze)."
    ]
    push.lines.clear()
    push.session("root")
    assert await push.send(options=["override-freeze"]) == 0
    rec = push.only_deploy()
    assert (rec.state, rec.actor, rec.options.override_freeze) == ("succeeded", "root", True)


async def test_a_push_into_a_promotion_only_deployment_names_the_way(push: Push) -> None:
    deps = tuple(
        dataclasses.replace(d, promote_from="staging") if d.name == "prod" else d
        for d in push.w.settings.deployments
    )
    reconfigure(push.w, deployments=deps)
    assert await push.send() == 1
    assert push.lines == [
        "deployd: prod takes promotions from staging: deployd promote staging prod"
    ]
    assert push.w.records.list_deploys(None, 100) == []


def test_the_help_names_the_release_commands() -> None:
    text = "\n".join(server.views.help_lines("2222"))
    for verb in ("promote SOURCE TARGET", "freeze DEPLOYMENT", "unfreeze DEPLOYMENT", "--freeze"):
        assert verb in text
    assert config.FreezeWindow  # the config knows windows (tests/test_config.py)
