"""The pure half of the Kubernetes adapter: plan.py's decisions (targets, patch, Job, pods).

Plain dicts in, plain dicts out: no simulator, no client.
"""

from __future__ import annotations

from typing import Any

import pytest

from daemon.adapters.kubernetes import plan
from daemon.config import Deployment, Workload
from daemon.errors import ClusterError

IMAGE = "registry.example:5000/team/airflow"
SCHED = Workload("deployment", "airflow-scheduler")
WORKER = Workload("statefulset", "airflow-worker")
EXEC3 = "AIRFLOW__KUBERNETES_EXECUTOR__WORKER_CONTAINER_"
EXEC2 = "AIRFLOW__KUBERNETES__WORKER_CONTAINER_"


def dep(**extra: Any) -> Deployment:
    fields: dict[str, Any] = {
        "name": "prod",
        "image": IMAGE,
        "namespace": "airflow",
        "workloads": (SCHED, WORKER),
        "worker_workloads": (WORKER,),
    }
    return Deployment(**{**fields, **extra})


def workload_obj(
    containers: list[dict[str, Any]],
    inits: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    pod: dict[str, Any] = {"containers": containers}
    if inits is not None:
        pod["initContainers"] = inits
    return {
        "metadata": {"name": "w", "generation": 4},
        "spec": {
            "selector": {"matchLabels": {"component": "w"}},
            "template": {"metadata": {"labels": {"component": "w"}}, "spec": pod},
            **spec,
        },
    }


def c(name: str, image: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": image, **extra}


def env(**values: str) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in values.items()]


# -- which containers get the image ------------------------------------------------


@pytest.mark.parametrize(
    ("containers", "inits", "names", "want", "want_inits"),
    [
        pytest.param(
            [c("scheduler", f"{IMAGE}:1"), c("log-groomer", "busybox:1.36")],
            None,
            (),
            ["scheduler"],
            [],
            id="by-repository-sidecar-left-alone",
        ),
        pytest.param(
            [c("scheduler", f"{IMAGE}@sha256:ab"), c("other", f"{IMAGE}-other:1")],
            None,
            (),
            ["scheduler"],
            [],
            id="by-repository-digest-and-a-lookalike",
        ),
        pytest.param(
            [c("scheduler", f"{IMAGE}:1")],
            [c("wait-for-airflow-migrations", f"{IMAGE}:1"), c("init-dns", "busybox:1")],
            (),
            ["scheduler"],
            ["wait-for-airflow-migrations"],
            id="init-containers-too",
        ),
        pytest.param(
            [],
            [c("only-init", f"{IMAGE}:1")],
            (),
            [],
            ["only-init"],
            id="only-an-init-container",
        ),
        pytest.param(
            [c("scheduler", "quay.io/other/airflow:2.10"), c("groomer", "busybox:1")],
            [c("wait", "quay.io/other/airflow:2.10")],
            ("scheduler", "wait"),
            ["scheduler"],
            ["wait"],
            id="by-containers-names-whatever-the-image",
        ),
        pytest.param(
            [c("scheduler", f"{IMAGE}:1"), c("groomer", f"{IMAGE}:1")],
            None,
            ("groomer",),
            ["groomer"],
            [],
            id="names-win-over-repository",
        ),
    ],
)
def test_the_containers_that_get_the_image(
    containers: list[dict[str, Any]],
    inits: list[dict[str, Any]] | None,
    names: tuple[str, ...],
    want: list[str],
    want_inits: list[str],
) -> None:
    t = plan.target_from(dep(containers=names), SCHED, workload_obj(containers, inits))
    assert (t.containers, t.init_containers) == (want, want_inits)
    everything = {x["name"]: x["image"] for x in containers + (inits or [])}
    assert t.images == {n: everything[n] for n in want + want_inits}


@pytest.mark.parametrize(
    ("containers", "names", "message"),
    [
        pytest.param(
            [c("scheduler", "quay.io/other/airflow:2.10"), c("groomer", "busybox:1")],
            (),
            f"deployment/airflow-scheduler in namespace airflow has no container running "
            f"{IMAGE} (it runs scheduler=quay.io/other/airflow:2.10, groomer=busybox:1); set "
            "`containers` to the names that should get the new image.",
            id="by-repository",
        ),
        pytest.param(
            [c("scheduler", f"{IMAGE}:1")],
            ("web", "api"),
            "deployment/airflow-scheduler in namespace airflow has no container named web, "
            f"api (it runs scheduler={IMAGE}:1); set `containers` to the names that should get "
            "the new image.",
            id="by-names",
        ),
        pytest.param(
            [],
            (),
            "deployment/airflow-scheduler in namespace airflow has no container running "
            f"{IMAGE} (it runs nothing); set `containers` to the names that should get the "
            "new image.",
            id="nothing",
        ),
    ],
)
def test_no_matching_container_is_refused_naming_what_runs(
    containers: list[dict[str, Any]], names: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ClusterError) as caught:
        plan.target_from(dep(containers=names), SCHED, workload_obj(containers))
    assert caught.value.message == message


@pytest.mark.parametrize(
    ("workload", "strategy", "refused"),
    [
        (WORKER, {"type": "OnDelete"}, True),
        (WORKER, {"type": "RollingUpdate"}, False),
        (WORKER, None, False),
        (SCHED, {"type": "Recreate"}, False),  # a Deployment's strategy is its own business
    ],
)
def test_only_rolling_update_statefulsets_are_rolled(
    workload: Workload, strategy: dict[str, str] | None, refused: bool
) -> None:
    spec = {"updateStrategy": strategy} if strategy else {}
    obj = workload_obj([c("worker", f"{IMAGE}:1")], **spec)
    if not refused:
        assert plan.target_from(dep(), workload, obj).containers == ["worker"]
        return
    with pytest.raises(ClusterError) as caught:
        plan.target_from(dep(), workload, obj)
    assert caught.value.message == (
        "statefulset/airflow-worker uses updateStrategy OnDelete: patching it would change no "
        "pod; deployd rolls StatefulSets with the RollingUpdate strategy."
    )


def test_a_target_keeps_what_a_rollback_restores() -> None:
    obj = workload_obj([c("worker", f"{IMAGE}:1")])
    obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 600
    obj["spec"]["template"]["metadata"]["annotations"] = {
        plan.ANNOTATION_DEPLOY: "7",
        "other": "kept out",
    }
    t = plan.target_from(dep(), WORKER, obj)
    assert t.worker and t.generation == 4 and t.grace == 600
    assert t.annotations == {plan.ANNOTATION_DEPLOY: "7", plan.ANNOTATION_COMMIT: None}
    plain = plan.target_from(dep(), SCHED, workload_obj([c("s", f"{IMAGE}:1")]))
    assert not plain.worker and plain.grace is None
    assert plain.annotations == {plan.ANNOTATION_DEPLOY: None, plan.ANNOTATION_COMMIT: None}


def test_saved_targets_come_back_whole_and_say_who_patched_last() -> None:
    """What a roll saves before patching is what recovery restores after a crash."""
    obj = workload_obj(
        [c("worker", f"{IMAGE}:1", env=env(**{f"{EXEC3}REPOSITORY": IMAGE, f"{EXEC3}TAG": "1"}))],
        [c("init", f"{IMAGE}:1")],
    )
    obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 600
    obj["spec"]["template"]["metadata"]["annotations"] = {plan.ANNOTATION_DEPLOY: "7"}
    targets = [plan.target_from(dep(), WORKER, obj), plan.target_from(dep(), SCHED, obj)]
    assert plan.targets_from_json(plan.targets_json(targets)) == targets
    assert plan.targets_from_json("[]") == []
    assert plan.deploy_of(obj) == "7"
    assert plan.deploy_of(workload_obj([c("s", f"{IMAGE}:1")])) is None
    assert plan.deploy_of({}) is None


# -- KubernetesExecutor's image variables --------------------------------------------


@pytest.mark.parametrize(
    ("variables", "want"),
    [
        pytest.param([], {}, id="none"),
        pytest.param(
            env(**{f"{EXEC3}REPOSITORY": IMAGE, f"{EXEC3}TAG": "1"}),
            {f"{EXEC3}REPOSITORY": IMAGE, f"{EXEC3}TAG": "1"},
            id="airflow-3",
        ),
        pytest.param(
            env(**{f"{EXEC2}REPOSITORY": IMAGE, f"{EXEC2}TAG": "1"}),
            {f"{EXEC2}REPOSITORY": IMAGE, f"{EXEC2}TAG": "1"},
            id="airflow-2",
        ),
        pytest.param(
            env(**{f"{EXEC3}TAG": "1"}),
            {f"{EXEC3}REPOSITORY": "", f"{EXEC3}TAG": "1"},
            id="only-the-tag",
        ),
        pytest.param(
            [
                {"name": f"{EXEC3}REPOSITORY", "valueFrom": {"configMapKeyRef": {"name": "x"}}},
                {"name": "OTHER", "value": "1"},
            ],
            {},
            id="valueFrom-is-not-ours-to-patch",
        ),
    ],
)
def test_executor_env_detection(variables: list[dict[str, Any]], want: dict[str, str]) -> None:
    obj = workload_obj([c("scheduler", f"{IMAGE}:1", env=variables), c("groomer", "busybox:1")])
    t = plan.target_from(dep(), SCHED, obj)
    assert t.executor_env == ({"scheduler": want} if want else {})
    assert t.env == t.executor_env  # what a rollback puts back


# -- the patch -----------------------------------------------------------------------


def target(**extra: Any) -> plan.Target:
    fields: dict[str, Any] = {
        "workload": SCHED,
        "containers": ["scheduler"],
        "init_containers": [],
        "images": {"scheduler": f"{IMAGE}:1"},
    }
    return plan.Target(**{**fields, **extra})


NEW = f"{IMAGE}:deploy-7@sha256:abc"
ANN: dict[str, str | None] = {plan.ANNOTATION_DEPLOY: "7", plan.ANNOTATION_COMMIT: "c0ffee"}


@pytest.mark.parametrize(
    ("t", "grace", "spec"),
    [
        pytest.param(
            target(), None, {"containers": [{"name": "scheduler", "image": NEW}]}, id="plain"
        ),
        pytest.param(
            target(),
            3600,
            {
                "containers": [{"name": "scheduler", "image": NEW}],
                "terminationGracePeriodSeconds": 3600,
            },
            id="with-grace",
        ),
        pytest.param(
            target(init_containers=["wait"]),
            None,
            {
                "containers": [{"name": "scheduler", "image": NEW}],
                "initContainers": [{"name": "wait", "image": NEW}],
            },
            id="init-containers",
        ),
        pytest.param(
            target(containers=[], init_containers=["wait"]),
            0,
            {
                "initContainers": [{"name": "wait", "image": NEW}],
                "terminationGracePeriodSeconds": 0,
            },
            id="only-init-zero-grace",
        ),
    ],
)
def test_patch_body_shape(t: plan.Target, grace: int | None, spec: dict[str, Any]) -> None:
    body = plan.patch_body(t, lambda _name: NEW, ANN, grace)
    assert body == {"spec": {"template": {"metadata": {"annotations": ANN}, "spec": spec}}}


def test_patch_restores_each_container_and_clears_annotations() -> None:
    t = target(containers=["a", "b"], images={"a": "r/x:1", "b": "r/y:2"}, annotations={"k": None})
    body = plan.patch_body(t, t.images.__getitem__, t.annotations, None)
    assert body["spec"]["template"] == {
        "metadata": {"annotations": {"k": None}},  # null removes what deployd had added
        "spec": {"containers": [{"name": "a", "image": "r/x:1"}, {"name": "b", "image": "r/y:2"}]},
    }


@pytest.mark.parametrize(
    ("prefix", "ref", "saved", "repo", "tag"),
    [
        pytest.param(EXEC3, NEW, None, IMAGE, "deploy-7@sha256:abc", id="derived-airflow-3"),
        pytest.param(EXEC2, f"{IMAGE}:v2", None, IMAGE, "v2", id="derived-airflow-2"),
        pytest.param(
            EXEC3,
            f"{IMAGE}:1",
            {"scheduler": {f"{EXEC3}REPOSITORY": "old/repo", f"{EXEC3}TAG": "old-tag"}},
            "old/repo",
            "old-tag",
            id="a-rollback-puts-the-saved-values-back",
        ),
    ],
)
def test_patch_env_values(
    prefix: str, ref: str, saved: dict[str, dict[str, str]] | None, repo: str, tag: str
) -> None:
    t = target(executor_env={"scheduler": {f"{prefix}REPOSITORY": "", f"{prefix}TAG": ""}})
    [item] = plan.patch_body(t, lambda _name: ref, ANN, None, saved)["spec"]["template"]["spec"][
        "containers"
    ]
    assert item == {
        "name": "scheduler",
        "image": ref,
        "env": [
            {"name": f"{prefix}REPOSITORY", "value": repo},
            {"name": f"{prefix}TAG", "value": tag},
        ],
    }


# -- the migration Job ---------------------------------------------------------------


def test_migration_job_shape() -> None:
    source = workload_obj(
        [
            c(
                "scheduler",
                f"{IMAGE}:1",
                args=["scheduler"],
                env=env(DB="postgres://"),
                envFrom=[{"secretRef": {"name": "db"}}],
                livenessProbe={"exec": {}},
                readinessProbe={"exec": {}},
                startupProbe={"exec": {}},
                lifecycle={"preStop": {}},
            ),
            c("groomer", "busybox:1"),
        ],
        [c("wait-for-airflow-migrations", f"{IMAGE}:1")],
    )
    source["spec"]["template"]["spec"]["serviceAccountName"] = "airflow"
    job = plan.migration_job(dep(), source, "scheduler", NEW, 12)
    assert source["spec"]["template"]["spec"]["initContainers"]  # the source is left as it was
    labels = {"deployd.dev/deploy-id": "12", "deployd.dev/job": "migrate"}
    assert job["metadata"] == {"name": "prod-migrate-12", "labels": labels, "namespace": "airflow"}
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 86400
    template = job["spec"]["template"]
    assert template["metadata"] == {"labels": labels}
    pod = template["spec"]
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "airflow"
    assert "initContainers" not in pod
    assert pod["containers"] == [
        {
            "name": "scheduler",
            "image": NEW,
            "command": ["airflow", "db", "migrate"],
            "env": env(DB="postgres://"),
            "envFrom": [{"secretRef": {"name": "db"}}],
        }
    ]


@pytest.mark.parametrize(
    ("name", "deploy_id", "want"),
    [
        ("prod", 1, "prod-migrate-1"),
        ("d" * 63, 7, "d" * 53 + "-migrate-7"),
        ("d" * 60, 12345, "d" * 49 + "-migrate-12345"),
        ("d" * 54, 7, "d" * 53 + "-migrate-7"),
        ("d" * 53, 7, "d" * 53 + "-migrate-7"),
    ],
)
def test_migration_job_name_fits_63_characters(name: str, deploy_id: int, want: str) -> None:
    source = workload_obj([c("scheduler", f"{IMAGE}:1")])
    got = plan.migration_job(dep(name=name), source, "scheduler", NEW, deploy_id)
    assert got["metadata"]["name"] == want and len(want) <= 63


# -- small readers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "want"),
    [
        ({}, []),
        ({"labels": {"app.kubernetes.io/managed-by": "Helm"}}, ["Helm"]),
        ({"labels": {"app.kubernetes.io/managed-by": "Kustomize"}}, []),
        ({"annotations": {"meta.helm.sh/release-name": "airflow"}}, ["Helm"]),
        ({"annotations": {"argocd.argoproj.io/tracking-id": "a:apps/Deployment:x"}}, ["Argo CD"]),
        ({"labels": {"argocd.argoproj.io/instance": "airflow"}}, ["Argo CD"]),
        (
            {
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"argocd.argoproj.io/tracking-id": "x"},
            },
            ["Helm", "Argo CD"],
        ),
        ({"labels": None, "annotations": None}, []),
    ],
)
def test_managers(meta: dict[str, Any], want: list[str]) -> None:
    assert plan.managers(meta) == want


