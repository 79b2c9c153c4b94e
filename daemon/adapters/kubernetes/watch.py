"""The cluster's state per deployment, kept in memory by watches: what the dashboard shows.

A page cannot make a round of API calls per request (ten deployments of five
workloads would be a hundred reads), so `ClusterWatch` lists each workload and
its pods once, then follows both with watches from the versions listed, and
answers `status(dep)` from memory: the same dicts as `KubeCluster.running(dep)`
(plan.workload_status per workload), i.e. what `deployd status` shows.

Streams the API server ends (its watch timeout) are resumed from the last
version seen; an expired version (410 Gone), a deleted or recreated workload
and a dropped connection are picked up by listing again, with backoff while
the cluster cannot be reached. A watch the credentials may not open (deploys
need `list` on pods, not `watch`, so a Role made for them may lack it) falls
back to listing every POLL_SECONDS.

While the watches are out of step with the cluster (it cannot be reached, a
list is refused), `status` answers one line saying since when and why, not
the last data: the overview flags pods that run something else than what
deployd deployed, and a flag drawn from state known to be stale would mislead;
what deployd deployed is in the records either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
from lightkube import ApiError

from daemon.adapters.kubernetes import plan
from daemon.adapters.kubernetes.cluster import KubeCluster
from daemon.config import Deployment, Settings, Workload
from daemon.errors import ClusterError, DeploydError
from daemon.printable import printable

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5  # seconds before listing again after a failure, doubled each time
BACKOFF_MAX = 30.0
POLL_SECONDS = 10.0  # how often a workload is listed when it may not be watched
STOP_SECONDS = 5.0  # how long stop() waits for the watches' connections to close

Connect = Callable[[Settings, Deployment], KubeCluster]


def connect(settings: Settings, dep: Deployment) -> KubeCluster:
    """A client of the deployment's cluster, with the credentials every deploy uses."""
    return KubeCluster(settings.kubernetes, dep.namespace)


