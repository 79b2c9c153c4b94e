"""The control loop: every tick, each kind's controller looks at each of its objects."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from tests.support.kubesim.controllers.common import (
    DEPLOYMENTS,
    JOBS,
    PODS,
    REPLICASETS,
    REVISIONS,
    STATEFULSETS,
    TICK,
    owned_by,
)
from tests.support.kubesim.controllers.deployment import DeploymentController
from tests.support.kubesim.controllers.job import JobController
from tests.support.kubesim.controllers.pod import PodController
from tests.support.kubesim.controllers.replicaset import ReplicaSetController
from tests.support.kubesim.controllers.statefulset import StatefulSetController
from tests.support.kubesim.store import Resource, Store


class Controllers(
    DeploymentController,
    ReplicaSetController,
    StatefulSetController,
    JobController,
    PodController,
):
    """The control loop of one simulator."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def deleted(self, res: Resource, obj: dict[str, Any]) -> None:
        """Cascade: deleting a workload deletes what it owns (foreground, at once)."""
        for child_res in (REPLICASETS, REVISIONS, PODS):
            for child in self.store.list(child_res, obj["metadata"].get("namespace")):
                if owned_by(child, obj):
                    self.store.delete(
                        child_res, child["metadata"]["namespace"], child["metadata"]["name"]
                    )
                    self.deleted(child_res, child)

    async def _loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a bug here must not kill the simulator silently
                import traceback

                traceback.print_exc()
            await asyncio.sleep(TICK)

    def tick(self) -> None:
        t = time.monotonic()
        for dep in self.store.list(DEPLOYMENTS, None):
            self._deployment(dep, t)
        for rs in self.store.list(REPLICASETS, None):
            self._replicaset(rs, t)
        for sts in self.store.list(STATEFULSETS, None):
            self._statefulset(sts, t)
        for job in self.store.list(JOBS, None):
            self._job(job, t)
        for pod in self.store.list(PODS, None):
            self._pod(pod, t)
        # Clients can see a status once the tick yields: that is when it became available.
        stamp = time.time()
        for key in self._became:
            self.available_at[key] = stamp
        self._became.clear()
