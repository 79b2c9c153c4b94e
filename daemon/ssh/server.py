"""The asyncssh server: public-key auth from the config, command routing, git transport.

Only `git-receive-pack` / `git-upload-pack` on a deployment name and the
deployd commands are run; shells, ptys, forwarding, agents, X11, subsystems
and client environment variables (but GIT_PROTOCOL) are refused or ignored.
A key reads and pushes only its own deployments (admin: all), and a read key
(`access = "read"`) only reads them: every command asks core/access.py for the
access it needs (`Command.access`), git's push before git starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from daemon import names, views
from daemon.adapters import repos
from daemon.adapters.records import Records
from daemon.adapters.reserve import too_full
from daemon.config import Deployment, Key, Settings
from daemon.core import access, deploys, usecases
from daemon.core.freezes import describe
from daemon.errors import DeploydError, DiskFull
from daemon.ssh import pushrules
from daemon.ssh.gate import Gate

if TYPE_CHECKING:
    from daemon.core.context import DeployRequest
    from daemon.core.pipeline import Pipeline

log = logging.getLogger(__name__)

LOGIN_TIMEOUT_SECONDS = 20
KEEPALIVE_SECONDS = 30
# AES-GCM first and chacha20-poly1305 not offered: OpenSSH clients pick chacha
# when offered, and asyncssh's chacha runs per packet in Python (about 10%
# slower on a 50 MB clone here); AES-GCM runs in OpenSSL.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
# Elliptic-curve and hybrid post-quantum key exchange only: no SHA-1, no 1024-bit or
# finite-field groups (whose server-side cost lets a few clients pin a core: DHEat).
# The ML-KEM hybrid is offered where this asyncssh has it; every OpenSSH since 7.4 has
# curve25519.
KEX = ("mlkem768x25519-sha256", "curve25519-sha256", "curve25519-sha256@libssh.org")
# Encrypt-then-MAC only (used with the CTR ciphers; GCM carries its own).
MACS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
)
_GIT_PROTOCOL = re.compile(r"version=[0-9]")


class Denied(DeploydError):
    """The key may not use that deployment."""


@dataclass
class PushSession:
    """A git-receive-pack in progress: who pushes where, and when git is done."""

    key: str
    deployment: str
    done: asyncio.Future[None]
    hooked: bool = False  # the pre-receive hook reached deployd (git stored the push)
    # A deploy still running after its verdict (a DAG deploy's `live` step): its
    # lines wait here for the post-receive hook (ssh/receive.py).
    after: Any = None


@dataclass
class SSHState:
    """What the SSH server shares with the rest of the daemon (reloaded on SIGHUP)."""

    settings: Settings
    records: Records
    hook_socket: Path
    sessions: dict[str, PushSession] = field(default_factory=dict)
    keys: dict[str, Key] = field(default_factory=dict)
    # Runs rollbacks asked for over SSH (set by `deployd serve`).
    pipeline: Pipeline | None = None
    # Makes a key's one-time dashboard sign-in URL and says how long it is valid, in
    # seconds (`login`; set by `deployd serve`: daemon/web/identity.py).
    login: Callable[[Key], tuple[str, int]] | None = None
    # Authenticated connections open now (metrics: deployd_ssh_sessions).
    authenticated: int = 0
    gate: Gate = field(init=False)

    def __post_init__(self) -> None:
        server = self.settings.server
        self.gate = Gate(server.ssh_max_unauthenticated, server.ssh_max_unauthenticated_per_source)

    def load_keys(self, settings: Settings) -> None:
        """Index the configured public keys by their key blob."""
        keys = {}
        for key in settings.keys:
            try:
                parsed = asyncssh.import_public_key(key.public_key)
            except (asyncssh.KeyImportError, ValueError) as exc:
                log.error("key %s: unusable public key (%s); it is ignored", key.name, exc)
                continue
            keys[bytes(parsed.public_data).hex()] = key
        self.settings = settings
        self.keys = keys


class _Server(asyncssh.SSHServer):
    """One SSH connection's authentication and channel policy."""

    def __init__(self, state: SSHState) -> None:
        self.state = state
        self.conn: asyncssh.SSHServerConnection | None = None
        self.ticket: int | None = None  # counted by the gate until it is in
        self.signed_in = False

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.ticket = self.state.gate.admit(str(peer[0]) if peer else "?")
        if self.ticket is None:
            # Closed at once (after asyncssh's banner, which it sends when this returns).
            asyncio.get_running_loop().call_soon(conn.abort)

    def auth_completed(self) -> None:
        self._uncount()
        self.signed_in = True
        self.state.authenticated += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._uncount()
        if self.signed_in:
            self.signed_in = False
            self.state.authenticated -= 1

    def _uncount(self) -> None:
        if self.ticket is not None:
            self.state.gate.leave(self.ticket)
            self.ticket = None

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        found = self.state.keys.get(bytes(key.public_data).hex())
        if found is None:
            return False
        assert self.conn is not None
        self.conn.set_extra_info(deployd_key=found.name)
        return True

    def connection_requested(self, *args: Any) -> bool:
        return False

    def server_requested(self, *args: Any) -> bool:
        return False

    def unix_connection_requested(self, *args: Any) -> bool:
        return False

    def unix_server_requested(self, *args: Any) -> bool:
        return False


