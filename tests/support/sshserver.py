"""A real `deployd serve` process for tests, driven with the real OpenSSH client and git."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.testenv import ROOT, Infra, write_config

SSH_OPTS = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "BatchMode=yes",
    "-o",
    "IdentitiesOnly=yes",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_key(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
    )
    return (path.with_suffix(".pub") if path.suffix else Path(f"{path}.pub")).read_text().strip()


@dataclass
class Server:
    """deployd serve on loopback, with keys alice (prod), bob (staging) and root (admin)."""

    root: Path
    ssh_port: int
    http_port: int
    config: Path
    state_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    notes: list[str] = field(default_factory=list)

    def key(self, name: str) -> Path:
        return self.root / "keys" / name

    def ssh_argv(self, key: str = "alice", *opts: str) -> list[str]:
        return [
            "ssh",
            *SSH_OPTS,
            "-i",
            str(self.key(key)),
            "-p",
            str(self.ssh_port),
            *opts,
            "git@127.0.0.1",
        ]

    def ssh(
        self, *command: str, key: str = "alice", opts: tuple[str, ...] = (), timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.ssh_argv(key, *opts), *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def git_env(self, key: str = "alice") -> dict[str, str]:
        ssh = " ".join(["ssh", *SSH_OPTS, "-i", str(self.key(key))])
        return {
            **os.environ,
            "GIT_SSH_COMMAND": ssh,
            "GIT_AUTHOR_NAME": "Ada",
            "GIT_AUTHOR_EMAIL": "ada@example.com",
            "GIT_COMMITTER_NAME": "Ada",
            "GIT_COMMITTER_EMAIL": "ada@example.com",
        }

    def url(self, deployment: str = "prod") -> str:
        return f"ssh://git@127.0.0.1:{self.ssh_port}/{deployment}"

    def git(
        self,
        repo: Path,
        *args: str,
        key: str = "alice",
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            env=self.git_env(key),
            timeout=timeout,
            check=False,
        )

    def start(self, environ: dict[str, str] | None = None) -> None:
        sock_path = self.root / "notify.sock"
        sock_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(sock_path))
        self.notify.settimeout(0.2)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYD_")}
        env.update(PYTHONPATH=str(ROOT), NOTIFY_SOCKET=str(sock_path), **(environ or {}))
        with open(self.root / "serve.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "daemon.cli", "--config", str(self.config), "serve"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
        self.wait_note("READY=1", 60)

    def wait_note(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in n for n in self.notes):
                return
            assert self.proc is not None and self.proc.poll() is None, self.log()
            try:
                assert self.notify is not None
                self.notes.append(self.notify.recv(4096).decode())
            except TimeoutError:
                pass
        raise AssertionError(f"no {text} from deployd serve; log:\n{self.log()}")

    def log(self) -> str:
        path = self.root / "serve.log"
        return path.read_text()[-5000:] if path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.notify is not None:
            self.notify.close()
        return int(self.proc.returncode)


def make_server(
    root: Path,
    infra: Infra,
    *,
    grace: int = 600,
    extra: dict[str, object] | None = None,
    max_push_mb: int | None = None,
) -> Server:
    """Write keys and a config for a Server (not started)."""
    (root / "keys").mkdir(parents=True)
    pubs = {name: make_key(root / "keys" / name) for name in ("alice", "bob", "root", "eve")}
    ssh_port, http_port = free_port(), free_port()
    state = root / "state"
    suffix = root.name[-8:].lower().replace("_", "-")
    deployments: list[dict[str, object]] = [
        {"name": "prod", "image": f"{infra.registry}/airflow/ssh-prod-{suffix}", **(extra or {})},
        {"name": "staging", "image": f"{infra.registry}/airflow/ssh-staging-{suffix}"},
    ]
    config = write_config(root / "deployd.toml", infra, state, deployments=deployments)
    text = config.read_text().replace(
        "[docker]",
        f'ssh_listen = "127.0.0.1:{ssh_port}"\nhttp_listen = "127.0.0.1:{http_port}"\n'
        f"shutdown_grace_seconds = {grace}\n"
        + (f"max_push_mb = {max_push_mb}\n" if max_push_mb else "")
        + "\n[docker]",
    )
    for name, deps, admin in (
        ("alice", ["prod"], False),
        ("bob", ["staging"], False),
        ("root", [], True),
    ):
        text += f'\n[[key]]\nname = "{name}"\npublic_key = "{pubs[name]}"\n'
        text += f"deployments = {deps!r}\n".replace("'", '"')
        if admin:
            text += "admin = true\n"
    config.write_text(text)
    return Server(root, ssh_port, http_port, config, state)
