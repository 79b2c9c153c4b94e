"""Preflight and roll: the Kubernetes half of a deploy.

preflight (before the build): every workload exists, has containers on the
deployment's image repository, and the credentials may get, patch and watch
it. roll (after the push): one strategic-merge patch per workload, all at once
(image `IMAGE:TAG@DIGEST`, the deploy id and commit on the pod template, the
worker grace period), then a wait by kubectl's rules through watches. If any
workload fails or the timeout passes, every workload patched goes back to what
ran before, that rollback is waited for too, and the deploy ends `rolled_back`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from daemon.context import DeployContext
from daemon.errors import DeploydError, RolledBack
from daemon.kube import ANNOTATION_COMMIT, ANNOTATION_DEPLOY, Cluster, Target


async def preflight(ctx: DeployContext) -> str:
    """Check the cluster before anything is built; keep the targets for the roll."""
    dep = ctx.deployment
    cluster = Cluster(ctx.services.settings.kubernetes, dep.namespace)
    ctx.cluster = cluster
    ctx.targets = await cluster.preflight(dep)
    for t in ctx.targets:
        names = ", ".join(t.containers + [f"{n} (init)" for n in t.init_containers])
        ctx.say(
            f"       {t.workload}: {names} (now {', '.join(sorted(set(t.images.values())))})",
            "preflight",
        )
    return f"{len(ctx.targets)} workloads in namespace {dep.namespace} can be rolled"


async def run(ctx: DeployContext) -> str:
    """Patch every workload to the new image, wait, and roll back on failure."""
    dep, cluster, targets = ctx.deployment, ctx.cluster, ctx.targets
    assert cluster is not None, "preflight runs before roll"
    ref = f"{dep.image}:{ctx.tag}@{ctx.digest}"
    annotations: dict[str, str | None] = {
        ANNOTATION_DEPLOY: str(ctx.id),
        ANNOTATION_COMMIT: ctx.request.commit,
    }
    await _migrate(ctx, ref)
    patched: list[Target] = []

    async def roll_one(t: Target) -> None:
        grace = dep.worker_grace_seconds if t.worker else None
        await cluster.patch_image(t, lambda _name: ref, annotations, grace)
        patched.append(t)

    results = await asyncio.gather(*(roll_one(t) for t in targets), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    ctx.say(f"       patched {len(patched)} of {len(targets)} workloads to {ref}", "roll")
    reason = ""
    if errors:
        reason = "; ".join(e.message if isinstance(e, DeploydError) else repr(e) for e in errors)
    else:
        reason = await _wait_all(ctx, targets, "roll")
    if not reason:
        draining = 0
        for t in targets:
            if t.worker:
                n = await cluster.draining(t.workload)
                draining += n
                if n:
                    ctx.say(
                        f"       {t.workload}: {n} old pods still draining (up to "
                        f"{dep.worker_grace_seconds} s to finish their tasks); not waited "
                        "for",
                        "roll",
                    )
        note = f"; {draining} old worker pods draining" if draining else ""
        return f"{len(targets)} workloads rolled out to {ctx.tag}{note}"
    ctx.say(f"-----> rollout failed: {reason}", "roll")
    ctx.say(f"-----> rolling back {len(patched)} workloads to what ran before", "roll")
    await asyncio.gather(*(cluster.restore(t) for t in patched))
    back = await _wait_all(ctx, patched, "rollback")
    if back:
        raise DeploydError(
            f"the rollout failed ({reason}) and the rollback did not finish "
            f"either ({back}); check the cluster."
        )
    raise RolledBack(f"the rollout failed and was rolled back: {reason}")


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in (text or "").split(".")[:3] if p.isdecimal())


async def _migrate(ctx: DeployContext, ref: str) -> None:
    """On an Airflow upgrade (or the first deploy), `airflow db migrate` runs first as a Job.

    The Helm chart's pods wait for the migrations; without them an upgrade
    would never become ready. A failed migration stops the deploy before any
    workload changed.
    """
    records, dep, cluster = ctx.services.records, ctx.deployment, ctx.cluster
    assert cluster is not None
    new = ((records.get(ctx.id) or {}).get("report") or {}).get("airflow_version")
    last = records.last_succeeded(dep.name)
    running = ((last or {}).get("report") or {}).get("airflow_version")
    if not new or new == running:
        return
    if running and _version(new) < _version(running):
        ctx.say(f"       Airflow {running} -> {new} (forced rollback): no migration", "roll")
        return
    source = next((t for t in ctx.targets if "scheduler" in t.workload.name), ctx.targets[0])
    obj = await cluster.get(source.workload)
    job = cluster.migration_job(dep, obj, source.containers[0], ref, ctx.id)
    ctx.say(
        f"-----> Airflow {running or '(first deploy)'} -> {new}: airflow db migrate first "
        f"(job/{job['metadata']['name']}, from {source.workload})",
        "roll",
    )
    deadline = time.monotonic() + dep.rollout_timeout_seconds
    why = await cluster.run_job(job, deadline, lambda m: ctx.say(f"       {m}", "roll"))
    if why:
        raise DeploydError(f"the database migration failed, so nothing was rolled: {why}")


async def _wait_all(ctx: DeployContext, targets: list[Target], what: str) -> str:
    """Wait for every workload; '' when all are done, else why not."""
    cluster = ctx.cluster
    assert cluster is not None
    timeout = ctx.deployment.rollout_timeout_seconds
    deadline = time.monotonic() + timeout

    def progress(t: Target) -> Callable[[str], None]:
        return lambda message: ctx.say(f"       {t.workload}: {message}", "roll")

    verdicts = await asyncio.gather(
        *(cluster.wait(t.workload, deadline, progress(t)) for t in targets)
    )
    bad = []
    for t, v in zip(targets, verdicts, strict=True):
        if v.failed:
            bad.append(f"{t.workload}: {v.message}")
        elif not v.done:
            bad.append(f"{t.workload} not ready after {timeout} s ({v.message.rstrip('.')})")
    return "; ".join(bad)