async def start(
    state: SSHState,
    host: str,
    port: int,
    host_key: Path,
) -> asyncssh.SSHAcceptor:
    """Listen for SSH connections."""
    return await asyncssh.create_server(
        lambda: _Server(state),
        host,
        port,
        server_host_keys=[str(host_key)],
        process_factory=lambda process: _handle(state, process),
        encoding=None,
        allow_pty=False,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        encryption_algs=CIPHERS,
        kex_algs=offered_kex(),
        mac_algs=MACS,
        login_timeout=LOGIN_TIMEOUT_SECONDS,
        keepalive_interval=KEEPALIVE_SECONDS,
        keepalive_count_max=3,
    )


def offered_kex() -> tuple[str, ...]:
    """KEX, less what this asyncssh does not implement."""
    from asyncssh.kex import get_kex_algs

    known = {alg.decode() for alg in get_kex_algs()}
    return tuple(alg for alg in KEX if alg in known)


def ensure_host_key(path: Path) -> str:
    """Create the ed25519 host key on first start; return its fingerprint."""
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519")
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o077)  # never readable by others, not even for a moment
        try:
            key.write_private_key(str(path))
        finally:
            os.umask(old)
        key.write_public_key(str(path) + ".pub")
    return str(asyncssh.read_private_key(str(path)).get_fingerprint())


async def _handle(state: SSHState, process: asyncssh.SSHServerProcess[bytes]) -> None:
    key_name = process.get_extra_info("deployd_key")
    key = next((k for k in state.settings.keys if k.name == key_name), None)
    command: pushrules.Command | None = None
    try:
        if key is None:
            raise Denied("this key is no longer configured.")
        if process.subsystem:
            raise pushrules.Refused("subsystems (sftp) are not offered.")
        command = pushrules.parse_command(process.command)
        if command.name.startswith("git-"):
            status = await _git(state, process, key, command)
        elif command.name == "rollback":
            status = await _rollback(state, process, key, command)
        elif command.name == "promote":
            status = await _promote(state, process, key, command)
        elif command.name == "cancel":
            status = await _cancel(state, process, key, command)
        elif command.name in ("freeze", "unfreeze"):
            _out(process, await asyncio.to_thread(_freeze, state, key, command))
            status = 0
        elif command.name == "status":
            _out(process, await _status(state, key, command))
            status = 0
        elif command.name == "logs":
            _out(process, await _logs(state, key, command))
            status = 0
        elif command.name == "login":
            _out(process, await _login(state, key))
            status = 0
        else:
            _out(process, _run_command(state, key, command))
            status = 0
    except DeploydError as exc:
        _err(process, f"deployd: {exc.message}")
        # The release-management commands exit with the error's code (refusals: 2).
        coded = command is not None and (
            command.name in ("promote", "freeze", "unfreeze", "cancel")
            or command.reason is not None
        )
        status = exc.exit_code if coded else 1
    except Exception:
        log.exception("SSH command %r of key %s failed", process.command, key_name)
        _err(process, "deployd: internal error; the daemon's log has the details.")
        status = 1
    log.info("ssh %s: %r -> %s", key_name, (process.command or "")[:80], status)
    with contextlib.suppress(Exception):
        process.exit(status)


