"""Fixtures of the notification tests: real Records in tmp_path, deploys made through
them, settings with [[notify]] targets, and a local receiver on loopback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.adapters.records import Records
from daemon.config import (
    Deployment,
    DockerSettings,
    GitHubSettings,
    KubernetesSettings,
    NotifyTarget,
    RegistrySettings,
    ServerSettings,
    Settings,
)
from daemon.core import deploys
from daemon.core.deploys import Options
from tests.support.receivers import Receiver

SECRET = "s3cret-hmac-key"


@pytest.fixture
def records(tmp_path: Path) -> Records:
    return Records(tmp_path / "state" / "deployd.db")


def settings(tmp_path: Path, *targets: NotifyTarget, public_url: str = "") -> Settings:
    return Settings(
        tmp_path / "deployd.toml",
        ServerSettings(state_dir=tmp_path / "state", public_url=public_url),
        DockerSettings(),
        RegistrySettings(),
        KubernetesSettings(),
        GitHubSettings(),
        (Deployment("prod", "registry.local/airflow/prod"), Deployment("staging", "r/s")),
        (),
        targets,
    )


def target(name: str, url: str, kind: str = "webhook", **kw: Any) -> NotifyTarget:
    secret = SECRET if kind == "webhook" else None
    return NotifyTarget(name, kind, url, kw.pop("secret", secret), **kw)


def deploy(records: Records, *path: str, deployment: str = "prod", **fields: Any) -> int:
    """A deploy created through the records and moved along `path` (its states)."""
    deploy_id = records.create_deploy(
        deployment=deployment,
        trigger="ssh",
        actor="alice",
        ref="refs/heads/main",
        options=Options(),
        pid=1,
        commit="0123456789abcdef0123456789abcdef01234567",
        description="Fix the sales DAG",
    )
    state = deploys.QUEUED
    for new in path:
        extra = fields if new in deploys.FINAL_STATES else {}
        assert records.transition(deploy_id, state, new, **extra)
        state = new
    return deploy_id


@dataclass
class Served:
    receiver: Receiver
    base: str  # http://127.0.0.1:PORT

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture
async def served(aiohttp_server: Callable[..., Awaitable[Any]]) -> Served:
    receiver = Receiver()
    server = await aiohttp_server(receiver.app())
    return Served(receiver, str(server.make_url("")).rstrip("/"))
