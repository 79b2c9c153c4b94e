"""The daemon's threads start before load, not on the event loop (daemon/threads.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from daemon import threads


def test_prestart_starts_every_thread_of_a_pool_and_submits_then_start_none() -> None:
    pool = threads.pool(4, "test-prestart")

    def of_pool() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("test-prestart"))

    assert of_pool() == []
    threads.prestart(pool, 4)
    assert of_pool() == [f"test-prestart_{i}" for i in range(4)]
    # Four at once, as a burst of webhook deliveries would: no thread is started.
    gate = threading.Barrier(5)
    started = [pool.submit(gate.wait, 5) for _ in range(4)]
    assert of_pool() == [f"test-prestart_{i}" for i in range(4)]
    gate.wait(5)
    assert all(f.result() is not None for f in started)
    pool.shutdown()


def test_prestart_all_covers_the_pools_made_by_pool() -> None:
    a, b = threads.pool(2, "test-all-a"), threads.pool(1, "test-all-b")
    threads.prestart_all()
    names = {t.name for t in threading.enumerate()}
    assert {"test-all-a_0", "test-all-a_1", "test-all-b_0"} <= names
    a.shutdown()
    b.shutdown()
    threads.prestart_all()  # a pool shut down meanwhile is passed over


async def test_start_is_not_waited_for_on_the_event_loop() -> None:
    # Thread.start waits until the new thread runs: the starter thread does that wait.
    starters: list[str] = []
    ran = threading.Event()

    class Recorded(threading.Thread):
        def start(self) -> None:
            starters.append(threading.current_thread().name)
            super().start()

    threads.start(Recorded(target=ran.set, daemon=True), lambda exc: None)
    assert await asyncio.to_thread(ran.wait, 5)
    assert starters == ["deployd-starter_0"]


async def test_a_thread_that_cannot_start_fails_the_call_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Out of threads (a cgroup's pids limit, TasksMax): `start` says so, and the Engine
    # call waiting for the thread fails at once instead of waiting for ever.
    from daemon.adapters import background

    class Unstartable(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    failed: list[BaseException] = []
    told = threading.Event()

    def record(exc: BaseException) -> None:
        failed.append(exc)
        told.set()

    threads.start(Unstartable(target=lambda: None), record)
    assert await asyncio.to_thread(told.wait, 5)
    assert [str(e) for e in failed] == ["can't start new thread"]

    start = threads.start
    monkeypatch.setattr(
        threads, "start", lambda thread, failed: start(Unstartable(target=thread.run), failed)
    )
    with pytest.raises(RuntimeError, match="can't start new thread"):
        await asyncio.wait_for(background.run_stoppable(lambda: 1, threading.Event()), 5)