def _out(process: asyncssh.SSHServerProcess[bytes], lines: list[str]) -> None:
    process.stdout.write(("\n".join(lines) + "\n").encode())


def _err(process: asyncssh.SSHServerProcess[bytes], line: str) -> None:
    with contextlib.suppress(Exception):
        process.stderr.write((line + "\n").encode())


def _deployment(state: SSHState, key: Key, name: str, need: str) -> Deployment:
    """The deployment `name` if `key` has `need` (READ or DEPLOY) on it; the same refusal
    for unknown and forbidden, so that a key learns nothing about deployments that are
    not its own. A read key asking to change one is told it is read-only (for any name)."""
    dep = next((d for d in state.settings.deployments if d.name == name), None)
    if dep is not None and access.allowed(key, dep.name, need):
        return dep
    if need == access.DEPLOY and access.read_only(key):
        raise access.forbidden(key, name, need)
    raise Denied(f"key {key.name} may not use deployment {name}.")


def _run_command(state: SSHState, key: Key, command: pushrules.Command) -> list[str]:
    records = state.records
    port = state.settings.server.ssh_listen.rpartition(":")[2]
    if command.name == "help":
        return views.help_lines(port)
    if command.name == "deploys":
        if command.args:
            allowed = [_deployment(state, key, command.args[0], command.access).name]
        else:
            allowed = [
                d.name
                for d in state.settings.deployments
                if access.allowed(key, d.name, command.access)
            ]
        frozen = {
            d.name: usecases.freeze_of(records, d)
            for d in state.settings.deployments
            if d.name in allowed
        }
        table = views.deploy_table(usecases.history(state.settings, records, allowed, 50))
        return views.freeze_lines(frozen) + table
    raise pushrules.Refused("unknown command.")


async def _logs(state: SSHState, key: Key, command: pushrules.Command) -> list[str]:
    rec = state.records.get(names.deploy_id(command.args[0]))
    if rec is None or not access.allowed(key, rec.deployment, command.access):
        # Same answer for "none" and "not yours": ids of others' deploys stay private.
        raise Denied(f"there is no deploy #{command.args[0]} that key {key.name} may read.")
    return [row.line async for row in usecases.follow_log(state.records, rec.id, follow=False)]


async def _login(state: SSHState, key: Key) -> list[str]:
    """A one-time URL that signs this key in to the dashboard (any configured key may)."""
    if state.login is None:
        raise pushrules.Refused("this server has no dashboard to sign in to.")
    url, seconds = await asyncio.to_thread(state.login, key)
    return [
        f"Open this link within {seconds // 60} minutes to sign in to the dashboard as {key.name}",
        "(it works once; the session has this key's permissions):",
        "",
        f"  {url}",
    ]


async def _status(state: SSHState, key: Key, command: pushrules.Command) -> list[str]:
    dep = _deployment(state, key, command.args[0], command.access)
    assert state.pipeline is not None
    return views.status_lines(await usecases.status(state.pipeline.services, dep))


def _allowed(state: SSHState, key: Key, name: str, need: str) -> Deployment:
    """The deployment `name` if `key` has `need` on it (refused alike when unknown: exit 2)."""
    dep = next((d for d in state.settings.deployments if d.name == name), None)
    if dep is None:
        raise access.forbidden(key, name, need)
    access.require(key, name, need)
    return dep


