"""After a crash: mark dead deploys `interrupted` and remove what they left behind.

Runs with the deployment's lock held, so no live deploy of that deployment can
be running: any record still `running` belongs to a process that died (the
kernel dropped its flock). A `queued` record is dead when its waiter is gone
and its process no longer exists, except a queued webhook deploy: GitHub was
told it is accepted, so it waits for the daemon, which resumes it at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.adapters.locks import DeploymentLock
from daemon.adapters.records import Records
from daemon.core import deploys
from daemon.core.policy import policy
from daemon.core.ports import LABEL_DEPLOYMENT, LABEL_INSTANCE, Engine, instance
from daemon.errors import DeploydError

if TYPE_CHECKING:
    from daemon.core.context import Services

log = logging.getLogger(__name__)


def work_root(state_dir: Path, deployment: str) -> Path:
    """Where the work dirs of a deployment's deploys live."""
    return state_dir / "work" / deployment


def recover(
    records: Records,
    images: Engine | None,
    state_dir: Path,
    deployment: str,
    lock: DeploymentLock,
    *,
    current: int | None = None,
) -> list[int]:
    """Mark dead deploys of `deployment` interrupted and clean up; return their ids."""
    assert lock.held, "recover() needs the deployment lock"
    marked = []
    for rec in records.in_flight(deployment):
        if rec.id == current:
            continue
        if rec.state == deploys.QUEUED and (
            lock.live_waiter(rec.id)
            or pid_alive(rec.pid)
            or policy(rec.trigger, rec.action).resumes_after_restart
        ):
            continue
        steps = records.running_steps(rec.id)
        for name in steps:
            records.step_finished(rec.id, name, "interrupted", "the deploying process died")
        where = "+".join(steps) or rec.step or ""
        during = f"during {where}" if where else "while queued"
        if records.transition(
            rec.id,
            rec.state,
            deploys.INTERRUPTED,
            step=where or None,
            error=f"the deploying process stopped {during}; nothing of this deploy was kept.",
        ):
            marked.append(rec.id)
            log.warning("deploy #%s of %s marked interrupted (%s)", rec.id, deployment, during)
    _clean_work_dirs(work_root(state_dir, deployment), keep=current)
    if images is not None:
        with contextlib.suppress(DeploydError):
            images.remove_containers(
                {LABEL_INSTANCE: instance(state_dir), LABEL_DEPLOYMENT: deployment}
            )
    return marked


async def reconcile_roll(services: Services, deployment: str, deploy_id: int) -> None:
    """After a deploy died during its roll: roll the cluster back, record what it shows.

    An interrupted deploy keeps nothing (the push was refused, the server branch
    did not move), so the workloads it had patched get back the pod templates
    its roll saved before patching, rather than go on to an image nobody was
    told is deployed.
    """
    from daemon.steps import roll

    records = services.records
    rec = records.get(deploy_id)
    if rec is None or rec.step != "roll" or rec.state != deploys.INTERRUPTED:
        return
    dep = services.settings.deployment(deployment)
    cluster = services.cluster(dep)
    try:
        restored, failures = await roll.undo(records, cluster, deploy_id)
        running = await cluster.running(dep)
    except DeploydError as exc:
        restored, failures = [], []
        shows = f"the cluster could not be read ({exc.message})"
    else:
        shows = "the cluster shows " + ", ".join(
            f"{w['workload']}: "
            + (
                w.get("error")
                or (
                    f"deploy #{w['deploy_id']}, {w['rollout'].rstrip('.')}"
                    if w["deploy_id"]
                    else "not deployed by deployd"
                )
            )
            for w in running
        )
    finally:
        await cluster.close()
    did = []
    if restored:
        did.append(f"{', '.join(restored)} rolled back to what ran before")
    if failures:
        did.append(f"not rolled back: {'; '.join(failures)}")
    what = "; ".join([*did, shows])
    log.warning("deploy #%s of %s, at recovery: %s", deploy_id, deployment, what)
    await asyncio.to_thread(records.append_log, deploy_id, "roll", [f"-----> at recovery: {what}"])
    await asyncio.to_thread(records.update, deploy_id, error=f"{rec.error} At recovery: {what}.")


async def finish_rollbacks(services: Services, deployment: str) -> list[str]:
    """Finish the rollbacks of `deployment` that gave up (the API away too long); with its
    lock held (the next deploy's start, or the daemon's loop). Returns what was done.

    The workloads that still carry such a deploy's changes get back the pod templates its
    roll saved; a rollback is finished once none carries them (a later deploy may have
    replaced them). While the API stays away nothing changes and it is tried again.
    """
    from daemon.steps import roll

    records = services.records
    pending = await asyncio.to_thread(unfinished_rollbacks, records, deployment)
    if not pending:
        return []
    dep = services.settings.deployment(deployment)
    cluster = services.cluster(dep)
    done = []
    try:
        for deploy_id, _ in pending:
            restored, failures = await roll.undo(records, cluster, deploy_id)
            if failures:
                log.info("deploy #%s's rollback still unfinished: %s", deploy_id, failures)
                continue
            what = (
                f"{', '.join(restored)} rolled back to what ran before"
                if restored
                else "no workload carries its changes any more"
            )
            line = f"-----> later: the rollback finished: {what}"
            await asyncio.to_thread(records.append_log, deploy_id, "roll", [line])
            await asyncio.to_thread(records.put_artifact, deploy_id, roll.FINISHED, what)
            rec = await asyncio.to_thread(records.get, deploy_id)
            error = f"{rec.error if rec else ''} Later the rollback finished: {what}."
            await asyncio.to_thread(records.update, deploy_id, error=error.strip())
            log.warning("deploy #%s of %s: the rollback finished: %s", deploy_id, deployment, what)
            done.append(f"deploy #{deploy_id}'s rollback had not finished; now {what}")
    finally:
        await cluster.close()
    return done


def unfinished_rollbacks(records: Records, deployment: str | None = None) -> list[tuple[int, str]]:
    """(id, deployment) of the deploys (of `deployment`, or of all) whose rollback gave up
    and is not finished."""
    from daemon.steps import roll

    rows = records.read(
        "SELECT a.deploy_id AS id, d.deployment AS deployment "
        "FROM artifacts a JOIN deploys d ON d.id = a.deploy_id "
        "WHERE a.name = ? AND (? IS NULL OR d.deployment = ?) AND NOT EXISTS "
        "(SELECT 1 FROM artifacts b WHERE b.deploy_id = a.deploy_id AND b.name = ?) "
        "ORDER BY a.deploy_id",
        [roll.UNFINISHED, deployment, deployment, roll.FINISHED],
    )
    return [(int(r["id"]), str(r["deployment"])) for r in rows]


def _clean_work_dirs(root: Path, keep: int | None) -> None:
    if not root.is_dir():
        return
    for child in root.iterdir():
        if keep is not None and child.name == str(keep):
            continue
        shutil.rmtree(child, ignore_errors=True)


def pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
