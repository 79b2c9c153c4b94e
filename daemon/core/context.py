"""What a deploy carries from step to step: the request, the adapters, the facts found."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.adapters.images import Images
from daemon.adapters.records import Records
from daemon.config import Deployment, Settings
from daemon.core.deploys import Options
from daemon.core.logs import DeployLog

if TYPE_CHECKING:  # lightkube costs ~60 ms to import: only deploys that roll load it
    from daemon.adapters.kubernetes.cluster import Cluster, Target


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
    # Fetch the commit from the deployment's fetch_url first (webhook deploys).
    fetch: bool = False
    # A rollback: the successful deploy whose image runs again (nothing is built).
    rollback_to: dict[str, Any] | None = None


@dataclass
class Services:
    """The adapters, built once by the command or the daemon and passed down."""

    settings: Settings
    records: Records
    images: Images


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
        from daemon.adapters.images import LABEL_COMMIT, LABEL_DEPLOY_ID, LABEL_DEPLOYMENT

        return {
            LABEL_DEPLOYMENT: self.deployment.name,
            LABEL_DEPLOY_ID: str(self.id),
            LABEL_COMMIT: self.request.commit,
        }

    def say(self, line: str, step: str | None = None) -> None:
        """Write a line to this deploy's log."""
        self.log.write(line, step)