@pytest.mark.parametrize(
    ("image", "want"),
    [
        ("airflow", "airflow"),
        ("apache/airflow:2.10.5", "apache/airflow"),
        ("registry:5000/team/airflow", "registry:5000/team/airflow"),
        ("registry:5000/team/airflow:3.0", "registry:5000/team/airflow"),
        ("registry:5000/team/airflow@sha256:abc", "registry:5000/team/airflow"),
        ("registry:5000/team/airflow:t@sha256:abc", "registry:5000/team/airflow"),
        ("localhost:5000/airflow", "localhost:5000/airflow"),
        ("quay.io/a/b/c:tag", "quay.io/a/b/c"),
    ],
)
def test_repository(image: str, want: str) -> None:
    assert plan.repository(image) == want


@pytest.mark.parametrize(
    ("obj", "want"),
    [
        ({}, {}),
        ({"spec": {"selector": {"matchExpressions": []}}}, {}),
        ({"spec": {"selector": {"matchLabels": {"a": "b", "c": "d"}}}}, {"a": "b", "c": "d"}),
    ],
)
def test_selector(obj: dict[str, Any], want: dict[str, str]) -> None:
    assert plan.selector(obj) == want


# -- permissions ---------------------------------------------------------------------

JOBS = [("batch", "jobs", v) for v in ("create", "get", "watch", "delete")]


