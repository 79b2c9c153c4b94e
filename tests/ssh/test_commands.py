"""The SSH server's commands and refusals, in process: the real asyncssh server on
127.0.0.1 port 0, asyncssh's client with keys made here, a Pipeline over the fakes.

What the real OpenSSH client and `git push` do against `deployd serve` is in
tests/ssh/test_server.py (integration); here every command answers in milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from daemon.core.deploys import Options
from daemon.printable import printable
from daemon.ssh import server
from daemon.ssh.gate import Gate
from tests.support.projects import commit_all, git
from tests.support.sshworld import SSHWorld


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[SSHWorld]:
    w = SSHWorld(tmp_path)
    host_key = w.state_dir / "ssh_host_ed25519_key"
    server.ensure_host_key(host_key)
    acceptor = await server.start(w.state, "127.0.0.1", 0, host_key)
    w.port = acceptor.get_port()
    yield w
    acceptor.close()
    await acceptor.wait_closed()
    w.close()


def connect(w: SSHWorld, key: str | None = "alice", **options: Any) -> Any:
    """`asyncssh.connect` as `key` (None: no key), ignoring ~/.ssh and any agent."""
    options.setdefault("username", "git")
    return asyncssh.connect(
        "127.0.0.1",
        w.port,
        client_keys=[w.keys[key]] if key else None,
        known_hosts=None,
        config=None,
        agent_path=None,
        **options,
    )


async def run(w: SSHWorld, command: str | None, key: str = "alice", **options: Any) -> Any:
    async with connect(w, key) as conn:
        return await conn.run(command, **options)


def table(stdout: str) -> list[tuple[int, str]]:
    """(id, deployment) of each row of the `deploys` table."""
    header, *rows = stdout.splitlines()
    assert header.split()[:3] == ["ID", "DEPLOYMENT", "STATE"]
    return [(int(row.split()[0]), row.split()[1]) for row in rows]


async def test_help_says_how_to_push_and_what_to_run(world: SSHWorld) -> None:
    result = await run(world, "help")
    assert (result.exit_status, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0] == "deployd: deploy Apache Airflow projects with git push."
    assert "  git remote add astro ssh://git@HOST:2222/DEPLOYMENT" in lines
    assert any(line.startswith("  ssh -p 2222 git@HOST rollback DEPLOYMENT") for line in lines)


async def test_deploys_lists_only_the_keys_own_deployments(world: SSHWorld) -> None:
    prod = await world.deploy("prod")
    staging = await world.deploy("staging")
    mine = await run(world, "deploys", "alice")
    assert (mine.exit_status, mine.stderr) == (0, "")
    assert table(mine.stdout) == [(prod.id, "prod")]
    assert table((await run(world, "deploys", "bob")).stdout) == [(staging.id, "staging")]
    everything = await run(world, "deploys", "root")
    assert table(everything.stdout) == [(staging.id, "staging"), (prod.id, "prod")]
    assert table((await run(world, "deploys prod", "root")).stdout) == [(prod.id, "prod")]


async def test_deploys_and_status_show_the_recorded_kind(world: SSHWorld) -> None:
    built = await world.deploy("prod")
    assert built.kind == "image"  # every deploy builds an image until DAG deploys land
    # A DAG deploy as the records will hold it (the pipeline does not make them yet).
    dags = world.records.create_deploy(
        deployment="prod", trigger="ssh", actor="alice", ref="refs/heads/main",
        options=Options(), pid=1, commit=built.commit, kind="dags",
    )  # fmt: skip
    assert world.records.transition(dags, "queued", "running")
    assert world.records.transition(dags, "running", "succeeded")
    listing = (await run(world, "deploys prod")).stdout.splitlines()
    assert listing[0].split()[:4] == ["ID", "DEPLOYMENT", "STATE", "KIND"]
    assert [row.split()[:4] for row in listing[1:]] == [
        [str(dags), "prod", "succeeded", "dags"],
        [str(built.id), "prod", "succeeded", "image"],
    ]
    status = (await run(world, "status prod")).stdout.splitlines()
    assert status[1].startswith(f"  deployed: deploy #{dags} of ")
    assert "  kind:     dags deploy" in status


async def test_deploys_before_any_deploy(world: SSHWorld) -> None:
    result = await run(world, "deploys prod")
    assert (result.exit_status, result.stdout) == (0, "no deploys yet\n")


async def test_deploys_of_a_forbidden_deployment_is_refused_like_an_unknown_one(
    world: SSHWorld,
) -> None:
    await world.deploy("staging")
    forbidden = await run(world, "deploys staging")
    unknown = await run(world, "deploys nowhere")
    assert (forbidden.exit_status, forbidden.stdout) == (1, "")
    assert forbidden.stderr == "deployd: key alice may not use deployment staging.\n"
    assert (unknown.exit_status, unknown.stdout) == (1, "")
    assert unknown.stderr == forbidden.stderr.replace("staging", "nowhere")


async def test_logs_prints_an_own_deploys_stored_lines(world: SSHWorld) -> None:
    rec = await world.deploy("prod")
    result = await run(world, f"logs {rec.id}")
    assert (result.exit_status, result.stderr) == (0, "")
    stored = [row.line for row in world.records.log_lines(rec.id)]
    assert result.stdout.splitlines() == stored
    assert stored[0].startswith(f"-----> deploy #{rec.id} of prod")
    assert any("deployed registry.test/airflow/prod" in line for line in stored)


async def test_logs_of_another_deployments_deploy_is_refused_like_a_missing_one(
    world: SSHWorld,
) -> None:
    other = await world.deploy("staging")
    forbidden = await run(world, f"logs {other.id}")
    missing = await run(world, "logs 999")
    assert (forbidden.exit_status, forbidden.stdout) == (1, "")
    assert forbidden.stderr == f"deployd: there is no deploy #{other.id} that key alice may read.\n"
    assert (missing.exit_status, missing.stdout) == (1, "")
    assert missing.stderr == forbidden.stderr.replace(f"#{other.id} ", "#999 ")
    readable = await run(world, f"logs {other.id}", "root")
    assert readable.exit_status == 0 and readable.stdout.startswith("-----> deploy #")


async def test_status_shows_the_records_and_the_clusters_workloads(world: SSHWorld) -> None:
    rec = await world.deploy("prod")
    assert rec.commit is not None
    result = await run(world, "status prod")
    assert (result.exit_status, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0] == "deployment prod"
    assert lines[1].startswith(f"  deployed: deploy #{rec.id} of {rec.commit[:12]} at ")
    assert lines[2] == f"  image:    {rec.image}:{rec.tag}@{rec.digest}"
    assert lines[3] == "  kind:     image deploy"
    for workload in ("deployment/airflow-scheduler", "statefulset/airflow-worker"):
        assert f"  {workload}: not deployed by deployd; rolled out" in lines
    # The FakeCluster's pods run its own image, not the deploy's: status says so.
    assert (
        lines.count(
            f"      running: 1 x registry.test/airflow/prod:old  <- not deploy #{rec.id}'s image"
        )
        == 2
    )
    assert world.cluster.closed == 2  # the deploy's client, then the status's


async def test_status_of_a_deployment_without_workloads_or_deploys(world: SSHWorld) -> None:
    result = await run(world, "status staging", "bob")
    assert result.exit_status == 0
    assert result.stdout.splitlines() == [
        "deployment staging",
        "  deployed: nothing yet",
        "  cluster:  no workloads configured",
    ]
    refused = await run(world, "status prod", "bob")
    assert (refused.exit_status, refused.stderr) == (
        1,
        "deployd: key bob may not use deployment prod.\n",
    )


async def test_rollback_runs_the_earlier_image_through_the_pipeline(world: SSHWorld) -> None:
    first = await world.deploy("prod")
    world.commit("second")
    second = await world.deploy("prod")
    world.cluster.patched.clear()
    calls = len(world.engine.calls)
    result = await run(world, "rollback prod")
    assert result.exit_status == 0, result.stderr
    (latest, *_) = world.records.list_deploys("prod")
    assert latest.id not in (first.id, second.id)
    assert result.stdout == f"deploy #{latest.id} succeeded: {first.image_ref}\n"
    assert (latest.state, latest.trigger, latest.action, latest.actor) == (
        "succeeded",
        "ssh",
        "rollback",
        "alice",
    )
    assert (latest.rollback_of, latest.digest) == (first.id, first.digest)
    # The progress goes to stderr, as for a push.
    progress = result.stderr.splitlines()
    assert progress[0].startswith(f"-----> deploy #{latest.id} of prod")
    assert "-----> roll" in progress
    assert world.cluster.patched == [
        ("deployment/airflow-scheduler", first.image_ref),
        ("statefulset/airflow-worker", first.image_ref),
    ]
    assert not any(call.startswith("build") for call in world.engine.calls[calls:])
    assert world.pipeline.commands == set()


async def test_rollback_to_a_chosen_deploy_and_its_refusals(world: SSHWorld) -> None:
    first = await world.deploy("prod")
    world.commit("second")
    await world.deploy("prod")
    chosen = await run(world, f"rollback prod {first.id}", "root")
    assert chosen.exit_status == 0, chosen.stderr
    (latest, *_) = world.records.list_deploys("prod")
    assert (latest.actor, latest.rollback_of) == ("root", first.id)
    count = len(world.records.list_deploys(None, 100))
    forbidden = await run(world, "rollback prod", "bob")
    assert (forbidden.exit_status, forbidden.stdout) == (1, "")
    assert forbidden.stderr == "deployd: key bob may not use deployment prod.\n"
    nothing = await run(world, "rollback staging", "bob")
    assert nothing.exit_status == 1
    assert "deployment staging names no workloads" in nothing.stderr
    assert len(world.records.list_deploys(None, 100)) == count  # nothing was queued


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("rm -rf /", "deployd: unknown command 'rm'; see: ssh git@HOST help"),
        ("help me", "deployd: unknown command 'help'; see: ssh git@HOST help"),
        ("scp -t /etc", "deployd: unknown command 'scp'; see: ssh git@HOST help"),
        ("git-receive-pack", "deployd: usage: git-receive-pack 'DEPLOYMENT' (git does this"),
        ("  ", "deployd: deployd offers no shell; see: ssh git@HOST help"),
    ],
)
async def test_unknown_commands_are_refused(world: SSHWorld, command: str, message: str) -> None:
    result = await run(world, command)
    assert (result.exit_status, result.stdout) == (1, "")
    assert result.stderr.startswith(message), result.stderr


async def test_git_on_a_forbidden_deployment_is_refused_like_an_unknown_one(
    world: SSHWorld,
) -> None:
    for verb in ("git-receive-pack", "git-upload-pack"):
        forbidden = await run(world, f"{verb} 'staging'")
        unknown = await run(world, f"{verb} 'nowhere.git'")
        assert (forbidden.exit_status, forbidden.stdout) == (1, "")
        assert forbidden.stderr == "deployd: key alice may not use deployment staging.\n"
        assert (unknown.exit_status, unknown.stderr) == (
            1,
            "deployd: key alice may not use deployment nowhere.\n",
        )
    assert not (world.state_dir / "repos" / "staging.git").exists()
    assert world.state.sessions == {}


async def test_git_upload_pack_of_an_own_deployment_runs_git(world: SSHWorld) -> None:
    # An empty repository: git advertises no refs, reads the client's flush and exits 0.
    result = await run(world, "git-upload-pack '/prod.git'", input=b"0000", encoding=None)
    assert (result.exit_status, result.stdout, result.stderr) == (0, b"0000", b"")
    assert (world.state_dir / "repos" / "prod.git" / "hooks" / "pre-receive").is_file()


@pytest.mark.parametrize(
    ("env", "v2"),
    [
        ({"GIT_PROTOCOL": "version=2"}, True),
        ({"GIT_PROTOCOL": "version=2:evil"}, False),
        ({"GIT_EXEC_PATH": "/tmp", "LD_PRELOAD": "/tmp/x.so"}, False),
    ],
)
async def test_only_a_well_formed_git_protocol_reaches_git(
    world: SSHWorld, env: dict[str, str], v2: bool
) -> None:
    result = await run(world, "git-upload-pack 'prod'", input=b"0000", encoding=None, env=env)
    assert result.exit_status == 0, result.stderr
    assert result.stdout.startswith(b"000eversion 2\n") is v2
    if not v2:
        assert result.stdout == b"0000"


async def test_git_receive_pack_holds_a_session_only_while_git_runs(world: SSHWorld) -> None:
    # The client sends a flush: nothing to push. git exits 0; the session is gone.
    result = await run(world, "git-receive-pack 'prod'", input=b"0000", encoding=None)
    assert result.exit_status == 0, result.stderr
    assert b"report-status" in result.stdout and b"push-options" in result.stdout
    assert world.state.sessions == {}
    assert world.records.list_deploys(None, 10) == []


async def test_a_shell_is_refused(world: SSHWorld) -> None:
    result = await run(world, None)
    assert (result.exit_status, result.stdout) == (1, "")
    assert result.stderr == "deployd: deployd offers no shell; see: ssh git@HOST help\n"


async def test_a_pty_is_refused(world: SSHWorld) -> None:
    async with connect(world) as conn:
        with pytest.raises(asyncssh.ChannelOpenError, match="PTY"):
            await conn.run("help", term_type="xterm")
        # The connection stays usable without one.
        assert (await conn.run("help")).exit_status == 0


async def test_the_sftp_subsystem_is_refused(world: SSHWorld) -> None:
    async with connect(world) as conn:
        # asyncssh refuses the request itself: the server has no sftp_factory.
        with pytest.raises(asyncssh.ChannelOpenError, match="Session request failed"):
            await conn.run(subsystem="sftp")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.start_sftp_client()
        assert (await conn.run("help")).exit_status == 0


async def test_other_subsystems_are_refused(world: SSHWorld) -> None:
    result = await run(world, None, subsystem="netconf")
    assert (result.exit_status, result.stdout) == (1, "")
    assert result.stderr == "deployd: subsystems (sftp) are not offered.\n"


async def test_a_key_not_in_the_config_cannot_log_in(world: SSHWorld) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await connect(world, "eve")


async def test_a_password_is_not_accepted(world: SSHWorld) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await connect(world, None, password="hunter2")
    # Nor a configured key's holder with a password instead of the key.
    with pytest.raises(asyncssh.PermissionDenied):
        await connect(world, None, username="alice", password="alice")


async def test_terminal_escapes_in_a_subject_reach_no_reader_raw(world: SSHWorld) -> None:
    (world.project / "dags" / "x.py").write_text("x = 1\n")
    commit_all(world.project, "Fix \x1b]0;pwned\x07\x1b[2J title\r-----> deployed prod:forged")
    subject = git(world.project, "log", "-1", "--format=%s")
    assert "\x1b" in subject  # git keeps the escapes: deployd must neutralise them
    rec = await world.deploy("prod")
    assert rec.description == printable(subject)
    assert rec.description.startswith("Fix ^[]0;pwned^G^[[2J title^")
    shown = await run(world, f"logs {rec.id}")
    listed = await run(world, "deploys prod")
    for text in (shown.stdout, listed.stdout, "".join(world.lines)):
        assert not any(c in text for c in "\x1b\x07\r"), text
    assert printable(subject)[:40] in shown.stdout.splitlines()[0]


async def _hold(w: SSHWorld, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from `source` that never authenticates (it sends nothing)."""
    return await asyncio.open_connection("127.0.0.1", w.port, local_addr=(source, 0))


