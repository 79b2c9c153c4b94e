"""ClusterWatch (the dashboard's cache of the cluster) against the Kubernetes API simulator.

The simulator runs in a thread of the test process (as in test_kubernetes_cluster.py);
changes are made with the real `kubectl`, or straight in its store, and the cache must
follow them through its watches and say what `KubeCluster.running` says.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.adapters.kubernetes import cluster as cluster_module
from daemon.adapters.kubernetes import watch as watch_module
from daemon.adapters.kubernetes.cluster import KubeCluster
from daemon.adapters.kubernetes.watch import ClusterWatch
from daemon.config import (
    Deployment,
    DockerSettings,
    GitHubSettings,
    KubernetesSettings,
    RegistrySettings,
    ServerSettings,
    Settings,
    Workload,
)
from tests.adapters.test_kubernetes_cluster import (
    IMAGE,
    OLD,
    PODS,
    RESOURCES,
    SCHED,
    WORKER,
    deployment,
    put,
    rolled,
    stop,
)
from tests.steps.test_roll import kubectl, scheduler, worker
from tests.support.kubesim import Fault, KubeSim

GONE = Workload("deployment", "airflow-gone")
NEW = f"{IMAGE}:deploy-2"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries and re-lists back off for 10-50 ms: the faults here are injected, not load."""
    monkeypatch.setattr(cluster_module, "BACKOFF", 0.01)
    monkeypatch.setattr(watch_module, "BACKOFF_FIRST", 0.05)
    monkeypatch.setattr(watch_module, "BACKOFF_MAX", 0.2)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[KubeSim]:
    s = KubeSim(tmp_path / "kubesim").start()
    put(s, scheduler(OLD, replicas=2))
    put(s, worker(OLD, replicas=2))
    yield s
    stop(s)


@pytest.fixture
async def kube(sim: KubeSim) -> AsyncIterator[KubeCluster]:
    c = KubeCluster(KubernetesSettings(kubeconfig=sim.kubeconfig), "airflow")
    await rolled(c, SCHED, WORKER)
    yield c
    await c.close()


def settings(kubeconfig: Path, *deployments: Deployment) -> Settings:
    return Settings(
        path=kubeconfig.parent / "deployd.toml",
        server=ServerSettings(state_dir=kubeconfig.parent),
        docker=DockerSettings(),
        registry=RegistrySettings(),
        kubernetes=KubernetesSettings(kubeconfig=kubeconfig),
        github=GitHubSettings(),
        deployments=deployments,
        keys=(),
    )


@pytest.fixture
async def cache(sim: KubeSim, kube: KubeCluster) -> AsyncIterator[ClusterWatch]:
    c = ClusterWatch(settings(sim.kubeconfig, deployment(SCHED, WORKER)))
    c.start()
    yield c
    await c.stop()


async def until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.02)


async def matches_running(cache: ClusterWatch, kube: KubeCluster, dep: Deployment) -> None:
    """The cache comes to say what a fresh round of reads says (the cluster has settled)."""
    want = await kube.running(dep)
    await until(lambda: cache.status(dep) == want)


async def opened(sim: KubeSim, count: int) -> None:
    """Wait until the cache has opened `count` watches (rollout waits open others)."""
    timeout = f"timeoutSeconds={cluster_module.WATCH_SECONDS}"
    await until(lambda: sum(timeout in path for _m, path in sim.sim.requests) >= count)


def pods_of(entry: dict[str, Any]) -> int:
    return sum(entry["pods_running"].values())


def image_ids(entry: dict[str, Any]) -> set[str]:
    return set(entry["pods_running"])


# -- loading -----------------------------------------------------------------------------


async def test_it_answers_what_running_answers_once_listed(sim: KubeSim, kube: KubeCluster) -> None:
    dep = deployment(SCHED, WORKER, GONE)
    cache = ClusterWatch(settings(sim.kubeconfig, dep))
    cache.start()
    try:
        first = cache.status(dep)
        assert isinstance(first, str)
        assert re.fullmatch(
            r"not read yet: listing the cluster's state since \d\d:\d\d:\d\d UTC", first
        )
        await until(lambda: isinstance(cache.status(dep), list))
        want = await kube.running(dep)
        assert cache.status(dep) == want
        [sched, work, gone] = want
        assert sched["images"]["scheduler"] == OLD and sum(sched["pods_running"].values()) == 4
        assert sum(work["pods_running"].values()) == 2
        assert gone == {
            "workload": "deployment/airflow-gone",
            "error": "Kubernetes refused reading deployment/airflow-gone: deployments.apps "
            '"airflow-gone" not found',
        }
        assert cache.status(dataclasses.replace(dep, workloads=())) == []
    finally:
        await cache.stop()