@pytest.mark.parametrize(
    ("workloads", "want"),
    [
        pytest.param(
            (SCHED, Workload("deployment", "web")),
            [("apps", "deployments", v) for v in ("get", "patch", "watch")]
            + JOBS
            + [("", "pods", "list")],
            id="deployments",
        ),
        pytest.param(
            (WORKER, SCHED),
            [("apps", "deployments", v) for v in ("get", "patch", "watch")]
            + [("apps", "statefulsets", v) for v in ("get", "patch", "watch")]
            + JOBS
            + [("", "pods", "list"), ("", "pods", "delete")],
            id="with-a-statefulset-stuck-pods-are-deleted",
        ),
    ],
)
def test_wanted_permissions(workloads: tuple[Workload, ...], want: list[plan.Permission]) -> None:
    assert plan.wanted_permissions(dep(workloads=workloads)) == want


@pytest.mark.parametrize(
    ("denied", "message"),
    [
        ([], ""),
        (
            [("apps", "deployments", "patch"), ("batch", "jobs", "create"), ("", "pods", "list")],
            "the cluster credentials may not patch deployments.apps, create jobs.batch, list "
            "pods in namespace airflow; grant them (RBAC) to deployd.",
        ),
    ],
)
def test_permission_refusal(denied: list[plan.Permission], message: str) -> None:
    assert plan.permission_refusal("airflow", denied) == message


