"""Adapter to the Kubernetes API (lightkube, async): preflight, patch, watch, roll back.

Only I/O lives here: workloads are read as plain dicts, and what to send (the
targets, the patch, which pods to delete) is decided in
daemon/adapters/kubernetes/plan.py; what "done" means lives in
daemon/adapters/kubernetes/rules.py. API and connection errors become DeploydErrors with the
API server's own message: an unreachable cluster is DependencyUnreachable,
a refusal (RBAC, missing object) is ClusterError; both exit 4.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import Any, TypeVar, cast

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.core.exceptions import NotReadyError
from lightkube.models.authorization_v1 import ResourceAttributes, SelfSubjectAccessReviewSpec
from lightkube.resources.apps_v1 import Deployment as K8sDeployment
from lightkube.resources.apps_v1 import StatefulSet as K8sStatefulSet
from lightkube.resources.authorization_v1 import SelfSubjectAccessReview
from lightkube.resources.batch_v1 import Job
from lightkube.resources.core_v1 import Pod
from lightkube.types import CascadeType, PatchType

from daemon.adapters.kubernetes import plan
from daemon.adapters.kubernetes import rules as rollout
from daemon.adapters.kubernetes.plan import Target
from daemon.config import Deployment, KubernetesSettings, Workload
from daemon.errors import ClusterError, DependencyUnreachable

T = TypeVar("T")
KINDS: dict[str, Any] = {"deployment": K8sDeployment, "statefulset": K8sStatefulSet}
Judge = Callable[[dict[str, Any]], rollout.Verdict]
WATCH_SECONDS = 300  # a watch the API server ends after this is resumed where it was


class KubeCluster:
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

    # -- reading -------------------------------------------------------------

    async def _read(self, kind: Any, name: str, what: str) -> dict[str, Any]:
        obj = await self._api(
            f"reading {what}", lambda: self.client.get(kind, name, namespace=self.namespace)
        )
        return dict(obj.to_dict())

    async def _pods(self, workload: Workload, selector: dict[str, str]) -> list[dict[str, Any]]:
        return (await self.pods_at(workload, selector))[0]

    async def pods_at(
        self, workload: Workload, selector: dict[str, str]
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The workload's pods and the list's resourceVersion: where a watch of them starts."""

        async def listing() -> tuple[list[dict[str, Any]], str | None]:
            found = self.client.list(Pod, namespace=self.namespace, labels=dict[str, Any](selector))
            pods = [dict(p.to_dict()) async for p in found]
            with contextlib.suppress(NotReadyError):  # the server sent no version
                return pods, found.resourceVersion
            return pods, None

        return await self._api(f"listing the pods of {workload}", listing)

    def changes(
        self, workload: Workload, rv: str | None, selector: dict[str, str] | None = None
    ) -> AsyncGenerator[tuple[str, dict[str, Any]]]:
        """Watch events (type, object as a dict) after `rv`: of the workload, or of its pods.

        With a `selector`, the pods it selects; without, the workload itself.
        Streams the server ends are resumed by lightkube from the last version
        seen; an expired version (410) and connection errors are raised.
        """
        if selector is None:
            watch = self.client.watch(
                KINDS[workload.kind],
                namespace=self.namespace,
                fields={"metadata.name": workload.name},
                resource_version=rv,
                server_timeout=WATCH_SECONDS,
            )
        else:
            watch = self.client.watch(
                Pod,
                namespace=self.namespace,
                labels=dict[str, Any](selector),
                resource_version=rv,
                server_timeout=WATCH_SECONDS,
            )
        return _as_dicts(watch)

    async def get(self, workload: Workload) -> dict[str, Any]:
        """The workload as the API server has it, as a plain dict."""
        return await self._read(KINDS[workload.kind], workload.name, str(workload))

    async def preflight(self, dep: Deployment) -> list[Target]:
        """Every workload exists, has containers on the deployment's image, and may be rolled."""
        await self._may(dep)

        async def target(workload: Workload) -> Target:
            return plan.target_from(dep, workload, await self.get(workload))

        # Read at once; the refusal told is the first in the config's order, whichever
        # answer came first, so that the same cluster always gets the same message.
        results = await asyncio.gather(*(target(w) for w in dep.workloads), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, Target)]

    async def _may(self, dep: Deployment) -> None:
        wanted = plan.wanted_permissions(dep)

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

        results = await asyncio.gather(*(allowed(*p) for p in wanted))
        denied = [p for p, ok in zip(wanted, results, strict=True) if not ok]
        if denied:
            raise ClusterError(plan.permission_refusal(self.namespace, denied))

    async def running(self, dep: Deployment) -> list[dict[str, Any]]:
        """What each workload runs, as the cluster says: template, rollout and pods."""
        out: list[dict[str, Any]] = []
        for workload in dep.workloads:
            try:
                obj = await self.get(workload)
            except ClusterError as exc:
                out.append({"workload": str(workload), "error": exc.message})
                continue
            pods = await self._pods(workload, plan.selector(obj))
            out.append(plan.workload_status(workload, obj, pods))
        return out

    async def draining(self, workload: Workload) -> int:
        """How many of the workload's pods are terminating (workers finishing their tasks)."""
        obj = await self.get(workload)
        pods = await self._pods(workload, plan.selector(obj))
        return sum(1 for p in pods if plan.terminating(p))

    # -- migrations ----------------------------------------------------------

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
        verdict = await self._follow(Job, name, f"job {name}", deadline, rollout.job)
        if verdict.done:
            progress(verdict.message)
            return "", True
        if verdict.failed:
            return verdict.message, True
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
        """Send plan.patch_body (one strategic-merge patch); the workload as patched."""
        body = plan.patch_body(target, image_for, annotations, grace, env)
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
        # The StatefulSet's update revision is the failed one until the patch below.
        before = await self.get(target.workload) if target.workload.kind == "statefulset" else {}
        failed_revision = (before.get("status") or {}).get("updateRevision")
        await self.patch_image(
            target,
            lambda name: target.images[name],
            target.annotations,
            target.grace if target.worker else None,
            target.env,
        )
        if failed_revision:  # an apps/v1 selector is immutable: the read above still holds
            pods = await self._pods(target.workload, plan.selector(before))
            for name in plan.stuck_pods(pods, failed_revision):
                await self._delete_pod(name)

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
        judge: Judge | None = None,
    ) -> rollout.Verdict:
        """Follow a workload through watches until kubectl would call it done or failed.

        Returns the last verdict (not done if the deadline passed). A read that
        fails (after its retries) or a dropped or expired watch is picked up
        again from a fresh read until the deadline: the caller decides then.
        """
        kind = workload.kind
        return await self._follow(
            KINDS[kind],
            workload.name,
            str(workload),
            deadline,
            judge or (lambda obj: rollout.verdict(kind, obj)),
            progress,
            patient=True,
        )

    async def _follow(
        self,
        kind: Any,
        name: str,
        what: str,
        deadline: float,
        judge: Judge,
        progress: Callable[[str], None] | None = None,
        *,
        patient: bool = False,
    ) -> rollout.Verdict:
        """Read, judge, then watch from that read until done, failed or the deadline.

        Each new verdict message goes to `progress`. A dropped or expired watch,
        or the object's deletion, is picked up from a fresh read; so is a read
        that failed after its retries when `patient` (else its error is raised).
        Returns the last verdict: neither done nor failed when the deadline passed.
        """
        last = ""
        verdict = rollout.Verdict(False, "not read yet")

        def judged(obj: dict[str, Any]) -> rollout.Verdict:
            nonlocal last
            out = judge(obj)
            if progress is not None and out.message != last:
                progress(out.message)
                last = out.message
            return out

        while time.monotonic() < deadline:
            try:
                obj = await self._read(kind, name, what)
            except (ClusterError, DependencyUnreachable) as exc:
                if not patient:
                    raise
                verdict = rollout.Verdict(False, f"cannot read it: {exc.message}")
                if progress is not None and verdict.message != last:
                    progress(f"{verdict.message}; still waiting")  # the log says why it waits
                    last = verdict.message
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            verdict = judged(obj)
            if verdict.done or verdict.failed:
                return verdict
            rv = (obj.get("metadata") or {}).get("resourceVersion")
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    watch = self._watch(kind, name, rv)
                    async with contextlib.aclosing(watch):  # its HTTP stream closes on return
                        async for event, item in watch:
                            if event == "DELETED":
                                break  # gone: the fresh read says so
                            verdict = judged(dict(item.to_dict()))
                            if verdict.done or verdict.failed:
                                return verdict
            except TimeoutError:
                break
            except (ApiError, httpx2.HTTPError):
                await asyncio.sleep(0.5)  # watch dropped or expired: read again
        return verdict

    def _watch(self, kind: Any, name: str, rv: str | None) -> AsyncGenerator[tuple[str, Any]]:
        # lightkube's typing says AsyncIterable; it is an async generator, which can be closed.
        return cast(
            "AsyncGenerator[tuple[str, Any]]",
            self.client.watch(
                kind,
                namespace=self.namespace,
                fields={"metadata.name": name},
                resource_version=rv,
                server_timeout=60,
            ),
        )


async def _as_dicts(
    watch: AsyncIterable[tuple[str, Any]],
) -> AsyncGenerator[tuple[str, dict[str, Any]]]:
    """lightkube's watch events with plain dicts; its HTTP stream closes with this generator."""
    events = cast("AsyncGenerator[tuple[str, Any]]", watch)  # typed AsyncIterable, is one
    async with contextlib.aclosing(events):
        async for event, item in events:
            yield event, dict(item.to_dict())


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
BACKOFF = 0.25  # seconds before the first retry, doubled for each next one


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
        await asyncio.sleep(BACKOFF * 2**attempt)
    raise AssertionError("unreachable")
