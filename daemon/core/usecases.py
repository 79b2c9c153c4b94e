"""What deployd does for someone, once, for every surface: the CLI, SSH commands, the HTTP API.

    deploy_checkout   a deploy of a local repository's HEAD (`deployd deploy`)
    rollback          an earlier successful deploy's image again, nothing built
    status            what is deployed, what is under way, what the cluster runs
    history           the newest deploys a caller may see
    follow_log        a deploy's log, live until it ends

The surfaces parse their input, call these, and render what comes back.
"""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.adapters import git, repos
from daemon.adapters.locks import DeploymentLock
from daemon.adapters.records import Records
from daemon.config import Deployment, Settings
from daemon.core import deploys
from daemon.core.context import DeployRequest, Services
from daemon.core.deploys import Deploy, LogLine, Options
from daemon.core.logs import DeployLog
from daemon.core.recovery import recover
from daemon.errors import DeploydError, UsageError

POLL_SECONDS = 0.2


# -- deploy -------------------------------------------------------------------


def deploy_checkout(
    dep: Deployment, path: Path, options: Options, *, trigger: str, actor: str
) -> DeployRequest:
    """A deploy of the HEAD commit of the work tree at `path` (dirty: refused unless allowed)."""
    repo = path.resolve()
    head = git.head(repo)
    if not options.allow_dirty:
        git.ensure_clean(repo)
    return DeployRequest(dep, repo, head.commit, head.ref, head.subject, trigger, actor, options)


def local_actor() -> str:
    """`user@host` of the person running a command on the build host."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = os.environ.get("USER") or str(os.getuid())
    return f"{user}@{os.uname().nodename}"[:64]


# -- rollback -----------------------------------------------------------------


def rollback(
    settings: Settings,
    records: Records,
    dep: Deployment,
    deploy_id: int | None,
    *,
    trigger: str,
    actor: str,
    force: bool,
) -> DeployRequest:
    """A rollback of `dep` to deploy `deploy_id` (default: the one before what runs).

    The target is a successful deploy of the deployment (by default the newest
    one that ran a different image than what runs now). Nothing is built; the
    server branch does not move. To an older Airflow version it is refused
    unless forced: the newer version has migrated the metadata database.
    """
    target = rollback_target(records, dep, deploy_id)
    current = records.last_succeeded(dep.name)
    now = current.airflow_version if current else None
    then = target.airflow_version
    if now and then and deploys.version_key(then) < deploys.version_key(now) and not force:
        raise UsageError(
            f"deploy #{target.id} runs Airflow {then}, the deployment runs {now}: "
            "the database was migrated by the newer version. Roll forward instead, "
            "or pass --force if you know the older version copes."
        )
    return DeployRequest(
        deployment=dep,
        repo=repos.repo_path(settings.server.state_dir, dep.name),
        commit=target.commit or "",
        ref=target.ref,
        subject=f"rollback to deploy #{target.id}",
        trigger=trigger,
        actor=actor,
        options=Options(force=force, description=f"rollback to deploy #{target.id}"),
        rollback_to=target,
    )


def rollback_target(records: Records, dep: Deployment, deploy_id: int | None) -> Deploy:
    """The successful deploy a rollback of `dep` runs again."""
    if not dep.workloads:
        raise UsageError(
            f"deployment {dep.name} names no workloads: nothing on a cluster to roll back."
        )
    if deploy_id is not None:
        rec = records.get(deploy_id)
        if rec is None or rec.deployment != dep.name:
            raise UsageError(f"there is no deploy #{deploy_id} of {dep.name}.")
        if rec.state != deploys.SUCCEEDED or not rec.digest:
            raise UsageError(
                f"deploy #{deploy_id} is {rec.state}: only a successful deploy "
                "can be rolled back to."
            )
        return rec
    current = records.last_succeeded(dep.name)
    running = (current.image, current.digest) if current else None
    for rec in records.list_deploys(dep.name, limit=1000):
        if rec.state == deploys.SUCCEEDED and rec.digest and (rec.image, rec.digest) != running:
            return rec
    raise UsageError(f"there is no earlier successful deploy of {dep.name} to roll back to.")


# -- status and history ---------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """What a deployment runs: by the records, and (if it has workloads) by the cluster."""

    deployment: str
    deployed: Deploy | None
    in_flight: list[Deploy]
    # One entry per workload, or why the cluster could not be read.
    cluster: list[dict[str, Any]] | str

    @property
    def unreachable(self) -> bool:
        return isinstance(self.cluster, str)


def summary(records: Records, dep: Deployment) -> tuple[Deploy | None, list[Deploy]]:
    """The deployment's last successful deploy and its unfinished ones (records only)."""
    return records.last_succeeded(dep.name), records.in_flight(dep.name)


async def status(services: Services, dep: Deployment) -> Status:
    """What is deployed, what is under way, and what the cluster really runs."""
    deployed, in_flight = summary(services.records, dep)
    cluster: list[dict[str, Any]] | str = []
    if dep.workloads:
        client = None
        try:
            client = services.cluster(dep)
            cluster = await client.running(dep)
        except DeploydError as exc:
            cluster = f"unreachable: {exc.message}"
        finally:
            if client is not None:
                await client.close()
    return Status(dep.name, deployed, in_flight, cluster)


def history(
    settings: Settings, records: Records, names: Sequence[str] | None, limit: int
) -> list[Deploy]:
    """The newest deploys of the deployments `names` (None: all), dead ones marked first."""
    for dep in settings.deployments:
        if names is None or dep.name in names:
            recover_if_idle(settings, records, dep.name)
    return records.list_deploys(list(names) if names is not None else None, limit)


def recover_if_idle(settings: Settings, records: Records, deployment: str) -> None:
    """Mark deploys of a crashed process interrupted, if no deploy holds the lock."""
    if not records.in_flight(deployment):
        return
    lock = DeploymentLock(settings.server.state_dir, deployment)
    if lock.try_acquire():
        try:
            recover(records, None, settings.server.state_dir, deployment, lock)
        finally:
            lock.release()


# -- logs -----------------------------------------------------------------------


async def follow_log(
    records: Records,
    deploy_id: int,
    *,
    live: DeployLog | None = None,
    follow: bool = True,
    settings: Settings | None = None,
) -> AsyncIterator[LogLine]:
    """The deploy's stored lines, then (if `follow`) each new one until the deploy ends.

    `live` is the deploy's log when this process runs it: new lines are pushed
    by it. Otherwise the records are read as they grow (a deploy run by another
    process, such as `deployd deploy` in CI); with `settings`, a deploy whose
    process died is marked interrupted so that following it ends.
    """
    queue = live.subscribe() if live is not None and follow else None
    after = 0
    for row in records.log_lines(deploy_id):
        after = row.id
        yield row
    if not follow:
        return
    if queue is not None:
        while (row_or_end := await queue.get()) is not None:
            if row_or_end.id > after:
                after = row_or_end.id
                yield row_or_end
        return
    while True:
        rec = records.get(deploy_id)
        rows = records.log_lines(deploy_id, after)
        for row in rows:
            after = row.id
            yield row
        if rec is None or rec.final:
            # Lines written between reading the state and the log are in `rows`.
            return
        if settings is not None and rec.state in (deploys.QUEUED, deploys.RUNNING):
            await asyncio.to_thread(recover_if_idle, settings, records, rec.deployment)
        await asyncio.sleep(POLL_SECONDS)
