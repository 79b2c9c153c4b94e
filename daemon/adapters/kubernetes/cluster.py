"""Adapter to the Kubernetes API (lightkube, async): preflight, patch, watch, roll back.

Workloads are read and written as plain dicts; what "done" means lives in
daemon/adapters/kubernetes/rules.py. API and connection errors become DeploydErrors with the
API server's own message: an unreachable cluster is DependencyUnreachable,
a refusal (RBAC, missing object) is ClusterError; both exit 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.models.authorization_v1 import ResourceAttributes, SelfSubjectAccessReviewSpec
from lightkube.resources.apps_v1 import Deployment as K8sDeployment
from lightkube.resources.apps_v1 import StatefulSet as K8sStatefulSet
from lightkube.resources.authorization_v1 import SelfSubjectAccessReview
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Pod
from lightkube.types import CascadeType, PatchType

from daemon.adapters.kubernetes import rules as rollout
from daemon.config import Deployment, KubernetesSettings, Workload
from daemon.errors import ClusterError, DependencyUnreachable

T = TypeVar("T")
KINDS: dict[str, Any] = {"deployment": K8sDeployment, "statefulset": K8sStatefulSet}
GROUP_RESOURCE = {"deployment": ("apps", "deployments"), "statefulset": ("apps", "statefulsets")}
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


def _selector(obj: dict[str, Any]) -> dict[str, str]:
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


class Cluster:
    """The deployment's cluster, through one lightkube client."""

    def __init__(self, settings: KubernetesSettings, namespace: str) -> None:
        self.namespace = namespace
        try:
            config = (
                KubeConfig.from_file(str(settings.kubeconfig))
                if settings.kubeconfig
                else KubeConfig.from_env()
            )
        except Exception as exc:
            raise DependencyUnreachable(f"no usable kubeconfig: {exc}") from exc
        self.client = AsyncClient(
            config=config,
            namespace=namespace,
            timeout=httpx2.Timeout(30.0),
            field_manager="deployd",
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()

    async def _api(self, doing: str, call: Callable[[], Awaitable[T]]) -> T:
        return await _with_retries(doing, call)

    async def _pods(self, workload: Workload, selector: dict[str, str]) -> list[Pod]:
        async def listing() -> list[Pod]:
            return [
                p
                async for p in self.client.list(
                    Pod, namespace=self.namespace, labels=dict[str, Any](selector)
                )
            ]

        return await self._api(f"listing the pods of {workload}", listing)

    # -- reading -------------------------------------------------------------

    async def get(self, workload: Workload) -> dict[str, Any]:
        obj = await self._api(
            f"reading {workload}",
            lambda: self.client.get(KINDS[workload.kind], workload.name, namespace=self.namespace),
        )
        return dict(obj.to_dict())

    async def preflight(self, dep: Deployment) -> list[Target]:
        """Every workload exists, has containers on the deployment's image, and may be rolled."""
        await self._may(dep)
        targets = await asyncio.gather(*(self._target(dep, w) for w in dep.workloads))
        return list(targets)

    async def _may(self, dep: Deployment) -> None:
        # The workloads, and the Job that migrates the database on an Airflow upgrade.
        wanted = sorted(
            {
                (GROUP_RESOURCE[w.kind], verb)
                for w in dep.workloads
                for verb in ("get", "patch", "watch")
            }
        ) + [(("batch", "jobs"), verb) for verb in ("create", "get", "watch", "delete")]
        wanted.append((("", "pods"), "list"))
        if any(w.kind == "statefulset" for w in dep.workloads):
            wanted.append((("", "pods"), "delete"))  # stuck pods, on a rollback

        async def allowed(group: str, resource: str, verb: str) -> bool:
            review = SelfSubjectAccessReview(
                spec=SelfSubjectAccessReviewSpec(
                    resourceAttributes=ResourceAttributes(
                        namespace=self.namespace, verb=verb, group=group, resource=resource
                    )
                )
            )
            answer = await self._api("checking permissions", lambda: self.client.create(review))
            return bool(answer.status and answer.status.allowed)

        results = await asyncio.gather(*(allowed(g, r, v) for (g, r), v in wanted))
        denied = [
            f"{verb} {resource}.{group}" if group else f"{verb} {resource}"
            for ((group, resource), verb), ok in zip(wanted, results, strict=True)
            if not ok
        ]
        if denied:
            raise ClusterError(
                f"the cluster credentials may not {', '.join(denied)} in "
                f"namespace {self.namespace}; grant them (RBAC) to deployd."
            )

    async def _target(self, dep: Deployment, workload: Workload) -> Target:
        obj = await self.get(workload)
        pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
        repo = repository(dep.image)

        def chosen(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            if dep.containers:
                return [c for c in items if c.get("name") in dep.containers]
            return [c for c in items if repository(str(c.get("image", ""))) == repo]

        strategy = ((obj.get("spec") or {}).get("updateStrategy") or {}).get("type")
        if workload.kind == "statefulset" and strategy not in (None, "RollingUpdate"):
            raise ClusterError(
                f"{workload} uses updateStrategy {strategy}: patching it would change no pod; "
                "deployd rolls StatefulSets with the RollingUpdate strategy."
            )
        containers = chosen(pod.get("containers") or [])
        inits = chosen(pod.get("initContainers") or [])
        if not containers and not inits:
            seen = ", ".join(
                f"{c.get('name')}={c.get('image')}"
                for c in (pod.get("containers") or []) + (pod.get("initContainers") or [])
            )
            want = f"named {', '.join(dep.containers)}" if dep.containers else f"running {repo}"
            raise ClusterError(
                f"{workload} in namespace {self.namespace} has no container "
                f"{want} (it runs {seen or 'nothing'}); set `containers` to the "
                "names that should get the new image."
            )
        executor_env: dict[str, dict[str, str]] = {}
        for c in containers:
            env = {
                e.get("name"): e.get("value")
                for e in c.get("env") or []
                if isinstance(e, dict) and "value" in e
            }
            for repo_var, tag_var in EXECUTOR_IMAGE_ENV:
                if repo_var in env or tag_var in env:
                    executor_env[c["name"]] = {
                        repo_var: str(env.get(repo_var) or ""),
                        tag_var: str(env.get(tag_var) or ""),
                    }
        template = ((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}
        saved = template.get("annotations") or {}
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

    async def running(self, dep: Deployment) -> list[dict[str, Any]]:
        """What each workload runs, as the cluster says: template, rollout and pods."""
        out: list[dict[str, Any]] = []
        for workload in dep.workloads:
            try:
                obj = await self.get(workload)
            except ClusterError as exc:
                out.append({"workload": str(workload), "error": exc.message})
                continue
            template = (obj.get("spec") or {}).get("template") or {}
            annotations = (template.get("metadata") or {}).get("annotations") or {}
            containers = (template.get("spec") or {}).get("containers") or []
            selector = _selector(obj)
            pods = [p.to_dict() for p in await self._pods(workload, selector)]
            images: dict[str, int] = {}
            for pod in pods:
                if (pod.get("metadata") or {}).get("deletionTimestamp"):
                    continue
                for c in (pod.get("status") or {}).get("containerStatuses") or []:
                    key = c.get("imageID") or c.get("image") or "?"
                    images[key] = images.get(key, 0) + 1
            meta = obj.get("metadata") or {}
            out.append(
                {
                    "workload": str(workload),
                    "managed_by": managers(meta),
                    "deploy_id": annotations.get(ANNOTATION_DEPLOY),
                    "images": {c.get("name"): c.get("image") for c in containers},
                    "rollout": rollout.verdict(workload.kind, obj).message,
                    "pods_running": images,
                }
            )
        return out

    async def draining(self, workload: Workload) -> int:
        """How many of the workload's pods are terminating (workers finishing their tasks)."""
        obj = await self.get(workload)
        selector = _selector(obj)
        pods = await self._pods(workload, selector)
        return sum(
            1 for p in pods if p.metadata is not None and p.metadata.deletionTimestamp is not None
        )

    # -- migrations ----------------------------------------------------------

    def migration_job(
        self, dep: Deployment, source: dict[str, Any], container: str, image: str, deploy_id: int
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
                "namespace": self.namespace,
            },
            "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 86400, "template": template},
        }

    async def run_job(
        self, job: dict[str, Any], deadline: float, progress: Callable[[str], None]
    ) -> str:
        """Create the Job and wait for it; '' when it completed, else why not.

        A Job still running when the deploy gives up (deadline, cancellation) is
        deleted with its pod, so that a migration of the new version does not go
        on afterwards; a failed Job is kept for its logs.
        """
        name = job["metadata"]["name"]
        try:
            why, ended = await self._follow_job(job, deadline, progress)
        except BaseException:
            await asyncio.shield(self._delete_job(name))
            raise
        if not ended:
            await self._delete_job(name)
        return why

    async def _delete_job(self, name: str) -> None:
        async def delete() -> None:
            await self.client.delete(
                Job, name, namespace=self.namespace, cascade=CascadeType.BACKGROUND
            )

        with contextlib.suppress(ClusterError, DependencyUnreachable):
            await self._api(f"deleting job {name}", delete)

    async def _follow_job(
        self, job: dict[str, Any], deadline: float, progress: Callable[[str], None]
    ) -> tuple[str, bool]:
        """Create the Job and follow it: (why it did not complete, whether it ended)."""
        name = job["metadata"]["name"]
        try:
            await self._api(
                f"creating job {name}", lambda: self.client.create(cast(Job, Job.from_dict(job)))
            )
        except ClusterError as exc:
            if exc.reason != "AlreadyExists":  # a retried create that had gone through
                raise
        progress(f"job/{name} created")
        while time.monotonic() < deadline:
            obj = (
                await self._api(
                    f"reading job {name}",
                    lambda: self.client.get(Job, name, namespace=self.namespace),
                )
            ).to_dict()
            for cond in (obj.get("status") or {}).get("conditions") or []:
                if cond.get("status") != "True":
                    continue
                if cond.get("type") == "Complete":
                    progress(f"job/{name} complete")
                    return "", True
                if cond.get("type") == "Failed":
                    return f"job/{name} failed: {cond.get('message') or cond.get('reason')}", True
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    async for _, _item in self.client.watch(
                        Job,
                        namespace=self.namespace,
                        fields={"metadata.name": name},
                        resource_version=rv,
                        server_timeout=60,
                    ):
                        break  # something changed: read it again above
            except TimeoutError:
                break
            except (ApiError, httpx2.HTTPError):
                await asyncio.sleep(0.5)
        return f"job/{name} did not finish in time", False

    # -- writing -------------------------------------------------------------

    async def patch_image(
        self,
        target: Target,
        image_for: Callable[[str], str],
        annotations: dict[str, str | None],
        grace: int | None,
        env: dict[str, dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        """One strategic-merge patch: images, pod-template annotations, worker grace.

        Containers that tell KubernetesExecutor the task pods' image get it in the
        same patch: `env` (a rollback's saved values) or derived from the new image.
        """
        containers = []
        for name in target.containers:
            item: dict[str, Any] = {"name": name, "image": image_for(name)}
            env_vars = target.executor_env.get(name)
            if env_vars:
                ref = image_for(name)
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
        body = {"spec": {"template": {"metadata": {"annotations": annotations}, "spec": spec}}}
        obj = await self._api(
            f"patching {target.workload}",
            lambda: self.client.patch(
                KINDS[target.workload.kind],
                target.workload.name,
                body,
                namespace=self.namespace,
                patch_type=PatchType.STRATEGIC,
            ),
        )
        return dict(obj.to_dict())

    async def restore(self, target: Target) -> None:
        """Put the workload's pod template back as preflight saw it.

        A StatefulSet does not replace a pod that is not Ready (OrderedReady): the
        pods of the failed revision that are stuck (crash loop, image pull) are
        deleted so that the controller recreates them from the restored template.
        """
        failed_revision = None
        if target.workload.kind == "statefulset":
            obj = await self.get(target.workload)
            failed_revision = (obj.get("status") or {}).get("updateRevision")
        await self.patch_image(
            target,
            lambda name: target.images[name],
            target.annotations,
            target.grace if target.worker else None,
            target.env,
        )
        if failed_revision:
            await self._delete_stuck_pods(target.workload, failed_revision)

    async def _delete_stuck_pods(self, workload: Workload, revision: str) -> None:
        obj = await self.get(workload)
        selector = _selector(obj)
        for pod in await self._pods(workload, selector):
            meta = pod.metadata
            if meta is None or meta.name is None or meta.deletionTimestamp is not None:
                continue
            if (meta.labels or {}).get("controller-revision-hash") != revision:
                continue
            ready = any(
                c.type == "Ready" and c.status == "True"
                for c in ((pod.status.conditions if pod.status else None) or [])
            )
            if not ready:
                await self._delete_pod(meta.name)

    async def _delete_pod(self, name: str) -> None:
        async def delete() -> None:
            await self.client.delete(Pod, name, namespace=self.namespace)

        await self._api(f"deleting stuck pod {name}", delete)

    # -- waiting -------------------------------------------------------------

    async def wait(
        self,
        workload: Workload,
        deadline: float,
        progress: Callable[[str], None],
        judge: Callable[[dict[str, Any]], rollout.Verdict] | None = None,
    ) -> rollout.Verdict:
        """Follow a workload through watches until kubectl would call it done or failed.

        Returns the last verdict (not done if the deadline passed). A read that
        fails (after its retries) or a dropped or expired watch is picked up
        again from a fresh read until the deadline: the caller decides then.
        """
        judge = judge or (lambda obj: rollout.verdict(workload.kind, obj))
        last = ""
        verdict = rollout.Verdict(False, "not read yet")
        while time.monotonic() < deadline:
            try:
                obj = await self.get(workload)
            except (ClusterError, DependencyUnreachable) as exc:
                verdict = rollout.Verdict(False, f"cannot read it: {exc.message}")
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            verdict = judge(obj)
            if verdict.message != last:
                progress(verdict.message)
                last = verdict.message
            if verdict.done or verdict.failed:
                return verdict
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    async for _, item in self.client.watch(
                        KINDS[workload.kind],
                        namespace=self.namespace,
                        fields={"metadata.name": workload.name},
                        resource_version=rv,
                        server_timeout=60,
                    ):
                        verdict = judge(dict(item.to_dict()))
                        if verdict.message != last:
                            progress(verdict.message)
                            last = verdict.message
                        if verdict.done or verdict.failed:
                            return verdict
            except TimeoutError:
                break
            except (ApiError, httpx2.HTTPError):
                await asyncio.sleep(0.5)  # watch dropped or expired: read again
        return verdict


def _status_of(exc: httpx2.HTTPStatusError) -> tuple[int, str, str]:
    """(code, reason, message) of an error answer, from its Status body if it has one."""
    code = exc.response.status_code
    status = getattr(exc, "status", None)  # lightkube's ApiError parsed it already
    if status is not None:
        return code, status.reason or "", status.message or f"HTTP {code}"
    try:
        body = exc.response.json()
    except (ValueError, httpx2.HTTPError):
        body = None
    if isinstance(body, dict) and body.get("kind") == "Status":
        return code, str(body.get("reason") or ""), str(body.get("message") or f"HTTP {code}")
    return code, "", f"HTTP {code}"


RETRIED = {409: "Conflict", 429: "", 500: "", 502: "", 503: "", 504: ""}
ATTEMPTS = 4


async def _with_retries(doing: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run one API call; retry conflicts, 5xx, rate limits and network errors with backoff.

    A conflicting patch is simply sent again: the server applies a strategic
    merge to the object as it is then (a fresh read). 401, 403, 404 and other
    refusals fail at once with the API server's message.
    """
    for attempt in range(ATTEMPTS):
        last = attempt == ATTEMPTS - 1
        try:
            return await call()
        except httpx2.HTTPStatusError as exc:  # lightkube's ApiError is one, when it parsed
            code, reason, message = _status_of(exc)
            if code not in RETRIED or (RETRIED[code] and reason != RETRIED[code]) or last:
                raise ClusterError(f"Kubernetes refused {doing}: {message}", reason=reason) from exc
        except (httpx2.TransportError, httpx2.TimeoutException) as exc:
            if last:
                raise DependencyUnreachable(
                    f"cannot reach the Kubernetes API while {doing}: {type(exc).__name__}: {exc}"
                ) from exc
        except httpx2.HTTPError as exc:
            raise DependencyUnreachable(
                f"the Kubernetes API failed while {doing}: {type(exc).__name__}: {exc}"
            ) from exc
        await asyncio.sleep(0.25 * 2**attempt)
    raise AssertionError("unreachable")
