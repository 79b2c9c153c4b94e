"""Runs a deploy: the per-deployment lock, the steps over one context, the records.

    [preflight] ─► checkout ─► build ─┬─► parse ─► [pytest] ─┬─► push (tag) ─► [roll]
                                      └─► upload (staging) ──┘

Every transition is written before the action it announces. Whatever the
outcome, the work dir and the check containers are removed and the lock is
released; old local images beyond `keep_images` are pruned. What differs by
where a deploy came from is asked of its policy (core/policy.py), also what
a freeze does to it: webhook deploys wait for the freeze to end (queued, but
outside the lock's queue, so that rollbacks run meanwhile); other deploys and
promotions are refused at their turn; rollbacks run. A promotion builds
nothing: its push step tags the source's image in this deployment's repository.

The event loop never waits for SQLite (another process may hold it for
seconds): a deploy's record changes go through its log's writer thread
(`ctx.record`), in order with its log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from daemon.adapters import freezes, git, repos
from daemon.adapters.locks import DeploymentLock
from daemon.core import cancel, deploys
from daemon.core.context import DeployContext, DeployRequest, Services
from daemon.core.deploys import Deploy
from daemon.core.freezes import Freeze, describe
from daemon.core.logs import DeployLog, Sink
from daemon.core.policy import Branch, Frozen, Lifecycle
from daemon.core.ports import LABEL_DEPLOY_ID, LABEL_DEPLOYMENT, LABEL_INSTANCE, instance
from daemon.core.recovery import finish_rollbacks, reconcile_roll, recover, work_root
from daemon.errors import EXIT_USAGE, Cancelled, DeploydError, DiskFull, StepFailed
from daemon.printable import printable
from daemon.steps import build, checkout, dags, live, promote, push, roll
from daemon.steps.checks import parse, pytest

log = logging.getLogger(__name__)

HOLD_LOCK_SECONDS = 60
# How often a webhook deploy waiting out a freeze reads the freezes table.
FREEZE_POLL_SECONDS = 1.0
# Told about every deploy that starts running ("running") and every deploy that
# ends ("finished"), with its record; must return at once (commit statuses).
Observer = Callable[[str, Deploy], None]
StepFn = Callable[[DeployContext], Awaitable[str]]
STEP_FUNCTIONS: dict[str, StepFn] = {
    "checkout": checkout.run,
    "build": build.run,
    "parse": parse.run,
    "pytest": pytest.run,
    "push": push.run,
    "roll": roll.run,
    "preflight": roll.preflight,
    "publish": dags.publish,
    "live": live.run,
}


@dataclass(frozen=True)
class DeployOutcome:
    """The record of a finished deploy and the exit code it maps to."""

    record: Deploy
    exit_code: int


def queued_fields(request: DeployRequest) -> dict[str, object]:
    """The record of a queued deploy of `request` (create_deploy's arguments)."""
    return {
        "deployment": request.deployment.name,
        "trigger": request.trigger,
        "action": request.action,
        "actor": request.actor,
        "ref": request.ref,
        "options": request.options,
        "pid": os.getpid(),
        "commit": request.commit,
        "description": printable(request.options.description or request.subject),
        "rollback_of": request.rollback_to.id if request.rollback_to else None,
        "promoted_from": request.promote_from.deployment if request.promote_from else None,
        "promoted_from_id": request.promote_from.id if request.promote_from else None,
    }


class Pipeline:
    """Runs deploys over shared adapters."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.lifecycle = Lifecycle.SERVING
        self.releases: set[asyncio.Task[None]] = set()
        self.observers: list[Observer] = []
        # Deploys started by SSH commands (rollbacks): drained like pushes.
        self.commands: set[asyncio.Task[object]] = set()
        # The logs of the deploys this process runs, for followers (core/usecases.py).
        self.live: dict[int, DeployLog] = {}

    def enqueue(self, request: DeployRequest) -> int:
        """Record a deploy of `request` as queued; `run` it with the id returned."""
        return self.services.records.create_deploy(**queued_fields(request))  # type: ignore[arg-type]

    async def run(
        self, request: DeployRequest, sink: Sink | None = None, deploy_id: int | None = None
    ) -> DeployOutcome:
        """Queue (unless `deploy_id` is already queued), wait for the lock, run, record."""
        if deploy_id is None:
            deploy_id = await asyncio.to_thread(self.enqueue, request)
        try:
            return await self._run(request, sink, deploy_id)
        except Exception as exc:
            # Before the deploy ran (once running, _run_locked records failures itself).
            error = f"internal error: {type(exc).__name__}: {exc}"
            await asyncio.to_thread(
                self.services.records.transition,
                deploy_id,
                deploys.QUEUED,
                deploys.FAILED,
                error=error,
            )
            raise
        finally:
            await self._tell("finished", deploy_id)

    async def _tell(self, event: str, deploy_id: int) -> None:
        record = await asyncio.to_thread(self.services.records.get, deploy_id)
        if record is None or (event == "finished" and not record.final):
            return
        for observer in self.observers:
            try:
                observer(event, record)
            except Exception:
                log.exception("observer of deploy #%s failed", deploy_id)

    async def _record(self, deploy_id: int) -> Deploy:
        """The deploy's record, read off the event loop."""
        record = await asyncio.to_thread(self.services.records.get, deploy_id)
        assert record is not None
        return record

    async def _run(
        self, request: DeployRequest, sink: Sink | None, deploy_id: int
    ) -> DeployOutcome:
        state_dir = self.services.settings.server.state_dir
        dep = request.deployment
        dlog = DeployLog(self.services.records, deploy_id, sink)
        self.live[deploy_id] = dlog
        lock = DeploymentLock(state_dir, dep.name)
        dlog.write(
            f"-----> deploy #{deploy_id} of {dep.name}: {request.commit[:12]} "
            f"({request.subject[:72]})"
        )
        try:
            got = await self._acquire(request, deploy_id, lock, dlog)
        except BaseException:
            self._close_log(dlog)
            raise
        if not got:
            record = await self._record(deploy_id)
            if record.state == deploys.QUEUED:
                dlog.write("       deployd is stopping; this deploy runs when it starts again")
            else:
                dlog.write(f"-----> {record.state}: {record.error or 'while queued'}")
            self._close_log(dlog)
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
                self._close_log(dlog)

    def _close_log(self, dlog: DeployLog) -> None:
        self.live.pop(dlog.deploy_id, None)
        dlog.close()

    async def _acquire(
        self, request: DeployRequest, deploy_id: int, lock: DeploymentLock, dlog: DeployLog
    ) -> bool:
        """Wait for the deployment's lock; False if the deploy left the queue meanwhile."""
        records = self.services.records
        resumes = request.policy.resumes_after_restart
        waits = request.policy.frozen is Frozen.WAITS and not request.options.override_freeze
        try:
            while True:
                if waits and not await self._wait_out_freeze(request, deploy_id, dlog):
                    return False
                got = await lock.acquire(
                    deploy_id,
                    on_wait=lambda ahead: dlog.write(
                        f"       queued behind deploy #{ahead}" if ahead else "       queued"
                    ),
                    give_up=functools.partial(self._gives_up, deploy_id, resumes),
                )
                if not (got and waits) or await self._freeze(request) is None:
                    return got
                # Frozen while it waited for the lock: it waits that out without the
                # lock, so that the rollbacks a freeze lets run are not held up.
                lock.release()
        except BaseException:
            if self.lifecycle is Lifecycle.INTERRUPTING and resumes:
                dlog.write("       deployd is stopping; this deploy resumes when it starts again")
            else:
                state = (
                    deploys.INTERRUPTED
                    if self.lifecycle is Lifecycle.INTERRUPTING
                    else deploys.CANCELLED
                )
                await dlog.record(
                    records.transition,
                    deploy_id,
                    deploys.QUEUED,
                    state,
                    error=f"{state} while queued",
                )
            raise

    async def _gives_up(self, deploy_id: int, resumes: bool) -> bool:
        """Whether a waiting deploy leaves the lock's queue: superseded (or otherwise
        ended) while it waited; one that resumes after a restart also leaves it when the
        daemon stops (it stays queued and the next daemon runs it)."""
        if self.lifecycle is not Lifecycle.SERVING and resumes:
            return True
        state = await asyncio.to_thread(self.services.records.state, deploy_id)
        return state != deploys.QUEUED

    async def _freeze(self, request: DeployRequest) -> Freeze | None:
        """What freezes the request's deployment now (recorded or a window), if anything."""
        return await asyncio.to_thread(freezes.current, self.services.records, request.deployment)

    async def _wait_out_freeze(
        self, request: DeployRequest, deploy_id: int, dlog: DeployLog
    ) -> bool:
        """Wait, queued but outside the lock's queue, while the deployment is frozen.

        The freezes table is read every FREEZE_POLL_SECONDS (an unfreeze may come
        from another process), and at the freeze's `until`. False if the deploy left
        the queue meanwhile (superseded, cancelled) or the daemon is stopping.
        """
        records = self.services.records
        told: Freeze | None = None
        while (freeze := await self._freeze(request)) is not None:
            if freeze != told:
                dlog.write(f"       {describe(freeze)}; this deploy waits for the freeze to end")
                told = freeze
            state = await asyncio.to_thread(records.state, deploy_id)
            if state != deploys.QUEUED or self.lifecycle is not Lifecycle.SERVING:
                return False
            left = FREEZE_POLL_SECONDS if freeze.until is None else freeze.until - time.time()
            await asyncio.sleep(max(0.01, min(FREEZE_POLL_SECONDS, left)))
        if told is not None:
            dlog.write(f"       {request.deployment.name} is no longer frozen; this deploy goes on")
        return True

    async def _run_locked(self, ctx: DeployContext, lock: DeploymentLock) -> DeployOutcome:
        refused = await self._before_start(ctx, lock)
        if refused is not None:
            return refused
        records = self.services.records
        dep = ctx.deployment
        log.info(
            "deploy #%s of %s started (%s %s by %s)",
            ctx.id,
            dep.name,
            ctx.request.trigger,
            ctx.request.action,
            ctx.request.actor,
        )
        target = ctx.request.rollback_to
        source = ctx.request.promote_from
        ctx.previous = await asyncio.to_thread(records.last_succeeded, dep.name)
        ctx.kind, why = await dags.decide(ctx)
        if why:
            ctx.say(f"-----> {'a DAG' if ctx.kind == deploys.DAGS else 'an image'} deploy: {why}")
        if ctx.kind != deploys.IMAGE:
            await ctx.record(records.update, ctx.id, kind=ctx.kind)
        plan = deploys.plan(
            dep,
            ctx.request.options,
            target.id if target else None,
            (source.deployment, source.id) if source else None,
            kind=ctx.kind,
        )
        await ctx.record(records.plan_steps, ctx.id, [(s.name, s.skip_reason) for s in plan])
        if not await ctx.record(
            records.transition, ctx.id, deploys.QUEUED, deploys.RUNNING, pid=os.getpid()
        ):
            record = await self._record(ctx.id)
            if record.final:  # superseded at the last moment
                ctx.say(f"-----> {record.state}: {record.error}")
                return DeployOutcome(record, 1)
            raise DeploydError(f"deploy #{ctx.id} was changed by someone else while queued.")
        await self._tell("running", ctx.id)
        started = time.monotonic()
        task = asyncio.current_task()
        assert task is not None
        # A cancel asked through the records (another process, SSH, the API) stops it.
        watcher = asyncio.create_task(cancel.watch(ctx, task))
        try:
            try:
                await self._execute(ctx, plan)
            finally:
                watcher.cancel()
        except asyncio.CancelledError:
            asked = cancel.asked(watcher, task)
            await self._stopped(ctx)
            if asked:
                await self._finish(ctx, deploys.CANCELLED, cancel.message(ctx), ctx.step or None)
                return DeployOutcome(await self._record(ctx.id), 1)
            if self.lifecycle is Lifecycle.INTERRUPTING:
                # The step column keeps the step it was in.
                await self._finish(
                    ctx, deploys.INTERRUPTED, "deployd shut down during the deploy", None
                )
            else:
                await self._finish(ctx, deploys.CANCELLED, "the deploy was cancelled", None)
            raise
        except StepFailed as exc:
            await self._stopped(ctx)
            if not isinstance(exc.cause, DeploydError):
                log.error("deploy #%s failed with an internal error", ctx.id, exc_info=exc.cause)
            await self._finish(ctx, exc.final_state, exc.message, exc.step)
            return DeployOutcome(await self._record(ctx.id), exc.exit_code)
        except Exception as exc:  # between steps: a bug, recorded as one
            await self._stopped(ctx)
            log.exception("deploy #%s failed with an internal error", ctx.id)
            error = f"internal error: {type(exc).__name__}: {exc}"
            await self._finish(ctx, deploys.FAILED, error, None)
            return DeployOutcome(await self._record(ctx.id), 1)
        took = time.monotonic() - started
        if ctx.kind == deploys.DAGS:
            ctx.say(
                f"-----> deployed the DAGs of {ctx.request.commit[:12]} as deploy #{ctx.id} in "
                f"{took:.1f} s; the image is unchanged ({dep.image}:{ctx.tag})"
            )
        else:
            ctx.say(
                f"-----> deployed {dep.image}:{ctx.tag} ({ctx.digest}) as deploy #{ctx.id} "
                f"in {took:.1f} s"
            )
        # Recorded the moment it is true; the server branch follows (still under the lock).
        await ctx.record(records.transition, ctx.id, deploys.RUNNING, deploys.SUCCEEDED, step=None)
        log.info("deploy #%s of %s succeeded: %s:%s", ctx.id, dep.name, dep.image, ctx.tag)
        if ctx.kind == deploys.IMAGE and (
            ctx.request.policy.branch is Branch.DEPLOYD
            # With dag_source = "git" the branch is what runs: a rollback moves it too.
            or (ctx.request.action == deploys.ROLLBACK and dep.dag_source == "git")
        ):
            await self._move_branch(ctx)
        return DeployOutcome(await self._record(ctx.id), 0)

    async def _before_start(self, ctx: DeployContext, lock: DeploymentLock) -> DeployOutcome | None:
        """With the lock held: recover dead deploys; the outcome if this one may not run."""
        records = self.services.records
        state_dir = self.services.settings.server.state_dir
        dep = ctx.deployment
        for gone in await asyncio.to_thread(
            recover, records, self.services.images, state_dir, dep.name, lock, current=ctx.id
        ):
            ctx.say(f"       deploy #{gone} had died; marked interrupted")
            await reconcile_roll(self.services, dep.name, gone)
        if dep.workloads:
            for done in await finish_rollbacks(self.services, dep.name):
                ctx.say(f"       {done}")
        if ctx.request.policy.superseded_by_newer:
            newer = await asyncio.to_thread(
                records.newer_queued, dep.name, ctx.id, ctx.request.trigger
            )
            if newer is not None:
                why = f"superseded by deploy #{newer}, a newer push waiting for its turn"
                ctx.say(f"-----> {why}")
                await ctx.record(
                    records.transition, ctx.id, deploys.QUEUED, deploys.SUPERSEDED, error=why
                )
                return DeployOutcome(await self._record(ctx.id), 1)
        if ctx.request.policy.frozen is Frozen.REFUSED and not ctx.request.options.override_freeze:
            freeze = await self._freeze(ctx.request)
            if freeze is not None:
                why = f"{describe(freeze)}. Nothing was deployed."
                ctx.say(f"-----> refused: {why}")
                await ctx.record(
                    records.transition, ctx.id, deploys.QUEUED, deploys.CANCELLED, error=why
                )
                return DeployOutcome(await self._record(ctx.id), EXIT_USAGE)
        moved = await asyncio.to_thread(self._ref_moved, ctx)
        if moved:
            ctx.say(f"-----> refused: {moved}")
            await ctx.record(
                records.transition, ctx.id, deploys.QUEUED, deploys.CANCELLED, error=moved
            )
            return DeployOutcome(await self._record(ctx.id), 1)
        return None

    async def _move_branch(self, ctx: DeployContext) -> None:
        dep = ctx.deployment
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
            self._close_log(ctx.log)

    async def _execute(self, ctx: DeployContext, plan: tuple[deploys.PlannedStep, ...]) -> None:
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        runs = {s.name for s in plan if s.runs}
        if ctx.kind == deploys.DAGS:
            await self._step(ctx, "checkout")
            await self._step(ctx, "parse", run=dags.parse_in_running_image)
            if "pytest" in runs:
                await self._step(ctx, "pytest")
            await self._step(ctx, "publish")
            if "live" in runs:
                await self._step(ctx, "live")
            return
        if "preflight" in runs:
            await self._step(ctx, "preflight")
        target = ctx.request.rollback_to
        if target is not None:
            ctx.tag, ctx.digest = target.tag or "", target.digest or ""
            ctx.tree, ctx.report = target.tree or "", target.report
            await ctx.record(
                self.services.records.update,
                ctx.id,
                image=target.image,
                tag=ctx.tag,
                digest=ctx.digest,
                tree_sha=target.tree,
                report=json.dumps(target.report) if target.report else None,
            )
            await self._step(ctx, "roll")
            return
        if ctx.request.promote_from is not None:
            await promote.adopt(ctx)
            await self._step(ctx, "push", run=promote.run)
            if "roll" in runs:
                await self._step(ctx, "roll")
            return
        await self._step(ctx, "checkout")
        await self._step(ctx, "build")
        # The upload overlaps the checks; the deploy tag waits for them.
        await ctx.record(self.services.records.step_started, ctx.id, "push")
        ctx.upload = asyncio.create_task(push.upload(ctx))
        await self._step(ctx, "parse")
        if "pytest" in runs:
            await self._step(ctx, "pytest")
        await ctx.record(self.services.records.update, ctx.id, step="push")
        await self._step(ctx, "push", already_started=True)
        if "roll" in runs:
            await self._step(ctx, "roll")

    async def _step(
        self,
        ctx: DeployContext,
        name: str,
        already_started: bool = False,
        run: StepFn | None = None,
    ) -> None:
        records = self.services.records
        ctx.step = name  # before the first await: a cancel seen from now on is in this step
        if not already_started:
            await ctx.record(records.step_started, ctx.id, name)
        ctx.say(f"-----> {name}")
        t0 = time.monotonic()
        try:
            summary = await (run or STEP_FUNCTIONS[name])(ctx)
        except asyncio.CancelledError:
            await ctx.record(records.step_finished, ctx.id, name, "cancelled", "cancelled")
            raise
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                exc = DiskFull(self.services.settings.server.state_dir, f", in {name}")
            if ctx.cancelled_by and name not in cancel.SELF_STOPPING:
                exc = Cancelled(cancel.message(ctx))  # what it raised is the stop at work
            failed = StepFailed(name, exc)
            ctx.log.end_step(name)
            state = "cancelled" if isinstance(exc, Cancelled) else "failed"
            await ctx.record(records.step_finished, ctx.id, name, state, failed.message)
            ctx.say(f"       {name} failed after {time.monotonic() - t0:.2f} s: {failed.message}")
            raise failed from exc
        ctx.log.end_step(name)
        await ctx.record(records.step_finished, ctx.id, name, "succeeded", summary)
        ctx.say(f"       {name} done in {time.monotonic() - t0:.2f} s: {summary}")

    async def _stopped(self, ctx: DeployContext) -> None:
        """The deploy will not go on: stop its work, and let go of an upload in flight."""
        ctx.stop.set()
        if ctx.upload is None:
            return
        if not ctx.upload.done():
            # Its push's stream is cut (the Engine abandons the upload) and waited for.
            ctx.upload.cancel()
        with contextlib.suppress(BaseException):
            await ctx.upload
        records = self.services.records
        if "push" in await ctx.record(records.running_steps, ctx.id):
            why = "not tagged: " + ("cancelled" if ctx.cancelled_by else "an earlier step failed")
            await ctx.record(records.step_finished, ctx.id, "push", "cancelled", why)

    async def _finish(self, ctx: DeployContext, state: str, error: str, step: str | None) -> None:
        records = self.services.records
        error = printable(error)  # it quotes build output, DAG errors, the registry
        for name in await ctx.record(records.running_steps, ctx.id):
            await ctx.record(records.step_finished, ctx.id, name, "cancelled", "stopped")
        ctx.say(f"-----> deploy #{ctx.id} {state}: {error}")
        log.info("deploy #%s of %s %s: %s", ctx.id, ctx.deployment.name, state, error[:200])
        await ctx.record(
            records.transition,
            ctx.id,
            deploys.RUNNING,
            state,
            error=error,
            **({"step": step} if step else {}),
        )

    def _cleanup(self, ctx: DeployContext) -> None:
        """Remove the work dir and containers; prune old images. Never raises."""
        shutil.rmtree(ctx.workdir, ignore_errors=True)
        images = self.services.images
        try:
            # Ids and names are per state_dir: another deployd on this Engine may have a
            # deployment of the same name, and a deploy #N too.
            mine = {
                LABEL_INSTANCE: instance(self.services.settings.server.state_dir),
                LABEL_DEPLOYMENT: ctx.deployment.name,
            }
            images.remove_containers({**mine, LABEL_DEPLOY_ID: str(ctx.id)})
            if ctx.image_id:
                images.untag(ctx.deployment.image, build.build_tag(ctx))
            images.prune(mine, ctx.deployment.keep_images)
        except DeploydError as exc:
            log.warning("cleanup after deploy #%s: %s", ctx.id, exc)