async def _admitted(reader: asyncio.StreamReader) -> bool:
    """Whether the server kept the connection open (it sent its banner and waits for ours)."""
    banner = await asyncio.wait_for(reader.readline(), 5)
    try:
        more = await asyncio.wait_for(reader.read(1), 0.3)
    except TimeoutError:
        return banner.startswith(b"SSH-2.0-")
    assert more == b"", more
    return False  # closed on us at once


async def test_unauthenticated_connections_are_capped_and_users_still_get_in(
    world: SSHWorld,
) -> None:
    world.state.gate = Gate(total=4, per_source=2, stall_seconds=0)  # stalled at once
    async with connect(world, "alice") as inside:  # in before the flood
        held = [await _hold(world, "127.0.0.2"), await _hold(world, "127.0.0.2")]
        assert [await _admitted(r) for r, _ in held] == [True, True]
        # A third from the same address is closed at once.
        reader, _ = await _hold(world, "127.0.0.2")
        assert not await _admitted(reader)
        # Another address still gets in, and someone already in is served.
        async with connect(world, "bob", local_addr=("127.0.0.3", 0)) as other:
            assert (await other.run("help")).exit_status == 0
        held += [await _hold(world, "127.0.0.4"), await _hold(world, "127.0.0.4")]
        assert [await _admitted(r) for r, _ in held[2:]] == [True, True]
        # The total cap: a fifth address is refused now, whoever it is.
        reader, _ = await _hold(world, "127.0.0.5")
        assert not await _admitted(reader)
        assert (await inside.run("help")).exit_status == 0
        for _, writer in held:
            writer.close()
        deadline = asyncio.get_running_loop().time() + 5
        while world.state.gate.unauthenticated:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        reader, _ = await _hold(world, "127.0.0.5")  # freed: admitted again
        assert await _admitted(reader)


