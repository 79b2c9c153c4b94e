"""The deploy log stream: stored, fanned out, capped."""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemon.adapters.records import Records
from daemon.core import logs
from daemon.core.deploys import Options
from daemon.core.logs import DeployLog


def make(tmp_path: Path) -> tuple[Records, int]:
    records = Records(tmp_path / "db.sqlite")
    return records, records.create_deploy(
        deployment="p", trigger="cli", actor="a", ref="r", options=Options(), pid=1
    )


async def test_lines_are_stored_printed_and_streamed(tmp_path: Path) -> None:
    records, did = make(tmp_path)
    printed: list[str] = []
    log = DeployLog(records, did, printed.append)
    queue = log.subscribe()
    log.write("hello\n", "build")
    await asyncio.to_thread(log.write, "from a thread", "build")
    log.close()
    got = [await queue.get() for _ in range(3)]
    assert [g.line if g else g for g in got] == ["hello", "from a thread", None]
    assert [g.id for g in got if g] == [r.id for r in records.log_lines(did)]
    assert printed == ["hello", "from a thread"]
    assert [r.line for r in records.log_lines(did)] == ["hello", "from a thread"]


def test_floods_keep_head_and_tail(tmp_path: Path) -> None:
    records, did = make(tmp_path)
    log = DeployLog(records, did)
    total = logs.HEAD_LINES + logs.TAIL_LINES + 5000
    for i in range(total):
        log.write(f"line {i}", "pytest")
    log.write("x" * 100_000, "other")
    log.end_step("pytest")
    log.flush()  # lines are stored on the writer thread
    lines = [r.line for r in records.log_lines(did)]
    assert lines[0] == "line 0"
    assert lines[-1] == f"line {total - 1}"
    assert any("5000 lines of pytest output not shown" in ln for ln in lines)
    assert len(lines) == logs.HEAD_LINES + logs.TAIL_LINES + 2
    assert max(len(ln) for ln in lines) < logs.MAX_LINE_CHARS + 40


async def test_a_held_database_keeps_nobody_waiting_and_keeps_the_order(tmp_path: Path) -> None:
    """Another writer holds the records (an operator's `BEGIN IMMEDIATE`): writing a line
    returns at once and the sink sees it; a record change waits its turn, after the line."""
    import sqlite3
    import time

    records, did = make(tmp_path)
    printed: list[str] = []
    log = DeployLog(records, did, printed.append)
    other = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    t0 = time.monotonic()
    log.write("-----> failed: the build broke")
    assert time.monotonic() - t0 < 5  # not the 30 s busy timeout: nothing waited
    assert printed == ["-----> failed: the build broke"]
    change = asyncio.ensure_future(log.record(records.update, did, error="the build broke"))
    await asyncio.sleep(0.5)
    assert not change.done()
    assert records.get(did).error is None  # type: ignore[union-attr]  # reads are answered
    other.execute("ROLLBACK")
    await change
    # A later record call sees the line stored: one writer, in order.
    seen = await log.record(records.log_lines, did)
    assert [r.line for r in seen] == ["-----> failed: the build broke"]
    assert records.get(did).error == "the build broke"  # type: ignore[union-attr]
    log.close()
    other.close()


async def test_a_follower_that_goes_away_is_fed_no_more(tmp_path: Path) -> None:
    from daemon.core import usecases

    records, deploy_id = make(tmp_path)
    log = DeployLog(records, deploy_id)
    log.write("before", "build")
    lines = usecases.follow_log(records, deploy_id, live=log)
    assert (await anext(lines)).line == "before"
    log.write("while followed", "build")
    assert (await anext(lines)).line == "while followed"
    assert len(log._subscribers) == 1
    await lines.aclose()  # the browser closed its page
    assert log._subscribers == []
    log.write("after", "build")  # queued for nobody
    log.close()


async def test_every_deploy_shares_one_writer_and_its_order_holds(tmp_path: Path) -> None:
    """30 deploys' logs start no thread each (a thread start waits for the new thread,
    on the event loop); lines held up behind a busy database are stored together, and
    still on the right side of a record change written between them."""
    import sqlite3
    import threading

    records, did = make(tmp_path)
    others = [
        records.create_deploy(
            deployment="p", trigger="cli", actor="a", ref="r", options=Options(), pid=1
        )
        for _ in range(30)
    ]
    before = {t.ident for t in threading.enumerate()}
    many = [DeployLog(records, i) for i in others]
    for n, dlog in enumerate(many):
        dlog.write(f"-----> deploy #{others[n]}")
    await asyncio.to_thread(many[-1].flush)
    started = [t.name for t in threading.enumerate() if t.ident not in before]
    # At most the one writer (if this test is the process's first to write a line);
    # asyncio's own pool thread, started by the flush above, is not the logs'.
    assert len([n for n in started if not n.startswith("asyncio")]) <= 1, started
    assert all(len(records.log_lines(i)) == 1 for i in others)

    log = DeployLog(records, did)
    other = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    for n in range(100):
        log.write(f"before {n}", "build")
    seen = asyncio.ensure_future(log.record(records.log_lines, did))
    await asyncio.sleep(0)  # submitted: it runs after the 100 lines, before the rest
    for n in range(50):
        log.write(f"after {n}", "build")
    other.execute("ROLLBACK")
    assert [r.line for r in await seen] == [f"before {n}" for n in range(100)]
    await asyncio.to_thread(log.flush)
    assert [r.line for r in records.log_lines(did)] == [f"before {n}" for n in range(100)] + [
        f"after {n}" for n in range(50)
    ]
    for dlog in [*many, log]:
        dlog.close()
    other.close()