def clock(when: float) -> str:
    """`when` as the UTC time of day a status line names."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(when))


def one_line(text: str) -> str:
    """An API server's or a library's message, made a single safe line."""
    return printable(" ".join(text.split()))


def kept(pod: dict[str, Any]) -> dict[str, Any]:
    """What plan.workload_status reads of a pod: memory for the pods, not their specs."""
    meta = pod.get("metadata") or {}
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return {
        "metadata": {"name": meta.get("name"), "deletionTimestamp": meta.get("deletionTimestamp")},
        "status": {
            "containerStatuses": [
                {"imageID": c.get("imageID"), "image": c.get("image")} for c in statuses
            ]
        },
    }


@dataclass
class WorkloadState:
    """One workload as the watches last saw it, and whether they are in step."""

    workload: Workload
    obj: dict[str, Any] | None = None
    error: str | None = None  # why the workload could not be read (missing, refused)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    loaded: bool = False
    failure: tuple[float, str] | None = None  # (since, why) the state is out of step
    polled: bool = False  # the credentials may not watch it: it is listed instead
    _entry: dict[str, Any] | None = None

    def read(self, obj: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        """A fresh list: the workload and its pods, in step again."""
        self.obj, self.error = obj, None
        self.pods = {str((p.get("metadata") or {}).get("name")): kept(p) for p in pods}
        self._listed()

    def missing(self, why: str) -> None:
        """A fresh read said the workload is not there (or may not be read)."""
        self.obj, self.error, self.pods = None, why, {}
        self._listed()

    def _listed(self) -> None:
        self.loaded, self.failure, self._entry = True, None, None

    def changed(self, obj: dict[str, Any]) -> None:
        self.obj, self._entry = obj, None

    def pod_event(self, event: str, pod: dict[str, Any]) -> None:
        name = str((pod.get("metadata") or {}).get("name"))
        if event == "DELETED":
            self.pods.pop(name, None)
        elif event in ("ADDED", "MODIFIED"):
            self.pods[name] = kept(pod)
        self._entry = None

    def fail(self, why: str) -> None:
        """Out of step from now (or since the first failure of this streak)."""
        if self.failure is None:
            self.failure = (time.time(), one_line(why))
        else:
            self.failure = (self.failure[0], one_line(why))

    def entry(self) -> dict[str, Any]:
        """What KubeCluster.running says of the workload, computed once per change."""
        if self._entry is None:
            if self.obj is None:
                self._entry = {"workload": str(self.workload), "error": self.error or ""}
            else:
                pods = list(self.pods.values())
                self._entry = plan.workload_status(self.workload, self.obj, pods)
        return self._entry


class Follower:
    """One deployment's watches: its own client, one task per workload."""

    def __init__(self, settings: Settings, dep: Deployment, connect: Connect) -> None:
        self.settings, self.dep, self.connect = settings, dep, connect
        self.states = [WorkloadState(w) for w in dep.workloads]
        self.started = time.time()
        self.client: KubeCluster | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Open the client and start following every workload (on the running loop)."""
        self.tasks = [
            asyncio.get_running_loop().create_task(
                self._guarded(state), name=f"cluster-watch {self.dep.name} {state.workload}"
            )
            for state in self.states
        ]

    async def stop(self) -> None:
        """Cancel the watches and close the client; an open stream is not waited on."""
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=STOP_SECONDS)
        if self.client is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_SECONDS):
                    await self.client.close()

    def status(self) -> list[dict[str, Any]] | str:
        """The workloads' status, or one line saying why it cannot be told now."""
        failures = [s.failure for s in self.states if s.failure is not None]
        if failures:
            since, why = min(failures)
            return f"unreachable since {clock(since)}: {why}"
        if not all(s.loaded for s in self.states):
            return f"not read yet: listing the cluster's state since {clock(self.started)}"
        return [s.entry() for s in self.states]

    def _cluster(self) -> KubeCluster:
        if self.client is None:  # a bad kubeconfig raises here, and is tried again later
            self.client = self.connect(self.settings, self.dep)
        return self.client

    async def _guarded(self, state: WorkloadState) -> None:
        """Follow the workload until cancelled; an unforeseen error is logged, then retried."""
        while True:
            try:
                await self._follow(state)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the dashboard's view for good
                log.exception("cluster watch of %s %s failed", self.dep.name, state.workload)
                state.fail(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(BACKOFF_MAX)

    async def _follow(self, state: WorkloadState) -> None:
        """List, then watch from the list; list again when the watch cannot go on."""
        delay = BACKOFF_FIRST
        while True:
            began = time.monotonic()
            try:
                await self._list_and_watch(state)
                # A re-list the watch asked for (deleted, recreated) goes at once, unless
                # the cluster keeps asking for one: then it waits like a failure.
                delay = BACKOFF_FIRST
                if time.monotonic() - began > BACKOFF_FIRST:
                    continue
            except DeploydError as exc:  # the list failed (after its retries)
                if state.failure is None:
                    log.warning("cluster of %s: %s", self.dep.name, one_line(exc.message))
                state.fail(exc.message)
            except httpx2.HTTPStatusError as exc:  # refused, or expired (lightkube's ApiError)
                code = exc.status.code if isinstance(exc, ApiError) else exc.response.status_code
                if code == 410:  # expired version: a fresh list, at once
                    continue
                if code == 403:  # may list but not watch: poll instead
                    if not state.polled:
                        log.warning(
                            "cluster of %s: may not watch %s; listing it every %.0f s",
                            self.dep.name,
                            state.workload,
                            POLL_SECONDS,
                        )
                        state.polled = True
                    await asyncio.sleep(POLL_SECONDS)
                    continue
                log.info("watch of %s %s refused: HTTP %s", self.dep.name, state.workload, code)
            except httpx2.HTTPError as exc:  # the stream broke: the next list tells why
                log.info("watch of %s %s dropped: %s", self.dep.name, state.workload, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _list_and_watch(self, state: WorkloadState) -> None:
        """One list and the watches that follow it; returns when a fresh list is needed."""
        cluster = self._cluster()
        was_failing = state.failure is not None
        try:
            obj = await cluster.get(state.workload)
        except ClusterError as exc:  # missing or refused: what `running` tells of it
            state.missing(exc.message)
            await self._until_it_appears(cluster, state)
            return
        selector = plan.selector(obj)
        pods, pods_rv = await cluster.pods_at(state.workload, selector)
        state.read(obj, pods)
        if was_failing:
            log.info("cluster of %s: %s read again", self.dep.name, state.workload)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        await first_of(
            self._workload_changes(cluster, state, rv, selector),
            self._pod_changes(cluster, state, pods_rv, selector),
        )

    async def _until_it_appears(self, cluster: KubeCluster, state: WorkloadState) -> None:
        # From no version: the server first sends what exists, so a creation between
        # the read above and this watch is not missed.
        async for event, _obj in cluster.changes(state.workload, None):
            if event in ("ADDED", "MODIFIED"):
                return

    async def _workload_changes(
        self, cluster: KubeCluster, state: WorkloadState, rv: str | None, selector: dict[str, str]
    ) -> None:
        async for event, obj in cluster.changes(state.workload, rv):
            if event == "DELETED" or (event != "BOOKMARK" and plan.selector(obj) != selector):
                return  # gone, or recreated with other pods: list again
            if event in ("ADDED", "MODIFIED"):
                state.changed(obj)

    async def _pod_changes(
        self, cluster: KubeCluster, state: WorkloadState, rv: str | None, selector: dict[str, str]
    ) -> None:
        async for event, pod in cluster.changes(state.workload, rv, selector):
            state.pod_event(event, pod)


async def first_of(*jobs: Awaitable[None]) -> None:
    """Run `jobs` together until the first returns or raises; the others are cancelled."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()  # its error, if it raised


class ClusterWatch:
    """The cluster's state of every deployment with workloads, kept current by watches.

    `start()` on the daemon's loop, `update(settings)` after a reload,
    `await stop()` at shutdown; `status(dep)` at any time, from memory.
    """

    def __init__(self, settings: Settings, connect: Connect = connect) -> None:
        self.settings = settings
        self.connect = connect
        self.followers: dict[str, Follower] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start following every deployment that names workloads."""
        self.update(self.settings)

    def update(self, settings: Settings) -> None:
        """Follow the deployments of `settings`: new ones start, changed ones restart."""
        kube_changed = settings.kubernetes != self.settings.kubernetes
        self.settings = settings
        wanted = {dep.name: dep for dep in settings.deployments if dep.workloads}
        for name, follower in list(self.followers.items()):
            dep = wanted.get(name)
            if kube_changed or dep is None or _watched(dep) != _watched(follower.dep):
                self._retire(self.followers.pop(name))
        for name, dep in wanted.items():
            if name not in self.followers:
                follower = Follower(settings, dep, self.connect)
                follower.start()
                self.followers[name] = follower

    def status(self, dep: Deployment) -> list[dict[str, Any]] | str:
        """What `deployd status` says of the deployment's workloads, from memory.

        A list of plan.workload_status dicts (KubeCluster.running's shape), [] for a
        deployment without workloads, or one line saying why it cannot be told now.
        The dicts are the cache's own (not copied per request): read them, never change them.
        """
        if not dep.workloads:
            return []
        follower = self.followers.get(dep.name)
        if follower is None or _watched(follower.dep) != _watched(dep):
            return "not read yet: the cluster's state is being listed"
        return follower.status()

    async def stop(self) -> None:
        """End every watch and close the clients; nothing is left running."""
        for follower in list(self.followers.values()):
            self._retire(follower)
        self.followers.clear()
        if self._stopping:
            await asyncio.wait(set(self._stopping))

    def _retire(self, follower: Follower) -> None:
        task = asyncio.get_running_loop().create_task(follower.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)


def _watched(dep: Deployment) -> tuple[str, tuple[Workload, ...]]:
    """What a deployment's watches depend on: a change of it restarts them."""
    return dep.namespace, dep.workloads
