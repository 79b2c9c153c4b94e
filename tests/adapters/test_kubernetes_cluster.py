"""KubeCluster (lightkube, async) against the Kubernetes API simulator, in-process.

No Docker and no kubectl: the simulator (tests/support/kubesim) runs in a thread of the
test process; objects are put straight into its store, and the client under
test talks to it over HTTP with the kubeconfig it wrote.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.adapters.kubernetes import cluster as cluster_module
from daemon.adapters.kubernetes import plan, rules
from daemon.adapters.kubernetes.cluster import KubeCluster
from daemon.config import Deployment, KubernetesSettings, Workload
from daemon.errors import ClusterError, DependencyUnreachable
from tests.steps.test_roll import EXECUTOR, scheduler, worker
from tests.support.kubesim import Fault, KubeSim
from tests.support.kubesim.controllers import DRAIN, SCENARIO
from tests.support.kubesim.store import BY_PATH

IMAGE = "registry.example:5000/airflow/prod"
OLD, NEW = f"{IMAGE}:before", f"{IMAGE}:deploy-1@sha256:{'ab' * 32}"
SCHED = Workload("deployment", "airflow-scheduler")
WORKER = Workload("statefulset", "airflow-worker")
RESOURCES = {
    "Deployment": BY_PATH[("apps", "v1", "deployments")],
    "StatefulSet": BY_PATH[("apps", "v1", "statefulsets")],
}
PODS = BY_PATH[("", "v1", "pods")]
JOBS = BY_PATH[("batch", "v1", "jobs")]
ANNOTATIONS: dict[str, str | None] = {plan.ANNOTATION_DEPLOY: "1", plan.ANNOTATION_COMMIT: "c0"}
# Slower (a second or so each): they wait out the simulated controllers' real time (a
# progress deadline, a StatefulSet's one-pod-at-a-time roll). They need only the simulator.
SLOW = pytest.mark.integration


def deployment(*workloads: Workload, **extra: Any) -> Deployment:
    return Deployment(
        name="prod",
        image=IMAGE,
        namespace="airflow",
        workloads=workloads or (SCHED, WORKER),
        worker_workloads=(WORKER,),
        **extra,
    )


def stop(sim: KubeSim) -> None:
    """End the watches still open, then stop the simulator.

    It notices that a client went away only when it next writes to the watch,
    and its server waits for every handler on the way out.
    """
    sim.call(lambda: [w.queue.put_nowait(None) for w in list(sim.sim.store.watchers)])
    sim.stop()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries back off for 10 ms, not 250: the faults here are injected, not load."""
    monkeypatch.setattr(cluster_module, "BACKOFF", 0.01)


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[KubeSim]:
    s = KubeSim(tmp_path / "kubesim").start()
    yield s
    stop(s)


@pytest.fixture
async def kube(sim: KubeSim) -> AsyncIterator[KubeCluster]:
    c = KubeCluster(KubernetesSettings(kubeconfig=sim.kubeconfig), "airflow")
    yield c
    await c.close()


