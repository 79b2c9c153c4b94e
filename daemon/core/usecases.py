"""What deployd does for someone, once, for every surface: the CLI, SSH commands, the HTTP API.

    deploy_checkout   a deploy of a local repository's HEAD (`deployd deploy`)
    admit             whether new code may be deployed now (promote_from, freezes)
    rollback          an earlier successful deploy's image again, nothing built
    promote           another deployment's checked image, by digest, nothing built
    freeze, unfreeze  stop and restart deploys of a deployment (rollbacks still run)
    cancel            stop a queued or running deploy, whichever process runs it
    status            what is deployed, what is under way, what the cluster runs
    history           the newest deploys a caller may see
    follow_log        a deploy's log, live until it ends

The surfaces parse their input, call these, and render what comes back.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.adapters import freezes, git, locks, repos
from daemon.adapters.locks import DeploymentLock
from daemon.adapters.records import Records
from daemon.adapters.registry import split as split_repository
from daemon.config import Deployment, Settings
from daemon.core import deploys
from daemon.core.context import DeployRequest, Services
from daemon.core.deploys import Deploy, LogLine, Options
from daemon.core.freezes import Freeze, check_reason, describe, parse_until, window_freeze
from daemon.core.logs import DeployLog
from daemon.core.recovery import recover
from daemon.errors import DeploydError, Refusal, UsageError

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


def promotions_only(dep: Deployment) -> str:
    """Why new code may not be deployed to `dep` but by promotion ('' if it may)."""
    if dep.promote_from is None:
        return ""
    return (
        f"{dep.name} takes promotions from {dep.promote_from}: "
        f"deployd promote {dep.promote_from} {dep.name}"
    )


def admit(records: Records, dep: Deployment, options: Options, *, hint: str = "") -> None:
    """Refuse at once (Refusal) a deploy of new code that `dep` does not take now: it takes
    only promotions, or it is frozen (unless `options.override_freeze`, an admin's).

    Pushes and `deployd deploy` ask this before they queue; a deploy queued
    before a freeze began is refused at its turn (core/pipeline.py).
    """
    why = promotions_only(dep)
    if why:
        raise Refusal(why)
    if options.override_freeze:
        return
    freeze = freezes.current(records, dep)
    if freeze is not None:
        raise Refusal(f"{describe(freeze)}. Nothing was deployed{hint}.")


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
    one that ran a different image than what runs now; with dag_source = "git",
    a different image or DAG commit). Nothing is built; the server branch does
    not move, unless Airflow reads its DAGs from it (dag_source = "git"). To an
    older Airflow version it is refused unless forced: the newer version has
    migrated the metadata database.
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
    """The successful deploy a rollback of `dep` runs again.

    With dag_source = "git" what runs is a pair, (image, DAG commit): the default target
    is the newest deploy whose pair differs, and a deployment without workloads may
    still roll back its DAGs.
    """
    pairs = dep.dag_source == "git"
    if not dep.workloads and not pairs:
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

    def runs(rec: Deploy) -> tuple[str | None, ...]:
        return (rec.image, rec.digest, rec.commit) if pairs else (rec.image, rec.digest)

    current = records.last_succeeded(dep.name)
    running = runs(current) if current else None
    for rec in records.list_deploys(dep.name, limit=1000):
        if rec.state == deploys.SUCCEEDED and rec.digest and runs(rec) != running:
            return rec
    raise UsageError(f"there is no earlier successful deploy of {dep.name} to roll back to.")


# -- promotion ----------------------------------------------------------------


def promote(
    settings: Settings,
    records: Records,
    source: Deployment,
    target: Deployment,
    deploy_id: int | None,
    *,
    trigger: str,
    actor: str,
    force: bool = False,
) -> DeployRequest:
    """A promotion to `target` of the image `source` runs now (or that its deploy built).

    By digest: nothing is built or checked again; the image gets a tag of
    `target` in the registry (copied registry-side if the repositories differ).
    The target's preflight, migration, rollout and automatic rollback run as
    for any deploy, and its server branch moves to the promoted commit.
    """
    if source.name == target.name:
        raise UsageError(f"{target.name} cannot be promoted to itself: name another deployment.")
    if target.promote_from is not None and target.promote_from != source.name:
        raise Refusal(
            f"{target.name} takes promotions from {target.promote_from}, not from "
            f"{source.name}: deployd promote {target.promote_from} {target.name}"
        )
    if source.dag_source != target.dag_source:
        raise Refusal(
            f"{source.name} takes its DAGs from the {source.dag_source}, {target.name} from "
            f"the {target.dag_source} (dag_source): a promotion ships an image and its DAGs "
            "together, so both must read DAGs the same way."
        )
    rec = promotion_source(records, source, deploy_id)
    image = rec.image or ""
    if split_repository(image)[0] != split_repository(target.image)[0]:
        raise UsageError(
            f"{source.name}'s image {image} and {target.name}'s {target.image} are on different "
            "registries: a promotion copies the image within one registry."
        )
    current = records.last_succeeded(target.name)
    now, then = (current.airflow_version if current else None), rec.airflow_version
    if now and then and deploys.version_key(then) < deploys.version_key(now) and not force:
        raise UsageError(
            f"{source.name}'s deploy #{rec.id} runs Airflow {then}, {target.name} runs {now}: "
            "its database was migrated by the newer version. Pass --force if the older "
            "version copes."
        )
    freeze = freezes.current(records, target)
    if freeze is not None:
        raise Refusal(f"{describe(freeze)}. Nothing was promoted.")
    description = f"promoted from {source.name} (deploy #{rec.id}): {rec.description}"
    return DeployRequest(
        deployment=target,
        repo=repos.repo_path(settings.server.state_dir, source.name),
        commit=rec.commit or "",
        ref=f"refs/heads/{target.branch}",
        subject=f"promotion of {source.name}'s deploy #{rec.id}",
        trigger=trigger,
        actor=actor,
        options=Options(force=force, description=description[:200]),
        promote_from=rec,
    )


def promotion_source(records: Records, source: Deployment, deploy_id: int | None) -> Deploy:
    """The source deploy of a promotion: `deploy_id`, else what `source` runs now."""
    if deploy_id is None:
        rec = records.last_succeeded(source.name)
        if rec is None or not rec.digest or not rec.image:
            raise UsageError(f"{source.name} has no successful deploy to promote.")
        return rec
    rec = records.get(deploy_id)
    if rec is None or rec.deployment != source.name:
        raise UsageError(f"there is no deploy #{deploy_id} of {source.name}.")
    if rec.state != deploys.SUCCEEDED or not rec.digest or not rec.image:
        raise UsageError(
            f"deploy #{deploy_id} of {source.name} is {rec.state}: only a successful "
            "deploy's image can be promoted."
        )
    return rec


# -- freezes ------------------------------------------------------------------


def freeze(
    records: Records, dep: Deployment, *, by: str, reason: str, until: str | None = None
) -> Freeze:
    """Freeze `dep` from now, until `until` (RFC 3339 or a duration) or until unfrozen."""
    reason = check_reason(reason)
    ends = parse_until(until, time.time()) if until else None
    made = freezes.start(records, dep.name, by=by, reason=reason, until=ends)
    if made is None:
        held = freezes.recorded(records, dep.name)
        what = describe(held) if held else f"{dep.name} is frozen"
        raise Refusal(f"{what}; to change it, unfreeze first: deployd unfreeze {dep.name}")
    return made


def unfreeze(records: Records, dep: Deployment, *, by: str) -> Freeze:
    """End the recorded freeze of `dep`; the freeze as ended (a freeze window cannot be)."""
    ended = freezes.end(records, dep.name, by=by)
    if ended is not None:
        return ended
    window = window_freeze(dep, time.time())
    if window is not None:
        raise Refusal(
            f"{describe(window)}; a freeze window ends by itself (or change "
            "[[deployment.freeze_window]] in the config)."
        )
    raise Refusal(f"{dep.name} is not frozen.")


def freeze_for_rollback(
    records: Records, dep: Deployment, *, by: str, reason: str
) -> tuple[Freeze, bool]:
    """`rollback --freeze`: freeze `dep` until unfrozen (unless a recorded freeze already
    holds, which is kept); (the freeze, whether it is new)."""
    held = freezes.recorded(records, dep.name)
    if held is not None:
        return held, False
    made = freezes.start(records, dep.name, by=by, reason=check_reason(reason), until=None)
    if made is None:  # someone froze it this instant
        return freeze_for_rollback(records, dep, by=by, reason=reason)
    return made, True


def freeze_of(records: Records, dep: Deployment) -> Freeze | None:
    """What freezes `dep` now (a recorded freeze, else a freeze window), if anything."""
    return freezes.current(records, dep)


# -- cancel -------------------------------------------------------------------


@dataclass(frozen=True)
class CancelAsked:
    """A cancel, as asked: the record right after, and where its log stood before."""

    record: Deploy
    log_mark: int  # the id of its last log line before the request (follow_log's `after`)
    already: bool  # someone had asked already (record.cancelled_by says who)


def cancel(
    records: Records,
    deploy_id: int,
    *,
    by: str,
    may: Callable[[str], bool] = lambda _deployment: True,
    caller: str = "",
) -> CancelAsked:
    """Ask for deploy `deploy_id` to be cancelled on behalf of `by`.

    The request is written to the record (compare-and-set on a state that is not
    final): a queued deploy is `cancelled` at once and leaves the queue; a running
    one is stopped by the process running it, which polls for this (core/cancel.py).
    `may(deployment)` says whether the caller may cancel that deployment's deploys
    (a key: its own); other deploys are refused like unknown ids, so that a key
    learns nothing of them. Refusals are one line (Refusal: exit 2).
    """
    rec = records.get(deploy_id)
    if rec is None or not may(rec.deployment):
        whose = f" that {caller} may cancel" if caller else ""
        raise Refusal(f"there is no deploy #{deploy_id}{whose}.")
    lines = records.log_lines(deploy_id)
    mark = lines[-1].id if lines else 0
    if not rec.final and records.request_cancel(deploy_id, by) is not None:
        now = records.get(deploy_id)
        assert now is not None
        # A queued deploy of this process leaves the lock's queue now, not at its next look.
        locks.wake(records.path.parent, now.deployment)
        return CancelAsked(now, mark, already=False)
    now = records.get(deploy_id)
    assert now is not None
    if now.final:
        asked = now.state == deploys.CANCELLED and now.cancelled_by
        by_whom = f" by {now.cancelled_by}" if asked else ""
        raise Refusal(
            f"deploy #{deploy_id} has already ended ({now.state}{by_whom}); "
            "there is nothing to cancel."
        )
    return CancelAsked(now, mark, already=True)


# -- status and history ---------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """What a deployment runs: by the records, and (if it has workloads) by the cluster."""

    deployment: str
    deployed: Deploy | None
    in_flight: list[Deploy]
    # One entry per workload, or why the cluster could not be read.
    cluster: list[dict[str, Any]] | str
    freeze: Freeze | None = None

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
    return Status(dep.name, deployed, in_flight, cluster, freeze_of(services.records, dep))


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


def _state_and_lines(
    records: Records, deploy_id: int, after: int
) -> tuple[Deploy | None, list[LogLine]]:
    """The deploy's record, then its lines after `after` (in that order: see follow_log)."""
    return records.get(deploy_id), records.log_lines(deploy_id, after)


async def follow_log(
    records: Records,
    deploy_id: int,
    *,
    live: DeployLog | None = None,
    follow: bool = True,
    settings: Settings | None = None,
    after: int = 0,
) -> AsyncIterator[LogLine]:
    """The deploy's stored lines (those after line id `after`), then (if `follow`) each
    new one until the deploy ends.

    `live` is the deploy's log when this process runs it: new lines are pushed
    by it. Otherwise the records are read as they grow (a deploy run by another
    process, such as `deployd deploy` in CI); with `settings`, a deploy whose
    process died is marked interrupted so that following it ends.
    """
    queue = live.subscribe() if live is not None and follow else None
    try:
        # Off the event loop: a log can be the largest deployd keeps, and another
        # writer may hold the database.
        for row in await asyncio.to_thread(records.log_lines, deploy_id, after):
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
    finally:
        if queue is not None and live is not None:
            live.unsubscribe(queue)  # a follower that went away is fed no more
    while True:
        rec, rows = await asyncio.to_thread(_state_and_lines, records, deploy_id, after)
        for row in rows:
            after = row.id
            yield row
        if rec is None or rec.final:
            # Lines written between reading the state and the log are in `rows`.
            return
        if settings is not None and rec.state in (deploys.QUEUED, deploys.RUNNING):
            await asyncio.to_thread(recover_if_idle, settings, records, rec.deployment)
        await asyncio.sleep(POLL_SECONDS)