def _freeze(state: SSHState, key: Key, command: pushrules.Command) -> list[str]:
    dep = _allowed(state, key, command.args[0], command.access)
    if command.name == "freeze":
        made = usecases.freeze(
            state.records, dep, by=key.name, reason=command.reason or "", until=command.until
        )
        return [describe(made)]
    ended = usecases.unfreeze(state.records, dep, by=key.name)
    still = usecases.freeze_of(state.records, dep)
    return [f"{dep.name} unfrozen (frozen by {ended.by}: {ended.reason})"] + (
        [f"note: {describe(still)}"] if still is not None else []
    )


async def _cancel(
    state: SSHState, process: asyncssh.SSHServerProcess[bytes], key: Key, command: pushrules.Command
) -> int:
    """Cancel a deploy of the key's deployments; its lines follow until it stops."""
    ident = int(command.args[0])

    def may(deployment: str) -> bool:
        if not access.allowed(key, deployment, access.READ):
            return False  # refused like an unknown id
        access.require(key, deployment, command.access)  # a read key: one line, read-only
        return True

    asked = await asyncio.to_thread(
        functools.partial(
            usecases.cancel,
            state.records,
            ident,
            by=key.name,
            may=may,
            caller=f"key {key.name}",
        )
    )
    _err(process, f"deployd: {views.cancel_asked_line(asked)}")
    live = state.pipeline.live.get(ident) if state.pipeline is not None else None
    lines = usecases.follow_log(
        state.records, ident, live=live, settings=state.settings, after=asked.log_mark
    )
    async for row in lines:
        _err(process, row.line)
    rec = await asyncio.to_thread(state.records.get, ident)
    assert rec is not None
    _out(process, [views.cancel_result(rec)])
    return 0 if rec.state == deploys.CANCELLED else 1


async def _promote(
    state: SSHState, process: asyncssh.SSHServerProcess[bytes], key: Key, command: pushrules.Command
) -> int:
    target = _allowed(state, key, command.args[1], access.DEPLOY)
    source = _allowed(state, key, command.args[0], access.READ)
    wanted = int(command.args[2]) if len(command.args) > 2 else None
    request = await asyncio.to_thread(
        usecases.promote,
        state.settings,
        state.records,
        source,
        target,
        wanted,
        trigger="ssh",
        actor=key.name,
    )
    return await _run_deploy(state, process, request)


async def _rollback(
    state: SSHState, process: asyncssh.SSHServerProcess[bytes], key: Key, command: pushrules.Command
) -> int:
    if command.reason is not None:  # rollback --freeze: refusals exit 2
        dep = _allowed(state, key, command.args[0], command.access)
    else:
        dep = _deployment(state, key, command.args[0], command.access)
    wanted = int(command.args[1]) if len(command.args) > 1 else None
    request = usecases.rollback(
        state.settings, state.records, dep, wanted, trigger="ssh", actor=key.name, force=False
    )
    if command.reason is not None:
        held, new = usecases.freeze_for_rollback(
            state.records, dep, by=key.name, reason=command.reason or request.subject
        )
        said = "froze" if new else "kept the freeze:"
        _err(process, f"deployd: {said} {describe(held)} (ssh ... unfreeze {dep.name} ends it)")
    return await _run_deploy(state, process, request)


async def _run_deploy(
    state: SSHState, process: asyncssh.SSHServerProcess[bytes], request: DeployRequest
) -> int:
    """Run a deploy asked for by an SSH command; progress to stderr, the verdict to stdout."""
    pipeline = state.pipeline
    assert pipeline is not None
    task = asyncio.current_task()
    assert task is not None
    pipeline.commands.add(task)  # SIGTERM waits for it like for a push
    try:
        outcome = await pipeline.run(request, sink=lambda line: _err(process, line))
    finally:
        pipeline.commands.discard(task)
    final = outcome.record
    _out(process, [f"deploy #{final.id} {final.state}: {final.error or final.image_ref}"])
    return int(outcome.exit_code)


