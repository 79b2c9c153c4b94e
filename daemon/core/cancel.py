"""Cancelling a running deploy: asked through the records, carried out by the process running it.

    deployd cancel 42 ─► Records.request_cancel (compare-and-set; usecases.cancel)
        queued   recorded `cancelled` at once; its waiter sees it leave the lock's queue
        running  `cancelled_by` set; the process running it (`deployd serve`, or a
                 `deployd deploy` in CI) sees it within POLL_SECONDS (watch) and stops:

    checkout, build, parse, pytest, push, preflight
             the deploy's task is cancelled and `stop` set: the build's stream is cut
             (the Engine cancels the build), check containers are killed, the upload
             is abandoned; each is waited for (adapters/background.run_stoppable)
    roll     stops itself (steps/roll.py): a migration Job runs to its end first;
             workloads it patched are rolled back, and that is waited for

The record ends `cancelled` with the step it was in, and the log says
`cancelled by <who> during <step>`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from daemon.core.context import DeployContext

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
# Steps that act on a cancel themselves, at points where stopping is safe.
SELF_STOPPING = frozenset({"roll"})


def message(ctx: DeployContext, detail: str = "") -> str:
    """`cancelled by <who> during <step>`, and what that left (`detail`), for record and log."""
    text = f"cancelled by {ctx.cancelled_by} during {ctx.step or 'its start'}"
    return f"{text}: {detail}" if detail else text


async def watch(ctx: DeployContext, task: asyncio.Task[Any]) -> bool:
    """Poll the records until a cancel of `ctx` is asked for, then stop the deploy.

    Runs beside the deploy's `task` for as long as it runs. Returns True once it has
    cancelled `task`; in a step of SELF_STOPPING it only tells the step (ctx.cancel_asked).
    """
    records = ctx.services.records
    failing = False
    while True:
        await asyncio.sleep(POLL_SECONDS)
        try:
            # Off the event loop: a cheap read by primary key, on the records' read connection.
            who = await asyncio.to_thread(records.cancel_requested, ctx.id)
        except Exception as exc:  # the deploy goes on; a cancel waits for the records
            if not failing:
                log.warning("deploy #%s: cannot read cancel requests: %s", ctx.id, exc)
            failing = True
            continue
        failing = False
        if who:
            break
    ctx.cancelled_by = who
    ctx.cancel_asked.set()
    step = ctx.step or "its start"
    log.info(
        "deploy #%s of %s: cancel asked by %s during %s", ctx.id, ctx.deployment.name, who, step
    )
    if ctx.step in SELF_STOPPING:
        ctx.say(f"-----> cancel asked by {who} during {step}: stopping where it is safe")
        return False
    ctx.say(f"-----> cancel asked by {who} during {step}: stopping")
    ctx.stop.set()
    task.cancel()
    return True


def asked(watcher: asyncio.Task[bool], task: asyncio.Task[Any]) -> bool:
    """After `task` got CancelledError: whether that was the watcher's doing alone.

    If so, the cancellation is taken back (`uncancel`): the deploy ends `cancelled`
    and returns its outcome, and whoever awaits it (a push waiting on it) is not
    cancelled too.
    """
    if not watcher.done() or watcher.cancelled() or watcher.exception() or not watcher.result():
        return False
    return task.uncancel() == 0
