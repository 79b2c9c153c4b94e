"""In-memory fakes of the Engine and the Cluster (daemon/core/ports.py), for the unit tier only.

Every integration test runs on the real Engine, registry and Kubernetes
simulator; these let the pipeline's state transitions run in milliseconds.
A fake fails where it is told to (`fail_*`) and blocks where it is told to
(`block_build`), so that each outcome of a deploy can be produced on purpose.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.adapters.kubernetes.plan import Target
from daemon.adapters.kubernetes.rules import Verdict
from daemon.config import Deployment, Workload
from daemon.core.ports import ContainerRun, Sandbox
from daemon.errors import Cancelled, DeploydError
from daemon.steps.checks.checker import RESULT_MARK
from daemon.steps.checks.pytest import JUNIT_MARK

Line = Callable[[str], None]


@dataclass
class FakeEngine:
    """Builds, checks and pushes nothing, but answers like the Engine does."""

    airflow_version: str = "3.3.2"
    # DAG file -> error message: the checker reports these files as failing.
    dag_errors: dict[str, str] = field(default_factory=dict)
    pytest_exit: int = 0
    fail_build: DeploydError | None = None
    fail_push: DeploydError | None = None
    fail_check: Exception | None = None
    fail_retag: DeploydError | None = None
    # When set, build() waits until the deploy is stopped (or this is set).
    block_build: threading.Event | None = None
    # The same for one check container (`block_check_in`: parse or pytest) and the
    # staging upload.
    block_check: threading.Event | None = None
    block_check_in: str = "parse"
    block_upload: threading.Event | None = None
    calls: list[str] = field(default_factory=list)
    pushed: list[str] = field(default_factory=list)
    last_image: str = ""

    def ping(self) -> None:
        self.calls.append("ping")

    def build(
        self,
        context: Path,
        tag: str,
        labels: dict[str, str],
        on_line: Line,
        stop: threading.Event | None = None,
    ) -> str:
        self.calls.append(f"build {tag}")
        on_line("Step 1/1 : FROM runtime")
        if self.block_build is not None:
            while not self.block_build.wait(0.01):
                if stop is not None and stop.is_set():
                    self.calls.append("build stopped")
                    raise Cancelled("stopped: the deploy was cancelled.")
        if self.fail_build is not None:
            raise self.fail_build
        self.last_image = "sha256:" + labels["deployd.deploy-id"].rjust(64, "0")
        return self.last_image

    def workdir(self, image: str) -> str:
        return "/usr/local/airflow"

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
    ) -> ContainerRun:
        if self.fail_check is not None:
            raise self.fail_check
        kind = "parse" if "DEPLOYD_CHECK" in environment else "pytest"
        if self.block_check is not None and kind == self.block_check_in:
            self.calls.append(f"{kind} started")
            while not self.block_check.wait(0.01):
                if stop is not None and stop.is_set():
                    self.calls.append(f"{kind} killed")
                    return ContainerRun(None)
        if "DEPLOYD_CHECK" in environment:
            return self._parse(project, on_line)
        self.calls.append("pytest")
        on_line("1 passed in 0.01s" if self.pytest_exit == 0 else "FAILED tests/test_x.py::t")
        on_line(JUNIT_MARK + json.dumps("<testsuites/>"))
        return ContainerRun(self.pytest_exit)

    def _parse(self, project: Path, on_line: Line) -> ContainerRun:
        self.calls.append("parse")
        files: dict[str, Any] = {}
        for path in sorted((project / "dags").glob("*.py")):
            name = f"dags/{path.name}"
            error = self.dag_errors.get(name)
            files[name] = (
                {"status": "error", "dags": [], "error": {"kind": "ImportError", "message": error}}
                if error
                else {"status": "ok", "dags": [path.stem]}
            )
        report = {"files": files, "airflow_version": self.airflow_version, "fatal": None}
        on_line(RESULT_MARK + json.dumps(report))
        return ContainerRun(0)

    def ncpu(self) -> int:
        return 2

    def remove_containers(self, labels: dict[str, str]) -> int:
        return 0

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        self.calls.append(f"tag {tag}")

    def untag(self, repository: str, tag: str) -> None:
        pass

    def push(
        self, repository: str, tag: str, on_line: Line, stop: threading.Event | None = None
    ) -> str:
        if self.fail_push is not None and tag != "deployd-staging":
            raise self.fail_push
        if self.block_upload is not None and tag == "deployd-staging":
            self.calls.append("upload started")
            while not self.block_upload.wait(0.01):
                if stop is not None and stop.is_set():
                    self.calls.append("upload stopped")
                    raise Cancelled("stopped: the deploy was cancelled.")
        self.pushed.append(tag)
        # One digest per built image, as a registry gives (the staging upload's is the same).
        return "sha256:" + hashlib.sha256(self.last_image.encode()).hexdigest()

    def prune(self, labels: dict[str, str], keep: int) -> list[str]:
        return []

    def local_image(self, reference: str, on_line: Line) -> tuple[str, str]:
        """The image a DAG deploy checks in: here whatever it names, by its digest."""
        self.calls.append(f"local_image {reference}")
        digest = reference.partition("@")[2]
        return "sha256:" + (digest.removeprefix("sha256:") or "0" * 64), digest

    def retag(
        self,
        source: str,
        digest: str,
        target: str,
        tag: str,
        on_line: Line,
        stop: threading.Event | None = None,
    ) -> str:
        self.calls.append(f"retag {source}@{digest} {target}:{tag}")
        if self.fail_retag is not None:
            raise self.fail_retag
        on_line(f"{tag}: digest: {digest}")
        return digest


@dataclass
class FakeCluster:
    """One namespace whose workloads roll out (or fail) the moment they are patched."""

    # Workloads whose rollout fails after the patch, with kubectl's message.
    failing: dict[str, str] = field(default_factory=dict)
    running_image: str = "registry.test/airflow/prod:old"
    preflight_seconds: float = 0.0
    patched: list[tuple[str, str]] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    closed: int = 0
    # Seconds a migration Job runs; rollouts (not rollbacks) that never end by themselves.
    job_seconds: float = 0.0
    hang_rollout: bool = False
    events: list[str] = field(default_factory=list)

    async def close(self) -> None:
        self.closed += 1

    async def get(self, workload: Workload) -> dict[str, Any]:
        pod = {"containers": [{"name": "base", "image": self.running_image}]}
        return {"metadata": {"name": workload.name}, "spec": {"template": {"spec": pod}}}

    async def preflight(self, dep: Deployment) -> list[Target]:
        await asyncio.sleep(self.preflight_seconds)
        return [
            Target(
                workload=w,
                containers=["base"],
                init_containers=[],
                images={"base": self.running_image},
                worker=w in dep.worker_workloads,
            )
            for w in dep.workloads
        ]

    async def running(self, dep: Deployment) -> list[dict[str, Any]]:
        return [
            {
                "workload": str(w),
                "managed_by": [],
                "deploy_id": None,
                "images": {"base": self.running_image},
                "rollout": "rolled out",
                "pods_running": {self.running_image: 1},
            }
            for w in dep.workloads
        ]

    async def draining(self, workload: Workload) -> int:
        return 0

    async def run_job(
        self, job: dict[str, Any], deadline: float, progress: Callable[[str], None]
    ) -> str:
        self.events.append("job started")
        await asyncio.sleep(self.job_seconds)
        self.events.append("job complete")
        progress(f"job/{job['metadata']['name']} complete")
        return ""

    async def patch_image(
        self,
        target: Target,
        image_for: Callable[[str], str],
        annotations: dict[str, str | None],
        grace: int | None,
        env: dict[str, dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        self.patched.append((str(target.workload), image_for("base")))
        return {}

    async def restore(self, target: Target) -> None:
        self.restored.append(str(target.workload))

    async def wait(
        self,
        workload: Workload,
        deadline: float,
        progress: Callable[[str], None],
        judge: Callable[[dict[str, Any]], Verdict] | None = None,
    ) -> Verdict:
        if str(workload) in self.failing and str(workload) not in self.restored:
            return Verdict(False, self.failing[str(workload)], failed=True)
        if self.hang_rollout and str(workload) not in self.restored:
            self.events.append(f"waiting for {workload}")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.events.append(f"stopped waiting for {workload}")
                raise
        return Verdict(True, "successfully rolled out")
