"""The SSH side of the daemon in one process, for the unit tier: settings from a TOML file in
tmp_path with generated keys, real SQLite records and git, the FakeEngine and FakeCluster.

Keys: alice may use prod, bob staging, root is admin, airflow may only read prod
(`access = "read"`); eve's key is generated but not configured. prod names workloads
(status and rollback reach the FakeCluster), staging none.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh

from daemon import config
from daemon.adapters.records import Records
from daemon.core import usecases
from daemon.core.context import Services
from daemon.core.deploys import Deploy, Options
from daemon.core.pipeline import Pipeline
from daemon.ssh.server import SSHState
from tests.support.fakes import FakeCluster, FakeEngine
from tests.support.projects import commit_all, make_project

WORKLOADS = ("deployment/airflow-scheduler", "statefulset/airflow-worker")
KEYS = {
    "alice": (["prod"], False),
    "bob": (["staging"], False),
    "root": ([], True),
    "airflow": (["prod"], False),
}
READ_KEYS = ("airflow",)  # access = "read"


def _quoted(values: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


class SSHWorld:
    """What `deployd serve` wires for the SSH server and the receiver, over fakes."""

    def __init__(self, tmp_path: Path, dag_source: str = "image") -> None:
        self.root = tmp_path
        self.dag_source = dag_source
        self.keys = {
            name: asyncssh.generate_private_key("ssh-ed25519", comment=name)
            for name in (*KEYS, "eve")
        }
        self.settings = config.load(self._write_config(tmp_path / "deployd.toml"))
        self.state_dir = self.settings.server.state_dir
        self.records = Records(self.state_dir / "deployd.db")
        self.engine = FakeEngine()
        self.cluster = FakeCluster()
        self.services = Services(
            self.settings, self.records, self.engine, connect=lambda _s, _d: self.cluster
        )
        self.pipeline = Pipeline(self.services)
        self.state = SSHState(self.settings, self.records, self.state_dir / "hook.sock")
        self.state.load_keys(self.settings)
        self.state.pipeline = self.pipeline
        self.project = make_project(tmp_path / "project", "runtime:3.3")
        self.lines: list[str] = []
        # Where the test started the SSH server (tests/ssh/test_commands.py).
        self.port = 0

    def _write_config(self, path: Path) -> Path:
        lines = [
            "[server]",
            f'state_dir = "{self.root / "state"}"',
            'ssh_listen = "127.0.0.1:2222"',
            "",
            "[[deployment]]",
            'name = "prod"',
            'image = "registry.test/airflow/prod"',
            f"workloads = {_quoted(WORKLOADS)}",
            f'dag_source = "{self.dag_source}"',
            "",
            "[[deployment]]",
            'name = "staging"',
            'image = "registry.test/airflow/staging"',
        ]
        for name, (deployments, admin) in KEYS.items():
            public = self.keys[name].export_public_key().decode().strip()
            lines += [
                "",
                "[[key]]",
                f'name = "{name}"',
                f'public_key = "{public}"',
                f"deployments = {_quoted(deployments)}",
                f"admin = {str(admin).lower()}",
                f'access = "{"read" if name in READ_KEYS else "deploy"}"',
            ]
        path.write_text("\n".join(lines) + "\n")
        return path

    def dep(self, name: str) -> config.Deployment:
        return self.settings.deployment(name)

    def commit(self, message: str) -> str:
        """A new commit in the project (a new DAG file), returned."""
        (self.project / "dags" / f"{message.replace(' ', '_')}.py").write_text("x = 1\n")
        return commit_all(self.project, message)

    async def deploy(self, deployment: str = "prod", **options: object) -> Deploy:
        """Deploy the project's HEAD to `deployment` the way `deployd deploy` does."""
        request = usecases.deploy_checkout(
            self.dep(deployment),
            self.project,
            Options(**options),  # type: ignore[arg-type]
            trigger="cli",
            actor="ada@host",
        )
        outcome = await self.pipeline.run(request, self.lines.append)
        assert outcome.record.state == "succeeded", outcome.record.error
        return outcome.record

    def close(self) -> None:
        self.records.close()


@contextlib.asynccontextmanager
async def serving(w: SSHWorld, *, hooks: bool = False) -> AsyncIterator[SSHWorld]:
    """The world's SSH server on 127.0.0.1 port 0 (w.port), its keys written to
    w.root/keys for OpenSSH; with `hooks`, the hook socket too, so that pushes deploy."""
    from daemon.ssh import server
    from daemon.ssh.hookline import HookServer
    from daemon.ssh.receive import Receiver

    host_key = w.state_dir / "ssh_host_ed25519_key"
    server.ensure_host_key(host_key)
    acceptor = await server.start(w.state, "127.0.0.1", 0, host_key)
    w.port = acceptor.get_port()
    hook_server = HookServer(w.state.hook_socket, Receiver(w.state, w.pipeline))
    if hooks:
        await hook_server.start()
    keys = w.root / "keys"
    keys.mkdir()
    for name, key in w.keys.items():
        key.write_private_key(str(keys / name))
        (keys / name).chmod(0o600)
    try:
        yield w
    finally:
        await hook_server.close()
        acceptor.close()
        await acceptor.wait_closed()
        w.close()
