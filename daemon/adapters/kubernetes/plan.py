"""Kubernetes planning, pure: which containers get the image, the patch, the migration Job.

Plain dicts in, plain dicts and dataclasses out; no client, no I/O. The
client (cluster.py) reads objects and sends what these functions decide.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from daemon.adapters.kubernetes import rules
from daemon.config import Deployment, Workload
from daemon.errors import ClusterError

ANNOTATION_DEPLOY = "deployd.dev/deploy-id"
ANNOTATION_COMMIT = "deployd.dev/commit"
# Where Airflow's KubernetesExecutor reads the image of task pods (Airflow 3, then 2).
EXECUTOR_IMAGE_ENV = (
    (
        "AIRFLOW__KUBERNETES_EXECUTOR__WORKER_CONTAINER_REPOSITORY",
        "AIRFLOW__KUBERNETES_EXECUTOR__WORKER_CONTAINER_TAG",
    ),
    (
        "AIRFLOW__KUBERNETES__WORKER_CONTAINER_REPOSITORY",
        "AIRFLOW__KUBERNETES__WORKER_CONTAINER_TAG",
    ),
)
GROUP_RESOURCE = {"deployment": ("apps", "deployments"), "statefulset": ("apps", "statefulsets")}
Permission = tuple[str, str, str]  # (API group, resource, verb), as RBAC names them


def managers(meta: dict[str, Any]) -> list[str]:
    """Tools that also own this object: their next sync undoes deployd's patch."""
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    out = []
    if labels.get("app.kubernetes.io/managed-by") == "Helm" or "meta.helm.sh/release-name" in (
        annotations
    ):
        out.append("Helm")
    if "argocd.argoproj.io/tracking-id" in annotations or "argocd.argoproj.io/instance" in labels:
        out.append("Argo CD")
    return out


