"""SQLite records: schema versions, WAL, compare-and-set transitions, steps and log."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from daemon.adapters.migrations import MIGRATIONS, SCHEMA_VERSION
from daemon.adapters.records import Records
from daemon.core import deploys
from daemon.core.deploys import Options, TargetState, TransitionError


@pytest.fixture
def records(tmp_path: Path) -> Records:
    return Records(tmp_path / "deployd.db")


def new(records: Records) -> int:
    return records.create_deploy(
        deployment="prod",
        trigger="cli",
        actor="ada@host",
        ref="refs/heads/main",
        options=Options(force=True),
        pid=1,
    )


def test_schema_is_versioned_and_wal(records: Records, tmp_path: Path) -> None:
    assert records.schema_version() == SCHEMA_VERSION
    mode = sqlite3.connect(tmp_path / "deployd.db").execute("PRAGMA journal_mode").fetchone()
    assert mode[0] == "wal"
    # Opening again applies nothing twice.
    again = Records(tmp_path / "deployd.db")
    assert again.schema_version() == SCHEMA_VERSION
    rows = again.db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()
    assert rows[0] == SCHEMA_VERSION


def test_a_deploy_records_its_kind(records: Records) -> None:
    assert records.get(new(records)).kind == deploys.IMAGE  # type: ignore[union-attr]
    dags = records.create_deploy(
        deployment="prod", trigger="ssh", actor="ada", ref="refs/heads/main",
        options=Options(), pid=1, kind=deploys.DAGS,
    )  # fmt: skip
    assert records.get(dags).kind == deploys.DAGS  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="kind is one of image, dags, not 'plugins'"):
        records.create_deploy(
            deployment="prod", trigger="ssh", actor="ada", ref="refs/heads/main",
            options=Options(), pid=1, kind="plugins",
        )  # fmt: skip


def test_deploys_recorded_before_kinds_were_image_deploys(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL)")
    for version, migration in enumerate(MIGRATIONS[:7], start=1):
        migration(db)
        db.execute("INSERT INTO schema_migrations VALUES (?, 0)", [version])
    db.execute(
        "INSERT INTO deploys (deployment, state, trigger, action, actor, ref, options, "
        "created_at) VALUES ('prod', 'succeeded', 'ssh', 'deploy', 'ada', 'main', '{}', 1)"
    )
    db.conn.commit()
    db.conn.close()
    records = Records(path)
    assert records.schema_version() == SCHEMA_VERSION
    old = records.get(1)
    assert old is not None and old.kind == deploys.IMAGE and old.state == "succeeded"


def test_deploy_lifecycle(records: Records) -> None:
    did = new(records)
    rec = records.get(did)
    assert rec is not None and rec.state == "queued" and rec.options.force is True
    records.plan_steps(did, [("checkout", ""), ("pytest", "skipped: not requested")])
    assert records.transition(did, deploys.QUEUED, deploys.RUNNING)
    records.step_started(did, "checkout")
    assert records.running_steps(did) == ["checkout"]
    assert records.get(did).step == "checkout"  # type: ignore[union-attr]
    records.step_finished(did, "checkout", "succeeded", "abc (3 files)")
    assert records.transition(did, deploys.RUNNING, deploys.SUCCEEDED, step=None)
    rec = records.get(did)
    assert rec is not None and rec.state == "succeeded" and rec.finished_at
    assert [(s.name, s.state) for s in rec.steps] == [
        ("checkout", "succeeded"),
        ("pytest", "skipped"),
    ]


def test_transition_is_compare_and_set(records: Records) -> None:
    did = new(records)
    assert records.transition(did, deploys.QUEUED, deploys.RUNNING)
    # A second writer that still believes the deploy is queued loses.
    assert not records.transition(did, deploys.QUEUED, deploys.CANCELLED)
    assert records.get(did).state == "running"  # type: ignore[union-attr]


def test_transition_refuses_illegal_moves(records: Records) -> None:
    did = new(records)
    with pytest.raises(TransitionError):
        records.transition(did, deploys.QUEUED, deploys.SUCCEEDED)


def test_ids_grow_and_log_is_ordered(records: Records) -> None:
    a, b = new(records), new(records)
    assert b > a
    records.append_log(a, "build", ["one", "two"])
    records.append_log(a, None, ["three"])
    lines = records.log_lines(a)
    assert [r.line for r in lines] == ["one", "two", "three"]
    assert [r.line for r in records.log_lines(a, after=lines[0].id)] == ["two", "three"]
    assert records.log_lines(b) == []


def test_list_and_in_flight(records: Records) -> None:
    a, b = new(records), new(records)
    records.transition(a, deploys.QUEUED, deploys.RUNNING)
    records.transition(a, deploys.RUNNING, deploys.FAILED, error="boom")
    assert [r.id for r in records.in_flight("prod")] == [b]
    assert [r.id for r in records.list_deploys("prod")] == [b, a]
    assert records.list_deploys("other") == []


def test_one_records_object_is_safe_across_threads(tmp_path: Path) -> None:
    # The daemon shares one Records between the event loop and worker threads:
    # reads in threads must not interleave with a transaction on the loop's thread.
    import threading

    from daemon.core.deploys import Options

    records = Records(tmp_path / "d.db")
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                records.in_flight("prod")
                records.list_deploys("prod", limit=5)
                records.running_steps(1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(300):
            records.record_delivery(
                "1",
                f"d-{i}",
                "push",
                202,
                {},
                [
                    {
                        "deployment": "prod",
                        "trigger": "webhook",
                        "actor": "a",
                        "ref": "r",
                        "options": Options(),
                        "pid": 1,
                    }
                ],
            )
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert len(records.list_deploys("prod", limit=1000)) == 300


def test_closing_while_threads_read_ends_them_with_an_error_not_a_crash(
    tmp_path: Path,
) -> None:
    # A test's teardown (or a shutdown) closes the records while a worker thread may be
    # mid-read: CPython's sqlite3 crashes the interpreter if a connection is closed under
    # a running statement. close() waits for it; a later read raises ProgrammingError.
    import threading

    records = Records(tmp_path / "d.db")
    for i in range(50):
        records.create_deploy(
            deployment="prod", trigger="push", actor="a", ref=f"r{i}", options=Options(), pid=1
        )
    ended: list[BaseException] = []
    started = threading.Barrier(5)

    def reader() -> None:
        started.wait()
        try:
            while True:
                records.list_deploys("prod", limit=50)
                records.get(1)
        except BaseException as exc:
            ended.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    started.wait()
    records.close()
    for t in threads:
        t.join(timeout=10)
    assert len(ended) == 4
    assert all(isinstance(e, sqlite3.ProgrammingError) for e in ended), ended


def test_each_state_change_adds_one_outbox_event_in_its_transaction(records: Records) -> None:
    first, second = new(records), new(records)
    assert records.events_after(0) == []  # queued is no event
    assert records.transition(first, deploys.QUEUED, deploys.RUNNING)
    assert not records.transition(first, deploys.QUEUED, deploys.RUNNING)  # lost the race
    assert records.transition(first, deploys.RUNNING, deploys.FAILED, error="boom")
    assert records.transition(second, deploys.QUEUED, deploys.CANCELLED)
    events = records.events_after(0)
    assert [(e.deploy_id, e.deployment, e.event) for e in events] == [
        (first, "prod", "started"),
        (first, "prod", "failed"),
        (second, "prod", "cancelled"),
    ]
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert records.last_event_id() == events[-1].id
    assert records.events_after(events[0].id, limit=1) == [events[1]]


def test_a_failed_change_leaves_no_event(records: Records) -> None:
    did = new(records)
    with pytest.raises(sqlite3.Error):
        # A column that does not exist: the UPDATE fails, and nothing is announced.
        records.transition(did, deploys.QUEUED, deploys.RUNNING, no_such_column=1)
    assert records.events_after(0) == []
    assert records.state(did) == deploys.QUEUED


def test_superseded_deploys_are_announced_with_the_delivery_that_superseded_them(
    records: Records,
) -> None:
    wanted = {
        "deployment": "prod",
        "trigger": "webhook",
        "actor": "github",
        "ref": "refs/heads/main",
        "options": Options(),
        "pid": 1,
    }
    _, _, _, [older] = records.record_delivery("h", "d1", "push", 202, {}, [wanted])
    _, _, _, [newer] = records.record_delivery("h", "d2", "push", 202, {}, [wanted])
    assert records.state(older) == deploys.SUPERSEDED
    assert [(e.deploy_id, e.event) for e in records.events_after(0)] == [(older, "superseded")]
    assert records.state(newer) == deploys.QUEUED


def test_notification_targets_start_at_the_end_and_are_held_by_one_process(
    records: Records,
) -> None:
    did = new(records)
    records.transition(did, deploys.QUEUED, deploys.RUNNING)
    records.add_targets(["slack"])
    records.transition(did, deploys.RUNNING, deploys.SUCCEEDED)
    records.add_targets(["slack", "late"])  # known targets keep their place
    places = {t.target: t.cursor for t in records.targets()}
    started, succeeded = (e.id for e in records.events_after(0))
    assert places == {"late": succeeded, "slack": started}
    held = records.claim_target("slack", "serve-1", 30)
    assert held is not None and held.cursor == started
    assert records.claim_target("slack", "cli-2", 30) is None
    assert records.claim_target("slack", "serve-1", 30) is not None  # renewing
    assert not records.target_done("slack", "cli-2", succeeded)  # not the holder
    records.target_failed("slack", "serve-1", 1, 123.0, "HTTP 500")
    assert records.targets()[1].attempts == 1
    assert records.target_done("slack", "serve-1", succeeded)
    assert not records.target_done("slack", "serve-1", started)  # never backwards
    assert records.targets()[1] == TargetState("slack", succeeded)
    records.release_target("slack", "serve-1")
    assert records.claim_target("slack", "cli-2", 30) is not None
    assert records.claim_target("slack", "serve-1", -1) is None
    # An expired lease can be taken over.
    records.claim_target("late", "cli-2", -1)
    assert records.claim_target("late", "serve-1", 30) is not None


def test_reads_are_answered_while_another_writer_holds_the_database(tmp_path: Path) -> None:
    """An operator's `BEGIN IMMEDIATE`: our writes wait for it, our reads do not."""
    import threading
    import time

    records = Records(tmp_path / "deployd.db")
    did = new(records)
    other = sqlite3.connect(tmp_path / "deployd.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    writer = threading.Thread(target=records.update, args=(did,), kwargs={"step": "build"})
    writer.start()  # waits for the other writer, holding our write lock
    time.sleep(0.2)
    t0 = time.monotonic()
    assert records.state(did) == deploys.QUEUED
    assert [d.id for d in records.list_deploys("prod")] == [did]
    assert time.monotonic() - t0 < 1
    other.execute("ROLLBACK")
    writer.join(10)
    rec = records.get(did)
    assert rec is not None and rec.step == "build"
    other.close()


def test_a_full_disk_gives_up_the_reserve_then_says_the_disk_is_full(
    records: Records, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from daemon.errors import DiskFull

    did = new(records)
    assert records.reserve.path.stat().st_size == records.reserve.size
    real = records.db.execute

    def full_once(sql: str, *args: object) -> sqlite3.Cursor:
        monkeypatch.setattr(records.db, "execute", real)
        raise sqlite3.OperationalError("database or disk is full")

    # Something new (a deploy, a delivery) is refused on a full disk; the reserve stays.
    monkeypatch.setattr(records.db, "execute", full_once)
    with pytest.raises(DiskFull) as err:
        new(records)
    assert "is full (No space left on device" in err.value.message
    assert "\n" not in err.value.message
    assert records.reserve.path.exists()
    # The outcome of a deploy under way: the reserve is given up and the write goes through.
    monkeypatch.setattr(records.db, "execute", full_once)
    records.update(did, step="checkout")
    assert not records.reserve.path.exists()
    assert records.get(did).step == "checkout"  # type: ignore[union-attr]
    # Really full (the database may not grow): one clear error, and a transaction that
    # failed half-way left nothing behind.
    pages = records.db.execute("PRAGMA page_count").fetchone()[0]
    records.db.execute(f"PRAGMA max_page_count = {pages}")
    wanted = [
        dict(deployment="prod", trigger="webhook", actor="gh", ref="r", options=Options(), pid=1)
    ]
    with pytest.raises(DiskFull):
        for i in range(200):
            records.record_delivery("1", f"d{i}", "push", 202, {"x": "y" * 2000}, wanted)
    delivered = records.db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    made = records.db.execute("SELECT COUNT(*) FROM deploys WHERE trigger = 'webhook'")
    assert delivered == made.fetchone()[0]  # each delivery with its deploy, or neither
    with pytest.raises(DiskFull):
        records.append_log(did, None, ["z" * 1500] * 20)
