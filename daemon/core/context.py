"""What a deploy carries from step to step: the request, the adapters, the facts found."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from daemon.adapters.records import Records
from daemon.config import Deployment, Settings
from daemon.core import deploys
from daemon.core.deploys import Deploy, Options
from daemon.core.logs import DeployLog
from daemon.core.policy import Policy, policy
from daemon.core.ports import Cluster, Engine

if TYPE_CHECKING:
    from daemon.adapters.kubernetes.plan import Target

T = TypeVar("T")


@dataclass(frozen=True)
class DeployRequest:
    """A request to deploy one commit of a local repository."""

    deployment: Deployment
    repo: Path
    commit: str
    ref: str
    subject: str
    trigger: str
    actor: str
    options: Options
    # git's quarantine variables while a pre-receive hook judges the push.
    object_env: Mapping[str, str] = field(default_factory=dict)
    # (ref, old commit): refuse at our turn if the ref moved while we waited.
    expect: tuple[str, str] | None = None
    # Keep the deployment's lock until this resolves (git updating the ref).
    hold_lock: asyncio.Future[None] | None = None
    # A push's verdict, given before the deploy ends: a DAG deploy's publish says yes
    # here so that git moves the branch, then the deploy goes on (steps/dags.py).
    answer: asyncio.Future[None] | None = None
    # Fetch the commit from the deployment's fetch_url first (webhook deploys).
    fetch: bool = False
    # A rollback: the successful deploy whose image runs again (nothing is built).
    rollback_to: Deploy | None = None
    # A promotion: another deployment's successful deploy whose image this one gets.
    promote_from: Deploy | None = None

    @property
    def action(self) -> str:
        """What the deploy does (deploys.DEPLOY, ROLLBACK, PROMOTION)."""
        if self.rollback_to is not None:
            return deploys.ROLLBACK
        return deploys.PROMOTION if self.promote_from is not None else deploys.DEPLOY

    @property
    def policy(self) -> Policy:
        """The rules it follows for its trigger and action."""
        return policy(self.trigger, self.action)


def connect_cluster(settings: Settings, dep: Deployment) -> Cluster:
    """The real cluster of a deployment (lightkube is imported only by deploys that roll)."""
    from daemon.adapters.kubernetes.cluster import KubeCluster

    return KubeCluster(settings.kubernetes, dep.namespace)


@dataclass
class Services:
    """The adapters, built once by the command or the daemon and passed down."""

    settings: Settings
    records: Records
    images: Engine
    # How to reach a deployment's cluster (a fake in the unit tier).
    connect: Callable[[Settings, Deployment], Cluster] = connect_cluster

    def cluster(self, dep: Deployment) -> Cluster:
        """A client of `dep`'s cluster; the caller closes it."""
        return self.connect(self.settings, dep)


@dataclass
class DeployContext:
    """One running deploy: its id, log, work dir and what the steps have found so far."""

    id: int
    request: DeployRequest
    services: Services
    log: DeployLog
    workdir: Path
    stop: threading.Event = field(default_factory=threading.Event)
    image_id: str = ""
    tag: str = ""
    digest: str = ""
    upload: asyncio.Task[str] | None = None
    cluster: Cluster | None = None
    targets: list[Target] = field(default_factory=list)
    # What the deploy learns on its way, for the steps after (never re-read from SQLite).
    tree: str = ""
    report: dict[str, Any] | None = None
    # The deployment's last successful deploy when this one started.
    previous: Deploy | None = None
    # What it ships (core/kinds.py), and for a DAG deploy the paths it changes.
    kind: str = deploys.IMAGE
    changed: list[str] = field(default_factory=list)
    # The step under way (the pipeline sets it), and who asked for a cancel of this
    # deploy once its process has seen the request (core/cancel.py).
    step: str = ""
    cancelled_by: str | None = None
    cancel_asked: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def airflow_version(self) -> str | None:
        """The Airflow version of the image this deploy rolls out, if known."""
        return deploys.airflow_version(self.report)

    @property
    def deployment(self) -> Deployment:
        return self.request.deployment

    @property
    def source(self) -> Path:
        """The checked-out project files."""
        return self.workdir / "src"

    @property
    def labels(self) -> dict[str, str]:
        """Labels that mark every image and container of this deploy."""
        from daemon.core.ports import (
            LABEL_COMMIT,
            LABEL_DEPLOY_ID,
            LABEL_DEPLOYMENT,
            LABEL_INSTANCE,
            instance,
        )

        return {
            LABEL_INSTANCE: instance(self.services.settings.server.state_dir),
            LABEL_DEPLOYMENT: self.deployment.name,
            LABEL_DEPLOY_ID: str(self.id),
            LABEL_COMMIT: self.request.commit,
        }

    def say(self, line: str, step: str | None = None) -> None:
        """Write a line to this deploy's log."""
        self.log.write(line, step)

    async def record(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a Records call for this deploy: off the event loop, after its log lines so far."""
        return await self.log.record(fn, *args, **kwargs)