async def _git(
    state: SSHState, process: asyncssh.SSHServerProcess[bytes], key: Key, command: pushrules.Command
) -> int:
    dep = _deployment(state, key, command.args[0], command.access)  # a push: before git
    deployment = dep.name
    repo = await asyncio.to_thread(
        repos.ensure, state.settings.server.state_dir, deployment, dep.branch
    )
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(state.settings.server.state_dir),
        "GIT_TERMINAL_PROMPT": "0",
    }
    client_protocol = process.env.get("GIT_PROTOCOL", "")
    if isinstance(client_protocol, str) and _GIT_PROTOCOL.fullmatch(client_protocol):
        env["GIT_PROTOCOL"] = client_protocol
    token = ""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    session: PushSession | None = None
    if command.name == "git-receive-pack":
        if await _disk_full(state):
            # git would fail with words that do not say why, or not store the push at all.
            _err(process, f"deployd: {DiskFull(state.settings.server.state_dir).message}")
            return 1
        token = secrets.token_hex(16)
        session = state.sessions[token] = PushSession(key.name, deployment, done)
        env.update(DEPLOYD_HOOK_SOCKET=str(state.hook_socket), DEPLOYD_SESSION=token)
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *git_limits(command.name, state.settings),
            command.name.removeprefix("git-"),
            str(repo),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        status = await _bridge(process, proc)
        if session is not None and not session.hooked and await _disk_full(state):
            # The disk filled while git stored the push: git's own words ("unable to
            # create temporary object directory", often with exit status 0) do not say why.
            _err(process, f"deployd: {DiskFull(state.settings.server.state_dir).message}")
        return status
    finally:
        if not done.done():
            done.set_result(None)
        state.sessions.pop(token, None)


async def _disk_full(state: SSHState) -> bool:
    """Whether state_dir's disk has less room than the records keep in reserve, twice."""
    return await asyncio.to_thread(too_full, state.settings.server.state_dir)


def git_limits(command: str, settings: Settings) -> list[str]:
    """`-c` options that bound what a push may store: size, and objects git finds malformed.

    A pack over max_push_mb is refused while it arrives, before any of it is kept;
    fsck refuses trees with duplicate entries, `..` or `.git` names and the like.
    """
    if command != "git-receive-pack":
        return []
    size = settings.server.max_push_mb * 1024 * 1024
    return ["-c", f"receive.maxInputSize={size}", "-c", "receive.fsckObjects=true"]


async def _bridge(
    process: asyncssh.SSHServerProcess[bytes], proc: asyncio.subprocess.Process
) -> int:
    """Copy the channel to git and git to the channel, to the last byte.

    git's exit is not the end: its output may still be in the pipes, so the
    exit status is sent only after both output pipes reached EOF. If the
    client goes away, git's output is drained and dropped: a push whose
    objects all arrived still runs its hook and ref update to the end.
    """
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin = proc.stdin

    async def pump_in() -> None:
        # An exception here means the client went away: git gets EOF.
        with contextlib.suppress(Exception):
            while data := await process.stdin.read(65536):
                stdin.write(data)
                await stdin.drain()
        with contextlib.suppress(Exception):
            stdin.close()

    async def pump_out(
        src: asyncio.StreamReader, write: Callable[[bytes], None], drain: Callable[[], Any]
    ) -> None:
        alive = True
        while data := await src.read(262144):
            if not alive:
                continue
            try:
                write(data)
                await drain()
            except Exception:  # the client went away: keep draining git
                alive = False

    feeder = asyncio.create_task(pump_in())
    outs = asyncio.gather(
        pump_out(proc.stdout, process.stdout.write, process.stdout.drain),
        pump_out(proc.stderr, process.stderr.write, process.stderr.drain),
    )
    status = await proc.wait()
    await outs
    feeder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await feeder
    return status