# -- pods ----------------------------------------------------------------------------


def pod(
    name: str,
    revision: str = "w-new",
    ready: bool = False,
    deleting: bool = False,
    statuses: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {"controller-revision-hash": revision}}
    if deleting:
        meta["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]
    }
    if statuses is not None:
        status["containerStatuses"] = statuses
    return {"metadata": meta, "status": status}


@pytest.mark.parametrize(
    ("pods", "want"),
    [
        pytest.param([], [], id="none"),
        pytest.param([pod("w-1"), pod("w-0")], ["w-1", "w-0"], id="crash-looping"),
        pytest.param([pod("w-1", ready=True)], [], id="ready-is-left"),
        pytest.param([pod("w-1", revision="w-old")], [], id="other-revision-is-left"),
        pytest.param([pod("w-1", deleting=True)], [], id="already-going"),
        pytest.param(
            [{"metadata": {"labels": {"controller-revision-hash": "w-new"}}}], [], id="no-name"
        ),
        pytest.param(
            [{"metadata": {"name": "w-2", "labels": {"controller-revision-hash": "w-new"}}}],
            ["w-2"],
            id="no-status-yet",
        ),
    ],
)
def test_stuck_pods(pods: list[dict[str, Any]], want: list[str]) -> None:
    assert plan.stuck_pods(pods, "w-new") == want


