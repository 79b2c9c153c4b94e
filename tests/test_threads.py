"""The daemon's threads start before load, not on the event loop (daemon/threads.py)."""

from __future__ import annotations

import asyncio
import threading

from daemon import threads


def test_prestart_starts_every_thread_of_a_pool_and_submits_then_start_none() -> None:
    pool = threads.pool(4, "test-prestart")
    before = threading.active_count()
    threads.prestart(pool, 4)
    assert threading.active_count() == before + 4
    # Four at once, as a burst of webhook deliveries would: no thread is started.
    gate = threading.Barrier(5)
    started = [pool.submit(gate.wait, 5) for _ in range(4)]
    assert threading.active_count() == before + 4
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

    threads.start(Recorded(target=ran.set, daemon=True))
    assert await asyncio.to_thread(ran.wait, 5)
    assert starters == ["deployd-starter_0"]