async def test_status_is_read_from_memory(
    sim: KubeSim, kube: KubeCluster, cache: ClusterWatch
) -> None:
    dep = deployment(SCHED, WORKER)
    await matches_running(cache, kube, dep)
    before = len(sim.sim.requests)
    for _ in range(1000):
        assert isinstance(cache.status(dep), list)
    assert sim.sim.requests[before:] == []


# -- following ----------------------------------------------------------------------------


def watched_only(requests: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Requests that the cache would have made had it read rather than watched."""
    return [r for r in requests if "/pods" in r[1] or "watch=" in r[1]]


@pytest.mark.integration
async def test_kubectl_set_image_and_scale_reach_it_through_the_watches(
    sim: KubeSim, kube: KubeCluster, cache: ClusterWatch
) -> None:
    dep = deployment(SCHED, WORKER)
    await matches_running(cache, kube, dep)
    loaded = cache.status(dep)
    assert isinstance(loaded, list)
    old_ids = image_ids(loaded[0]) - {i for i in image_ids(loaded[0]) if "busybox" in i}
    await opened(sim, 4)
    before = len(sim.sim.requests)
    kubectl(
        sim, "-n", "airflow", "set", "image", "deployment/airflow-scheduler", f"scheduler={NEW}"
    )
    kubectl(sim, "-n", "airflow", "scale", "statefulset/airflow-worker", "--replicas=3")

    def followed() -> bool:
        status = cache.status(dep)
        if not isinstance(status, list):
            return False
        [sched, work] = status
        return (
            sched["images"]["scheduler"] == NEW
            and not old_ids & image_ids(sched)
            and sum(sched["pods_running"].values()) == 4
            and sum(work["pods_running"].values()) == 3
        )

    await until(followed)
    assert watched_only(sim.sim.requests[before:]) == []  # no list, no watch opened again
    await matches_running(cache, kube, dep)


async def test_a_dropped_watch_is_resumed(
    sim: KubeSim, kube: KubeCluster, cache: ClusterWatch
) -> None:
    dep = deployment(SCHED, WORKER)
    await matches_running(cache, kube, dep)
    await opened(sim, 4)
    # The streams of pods come back through the fault: each is closed after one event.
    sim.sim.faults.append(Fault(path="/pods", drop_watch_after=1, count=4))
    stop_watches(sim)
    scale(sim, "airflow-worker", 1)
    await until(lambda: matching(cache, dep, lambda e: sum(e[1]["pods_running"].values()) == 1))
    await until(lambda: not sim.sim.faults)  # every dropped stream was opened again
    await matches_running(cache, kube, dep)


async def test_an_expired_version_is_listed_again(
    sim: KubeSim, kube: KubeCluster, cache: ClusterWatch
) -> None:
    dep = deployment(SCHED, WORKER)
    await matches_running(cache, kube, dep)
    store = sim.sim.store
    sim.call(lambda: setattr(store, "events", deque(store.events, maxlen=3)))
    await opened(sim, 4)
    told: list[object] = []
    sampler = asyncio.create_task(sample(lambda: told.append(cache.status(dep))))
    sim.sim.latency = 0.5  # the watches come back after the writes below
    stop_watches(sim)
    for n in range(6):
        sim.call(store.create, PODS, "airflow", other_pod(n))
    await asyncio.sleep(0.6)
    sim.sim.latency = 0.0
    listed = len(sim.sim.requests)
    scale(sim, "airflow-worker", 1)
    await until(lambda: matching(cache, dep, lambda e: sum(e[1]["pods_running"].values()) == 1))
    await matches_running(cache, kube, dep)
    relists = [r for r in sim.sim.requests[:listed] if "/pods?" in r[1] and "watch" not in r[1]]
    assert len(relists) >= 4, relists  # two at start, and again after the 410s
    sampler.cancel()
    assert told and all(isinstance(t, list) for t in told)  # the data stayed meanwhile


async def sample(record: Callable[[], None]) -> None:
    while True:
        record()
        await asyncio.sleep(0.01)


def stop_watches(sim: KubeSim) -> None:
    """End every open watch stream, as an API server does at its timeout."""
    sim.call(lambda: [w.queue.put_nowait(None) for w in list(sim.sim.store.watchers)])


def scale(sim: KubeSim, name: str, replicas: int, kind: str = "StatefulSet") -> None:
    res = RESOURCES[kind]

    def change() -> None:
        obj = sim.sim.store.get(res, "airflow", name)
        obj["spec"]["replicas"] = replicas
        sim.sim.store.replace(res, "airflow", name, obj)

    sim.call(change)


def other_pod(n: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"other-{n}", "namespace": "airflow", "labels": {"app": "other"}},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]},
    }


def matching(
    cache: ClusterWatch, dep: Deployment, check: Callable[[list[dict[str, Any]]], bool]
) -> bool:
    status = cache.status(dep)
    return isinstance(status, list) and check(status)


# -- an unreachable cluster -----------------------------------------------------------------


async def test_an_unreachable_cluster_is_one_line_then_read_again(tmp_path: Path) -> None:
    dep = deployment(SCHED, WORKER)
    first = KubeSim(tmp_path / "first").start()
    put(first, scheduler(OLD, replicas=1))
    cache = ClusterWatch(settings(first.kubeconfig, dep))
    cache.start()
    again: KubeSim | None = None
    try:
        await until(lambda: isinstance(cache.status(dep), list))
        stop(first)
        await until(lambda: isinstance(cache.status(dep), str))
        down = cache.status(dep)
        assert isinstance(down, str) and "\n" not in down
        assert re.match(
            r"unreachable since \d\d:\d\d:\d\d UTC: cannot reach the Kubernetes API", down
        )
        # Back at the same address (the same kubeconfig works), with other objects.
        again = KubeSim(tmp_path / "again").start(first.port)
        put(again, scheduler(OLD, replicas=2))
        await until(lambda: isinstance(cache.status(dep), list))
        back = KubeCluster(KubernetesSettings(kubeconfig=again.kubeconfig), "airflow")
        try:
            await rolled(back, SCHED)
            await matches_running(cache, back, dep)
            [sched, work] = await back.running(dep)
            assert sum(sched["pods_running"].values()) == 4 and "not found" in work["error"]
        finally:
            await back.close()
    finally:
        await cache.stop()
        if again is not None:
            stop(again)


async def test_a_cluster_never_reached_says_why(tmp_path: Path) -> None:
    dead = KubeSim(tmp_path / "dead").start()
    stop(dead)  # its kubeconfig names a port where nothing listens
    dep = deployment(SCHED)
    cache = ClusterWatch(settings(dead.kubeconfig, dep))
    cache.start()
    try:
        await until(lambda: str(cache.status(dep)).startswith("unreachable"))
        down = cache.status(dep)
        assert isinstance(down, str) and "\n" not in down
        assert "cannot reach the Kubernetes API while reading deployment/airflow-scheduler" in down
    finally:
        await cache.stop()


async def test_a_bad_kubeconfig_says_why(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("{not yaml: [")
    dep = deployment(SCHED)
    cache = ClusterWatch(settings(bad, dep))
    cache.start()
    try:
        await until(lambda: str(cache.status(dep)).startswith("unreachable"))
        assert "no usable kubeconfig" in str(cache.status(dep))
    finally:
        await cache.stop()


async def test_credentials_that_may_not_watch_are_polled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch_module, "POLL_SECONDS", 0.2)
    # Failures wait far longer: a refused watch taken for one would be seen late.
    monkeypatch.setattr(watch_module, "BACKOFF_FIRST", 5.0)
    monkeypatch.setattr(watch_module, "BACKOFF_MAX", 5.0)
    sim = KubeSim(tmp_path / "kubesim", token="admin").start()
    try:
        sim.sim.tokens["lister"] = ("lister", {"get", "list"})
        put(sim, scheduler(OLD, replicas=1))
        dep = deployment(SCHED)
        cache = ClusterWatch(settings(sim.write_kubeconfig(tmp_path / "lister", "lister"), dep))
        cache.start()
        try:
            await until(lambda: isinstance(cache.status(dep), list))
            told: list[object] = []
            sampler = asyncio.create_task(sample(lambda: told.append(cache.status(dep))))
            scale(sim, "airflow-scheduler", 3, "Deployment")
            await until(lambda: matching(cache, dep, lambda e: pods_of(e[0]) == 6), 3)
            await asyncio.sleep(0.5)  # more than one poll
            sampler.cancel()
            assert all(isinstance(t, list) for t in told), {t for t in told if isinstance(t, str)}
            watches = [p for _m, p in sim.sim.requests if "watch=true" in p]
            assert watches  # tried, refused (403), then listed every POLL_SECONDS
        finally:
            await cache.stop()
    finally:
        stop(sim)


# -- reload and stop ----------------------------------------------------------------------


async def test_a_reload_follows_the_new_workloads(
    sim: KubeSim, kube: KubeCluster, cache: ClusterWatch
) -> None:
    one, two = deployment(SCHED), deployment(SCHED, WORKER)
    await matches_running(cache, kube, two)
    cache.update(settings(sim.kubeconfig, one))
    assert isinstance(cache.status(one), str)  # listed again for the new set
    await matches_running(cache, kube, one)
    cache.update(settings(sim.kubeconfig))  # the deployment is gone
    assert cache.followers == {}
    await cache.stop()
    assert cache._stopping == set()


async def test_stop_ends_every_watch_at_once(
    sim: KubeSim, kube: KubeCluster, cache: ClusterWatch
) -> None:
    dep = deployment(SCHED, WORKER)
    await matches_running(cache, kube, dep)
    await opened(sim, 4)  # workload and pods, twice
    began = time.monotonic()
    await cache.stop()
    assert time.monotonic() - began < 1.0
    assert asyncio.all_tasks() == {asyncio.current_task()}
