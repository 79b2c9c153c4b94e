"""The per-deployment lock: exclusive across processes, fair, released by death."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon.adapters import locks
from daemon.adapters.locks import DeploymentLock

HOLD = """
import asyncio, sys, time
from pathlib import Path
from daemon.adapters.locks import DeploymentLock
state, ticket, hold, out = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
lock = DeploymentLock(state, "prod")
asyncio.run(lock.acquire(ticket))
with open(out, "a") as fh:
    fh.write(f"start {ticket} {time.time()}\\n")
time.sleep(hold)
with open(out, "a") as fh:
    fh.write(f"end {ticket} {time.time()}\\n")
lock.release()
"""


def spawn(state: Path, ticket: int, hold: float, out: Path) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parents[2]
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(state), str(ticket), str(hold), str(out)], cwd=root
    )


def test_processes_take_turns_in_ticket_order(tmp_path: Path) -> None:
    out = tmp_path / "events"
    first = spawn(tmp_path, 1, 0.6, out)
    time.sleep(0.3)
    # Tickets 3 and 2 arrive in the "wrong" order of process start; 2 must run first.
    third = spawn(tmp_path, 3, 0.1, out)
    time.sleep(0.1)
    second = spawn(tmp_path, 2, 0.1, out)
    for p in (first, second, third):
        assert p.wait(timeout=20) == 0
    events = [line.split() for line in out.read_text().splitlines()]
    assert [(e[0], e[1]) for e in events] == [
        ("start", "1"),
        ("end", "1"),
        ("start", "2"),
        ("end", "2"),
        ("start", "3"),
        ("end", "3"),
    ]


def test_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    out = tmp_path / "events"
    holder = spawn(tmp_path, 1, 60, out)
    deadline = time.time() + 10
    while not out.exists() and time.time() < deadline:
        time.sleep(0.05)
    lock = DeploymentLock(tmp_path, "prod")
    assert not lock.try_acquire()
    assert lock.holder() == 1
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert lock.try_acquire(5)
    assert lock.holder() == 5
    lock.release()


async def test_dead_waiter_does_not_block_the_queue(tmp_path: Path) -> None:
    out = tmp_path / "events"
    holder = spawn(tmp_path, 1, 60, out)
    while not out.exists():
        await asyncio.sleep(0.05)
    waiter = spawn(tmp_path, 2, 0, tmp_path / "never")
    lock = DeploymentLock(tmp_path, "prod")
    while not (lock.dir / f"wait-{2:020d}.lock").exists():
        await asyncio.sleep(0.02)
    assert lock.live_waiter(2)
    for p in (waiter, holder):
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    told: list[int | None] = []
    await asyncio.wait_for(lock.acquire(3, on_wait=told.append), timeout=5)
    assert lock.held and not (tmp_path / "never").exists()
    assert not lock.live_waiter(2)
    lock.release()


async def test_waiter_is_told_who_is_ahead(tmp_path: Path) -> None:
    first = DeploymentLock(tmp_path, "prod")
    assert first.try_acquire(41)
    second = DeploymentLock(tmp_path, "prod")
    told: list[int | None] = []
    task = asyncio.create_task(second.acquire(42, on_wait=told.append))
    await asyncio.sleep(0.2)
    assert told == [41] and not task.done()
    first.release()
    await asyncio.wait_for(task, timeout=5)
    assert second.held
    second.release()


async def test_a_waiter_that_gives_up_leaves_the_queue(tmp_path: Path) -> None:
    holder = DeploymentLock(tmp_path, "prod")
    assert holder.try_acquire(1)
    quitting = DeploymentLock(tmp_path, "prod")
    give_up = asyncio.Event()
    task = asyncio.create_task(quitting.acquire(2, give_up=give_up.is_set))
    await asyncio.sleep(0.2)
    assert not task.done() and quitting.live_waiter(2)
    give_up.set()
    assert await asyncio.wait_for(task, timeout=5) is False
    assert not quitting.held and not quitting.live_waiter(2)
    # The one behind it is not held up by it.
    holder.release()
    behind = DeploymentLock(tmp_path, "prod")
    assert await asyncio.wait_for(behind.acquire(3), timeout=5) is True
    behind.release()


async def test_waiters_of_this_process_are_woken_not_left_to_their_poll(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # With the poll an hour long, only the wake-ups hand the lock over: on release, on a
    # waiter ahead leaving the queue, and on `wake` (a queued deploy was cancelled).
    monkeypatch.setattr(locks, "_POLL_SECONDS", 3600.0)
    holder = DeploymentLock(tmp_path, "prod")
    assert holder.try_acquire(1)
    order: list[int] = []
    cancelled = asyncio.Event()

    async def wait(ticket: int, give_up: Any = None) -> None:
        lock = DeploymentLock(tmp_path, "prod")
        if await lock.acquire(ticket, give_up=give_up):
            order.append(ticket)
            await asyncio.sleep(0.01)
            lock.release()
        else:
            order.append(-ticket)

    async def is_cancelled() -> bool:
        return cancelled.is_set()

    waiters = [
        asyncio.create_task(wait(2, is_cancelled)),
        asyncio.create_task(wait(3)),
        asyncio.create_task(wait(4)),
    ]
    await asyncio.sleep(0.1)
    assert order == []
    cancelled.set()
    locks.wake(tmp_path, "prod")  # 2 leaves the queue; 3 is next, the lock still held
    await asyncio.sleep(0.1)
    assert order == [-2]
    holder.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert order == [-2, 3, 4]
    assert locks._waiters == {}


async def test_a_hand_over_costs_one_look_not_one_per_waiter(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # 60 deploys queued in one process (a burst of pushes): each release and each
    # leaving wakes only the first in line, and a look stops at the first live waiter
    # ahead. Waking every waiter, each listing and flock-testing everyone ahead of it,
    # cost the event loop O(n^2) file operations per burst (bench/webhook_load phase 2).
    monkeypatch.setattr(locks, "_POLL_SECONDS", 3600.0)
    looks: list[int] = []
    flocks: list[Path] = []
    first_before = DeploymentLock._first_live_waiter_before
    alive = DeploymentLock._alive

    def counted_look(self: DeploymentLock, ticket: int) -> int | None:
        looks.append(ticket)
        return first_before(self, ticket)

    def counted_alive(path: Path) -> bool:
        flocks.append(path)
        return alive(path)

    monkeypatch.setattr(DeploymentLock, "_first_live_waiter_before", counted_look)
    monkeypatch.setattr(DeploymentLock, "_alive", staticmethod(counted_alive))
    holder = DeploymentLock(tmp_path, "prod")
    assert holder.try_acquire(1)
    order: list[int] = []

    async def wait(ticket: int) -> None:
        lock = DeploymentLock(tmp_path, "prod")
        assert await lock.acquire(ticket)
        order.append(ticket)
        await asyncio.sleep(0)
        lock.release()

    n = 60
    waiters = [asyncio.create_task(wait(t)) for t in range(2, n + 2)]
    await asyncio.sleep(0.2)
    queued_looks = len(looks)
    assert queued_looks == n  # each looked once on arrival
    holder.release()
    await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert order == list(range(2, n + 2))
    hand_over_looks = len(looks) - queued_looks
    assert hand_over_looks <= 3 * n, hand_over_looks
    assert len(flocks) <= 3 * n, len(flocks)
    assert locks._waiters == {}


async def test_a_waiter_cancelled_while_it_looks_leaves_the_lock_free(
    tmp_path: Path, monkeypatch: Any
) -> None:
    # The look runs on the lock thread and may take the lock after the waiter was
    # cancelled (a drain, a timeout): nobody would release it, and every later deploy
    # of the deployment would wait behind it for the life of the process.
    look = DeploymentLock._look

    def slow_look(self: DeploymentLock, ticket: int, who: bool) -> tuple[bool, int | None]:
        time.sleep(0.3)
        return look(self, ticket, who)

    monkeypatch.setattr(DeploymentLock, "_look", slow_look)
    cancelled = DeploymentLock(tmp_path, "prod")
    task = asyncio.create_task(cancelled.acquire(1))
    await asyncio.sleep(0.1)  # inside the look
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the cancel was lost")
    monkeypatch.setattr(DeploymentLock, "_look", look)
    nxt = DeploymentLock(tmp_path, "prod")
    assert await asyncio.wait_for(nxt.acquire(2), 5) is True
    assert not cancelled.held and not cancelled.live_waiter(1)
    nxt.release()
