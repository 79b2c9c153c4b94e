"""Cancelling a deploy through the records, in milliseconds: real SQLite and git, fake Engine
and Cluster (tests/support/fakes.py). The pipeline's watcher sees the request and stops each
step for real; what the fakes were doing when it came shows that they were stopped and
waited for, not walked away from. The same against the real Engine, registry and simulator:
tests/core/test_cancel_e2e.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.adapters.background import run_stoppable
from daemon.core import cancel, usecases
from daemon.core.pipeline import DeployOutcome
from daemon.errors import Refusal
from tests.core.test_pipeline_states import WORKLOADS, World


@pytest.fixture(autouse=True)
def quick_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    # The watcher's 0.5 s is for production; one test below runs with it.
    monkeypatch.setattr(cancel, "POLL_SECONDS", 0.02)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def building(w: World) -> bool:
    return any(call.startswith("build ") for call in w.engine.calls)


def started(w: World, step: str) -> Callable[[], bool]:
    def check() -> bool:
        recs = w.records.list_deploys("prod", 1)
        return bool(recs) and recs[0].step == step and w.steps(recs[0].id)[step] == "running"

    return check


async def cancel_in(
    w: World, step: str, ready: Callable[[], bool], **options: object
) -> DeployOutcome:
    """Start a deploy, wait for `ready` in `step`, have bob cancel it; its outcome."""
    task = asyncio.create_task(w.run(w.request(**options)))
    await until(lambda: started(w, step)() and ready())
    (rec,) = w.records.list_deploys("prod", 1)
    asked = usecases.cancel(w.records, rec.id, by="bob")
    assert (asked.record.state, asked.record.cancelled_by, asked.already) == (
        "running",
        "bob",
        False,
    )
    return await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("step", ["preflight", "build", "parse", "pytest", "push"])
async def test_a_running_deploy_stops_for_real_in_each_step(tmp_path: Path, step: str) -> None:
    w = World(tmp_path, workloads=WORKLOADS)
    gate = threading.Event()  # never set: only the stop ends what blocks
    ready: Callable[[], bool] = lambda: True  # noqa: E731
    if step == "preflight":
        w.cluster.preflight_seconds = 3600
    elif step == "build":
        w.engine.block_build = gate
        ready = lambda: building(w)  # noqa: E731
    elif step in ("parse", "pytest"):
        w.engine.block_check, w.engine.block_check_in = gate, step
        w.engine.block_upload = gate  # the upload is in flight beside the check
        ready = lambda: {f"{step} started", "upload started"} <= set(w.engine.calls)  # noqa: E731
    else:
        w.engine.block_upload = gate  # the checks passed; the deploy tag waits for the upload
        ready = lambda: "upload started" in w.engine.calls  # noqa: E731
    out = await cancel_in(w, step, ready, pytest=step == "pytest")
    rec = out.record
    # The deploy ends `cancelled`, returns its outcome (the caller, a push, is not cancelled).
    assert (out.exit_code, rec.state, rec.step, rec.cancelled_by) == (1, "cancelled", step, "bob")
    assert rec.error == f"cancelled by bob during {step}"
    assert w.steps(rec.id)[step] == "cancelled"
    log = [row.line for row in w.records.log_lines(rec.id)]
    assert f"-----> cancel asked by bob during {step}: stopping" in log
    assert f"-----> deploy #{rec.id} cancelled: cancelled by bob during {step}" in log
    # What ran was stopped and had ended by the time the deploy did.
    stopped = {
        "build": ["build stopped"],
        "parse": ["parse killed", "upload stopped"],
        "pytest": ["pytest killed", "upload stopped"],
        "push": ["upload stopped"],
    }.get(step, [])
    assert set(stopped) <= set(w.engine.calls), w.engine.calls
    assert w.engine.pushed == [] and not rec.tag  # no deploy tag, not even the staging one
    if step in ("parse", "pytest", "push"):
        assert w.steps(rec.id)["push"] == "cancelled"
    assert w.cluster.patched == []
    server = w.settings.server.state_dir / "repos" / "prod.git"
    assert not server.exists()  # the branch never moved


async def test_a_cancel_is_acknowledged_within_the_poll_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cancel, "POLL_SECONDS", 0.5)  # the real interval
    w = World(tmp_path)
    w.engine.block_build = threading.Event()
    task = asyncio.create_task(w.run())
    await until(lambda: building(w))
    (rec,) = w.records.list_deploys("prod", 1)
    t0 = time.monotonic()
    usecases.cancel(w.records, rec.id, by="bob")
    out = await asyncio.wait_for(task, 5)
    assert out.record.state == "cancelled"
    assert time.monotonic() - t0 < 1.0  # seen within 0.5 s, stopped at once


async def test_a_cancel_during_the_rollout_rolls_back_what_it_patched(tmp_path: Path) -> None:
    w = World(tmp_path, workloads=WORKLOADS)
    w.cluster.hang_rollout = True
    waiting = lambda: sum(e.startswith("waiting for") for e in w.cluster.events) == 2  # noqa: E731
    out = await cancel_in(w, "roll", waiting)
    rec = out.record
    assert (out.exit_code, rec.state, rec.step, rec.cancelled_by) == (1, "cancelled", "roll", "bob")
    assert rec.error == "cancelled by bob during roll: 2 workloads rolled back to what ran before"
    assert w.steps(rec.id)["roll"] == "cancelled"
    assert [w for w, _ in w.cluster.patched] == list(WORKLOADS)
    assert w.cluster.restored == list(WORKLOADS)  # and that rollback was waited for
    assert {f"stopped waiting for {x}" for x in WORKLOADS} <= set(w.cluster.events)
    log = [row.line for row in w.records.log_lines(rec.id)]
    assert "-----> cancel asked by bob during roll: stopping where it is safe" in log
    assert "-----> cancelled by bob during roll: rolling back 2 workloads" in log


async def test_a_migration_job_is_never_stopped_midway(tmp_path: Path) -> None:
    w = World(tmp_path, workloads=WORKLOADS)
    w.cluster.job_seconds = 0.5
    out = await cancel_in(w, "roll", lambda: "job started" in w.cluster.events)
    rec = out.record
    assert w.cluster.events == ["job started", "job complete"]  # it ran to its end
    assert (rec.state, rec.step, rec.cancelled_by) == ("cancelled", "roll", "bob")
    assert rec.error == (
        "cancelled by bob during roll: job/prod-migrate-1 (airflow db migrate) finished first; "
        "no workload was changed"
    )
    assert w.cluster.patched == [] and w.cluster.restored == []


async def test_a_queued_deploy_is_cancelled_at_once_and_leaves_the_queue(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.engine.block_build = threading.Event()
    first = asyncio.create_task(w.run())
    await until(lambda: building(w))
    lines: list[str] = []
    second = asyncio.create_task(w.pipeline.run(w.request(), lines.append))
    await until(lambda: any("queued behind deploy #1" in line for line in lines))
    asked = usecases.cancel(w.records, 2, by="bob")
    assert (asked.record.state, asked.record.cancelled_by) == ("cancelled", "bob")
    assert asked.record.error == "cancelled by bob while queued"
    out = await asyncio.wait_for(second, 2)  # it left the queue
    assert (out.record.state, out.exit_code) == ("cancelled", 1)
    assert "-----> cancelled: cancelled by bob while queued" in lines
    assert out.record.started_at is None  # it never ran
    w.engine.block_build.set()
    assert (await first).record.state == "succeeded"


async def test_refusals_say_why(tmp_path: Path) -> None:
    w = World(tmp_path)
    done = (await w.run()).record
    with pytest.raises(Refusal, match=r"^there is no deploy #99\.$"):
        usecases.cancel(w.records, 99, by="bob")
    with pytest.raises(
        Refusal,
        match=rf"^deploy #{done.id} has already ended \(succeeded\); there is nothing to cancel\.$",
    ):
        usecases.cancel(w.records, done.id, by="bob")
    # Another key's deploy is refused like an unknown one.
    with pytest.raises(Refusal, match=rf"^there is no deploy #{done.id} that key eve may cancel"):
        usecases.cancel(w.records, done.id, by="eve", may=lambda _d: False, caller="key eve")
    queued = w.pipeline.enqueue(w.request())
    usecases.cancel(w.records, queued, by="bob")
    with pytest.raises(Refusal, match=r"has already ended \(cancelled by bob\)"):
        usecases.cancel(w.records, queued, by="alice")


async def test_a_second_cancel_is_told_who_asked_first(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.engine.block_build = threading.Event()
    task = asyncio.create_task(w.run())
    await until(lambda: building(w))
    # The watcher polls every 20 ms here: ask twice before it can have looked.
    first = usecases.cancel(w.records, 1, by="bob")
    again = usecases.cancel(w.records, 1, by="alice")
    assert (first.already, again.already, again.record.cancelled_by) == (False, True, "bob")
    assert (await asyncio.wait_for(task, 5)).record.error == "cancelled by bob during build"


async def test_a_failed_check_stops_the_upload_beside_it(tmp_path: Path) -> None:
    """Not only a cancel: a failure too leaves nothing of the deploy running."""
    w = World(tmp_path)
    w.engine.block_upload = threading.Event()
    w.engine.dag_errors = {"dags/example_dag.py": "No module named nope"}
    out = await w.run()
    assert (out.record.state, out.record.step) == ("failed", "parse")
    assert "upload stopped" in w.engine.calls  # stopped and waited for, before run() returned
    assert w.engine.pushed == []
    assert w.steps(out.record.id)["push"] == "cancelled"


async def test_ctrl_c_still_cancels_without_a_request(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.engine.block_build = threading.Event()
    task = asyncio.create_task(w.run())
    await until(lambda: building(w))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (rec,) = w.records.list_deploys("prod")
    assert (rec.state, rec.error, rec.cancelled_by) == (
        "cancelled",
        "the deploy was cancelled",
        None,
    )
    assert "build stopped" in w.engine.calls


async def test_run_stoppable_waits_for_the_stopped_call() -> None:
    stop = threading.Event()
    ended = threading.Event()

    def blocking() -> str:
        stop.wait()
        time.sleep(0.1)  # what a cut stream or killed container takes to end
        ended.set()
        return "late"

    task = asyncio.create_task(run_stoppable(blocking, stop))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stop.is_set() and ended.is_set()  # not abandoned: it had ended
    assert await run_stoppable(lambda: 42, threading.Event()) == 42
    with pytest.raises(KeyError):
        await run_stoppable(lambda: {}["x"], threading.Event())
