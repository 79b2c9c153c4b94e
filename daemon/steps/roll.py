"""Preflight and roll: the Kubernetes half of a deploy.

preflight (before the build): every workload exists, has containers on the
deployment's image repository, and the credentials may get, patch and watch
it. roll (after the push): one strategic-merge patch per workload, all at once
(image `IMAGE:TAG@DIGEST`, the deploy id and commit on the pod template, the
worker grace period), then a wait by kubectl's rules through watches. If any
workload fails or the timeout passes, every workload patched goes back to what
ran before, that rollback is waited for too, and the deploy ends `rolled_back`.
What ran before is saved with the deploy before the first patch: if the process
dies during the roll, the next start puts it back (undo), since an interrupted
deploy keeps nothing. A cancel (core/cancel.py) is acted on where that is safe:
before the migration Job or once it has finished (never midway), and after the
patches, by rolling back as for a failed rollout; the deploy ends `cancelled`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from daemon.adapters.kubernetes import plan
from daemon.adapters.kubernetes import rules as rollout
from daemon.core import cancel, deploys
from daemon.core.context import DeployContext
from daemon.errors import Cancelled, DependencyUnreachable, DeploydError, RolledBack

if TYPE_CHECKING:
    from daemon.adapters.kubernetes.plan import Target
    from daemon.adapters.records import Records
    from daemon.core.ports import Cluster

# The workloads as they were before a roll patched them (an artifact of the deploy).
SAVED_TARGETS = "roll-targets.json"
# A rollback that gave up (the API away past rollout_timeout_seconds twice): kept with the
# deploy until core/recovery.finish_rollbacks has put the workloads back.
UNFINISHED = "rollback-unfinished"
FINISHED = "rollback-finished"
RESTORE_RETRY_SECONDS = 2.0  # between tries to put a workload back while the API is away


async def preflight(ctx: DeployContext) -> str:
    """Check the cluster before anything is built; keep the targets for the roll."""
    dep = ctx.deployment
    cluster = ctx.services.cluster(dep)
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
        plan.ANNOTATION_DEPLOY: str(ctx.id),
        plan.ANNOTATION_COMMIT: ctx.request.commit,
    }
    # A cancel stops a roll only where that is safe (core/cancel.py): before the
    # migration, after it (never midway), or once the patches are sent, by rolling back.
    if ctx.cancelled_by:
        raise Cancelled(cancel.message(ctx, "no workload was changed"))
    await _migrate(ctx, ref)
    # Written before any workload changes: if this process dies during the roll, the
    # next start puts these templates back (undo).
    await ctx.record(
        ctx.services.records.put_artifact, ctx.id, SAVED_TARGETS, plan.targets_json(targets)
    )
    patched: list[Target] = []

    async def roll_one(t: Target) -> None:
        grace = dep.worker_grace_seconds if t.worker else None
        await cluster.patch_image(t, lambda _name: ref, annotations, grace)
        patched.append(t)

    try:
        results = await asyncio.gather(*(roll_one(t) for t in targets), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        ctx.say(f"       patched {len(patched)} of {len(targets)} workloads to {ref}", "roll")
        reason: str | None  # None: cancelled
        if errors:
            reason = "; ".join(_why(e) for e in errors)
        elif ctx.cancelled_by:
            reason = None
        else:
            reason = await _wait_all(ctx, targets, until=ctx.cancel_asked)
    except Exception as exc:  # whatever happens once workloads are patched, roll them back
        reason = _why(exc)
    if reason == "":
        return f"{len(targets)} workloads rolled out to {ctx.tag}{await _draining(ctx, targets)}"
    if reason is None:
        ctx.say(f"-----> {cancel.message(ctx)}: rolling back {_count(len(patched))}", "roll")
    else:
        ctx.say(f"-----> rollout failed: {reason}", "roll")
        ctx.say(f"-----> rolling back {len(patched)} workloads to what ran before", "roll")
    restores = await asyncio.gather(*(_restore(ctx, t) for t in patched), return_exceptions=True)
    unrestored = [
        f"{t.workload}: {_why(r)}"
        for t, r in zip(patched, restores, strict=True)
        if isinstance(r, BaseException)
    ]
    back = await _wait_all(
        ctx, [t for t, r in zip(patched, restores, strict=True) if not isinstance(r, BaseException)]
    )
    if back or unrestored:
        what = f"the rollout failed ({reason})" if reason is not None else cancel.message(ctx)
        why = "; ".join(unrestored + ([back] if back else []))
        # deployd finishes it once the API answers again (core/recovery.finish_rollbacks).
        await ctx.record(ctx.services.records.put_artifact, ctx.id, UNFINISHED, why)
        raise DeploydError(
            f"{what} and the rollback did not finish either ({why}); deployd tries again "
            "until the cluster answers (check it)."
        )
    if reason is None:
        detail = f"{_count(len(patched))} rolled back to what ran before"
        raise Cancelled(cancel.message(ctx, detail))
    raise RolledBack(f"the rollout failed and was rolled back: {reason}")


async def undo(records: Records, cluster: Cluster, deploy_id: int) -> tuple[list[str], list[str]]:
    """After deploy `deploy_id` died in its roll: put back the pod templates it saved on the
    workloads that still carry its changes. Returns (workloads put back, failures)."""
    saved = await asyncio.to_thread(records.artifact, deploy_id, SAVED_TARGETS)
    restored, failures = [], []
    for t in plan.targets_from_json(saved) if saved else []:
        try:
            if plan.deploy_of(await cluster.get(t.workload)) != str(deploy_id):
                continue  # not patched yet, or patched back or by someone since
            await cluster.restore(t)
            restored.append(str(t.workload))
        except DeploydError as exc:
            failures.append(f"{t.workload}: {exc.message}")
    return restored, failures


async def _restore(ctx: DeployContext, target: Target) -> None:
    """Put one workload back. While the API cannot be reached this is tried again, for up
    to rollout_timeout_seconds: a rollback that gave up at the first refused connection
    would leave the failed image running once the API is back (the wait that failed may
    itself have failed because the API went away)."""
    cluster = ctx.cluster
    assert cluster is not None
    deadline = time.monotonic() + ctx.deployment.rollout_timeout_seconds
    told = False
    while True:
        try:
            await cluster.restore(target)
            return
        except DependencyUnreachable as exc:
            if time.monotonic() + RESTORE_RETRY_SECONDS > deadline:
                raise
            if not told:
                ctx.say(f"       {target.workload}: {exc.message}; trying again", "roll")
                told = True
            await asyncio.sleep(RESTORE_RETRY_SECONDS)


def _count(n: int) -> str:
    return f"{n} workload{'' if n == 1 else 's'}"


def _why(exc: BaseException) -> str:
    return exc.message if isinstance(exc, DeploydError) else f"internal error: {exc!r}"


async def _draining(ctx: DeployContext, targets: list[Target]) -> str:
    """Report worker pods still finishing their tasks (best effort: never fails the deploy)."""
    cluster, dep = ctx.cluster, ctx.deployment
    assert cluster is not None
    total = 0
    for t in targets:
        if not t.worker:
            continue
        try:
            n = await cluster.draining(t.workload)
        except DeploydError as exc:
            ctx.say(f"       {t.workload}: could not count draining pods: {exc.message}", "roll")
            continue
        total += n
        if n:
            ctx.say(
                f"       {t.workload}: {n} old pods still draining (up to "
                f"{dep.worker_grace_seconds} s to finish their tasks); not waited for",
                "roll",
            )
    return f"; {total} old worker pods draining" if total else ""


async def _migrate(ctx: DeployContext, ref: str) -> None:
    """On an Airflow upgrade (or the first deploy), `airflow db migrate` runs first as a Job.

    The Helm chart's pods wait for the migrations; without them an upgrade
    would never become ready. A failed migration stops the deploy before any
    workload changed.
    """
    dep, cluster = ctx.deployment, ctx.cluster
    assert cluster is not None
    new = ctx.airflow_version
    running = ctx.previous.airflow_version if ctx.previous else None
    if not new or new == running:
        return
    if running and deploys.version_key(new) < deploys.version_key(running):
        ctx.say(f"       Airflow {running} -> {new} (forced rollback): no migration", "roll")
        return
    source = next((t for t in ctx.targets if "scheduler" in t.workload.name), ctx.targets[0])
    obj = await cluster.get(source.workload)
    job = plan.migration_job(dep, obj, source.containers[0], ref, ctx.id)
    ctx.say(
        f"-----> Airflow {running or '(first deploy)'} -> {new}: airflow db migrate first "
        f"(job/{job['metadata']['name']}, from {source.workload})",
        "roll",
    )
    deadline = time.monotonic() + dep.rollout_timeout_seconds
    # Never stopped midway, not even by a cancel: it runs to its end, then the deploy stops.
    why = await cluster.run_job(job, deadline, lambda m: ctx.say(f"       {m}", "roll"))
    if why:
        raise DeploydError(f"the database migration failed, so nothing was rolled: {why}")
    if ctx.cancelled_by:
        done = f"job/{job['metadata']['name']} (airflow db migrate) finished first"
        raise Cancelled(cancel.message(ctx, f"{done}; no workload was changed"))


async def _wait_all(
    ctx: DeployContext, targets: list[Target], until: asyncio.Event | None = None
) -> str | None:
    """Wait for every workload; '' when all are done, else why not (None: `until` came first).

    Worker StatefulSets count as rolled once the controller took the new
    template: their pods are replaced one by one as each old one finishes its
    tasks, which may take up to worker_grace_seconds each (rollout.settled).
    """
    cluster = ctx.cluster
    assert cluster is not None
    timeout = ctx.deployment.rollout_timeout_seconds
    deadline = time.monotonic() + timeout

    def progress(t: Target) -> Callable[[str], None]:
        return lambda message: ctx.say(f"       {t.workload}: {message}", "roll")

    def judge(t: Target) -> Callable[[dict[str, Any]], rollout.Verdict] | None:
        return rollout.settled if t.worker and t.workload.kind == "statefulset" else None

    waits = asyncio.gather(
        *(cluster.wait(t.workload, deadline, progress(t), judge(t)) for t in targets)
    )
    if until is not None:
        stopper = asyncio.ensure_future(until.wait())
        either: set[asyncio.Future[Any]] = {waits, stopper}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not waits.done():
                waits.cancel()
        if not waits.done() or waits.cancelled():
            await asyncio.wait({waits})  # the watches end; this task is not cancelled
            return None
    verdicts = await waits
    bad = []
    for t, v in zip(targets, verdicts, strict=True):
        if v.failed:
            bad.append(f"{t.workload}: {v.message}")
        elif not v.done:
            bad.append(f"{t.workload} not ready after {timeout} s ({v.message.rstrip('.')})")
    return "; ".join(bad)
