"""The two systems a deploy drives, as the core sees them: the Engine and the Cluster.

`adapters.images.Images` (Docker Engine + registry) and
`adapters.kubernetes.cluster.KubeCluster` (lightkube) are the real ones; the
unit tier passes in-memory fakes of these protocols. Blocking Engine calls run
in worker threads; Cluster calls are async.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from daemon.config import Deployment, Workload

if TYPE_CHECKING:
    from daemon.adapters.kubernetes.plan import Target
    from daemon.adapters.kubernetes.rules import Verdict

LABEL_DEPLOYMENT = "deployd.deployment"
LABEL_DEPLOY_ID = "deployd.deploy-id"
LABEL_COMMIT = "deployd.commit"
LABEL_ROLE = "deployd.role"
# Which deployd (which state_dir) made it: deploy ids and deployment names are only
# unique within one, and several may share an Engine.
LABEL_INSTANCE = "deployd.instance"


def instance(state_dir: Path) -> str:
    """The LABEL_INSTANCE value of the deployd whose state is in `state_dir`."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]


STAGING_TAG = "deployd-staging"

Line = Callable[[str], None]


@dataclass
class ContainerRun:
    """How a check container ended."""

    exit_code: int | None
    timed_out: bool = False
    oom_killed: bool = False


@dataclass(frozen=True)
class Sandbox:
    """Limits of a check container (SPEC.md: no network, memory, CPU, pids, time)."""

    memory_mb: int
    cpus: float
    timeout_seconds: int
    pids: int = 1024
    scratch_mb: int = 512


class Engine(Protocol):
    """Builds, runs checks in and pushes images (blocking calls)."""

    def ping(self) -> None: ...

    def build(
        self,
        context: Path,
        tag: str,
        labels: dict[str, str],
        on_line: Line,
        stop: threading.Event | None = None,
    ) -> str: ...

    def workdir(self, image: str) -> str: ...

    def run_sandboxed(
        self,
        image: str,
        argv: list[str],
        *,
        project: Path,
        mount_at: str,
        environment: dict[str, str],
        sandbox: Sandbox,
        labels: dict[str, str],
        on_line: Line,
        stop: threading.Event | None = None,
    ) -> ContainerRun: ...

    def ncpu(self) -> int: ...

    def remove_containers(self, labels: dict[str, str]) -> int: ...

    def tag(self, image_id: str, repository: str, tag: str) -> None: ...

    def untag(self, repository: str, tag: str) -> None: ...

    def push(
        self, repository: str, tag: str, on_line: Line, stop: threading.Event | None = None
    ) -> str: ...

    def prune(self, labels: dict[str, str], keep: int) -> list[str]: ...

    def local_image(self, reference: str, on_line: Line) -> tuple[str, str]: ...

    def retag(
        self,
        source: str,
        digest: str,
        target: str,
        tag: str,
        on_line: Line,
        stop: threading.Event | None = None,
    ) -> str: ...


class Cluster(Protocol):
    """One deployment's namespace on Kubernetes (async calls)."""

    async def close(self) -> None: ...

    async def get(self, workload: Workload) -> dict[str, Any]: ...

    async def preflight(self, dep: Deployment) -> list[Target]: ...

    async def running(self, dep: Deployment) -> list[dict[str, Any]]: ...

    async def draining(self, workload: Workload) -> int: ...

    async def run_job(
        self, job: dict[str, Any], deadline: float, progress: Callable[[str], None]
    ) -> str: ...

    async def patch_image(
        self,
        target: Target,
        image_for: Callable[[str], str],
        annotations: dict[str, str | None],
        grace: int | None,
        env: dict[str, dict[str, str]] | None = None,
    ) -> dict[str, Any]: ...

    async def restore(self, target: Target) -> None: ...

    async def wait(
        self,
        workload: Workload,
        deadline: float,
        progress: Callable[[str], None],
        judge: Callable[[dict[str, Any]], Verdict] | None = None,
    ) -> Verdict: ...