def test_the_gate_counts_only_until_authentication() -> None:
    gate = Gate(total=3, per_source=2, stall_seconds=0)
    a1, a2 = gate.admit("a"), gate.admit("a")
    assert a1 and a2 and gate.admit("a") is None
    assert gate.admit("b") and gate.admit("c") is None  # total reached
    gate.leave(a1)  # authenticated
    assert gate.admit("c") and gate.unauthenticated == 3


def test_per_source_only_stalled_connections_count() -> None:
    gate = Gate(total=100, per_source=2)  # stalled after 2 s
    burst = [gate.admit("10.0.0.9") for _ in range(50)]  # fetchers behind one NAT
    assert all(burst)
    stalled = Gate(total=100, per_source=2, stall_seconds=0)
    assert stalled.admit("x") and stalled.admit("x") and stalled.admit("x") is None


async def test_authenticated_connections_are_counted_while_open(world: SSHWorld) -> None:
    async def settled(want: int) -> int:
        for _ in range(200):  # the server sees a close a moment after the client
            if world.state.authenticated == want:
                break
            await asyncio.sleep(0.01)
        return world.state.authenticated

    assert world.state.authenticated == 0
    async with connect(world, "alice"), connect(world, "bob"):
        assert await settled(2) == 2
        with pytest.raises(asyncssh.PermissionDenied):
            await connect(world, "eve")  # never in: not counted
        assert world.state.authenticated == 2
    assert await settled(0) == 0