def put(sim: KubeSim, obj: dict[str, Any]) -> None:
    """Create `obj` in the simulator's store (as `kubectl create` would).

    The simulator stores a new StatefulSet with `status: {}` until its
    controller's first tick, where kube-apiserver always says `replicas: 0`;
    lightkube refuses to decode the former, so wait for the controller.
    """
    res = RESOURCES[obj["kind"]]
    name = obj["metadata"]["name"]
    sim.call(sim.sim.store.create, res, "airflow", obj)
    if obj["kind"] != "StatefulSet":
        return
    deadline = soon(5)
    while "replicas" not in sim.call(sim.sim.store.get, res, "airflow", name)["status"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def pods(sim: KubeSim, component: str) -> list[dict[str, Any]]:
    listed = sim.call(sim.sim.store.list, PODS, "airflow", f"component={component}")
    return [p for p in listed if not p["metadata"].get("deletionTimestamp")]


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


async def rolled(kube: KubeCluster, *workloads: Workload) -> None:
    for w in workloads:
        verdict = await kube.wait(w, soon(), lambda _m: None)
        assert verdict.done, verdict


def template(sim: KubeSim, workload: Workload) -> dict[str, Any]:
    res = RESOURCES["Deployment" if workload.kind == "deployment" else "StatefulSet"]
    return dict(sim.call(sim.sim.store.get, res, "airflow", workload.name)["spec"]["template"])


# -- preflight -----------------------------------------------------------------------


async def test_preflight_finds_the_targets(sim: KubeSim, kube: KubeCluster) -> None:
    put(sim, scheduler(OLD, replicas=1))
    put(sim, worker(OLD, replicas=1))
    sched, work = await kube.preflight(deployment())
    assert (sched.workload, sched.containers, sched.init_containers) == (
        SCHED,
        ["scheduler"],
        ["wait-for-airflow-migrations"],
    )
    assert sched.images == {"scheduler": OLD, "wait-for-airflow-migrations": OLD}
    assert sched.executor_env == {
        "scheduler": {f"{EXECUTOR}REPOSITORY": IMAGE, f"{EXECUTOR}TAG": "before"}
    }
    assert not sched.worker and sched.generation == 1
    assert (work.workload, work.containers, work.worker, work.grace) == (
        WORKER,
        ["worker"],
        True,
        600,
    )


async def test_preflight_refuses_a_missing_workload(sim: KubeSim, kube: KubeCluster) -> None:
    put(sim, scheduler(OLD, replicas=1))
    with pytest.raises(ClusterError) as caught:
        await kube.preflight(deployment())
    assert caught.value.reason == "NotFound"
    assert caught.value.message == (
        'Kubernetes refused reading statefulset/airflow-worker: statefulsets.apps "airflow-worker" '
        "not found"
    )


async def test_preflight_names_the_permissions_a_token_lacks(tmp_path: Path) -> None:
    sim = KubeSim(tmp_path / "tls", tls=True, token="admin", read_token="reader").start()
    try:
        put(sim, scheduler(OLD, replicas=1))
        put(sim, worker(OLD, replicas=1))
        for token, message in [
            (
                "reader",
                "the cluster credentials may not patch deployments.apps, patch "
                "statefulsets.apps, create jobs.batch, delete jobs.batch, delete pods in "
                "namespace airflow; grant them (RBAC) to deployd.",
            ),
            ("stale", "Kubernetes refused checking permissions: Unauthorized"),
        ]:
            config = sim.write_kubeconfig(tmp_path / f"{token}.kubeconfig", token)
            kube = KubeCluster(KubernetesSettings(kubeconfig=config), "airflow")
            try:
                with pytest.raises(ClusterError) as caught:
                    await kube.preflight(deployment())
                assert caught.value.message == message
            finally:
                await kube.close()
        admin = KubeCluster(KubernetesSettings(kubeconfig=sim.kubeconfig), "airflow")
        try:
            assert len(await admin.preflight(deployment())) == 2
        finally:
            await admin.close()
    finally:
        stop(sim)


async def test_an_unreachable_api_is_dependency_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = KubeSim(tmp_path / "gone").start()
    sim.stop()  # its port is now closed
    monkeypatch.setattr(cluster_module, "ATTEMPTS", 1)
    kube = KubeCluster(KubernetesSettings(kubeconfig=sim.kubeconfig), "airflow")
    try:
        with pytest.raises(DependencyUnreachable) as caught:
            await kube.get(SCHED)
        assert caught.value.message.startswith(
            "cannot reach the Kubernetes API while reading deployment/airflow-scheduler: "
        )
    finally:
        await kube.close()


# -- patch, wait, restore --------------------------------------------------------------


async def test_a_patch_rolls_out_and_wait_sees_it_done(sim: KubeSim, kube: KubeCluster) -> None:
    put(sim, scheduler(OLD, replicas=1))
    await rolled(kube, SCHED)
    [target] = await kube.preflight(deployment(SCHED))
    patched = await kube.patch_image(target, lambda _name: NEW, ANNOTATIONS, None)
    assert patched["metadata"]["generation"] == 2
    said: list[str] = []
    verdict = await kube.wait(SCHED, soon(), said.append)
    assert verdict == rules.Verdict(True, 'deployment "airflow-scheduler" successfully rolled out')
    assert said[-1] == verdict.message and len(said) == len(set(said))  # each message once
    tpl = template(sim, SCHED)
    images = {c["name"]: c["image"] for c in tpl["spec"]["containers"]}
    assert images == {"scheduler": NEW, "log-groomer": "busybox:1.36"}
    assert tpl["spec"]["initContainers"][0]["image"] == NEW
    env = {e["name"]: e["value"] for e in tpl["spec"]["containers"][0]["env"]}
    assert env == {f"{EXECUTOR}REPOSITORY": IMAGE, f"{EXECUTOR}TAG": NEW.split(":", 2)[2]}
    assert tpl["metadata"]["annotations"] == ANNOTATIONS
    running = {c["image"] for p in pods(sim, "scheduler") for c in p["status"]["containerStatuses"]}
    assert running == {NEW, "busybox:1.36"}


async def test_restore_puts_back_what_preflight_saw(sim: KubeSim, kube: KubeCluster) -> None:
    put(sim, scheduler(OLD, replicas=1))
    await rolled(kube, SCHED)
    before = template(sim, SCHED)
    [target] = await kube.preflight(deployment(SCHED))
    await kube.patch_image(target, lambda _name: NEW, ANNOTATIONS, None)
    assert template(sim, SCHED) != before
    await kube.restore(target)
    assert template(sim, SCHED) == before  # images, executor env, annotations: as they were
    await rolled(kube, SCHED)


@SLOW
async def test_a_failed_rollout_is_restored(sim: KubeSim, kube: KubeCluster) -> None:
    put(sim, scheduler(OLD, replicas=1, scenario="never-ready", deadline=1))
    await rolled(kube, SCHED)
    before = template(sim, SCHED)
    [target] = await kube.preflight(deployment(SCHED))
    await kube.patch_image(target, lambda _name: NEW, ANNOTATIONS, None)
    verdict = await kube.wait(SCHED, soon(), lambda _m: None)
    assert verdict == rules.Verdict(
        False, 'deployment "airflow-scheduler" exceeded its progress deadline', failed=True
    )
    await kube.restore(target)
    assert template(sim, SCHED) == before  # images, executor env, annotations: all as they were
    await rolled(kube, SCHED)
    running = {c["image"] for p in pods(sim, "scheduler") for c in p["status"]["containerStatuses"]}
    assert running == {OLD, "busybox:1.36"}


@SLOW
async def test_a_stuck_statefulset_pod_is_replaced_on_restore(
    sim: KubeSim, kube: KubeCluster
) -> None:
    sts = worker(OLD, replicas=1)
    sts["metadata"]["annotations"] = {SCENARIO: "never-ready"}
    put(sim, sts)
    await rolled(kube, WORKER)
    [target] = await kube.preflight(deployment(WORKER))
    await kube.patch_image(target, lambda _name: NEW, ANNOTATIONS, 3600)
    assert template(sim, WORKER)["spec"]["terminationGracePeriodSeconds"] == 3600

    deadline = soon()
    while not any(p["spec"]["containers"][0]["image"] == NEW for p in pods(sim, "worker")):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert not (await kube.wait(WORKER, soon(0.1), lambda _m: None)).done  # crash-looping
    await kube.restore(target)
    tpl = template(sim, WORKER)
    assert tpl["spec"]["terminationGracePeriodSeconds"] == 600  # a worker's grace comes back
    await rolled(kube, WORKER)
    running = {c["image"] for p in pods(sim, "worker") for c in p["status"]["containerStatuses"]}
    assert running == {OLD}


async def test_wait_gives_the_last_verdict_at_the_deadline(sim: KubeSim, kube: KubeCluster) -> None:
    said: list[str] = []
    missing = await kube.wait(SCHED, soon(0.1), said.append)
    assert not missing.done and not missing.failed
    assert missing.message == (
        "cannot read it: Kubernetes refused reading deployment/airflow-scheduler: "
        'deployments.apps "airflow-scheduler" not found'
    )
    # A read that fails is retried until the deadline, and said once (why the wait goes on).
    assert said == [f"{missing.message}; still waiting"]
    said.clear()
    put(sim, scheduler(OLD, replicas=1, scenario="never-ready"))
    await rolled(kube, SCHED)  # what a workload is created with runs; the scenario is for changes
    [target] = await kube.preflight(deployment(SCHED))
    await kube.patch_image(target, lambda _name: NEW, ANNOTATIONS, None)
    late = await kube.wait(SCHED, soon(0.2), said.append)
    assert not late.done and not late.failed
    assert late.message.startswith('Waiting for deployment "airflow-scheduler" rollout to finish')


async def test_a_workload_deleted_while_waited_for_is_told(sim: KubeSim, kube: KubeCluster) -> None:
    put(sim, scheduler(OLD, replicas=1, scenario="never-ready"))
    await rolled(kube, SCHED)
    [target] = await kube.preflight(deployment(SCHED))
    await kube.patch_image(target, lambda _name: NEW, ANNOTATIONS, None)
    waiting = asyncio.create_task(kube.wait(SCHED, soon(0.4), lambda _m: None))
    await asyncio.sleep(0.1)
    sim.call(sim.sim.store.delete, RESOURCES["Deployment"], "airflow", SCHED.name)
    verdict = await waiting
    assert not verdict.done and verdict.message.endswith(
        'deployments.apps "airflow-scheduler" not found'
    )


async def test_a_draining_worker_is_settled_and_counted(sim: KubeSim, kube: KubeCluster) -> None:
    sts = worker(OLD, replicas=2)
    sts["metadata"]["annotations"] = {DRAIN: "60"}
    put(sim, sts)
    await rolled(kube, WORKER)
    assert await kube.draining(WORKER) == 0
    [target] = await kube.preflight(deployment(WORKER))
    await kube.patch_image(target, lambda _name: NEW, ANNOTATIONS, 3600)
    verdict = await kube.wait(WORKER, soon(), lambda _m: None, rules.settled)
    assert verdict.done and verdict.message.startswith("new template taken (revision ")
    deadline = soon(5)
    while await kube.draining(WORKER) != 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


# -- what runs ---------------------------------------------------------------------------


async def test_running_reports_pods_and_missing_workloads(sim: KubeSim, kube: KubeCluster) -> None:
    sched = scheduler(OLD, replicas=2)
    sched["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "Helm"}
    put(sim, sched)
    await rolled(kube, SCHED)
    [status, gone] = await kube.running(deployment())
    assert gone == {
        "workload": "statefulset/airflow-worker",
        "error": "Kubernetes refused reading statefulset/airflow-worker: statefulsets.apps "
        '"airflow-worker" not found',
    }
    [old_id] = {
        c["imageID"]
        for p in pods(sim, "scheduler")
        for c in p["status"]["containerStatuses"]
        if c["name"] == "scheduler"
    }
    assert old_id.startswith(f"{IMAGE}@sha256:")
    assert status["workload"] == "deployment/airflow-scheduler"
    assert status["managed_by"] == ["Helm"] and status["deploy_id"] is None
    assert status["images"] == {"scheduler": OLD, "log-groomer": "busybox:1.36"}
    assert status["rollout"] == 'deployment "airflow-scheduler" successfully rolled out'
    assert status["pods_running"][old_id] == 2 and sum(status["pods_running"].values()) == 4


# -- the migration Job -------------------------------------------------------------------


def migration(outcome: str = "succeed") -> dict[str, Any]:
    source = scheduler(OLD)
    source["spec"]["template"]["metadata"]["annotations"] = {SCENARIO: outcome}
    return plan.migration_job(deployment(), source, "scheduler", NEW, 1)


@pytest.mark.parametrize(
    ("outcome", "why", "said"),
    [
        ("succeed", "", ["job/prod-migrate-1 created", "job/prod-migrate-1 complete"]),
        (
            "fail",
            "job/prod-migrate-1 failed: Job has reached the specified backoff limit",
            ["job/prod-migrate-1 created"],
        ),
    ],
)
async def test_run_job(
    sim: KubeSim, kube: KubeCluster, outcome: str, why: str, said: list[str]
) -> None:
    progress: list[str] = []
    assert await kube.run_job(migration(outcome), soon(), progress.append) == why
    assert progress == said
    # A job that ended (complete or failed, for its logs) is kept.
    assert sim.call(sim.sim.store.find, JOBS, "airflow", "prod-migrate-1") is not None


async def test_a_job_not_done_in_time_is_deleted(sim: KubeSim, kube: KubeCluster) -> None:
    why = await kube.run_job(migration(), soon(0.1), lambda _m: None)
    assert why == "job/prod-migrate-1 did not finish in time"
    assert sim.call(sim.sim.store.find, JOBS, "airflow", "prod-migrate-1") is None


async def test_a_job_that_cannot_be_read_is_deleted(sim: KubeSim, kube: KubeCluster) -> None:
    sim.call(sim.sim.faults.append, Fault(status=403, path="/jobs/prod-migrate-1", method="GET"))
    with pytest.raises(ClusterError) as caught:
        await kube.run_job(migration(), soon(), lambda _m: None)
    assert caught.value.message == "Kubernetes refused reading job prod-migrate-1: injected fault"
    assert sim.call(sim.sim.store.find, JOBS, "airflow", "prod-migrate-1") is None


async def test_a_job_deleted_while_followed_is_a_refusal(sim: KubeSim, kube: KubeCluster) -> None:
    following = asyncio.create_task(kube.run_job(migration(), soon(), lambda _m: None))
    deadline = soon(5)
    while sim.call(sim.sim.store.find, JOBS, "airflow", "prod-migrate-1") is None:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # followed by now; its pod runs for 0.3 s
    sim.call(sim.sim.store.delete, JOBS, "airflow", "prod-migrate-1")
    with pytest.raises(ClusterError) as caught:
        await following
    assert caught.value.reason == "NotFound"


async def test_a_retried_create_that_went_through_is_followed(
    sim: KubeSim, kube: KubeCluster
) -> None:
    job = migration()
    sim.call(sim.sim.store.create, JOBS, "airflow", job)
    assert await kube.run_job(job, soon(), lambda _m: None) == ""


# -- API faults ------------------------------------------------------------------------


async def test_api_faults_are_retried(sim: KubeSim, kube: KubeCluster) -> None:
    put(sim, scheduler(OLD, replicas=1))
    await rolled(kube, SCHED)
    [target] = await kube.preflight(deployment(SCHED))
    path = "/deployments/airflow-scheduler"
    sim.call(
        sim.sim.faults.extend,
        [
            Fault(status=500, count=1, path=path, method="GET"),  # a read fails once
            Fault(status=409, count=1, path=path, method="PATCH"),  # the patch conflicts
            Fault(status=503, count=1, path=path, method="PATCH"),  # then the server is busy
            Fault(status=0, drop_watch_after=1, count=2, path="/deployments"),  # watches drop
        ],
    )
    before = len(sim.sim.requests)
    assert (await kube.get(SCHED))["metadata"]["name"] == "airflow-scheduler"
    await kube.patch_image(target, lambda _name: NEW, ANNOTATIONS, None)
    assert (await kube.wait(SCHED, soon(), lambda _m: None)).done
    patches = [p for m, p in sim.sim.requests[before:] if m == "PATCH" and path in p]
    assert len(patches) == 3  # 409, 503, then accepted
    assert sim.sim.faults == []


@pytest.mark.parametrize(
    ("status", "attempts", "reason"),
    [(403, 1, "Forbidden"), (404, 1, "NotFound"), (500, 2, "InternalError")],
)
async def test_refusals_fail_at_once_and_retries_give_up(
    sim: KubeSim,
    kube: KubeCluster,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    attempts: int,
    reason: str,
) -> None:
    monkeypatch.setattr(cluster_module, "ATTEMPTS", 2)
    put(sim, scheduler(OLD, replicas=1))
    path = "/deployments/airflow-scheduler"
    sim.call(sim.sim.faults.append, Fault(status=status, count=5, path=path, method="GET"))
    before = len(sim.sim.requests)
    with pytest.raises(ClusterError) as caught:
        await kube.get(SCHED)
    assert caught.value.message == (
        "Kubernetes refused reading deployment/airflow-scheduler: injected fault"
    )
    assert caught.value.reason == reason
    assert len([m for m, p in sim.sim.requests[before:] if path in p]) == attempts