def selector(obj: dict[str, Any]) -> dict[str, str]:
    """A workload's pod selector (matchLabels)."""
    return dict(((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {})


def repository(image: str) -> str:
    """`registry/path` of an image reference, without tag or digest."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return name.rsplit(":", 1)[0] if ":" in last else name


@dataclass
class Target:
    """One workload to roll: what it runs now and which containers get the new image."""

    workload: Workload
    containers: list[str]
    init_containers: list[str]
    images: dict[str, str]  # container name -> image before this deploy
    executor_env: dict[str, dict[str, str]] = field(default_factory=dict)  # container -> env
    worker: bool = False
    generation: int = 0
    # The pod template as it was, to restore it exactly on rollback (the old
    # ReplicaSet / revision is then reused).
    annotations: dict[str, str | None] = field(default_factory=dict)
    grace: int | None = None
    env: dict[str, dict[str, str]] = field(default_factory=dict)


# -- preflight -----------------------------------------------------------------


def target_from(dep: Deployment, workload: Workload, obj: dict[str, Any]) -> Target:
    """What preflight keeps of a workload: the containers that get the image, as they run now.

    Raises ClusterError when the workload cannot be rolled: a StatefulSet that
    is not RollingUpdate, or no container on the image (or named in `containers`).
    """
    spec = obj.get("spec") or {}
    template = spec.get("template") or {}
    pod = template.get("spec") or {}
    strategy = (spec.get("updateStrategy") or {}).get("type")
    if workload.kind == "statefulset" and strategy not in (None, "RollingUpdate"):
        raise ClusterError(
            f"{workload} uses updateStrategy {strategy}: patching it would change no pod; "
            "deployd rolls StatefulSets with the RollingUpdate strategy."
        )
    containers = _chosen(dep, pod.get("containers") or [])
    inits = _chosen(dep, pod.get("initContainers") or [])
    if not containers and not inits:
        seen = ", ".join(
            f"{c.get('name')}={c.get('image')}"
            for c in (pod.get("containers") or []) + (pod.get("initContainers") or [])
        )
        repo = repository(dep.image)
        want = f"named {', '.join(dep.containers)}" if dep.containers else f"running {repo}"
        raise ClusterError(
            f"{workload} in namespace {dep.namespace} has no container "
            f"{want} (it runs {seen or 'nothing'}); set `containers` to the "
            "names that should get the new image."
        )
    executor_env = executor_env_of(containers)
    saved = (template.get("metadata") or {}).get("annotations") or {}
    return Target(
        workload=workload,
        containers=[c["name"] for c in containers],
        init_containers=[c["name"] for c in inits],
        images={c["name"]: str(c.get("image")) for c in containers + inits},
        executor_env=executor_env,
        worker=workload in dep.worker_workloads,
        generation=int((obj.get("metadata") or {}).get("generation") or 0),
        annotations={k: saved.get(k) for k in (ANNOTATION_DEPLOY, ANNOTATION_COMMIT)},
        grace=pod.get("terminationGracePeriodSeconds"),
        env=executor_env,
    )


def targets_json(targets: list[Target]) -> str:
    """The targets as JSON: what a roll saves before it patches (see targets_from_json)."""
    return json.dumps([asdict(t) for t in targets])


def targets_from_json(text: str) -> list[Target]:
    """The targets a roll saved, to put them back after its process died."""
    out = []
    for item in json.loads(text):
        item["workload"] = Workload(**item["workload"])
        out.append(Target(**item))
    return out


def deploy_of(obj: dict[str, Any]) -> str | None:
    """The deploy id on a workload's pod template (the last deploy that patched it)."""
    template = (obj.get("spec") or {}).get("template") or {}
    return ((template.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_DEPLOY)


def _chosen(dep: Deployment, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The containers that get the new image: named in `containers`, else on the image."""
    if dep.containers:
        return [c for c in items if c.get("name") in dep.containers]
    repo = repository(dep.image)
    return [c for c in items if repository(str(c.get("image", ""))) == repo]


def executor_env_of(containers: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """container -> the KubernetesExecutor image variables it sets (literal values), if any."""
    out: dict[str, dict[str, str]] = {}
    for c in containers:
        env = {
            e.get("name"): e.get("value")
            for e in c.get("env") or []
            if isinstance(e, dict) and "value" in e
        }
        for repo_var, tag_var in EXECUTOR_IMAGE_ENV:
            if repo_var in env or tag_var in env:
                out[c["name"]] = {
                    repo_var: str(env.get(repo_var) or ""),
                    tag_var: str(env.get(tag_var) or ""),
                }
    return out


def wanted_permissions(dep: Deployment) -> list[Permission]:
    """What the deploy will do in the namespace: workloads, the migration Job, pods."""
    wanted = sorted(
        {
            (*GROUP_RESOURCE[w.kind], verb)
            for w in dep.workloads
            for verb in ("get", "patch", "watch")
        }
    ) + [("batch", "jobs", verb) for verb in ("create", "get", "watch", "delete")]
    wanted.append(("", "pods", "list"))
    if any(w.kind == "statefulset" for w in dep.workloads):
        wanted.append(("", "pods", "delete"))  # stuck pods, on a rollback
    return wanted


def permission_refusal(namespace: str, denied: list[Permission]) -> str:
    """The message naming the permissions the credentials lack ('' when none)."""
    if not denied:
        return ""
    names = [f"{verb} {res}.{group}" if group else f"{verb} {res}" for group, res, verb in denied]
    return (
        f"the cluster credentials may not {', '.join(names)} in "
        f"namespace {namespace}; grant them (RBAC) to deployd."
    )


# -- the roll ------------------------------------------------------------------


def patch_body(
    target: Target,
    image_for: Callable[[str], str],
    annotations: dict[str, str | None],
    grace: int | None,
    env: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The strategic-merge patch of one workload: images, pod-template annotations, grace.

    Containers that tell KubernetesExecutor the task pods' image get it in the
    same patch: `env` (a rollback's saved values) or derived from the new image.
    """
    containers = []
    for name in target.containers:
        ref = image_for(name)
        item: dict[str, Any] = {"name": name, "image": ref}
        env_vars = target.executor_env.get(name)
        if env_vars:
            repo = repository(ref)
            values = (env or {}).get(name) or {
                var: repo if var.endswith("REPOSITORY") else ref[len(repo) + 1 :]
                for var in env_vars
            }
            item["env"] = [{"name": var, "value": values[var]} for var in env_vars]
        containers.append(item)
    spec: dict[str, Any] = {}
    if containers:
        spec["containers"] = containers
    if target.init_containers:
        spec["initContainers"] = [
            {"name": n, "image": image_for(n)} for n in target.init_containers
        ]
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"spec": {"template": {"metadata": {"annotations": annotations}, "spec": spec}}}


def terminating(pod: dict[str, Any]) -> bool:
    """A pod on its way out (its containers may still be finishing their work)."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def stuck_pods(pods: list[dict[str, Any]], revision: str) -> list[str]:
    """Pods of a StatefulSet's failed `revision` that are not Ready: delete them on a rollback.

    The StatefulSet controller (OrderedReady) does not replace a pod that is not
    Ready, so a crash-looping pod of the failed template would stay as it is.
    """
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if not meta.get("name") or terminating(pod):
            continue
        if (meta.get("labels") or {}).get("controller-revision-hash") != revision:
            continue
        conditions = (pod.get("status") or {}).get("conditions") or []
        if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            out.append(str(meta["name"]))
    return out


def workload_status(
    workload: Workload, obj: dict[str, Any], pods: list[dict[str, Any]]
) -> dict[str, Any]:
    """What a workload runs, as the cluster says: template images, rollout, pods by imageID."""
    template = (obj.get("spec") or {}).get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    containers = (template.get("spec") or {}).get("containers") or []
    images: dict[str, int] = {}
    for pod in pods:
        if terminating(pod):
            continue
        for c in (pod.get("status") or {}).get("containerStatuses") or []:
            key = c.get("imageID") or c.get("image") or "?"
            images[key] = images.get(key, 0) + 1
    return {
        "workload": str(workload),
        "managed_by": managers(obj.get("metadata") or {}),
        "deploy_id": annotations.get(ANNOTATION_DEPLOY),
        "images": {c.get("name"): c.get("image") for c in containers},
        "rollout": rules.verdict(workload.kind, obj).message,
        "pods_running": images,
    }


# -- migrations ----------------------------------------------------------------


def migration_job(
    dep: Deployment, source: dict[str, Any], container: str, image: str, deploy_id: int
) -> dict[str, Any]:
    """A Job running `airflow db migrate` with `image`, from a workload's pod template.

    It keeps what the container needs to reach the database (env, envFrom,
    volumes, service account, security context) and drops what would stop
    it: init containers (the Helm chart's wait-for-migrations), probes, sidecars.
    """
    template = json.loads(json.dumps((source.get("spec") or {}).get("template") or {}))
    pod = template.get("spec") or {}
    main = next(c for c in pod.get("containers") or [] if c.get("name") == container)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe", "lifecycle"):
        main.pop(probe, None)
    main.update(image=image, command=["airflow", "db", "migrate"])
    main.pop("args", None)
    pod.update(containers=[main], restartPolicy="Never")
    pod.pop("initContainers", None)
    meta = template.setdefault("metadata", {})
    labels = {"deployd.dev/deploy-id": str(deploy_id), "deployd.dev/job": "migrate"}
    meta["labels"] = labels
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{dep.name[: 63 - len(f'-migrate-{deploy_id}')]}-migrate-{deploy_id}",
            "labels": labels,
            "namespace": dep.namespace,
        },
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 86400, "template": template},
    }
