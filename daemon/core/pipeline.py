"""Runs a deploy: the per-deployment lock, the steps over one context, the records.

    checkout ─► build ─┬─► parse ─► [pytest] ─┬─► push (tag) ─► roll
                       └─► upload (staging) ──┘

Every transition is written before the action it announces. Whatever the
outcome, the work dir and the check containers are removed and the lock is
released; old local images beyond `keep_images` are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from typing import Any

from daemon.adapters import git, repos
from daemon.adapters.images import LABEL_DEPLOY_ID
from daemon.adapters.locks import DeploymentLock
from daemon.core import deploys
from daemon.core.context import DeployContext, DeployRequest, Services
from daemon.core.logs import DeployLog, Sink
from daemon.core.recovery import recover, work_root
from daemon.errors import Cancelled, DeploydError, RolledBack
from daemon.steps import build, checkout, push, roll
from daemon.steps.checks import parse, pytest

log = logging.getLogger(__name__)

HOLD_LOCK_SECONDS = 60
# Told about every deploy that starts running ("running") and every deploy that
# ends ("finished"), with its record; must return at once (commit statuses).
Observer = Callable[[str, dict[str, Any]], None]
StepFn = Callable[[DeployContext], Awaitable[str]]
STEP_FUNCTIONS: dict[str, StepFn] = {
    "checkout": checkout.run,
    "build": build.run,
    "parse": parse.run,
    "pytest": pytest.run,
    "push": push.run,
    "roll": roll.run,
    "preflight": roll.preflight,
}


class DeployOutcome:
    """The record of a finished deploy and the exit code it maps to."""

    def __init__(self, record: dict[str, Any], exit_code: int) -> None:
        self.record = record
        self.exit_code = exit_code


def preflight(request: DeployRequest) -> None:
    """Refuse, before anything is queued, what this version cannot do (nothing, now)."""


def queued_fields(request: DeployRequest) -> dict[str, Any]:
    """The record of a queued deploy of `request` (create_deploy's arguments)."""
    return {
        "deployment": request.deployment.name,
        "trigger": request.trigger,
        "actor": request.actor,
        "ref": request.ref,
        "options": request.options,
        "pid": os.getpid(),
        "commit": request.commit,
        "description": request.options.description or request.subject,
        "rollback_of": request.rollback_to["id"] if request.rollback_to else None,
    }


class Pipeline:
    """Runs deploys over shared adapters."""

    def __init__(self, services: Services) -> None:
        self.services = services
        # Set by `deployd serve` on SIGTERM: deploys it cancels are `interrupted`.
        self.shutting_down = False
        self.releases: set[asyncio.Task[None]] = set()
        self.observers: list[Observer] = []
        # Set by `deployd serve` on SIGTERM: deploys not yet started do not start.
        self.stopping = False
        # Deploys started by SSH commands (rollbacks): drained like pushes.
        self.commands: set[asyncio.Task[Any]] = set()

    def enqueue(self, request: DeployRequest) -> int:
        """Record a deploy of `request` as queued; `run` it with the id returned."""
        preflight(request)
        return self.services.records.create_deploy(**queued_fields(request))

    async def run(
        self, request: DeployRequest, sink: Sink | None = None, deploy_id: int | None = None
    ) -> DeployOutcome:
        """Queue (unless `deploy_id` is already queued), wait for the lock, run, record."""
        if deploy_id is None:
            deploy_id = self.enqueue(request)
        try:
            return await self._run(request, sink, deploy_id)
        except Exception as exc:
            # Before the deploy ran (once running, _run_locked records failures itself).
            error = f"internal error: {type(exc).__name__}: {exc}"
            self.services.records.transition(deploy_id, deploys.QUEUED, deploys.FAILED, error=error)
            raise
        finally:
            self._tell("finished", deploy_id)

    def _tell(self, event: str, deploy_id: int) -> None:
        record = self.services.records.get(deploy_id)
        if record is None or (event == "finished" and record["state"] not in deploys.FINAL_STATES):
            return
        for observer in self.observers:
            try:
                observer(event, record)
            except Exception:
                log.exception("observer of deploy #%s failed", deploy_id)

    async def _run(
        self, request: DeployRequest, sink: Sink | None, deploy_id: int
    ) -> DeployOutcome:
        records = self.services.records
        state_dir = self.services.settings.server.state_dir
        dep = request.deployment
        dlog = DeployLog(records, deploy_id, sink)
        lock = DeploymentLock(state_dir, dep.name)
        dlog.write(
            f"-----> deploy #{deploy_id} of {dep.name}: {request.commit[:12]} "
            f"({request.subject[:72]})"
        )
        try:
            got = await lock.acquire(
                deploy_id,
                on_wait=lambda ahead: dlog.write(
                    f"       queued behind deploy #{ahead}" if ahead else "       queued"
                ),
                # Superseded (or otherwise ended) while it waited: leave the queue. A
                # webhook deploy also leaves it when the daemon stops: it stays queued
                # and the next daemon resumes it.
                give_up=lambda: (
                    records.state(deploy_id) != deploys.QUEUED
                    or (self.stopping and request.trigger == "webhook")
                ),
            )
        except BaseException:
            if self.shutting_down and request.trigger == "webhook":
                # Accepted by the webhook: stays queued; the next daemon resumes it.
                dlog.write("       deployd is stopping; this deploy resumes when it starts again")
            else:
                state = deploys.INTERRUPTED if self.shutting_down else deploys.CANCELLED
                records.transition(deploy_id, deploys.QUEUED, state, error=f"{state} while queued")
            dlog.close()
            raise
        if not got:
            record = records.get(deploy_id)
            assert record is not None
            if record["state"] == deploys.QUEUED:
                dlog.write("       deployd is stopping; this deploy runs when it starts again")
            else:
                dlog.write(f"-----> {record['state']}: {record['error'] or 'while queued'}")
            dlog.close()
            return DeployOutcome(record, 1)
        ctx = DeployContext(
            deploy_id, request, self.services, dlog, work_root(state_dir, dep.name) / str(deploy_id)
        )
        try:
            return await self._run_locked(ctx, lock)
        finally:
            if ctx.cluster is not None:
                await ctx.cluster.close()
            if request.hold_lock is not None:
                # The pusher gets the verdict now; cleanup runs after it, and git updates
                # the pushed ref only after the hook has our answer: the next push of
                # this deployment must see that update at its turn, so the lock waits.
                after = asyncio.create_task(self._after_push(ctx, lock, request.hold_lock))
                self.releases.add(after)
                after.add_done_callback(self.releases.discard)
            else:
                await asyncio.shield(asyncio.to_thread(self._cleanup, ctx))
                lock.release()
                dlog.close()

    async def _run_locked(self, ctx: DeployContext, lock: DeploymentLock) -> DeployOutcome:
        records = self.services.records
        state_dir = self.services.settings.server.state_dir
        dep = ctx.deployment
        for gone in await asyncio.to_thread(
            recover, records, self.services.images, state_dir, dep.name, lock, current=ctx.id
        ):
            ctx.say(f"       deploy #{gone} had died; marked interrupted")
            await roll.reconcile(self.services, dep.name, gone)
        if ctx.request.trigger == "webhook":
            newer = records.newer_queued(dep.name, ctx.id, "webhook")
            if newer is not None:
                why = f"superseded by deploy #{newer}, a newer push waiting for its turn"
                ctx.say(f"-----> {why}")
                records.transition(ctx.id, deploys.QUEUED, deploys.SUPERSEDED, error=why)
                return DeployOutcome(self._record(ctx), 1)
        moved = await asyncio.to_thread(self._ref_moved, ctx)
        if moved:
            ctx.say(f"-----> refused: {moved}")
            records.transition(ctx.id, deploys.QUEUED, deploys.CANCELLED, error=moved)
            return DeployOutcome(self._record(ctx), 1)
        log.info(
            "deploy #%s of %s started (%s by %s)",
            ctx.id,
            dep.name,
            ctx.request.trigger,
            ctx.request.actor,
        )
        target = ctx.request.rollback_to
        plan = deploys.plan(dep, ctx.request.options, target["id"] if target else None)
        records.plan_steps(ctx.id, [(s.name, s.skip_reason) for s in plan])
        if not records.transition(ctx.id, deploys.QUEUED, deploys.RUNNING, pid=os.getpid()):
            record = self._record(ctx)
            if record["state"] in deploys.FINAL_STATES:  # superseded at the last moment
                ctx.say(f"-----> {record['state']}: {record['error']}")
                return DeployOutcome(record, 1)
            raise DeploydError(f"deploy #{ctx.id} was changed by someone else while queued.")
        self._tell("running", ctx.id)
        started = time.monotonic()
        try:
            await self._execute(ctx, plan)
        except asyncio.CancelledError:
            ctx.stop.set()
            await self._settle_upload(ctx)
            if self.shutting_down:
                # The step column keeps the step it was in.
                self._finish(ctx, deploys.INTERRUPTED, "deployd shut down during the deploy", None)
            else:
                self._finish(ctx, deploys.CANCELLED, "the deploy was cancelled", None)
            raise
        except DeploydError as exc:
            ctx.stop.set()
            await self._settle_upload(ctx)
            failed = getattr(exc, "failed_step", None)
            state = (
                deploys.CANCELLED
                if isinstance(exc, Cancelled)
                else deploys.ROLLED_BACK
                if isinstance(exc, RolledBack)
                else deploys.FAILED
            )
            self._finish(ctx, state, exc.message, failed)
            return DeployOutcome(self._record(ctx), exc.exit_code)
        except Exception as exc:
            ctx.stop.set()
            await self._settle_upload(ctx)
            log.exception("deploy #%s failed with an internal error", ctx.id)
            self._finish(ctx, deploys.FAILED, f"internal error: {type(exc).__name__}: {exc}", None)
            return DeployOutcome(self._record(ctx), 1)
        elapsed = time.monotonic() - started
        ctx.say(
            f"-----> deployed {dep.image}:{ctx.tag} ({ctx.digest}) as deploy #{ctx.id} "
            f"in {elapsed:.1f} s"
        )
        # Recorded the moment it is true; the server branch follows (still under the lock).
        records.transition(ctx.id, deploys.RUNNING, deploys.SUCCEEDED, step=None)
        log.info("deploy #%s of %s succeeded: %s:%s", ctx.id, dep.name, dep.image, ctx.tag)
        if ctx.request.trigger != "ssh" and ctx.request.rollback_to is None:
            # A push updates the server branch itself (git, after the hook says yes).
            try:
                await asyncio.to_thread(
                    repos.record_deployed,
                    self.services.settings.server.state_dir,
                    dep.name,
                    dep.branch,
                    ctx.request.repo,
                    ctx.request.commit,
                )
            except DeploydError as exc:
                ctx.say(f"       note: the server repository was not updated: {exc.message}")
        return DeployOutcome(self._record(ctx), 0)

    def _ref_moved(self, ctx: DeployContext) -> str:
        """Why this push may no longer be deployed (the branch moved while it waited), or ''."""
        if ctx.request.expect is None:
            return ""
        ref, old = ctx.request.expect
        current = git.resolve(ctx.request.repo, ref) or git.ZERO
        if current == old:
            return ""
        branch = ref.removeprefix("refs/heads/")
        by = self.services.records.deployed_commit(ctx.deployment.name, current)
        which = f" (deploy #{by})" if by else ""
        return f"{branch} moved to {current[:12]} while you waited{which}: pull, then push again."

    async def _after_push(
        self, ctx: DeployContext, lock: DeploymentLock, done: asyncio.Future[None]
    ) -> None:
        try:
            await asyncio.to_thread(self._cleanup, ctx)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), HOLD_LOCK_SECONDS)
        finally:
            lock.release()
            ctx.log.close()

    async def _execute(self, ctx: DeployContext, plan: tuple[deploys.PlannedStep, ...]) -> None:
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        runs = {s.name for s in plan if s.runs}
        if "preflight" in runs:
            await self._step(ctx, "preflight")
        target = ctx.request.rollback_to
        if target is not None:
            ctx.tag, ctx.digest = target["tag"], target["digest"]
            self.services.records.update(
                ctx.id,
                image=target["image"],
                tag=ctx.tag,
                digest=ctx.digest,
                report=json.dumps(target["report"]) if target["report"] else None,
            )
            await self._step(ctx, "roll")
            return
        await self._step(ctx, "checkout")
        await self._step(ctx, "build")
        # The upload overlaps the checks; the deploy tag waits for them.
        self.services.records.step_started(ctx.id, "push")
        ctx.upload = asyncio.create_task(push.upload(ctx))
        await self._step(ctx, "parse")
        if "pytest" in runs:
            await self._step(ctx, "pytest")
        self.services.records.update(ctx.id, step="push")
        await self._step(ctx, "push", already_started=True)
        if "roll" in runs:
            await self._step(ctx, "roll")

    async def _step(self, ctx: DeployContext, name: str, already_started: bool = False) -> None:
        records = self.services.records
        if not already_started:
            records.step_started(ctx.id, name)
        ctx.say(f"-----> {name}")
        t0 = time.monotonic()
        try:
            summary = await STEP_FUNCTIONS[name](ctx)
        except DeploydError as exc:
            ctx.log.end_step(name)
            records.step_finished(ctx.id, name, "failed", exc.message)
            ctx.say(f"       {name} failed after {time.monotonic() - t0:.2f} s: {exc.message}")
            exc.failed_step = name  # type: ignore[attr-defined]
            raise
        except asyncio.CancelledError:
            records.step_finished(ctx.id, name, "cancelled", "cancelled")
            raise
        except Exception as exc:
            records.step_finished(ctx.id, name, "failed", f"internal error: {exc}")
            exc.failed_step = name  # type: ignore[attr-defined]
            raise
        ctx.log.end_step(name)
        records.step_finished(ctx.id, name, "succeeded", summary)
        ctx.say(f"       {name} done in {time.monotonic() - t0:.2f} s: {summary}")

    async def _settle_upload(self, ctx: DeployContext) -> None:
        """Stop waiting for an upload whose deploy will not be tagged, and mark the step."""
        if ctx.upload is None:
            return
        if not ctx.upload.done():
            ctx.upload.cancel()  # its thread is abandoned; the staging tag is not a deploy tag
        with contextlib.suppress(BaseException):
            await ctx.upload
        records = self.services.records
        if "push" in records.running_steps(ctx.id):
            records.step_finished(ctx.id, "push", "cancelled", "not tagged: an earlier step failed")

    def _finish(self, ctx: DeployContext, state: str, error: str, step: str | None) -> None:
        records = self.services.records
        for name in records.running_steps(ctx.id):
            records.step_finished(ctx.id, name, "cancelled", "stopped")
        ctx.say(f"-----> deploy #{ctx.id} {state}: {error}")
        log.info("deploy #%s of %s %s: %s", ctx.id, ctx.deployment.name, state, error[:200])
        records.transition(
            ctx.id, deploys.RUNNING, state, error=error, **({"step": step} if step else {})
        )

    def _record(self, ctx: DeployContext) -> dict[str, Any]:
        record = self.services.records.get(ctx.id)
        assert record is not None
        return record

    def _cleanup(self, ctx: DeployContext) -> None:
        """Remove the work dir and containers; prune old images. Never raises."""
        shutil.rmtree(ctx.workdir, ignore_errors=True)
        images = self.services.images
        try:
            images.remove_containers({LABEL_DEPLOY_ID: str(ctx.id)})
            if ctx.image_id:
                images.untag(ctx.deployment.image, build.build_tag(ctx))
            images.prune(ctx.deployment.name, ctx.deployment.keep_images)
        except DeploydError as exc:
            log.warning("cleanup after deploy #%s: %s", ctx.id, exc)
