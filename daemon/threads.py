"""`deployd serve`'s threads start with it, not on the event loop once load comes.

Starting a thread waits until the new thread runs (`threading.Thread.start`), and
a thread pool starts its threads on demand, inside the `submit` that needs one:
on the event loop, while deploys run on a busy 2-core machine, that wait held
the loop for 57 to 95 ms (bench/endurance). So the daemon starts its pools' threads
before it listens (`prestart_all`: every pool made by `pool`), and a thread
made for one call (adapters/background.py) is started by a thread kept for that
(`start`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# Every pool made by `pool` that is still in use, with its size.
_POOLS: weakref.WeakKeyDictionary[ThreadPoolExecutor, int] = weakref.WeakKeyDictionary()


def pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads `prestart_all` starts."""
    executor = ThreadPoolExecutor(workers, thread_name_prefix=name)
    _POOLS[executor] = workers
    return executor


_STARTER = pool(1, "deployd-starter")


def start(thread: threading.Thread, failed: Callable[[BaseException], None]) -> None:
    """Start `thread` without waiting until it runs (the starter thread waits);
    `failed(exc)` is called on the starter if it cannot start (out of threads)."""

    def run() -> None:
        try:
            thread.start()
        except BaseException as exc:  # RuntimeError: can't start new thread
            failed(exc)

    _STARTER.submit(run)


def prestart(pool: ThreadPoolExecutor, workers: int) -> None:
    """Start `workers` threads of `pool` now (blocking; at start-up).

    Each of `workers` tasks waits for all the others, so none of the pool's threads
    is idle to take the next one and the pool starts a thread per task. `workers`
    must not exceed the pool's size (the wait gives up after 10 s if it does).
    """
    gate = threading.Barrier(workers + 1)

    def wait() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            gate.wait(10)

    for _ in range(workers):
        pool.submit(wait)
    wait()


def prestart_all() -> None:
    """Start the threads of every pool made by `pool` (at start-up, before listening)."""
    for executor, workers in list(_POOLS.items()):
        with contextlib.suppress(RuntimeError):  # shut down meanwhile
            prestart(executor, workers)