def running(image: str, image_id: str = "") -> dict[str, str]:
    return {"name": "scheduler", "image": image, "imageID": image_id}


@pytest.mark.parametrize(
    ("pods", "want"),
    [
        pytest.param([], {}, id="no-pods"),
        pytest.param(
            [
                pod("a", statuses=[running(f"{IMAGE}:2", f"{IMAGE}@sha256:2")]),
                pod("b", statuses=[running(f"{IMAGE}:2", f"{IMAGE}@sha256:2")]),
                pod("c", statuses=[running(f"{IMAGE}:1", f"{IMAGE}@sha256:1")]),
            ],
            {f"{IMAGE}@sha256:2": 2, f"{IMAGE}@sha256:1": 1},
            id="by-image-id",
        ),
        pytest.param(
            [
                pod("a", statuses=[running(f"{IMAGE}:2", f"{IMAGE}@sha256:2")]),
                pod("b", deleting=True, statuses=[running(f"{IMAGE}:1", f"{IMAGE}@sha256:1")]),
            ],
            {f"{IMAGE}@sha256:2": 1},
            id="terminating-pods-are-skipped",
        ),
        pytest.param(
            [pod("a", statuses=[running(f"{IMAGE}:3")]), pod("b", statuses=[{"name": "x"}])],
            {f"{IMAGE}:3": 1, "?": 1},
            id="no-image-id-yet",
        ),
        pytest.param([pod("a")], {}, id="no-container-statuses"),
    ],
)
def test_workload_status_counts_pods(pods: list[dict[str, Any]], want: dict[str, int]) -> None:
    obj = workload_obj([c("scheduler", f"{IMAGE}:2"), c("groomer", "busybox:1")])
    obj["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "Helm"}
    obj["spec"]["template"]["metadata"]["annotations"] = {plan.ANNOTATION_DEPLOY: "9"}
    obj["spec"]["replicas"] = 1
    obj["status"] = {"observedGeneration": 4, "updatedReplicas": 1, "replicas": 1}
    assert plan.workload_status(SCHED, obj, pods) == {
        "workload": "deployment/airflow-scheduler",
        "managed_by": ["Helm"],
        "deploy_id": "9",
        "images": {"scheduler": f"{IMAGE}:2", "groomer": "busybox:1"},
        "rollout": 'Waiting for deployment "w" rollout to finish: 0 of 1 updated replicas '
        "are available...",
        "pods_running": want,
    }


def test_terminating() -> None:
    assert plan.terminating(pod("a", deleting=True))
    assert not plan.terminating(pod("a")) and not plan.terminating({})
