"""Deploy records in SQLite through sqlite-utils: schema, migrations, queries.

WAL mode, so readers (the CLI, the HTTP API) never block the writer. Every
state change is a compare-and-set (`UPDATE ... WHERE state = ?`) written
before the action it announces, so after a crash the records tell what was in
flight and in which step.

Reads go through a connection of their own: in WAL mode a read never waits
for a writer, so while another process holds the database (an operator's
`sqlite3` session in `BEGIN IMMEDIATE`) and a write of ours waits for it,
reads (the event loop's) are still answered at once.

A write that finds the disk full gives up the room kept for that
(adapters/reserve.py) and is tried once more; then it raises DiskFull.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import sqlite_utils

from daemon.adapters.migrations import MIGRATIONS
from daemon.adapters.reserve import Reserve, disk_full
from daemon.core import deploys
from daemon.core.deploys import Deploy, DeployEvent, LogLine, Options, StepRecord, TargetState
from daemon.errors import DiskFull

F = TypeVar("F", bound=Callable[..., Any])


def now() -> float:
    """Wall-clock time as stored in records (Unix seconds)."""
    return time.time()


MAX_ARTIFACT = 5 * 1024 * 1024


def private(state_dir: Path) -> None:
    """Create `state_dir` readable by its owner only (and make an existing one so)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if state_dir.stat().st_uid == os.getuid():
        state_dir.chmod(0o700)


def _writes(method: F) -> F:
    """A write that finds the disk full: give up the reserve and try once more, else DiskFull.

    Only the outermost write does so: one inside a caller's transaction passes the
    error on (SQLite may have rolled the whole transaction back).
    """
    return _on_full_disk(method, use_reserve=True)


def _refused_when_full(method: F) -> F:
    """A write that starts something new: on a full disk, DiskFull (the reserve is kept
    for the outcomes of what is under way)."""
    return _on_full_disk(method, use_reserve=False)


def _on_full_disk(method: F, *, use_reserve: bool) -> F:
    @functools.wraps(method)
    def wrapper(self: Records, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(self._nesting, "depth", 0)
        self._nesting.depth = depth + 1
        try:
            try:
                return method(self, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                if depth or not disk_full(exc):
                    raise
                if not (use_reserve and self.reserve.release()):
                    raise DiskFull(self.path.parent, ", writing deployd.db") from exc
            try:
                return method(self, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                if disk_full(exc):
                    raise DiskFull(self.path.parent, ", writing deployd.db") from exc
                raise
        finally:
            self._nesting.depth = depth

    return cast(F, wrapper)


class Records:
    """The deploy records of one state_dir. Safe to share between threads."""

    def __init__(self, path: Path) -> None:
        private(path.parent)
        self.path = path
        self.reserve = Reserve(path.with_name(path.name + ".reserve"))
        self._nesting = threading.local()
        conn = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        self.db.execute("PRAGMA busy_timeout = 30000")
        # Two processes opening a new database at once (two CLI deploys) would race
        # to switch it to WAL, which SQLite may refuse at once rather than wait for;
        # setting up the database is serialised on a lock file beside it.
        with open(path.with_name(path.name + ".init-lock"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            self.db.enable_wal()
            self.migrate()
        for name in (path.name, path.name + "-wal", path.name + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (path.parent / name).chmod(0o600)  # made before this version, or under 022
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("PRAGMA foreign_keys = ON")
        self._reader = sqlite3.connect(
            str(path), timeout=30, check_same_thread=False, isolation_level=None
        )
        self._reader.execute("PRAGMA query_only = ON")
        self._read_lock = threading.RLock()
        self.reserve.keep()

    def _rows(
        self, sql: str, args: list[Any] | tuple[Any, ...] = (), *, writer: bool = False
    ) -> list[dict[str, Any]]:
        """Run a read and fetch every row.

        On the read connection (under its own lock), unless `writer`: a read
        inside one of our write transactions must see that transaction.
        """
        conn, lock = (self.db.conn, self._lock) if writer else (self._reader, self._read_lock)
        with lock:
            cur = conn.execute(sql, list(args))
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def read(self, sql: str, args: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """A read-only query of the records' own (for aggregates: daemon/metrics.py)."""
        return self._rows(sql, args)

    def write(self, sql: str, args: list[Any] | tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One write statement of the records' own, in a transaction of its own, with its
        RETURNING rows (for tables kept by another module: adapters/freezes.py)."""
        with self._atomic():
            return [tuple(row) for row in self.db.conn.execute(sql, list(args)).fetchall()]

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read transaction: every read inside sees the records as of the first one."""
        with self._read_lock:
            self._reader.execute("BEGIN")
            try:
                yield
            finally:
                self._reader.execute("COMMIT")

    def _one(
        self, sql: str, args: list[Any] | tuple[Any, ...] = (), *, writer: bool = False
    ) -> tuple[Any, ...] | None:
        """Run a read and fetch its first row (on the read connection unless `writer`)."""
        conn, lock = (self.db.conn, self._lock) if writer else (self._reader, self._read_lock)
        with lock:
            row = conn.execute(sql, list(args)).fetchone()
            return tuple(row) if row is not None else None

    def close(self) -> None:
        """Close the connections, once the read or write in flight on each has ended.

        Closing a connection while another thread's statement runs on it crashes the
        interpreter (CPython's sqlite3 does not guard it); a call after this raises
        sqlite3.ProgrammingError instead.
        """
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self.db.conn.close()

    def migrate(self) -> int:
        """Bring the schema up to SCHEMA_VERSION, one versioned migration at a time."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations "
                    "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
                )
                row = self._one("SELECT MAX(version) FROM schema_migrations", writer=True)
                assert row is not None
                current = row[0] or 0
                for version in range(current + 1, len(MIGRATIONS) + 1):
                    MIGRATIONS[version - 1](self.db)
                    self.db.execute("INSERT INTO schema_migrations VALUES (?, ?)", [version, now()])
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return len(MIGRATIONS)

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already (a full disk may)."""
        if self.db.conn.in_transaction:
            self.db.execute("ROLLBACK")

    def schema_version(self) -> int:
        """The newest migration applied."""
        row = self._one("SELECT MAX(version) FROM schema_migrations")
        assert row is not None
        return int(row[0] or 0)

    # -- deploys -------------------------------------------------------------

    @_refused_when_full
    def create_deploy(
        self,
        *,
        deployment: str,
        trigger: str,
        actor: str,
        ref: str,
        options: Options,
        pid: int,
        action: str = "deploy",
        commit: str | None = None,
        description: str = "",
        rollback_of: int | None = None,
        promoted_from: str | None = None,
        promoted_from_id: int | None = None,
        kind: str = deploys.IMAGE,
    ) -> int:
        """Record a new deploy in state `queued` and return its id.

        Refused (DiskFull) without room to keep the reserve: what is left is for
        recording the outcomes of the deploys under way.
        """
        if kind not in deploys.KINDS:
            raise ValueError(f"a deploy's kind is one of {', '.join(deploys.KINDS)}, not {kind!r}")
        if not self.reserve.keep():
            raise DiskFull(self.path.parent, ", too little left to record a deploy")
        row = {
            "deployment": deployment,
            "state": deploys.QUEUED,
            "trigger": trigger,
            "action": action,
            "actor": actor,
            "ref": ref,
            "commit_sha": commit,
            "description": description or options.description,
            "options": json.dumps(
                {
                    "force": options.force,
                    "pytest": options.pytest,
                    "allow_dirty": options.allow_dirty,
                    "override_freeze": options.override_freeze,
                    "image": options.image,
                }
            ),
            "rollback_of": rollback_of,
            "promoted_from": promoted_from,
            "promoted_from_id": promoted_from_id,
            "kind": kind,
            "pid": pid,
            "created_at": now(),
        }
        cols = ", ".join(f"[{k}]" for k in row)
        with self._lock:
            # Plain SQL, so that it can be part of a caller's transaction.
            cur = self.db.execute(
                f"INSERT INTO deploys ({cols}) VALUES ({', '.join('?' * len(row))})",  # noqa: S608
                list(row.values()),
            )
            return int(cur.lastrowid or 0)

    # -- webhook deliveries --------------------------------------------------

    @_refused_when_full
    def record_delivery(
        self,
        hook_id: str,
        delivery_id: str,
        event: str,
        status: int,
        answer: dict[str, Any],
        wanted: list[dict[str, Any]],
    ) -> tuple[bool, int, dict[str, Any], list[int]]:
        """Record a delivery once; on its first arrival create the deploys it asks for.

        `wanted` holds create_deploy's keyword arguments for each deploy. Returns
        (new, status, answer, deploy ids); for a redelivery, new is False and the
        rest is what the first arrival recorded. The delivery and its deploys are
        written in one transaction (a delivery without deploys in one statement).
        Deliveries coalesce: a new deploy supersedes the deploys of its deployment
        and trigger still queued (see supersede_queued).
        """
        insert = (
            "INSERT INTO deliveries (hook_id, delivery_id, event, received_at, status, answer, "
            "deploy_ids) VALUES (?, ?, ?, ?, ?, ?, '[]') ON CONFLICT DO NOTHING"
        )
        args = [hook_id, delivery_id, event, now(), status, json.dumps(answer)]
        with self._lock:
            if not wanted:
                if self.db.execute(insert, args).rowcount == 1:
                    return True, status, answer, []
                return self._delivery(hook_id, delivery_id)
            self.db.execute("BEGIN IMMEDIATE")
            try:
                if self.db.execute(insert, args).rowcount == 0:
                    self.db.execute("ROLLBACK")
                    return self._delivery(hook_id, delivery_id)
                ids = [self.create_deploy(**kwargs) for kwargs in wanted]
                for kwargs, deploy_id in zip(wanted, ids, strict=True):
                    self.supersede_queued(kwargs["deployment"], kwargs["trigger"], deploy_id)
                self.db.execute(
                    "UPDATE deliveries SET deploy_ids = ? WHERE hook_id = ? AND delivery_id = ?",
                    [json.dumps(ids), hook_id, delivery_id],
                )
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return True, status, answer, ids

    def _delivery(
        self, hook_id: str, delivery_id: str
    ) -> tuple[bool, int, dict[str, Any], list[int]]:
        row = self._one(
            "SELECT status, answer, deploy_ids FROM deliveries "
            "WHERE hook_id = ? AND delivery_id = ?",
            [hook_id, delivery_id],
        )
        assert row is not None
        return False, int(row[0]), json.loads(row[1]), json.loads(row[2])

    @_writes
    def supersede_queued(self, deployment: str, trigger: str, newer: int) -> int:
        """Mark `superseded` the deploys of `deployment` by `trigger` queued before `newer`."""
        with self._atomic():
            ids = [
                int(row[0])
                for row in self.db.conn.execute(
                    "UPDATE deploys SET state = ?, error = ?, finished_at = ? "
                    "WHERE deployment = ? AND trigger = ? AND state = ? AND id < ? RETURNING id",
                    [
                        deploys.SUPERSEDED,
                        f"superseded by deploy #{newer}, a newer push waiting for its turn",
                        now(),
                        deployment,
                        trigger,
                        deploys.QUEUED,
                        newer,
                    ],
                ).fetchall()
            ]
            self._announce(sorted(ids), deploys.SUPERSEDED)
            return len(ids)

    def state(self, deploy_id: int) -> str | None:
        """The state of one deploy (cheap: for polling)."""
        row = self._one("SELECT state FROM deploys WHERE id = ?", [deploy_id])
        return str(row[0]) if row else None

    @_writes
    def request_cancel(self, deploy_id: int, by: str) -> str | None:
        """Ask for deploy `deploy_id` to be cancelled, on behalf of `by`.

        Compare-and-set on a state that is not final: a queued deploy is recorded
        `cancelled` at once (whoever waits for the lock sees it leave the queue); a
        running one gets `cancelled_by`, which the process running it polls
        (cancel_requested) and acts on. Returns the state it was asked in (queued or
        running), or None if it had ended or a cancel was already asked.
        """
        with self._atomic():
            cur = self.db.execute(
                "UPDATE deploys SET state = ?, cancelled_by = ?, error = ?, finished_at = ? "
                "WHERE id = ? AND state = ?",
                [
                    deploys.CANCELLED,
                    by,
                    f"cancelled by {by} while queued",
                    now(),
                    deploy_id,
                    deploys.QUEUED,
                ],
            )
            if cur.rowcount == 1:
                self._announce([deploy_id], deploys.CANCELLED)
                return deploys.QUEUED
            cur = self.db.execute(
                "UPDATE deploys SET cancelled_by = ? "
                "WHERE id = ? AND state = ? AND cancelled_by IS NULL",
                [by, deploy_id, deploys.RUNNING],
            )
            return deploys.RUNNING if cur.rowcount == 1 else None

    def cancel_requested(self, deploy_id: int) -> str | None:
        """Who asked for running deploy `deploy_id` to be cancelled, if anyone (cheap: by id,
        on the read connection; the running process polls it)."""
        row = self._one(
            "SELECT cancelled_by FROM deploys WHERE id = ? AND state = ?",
            [deploy_id, deploys.RUNNING],
        )
        return str(row[0]) if row and row[0] else None

    def newer_queued(self, deployment: str, deploy_id: int, trigger: str) -> int | None:
        """The newest deploy of `deployment` by `trigger` queued after `deploy_id`, if any."""
        row = self._one(
            "SELECT MAX(id) FROM deploys WHERE deployment = ? AND trigger = ? AND state = ? "
            "AND id > ?",
            [deployment, trigger, deploys.QUEUED, deploy_id],
        )
        return int(row[0]) if row and row[0] else None

    @_writes
    def transition(self, deploy_id: int, current: str, new: str, **fields: Any) -> bool:
        """Move a deploy from `current` to `new` (compare-and-set); False if it was not there."""
        deploys.check_transition(current, new)
        values = dict(fields)
        values["state"] = new
        if new == deploys.RUNNING:
            values.setdefault("started_at", now())
        if new in deploys.FINAL_STATES:
            values.setdefault("finished_at", now())
        cols = ", ".join(f"[{k}] = ?" for k in values)
        with self._atomic():
            cur = self.db.execute(
                f"UPDATE deploys SET {cols} WHERE id = ? AND state = ?",  # noqa: S608
                [*values.values(), deploy_id, current],
            )
            if cur.rowcount != 1:
                return False
            self._announce([deploy_id], new)
            return True

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        """One transaction (a savepoint inside a caller's), holding the lock."""
        with self._lock:
            if self.db.conn.in_transaction:
                self.db.execute("SAVEPOINT atomic")
                try:
                    yield
                except BaseException:
                    if self.db.conn.in_transaction:  # else SQLite rolled it all back
                        self.db.execute("ROLLBACK TO atomic")
                        self.db.execute("RELEASE atomic")
                    raise
                self.db.execute("RELEASE atomic")
                return
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._rollback()
                raise
            self.db.execute("COMMIT")

    def _announce(self, deploy_ids: list[int], state: str) -> None:
        """Add to the outbox that these deploys reached `state` (in the change's transaction)."""
        event = deploys.event_of(state)
        for deploy_id in deploy_ids:
            self.db.execute(
                "INSERT INTO events (deploy_id, deployment, event, at) "
                "SELECT id, deployment, ?, ? FROM deploys WHERE id = ?",
                [event, now(), deploy_id],
            )

    @_writes
    def update(self, deploy_id: int, **fields: Any) -> None:
        """Set facts on a deploy (commit, image, tag, digest, current step)."""
        with self._lock:
            self.db.table("deploys").update(deploy_id, fields)

    def get(self, deploy_id: int) -> Deploy | None:
        """One deploy with its steps, in the shape the CLI and the API print."""
        rows = self._rows("SELECT * FROM deploys WHERE id = ?", [deploy_id])
        return self._shape(rows[0]) if rows else None

    def list_deploys(
        self, deployment: str | list[str] | None = None, limit: int = 50
    ) -> list[Deploy]:
        """The newest deploys: of all deployments, of one, or of several."""
        names = [deployment] if isinstance(deployment, str) else deployment
        where, args = ("", [])
        if names is not None:
            where = f"WHERE deployment IN ({', '.join('?' * len(names))})" if names else "WHERE 0"
            args = list(names)
        rows = self._rows(
            f"SELECT * FROM deploys {where} ORDER BY id DESC LIMIT ?",  # noqa: S608
            [*args, limit],
        )
        return [self._shape(r) for r in rows]

    def find_deploys(
        self,
        deployment: str,
        states: tuple[str, ...] = (),
        trigger: str | None = None,
        *,
        limit: int = 50,
        offset: int = 0,
        count: bool = False,
    ) -> tuple[list[Deploy], int]:
        """A page of `deployment`'s deploys (newest first) in `states` (() = any) and from
        `trigger` (None = any), and (if `count`) how many match in all, else -1 (the
        dashboard's history, and its overview's last failure)."""
        where, args = "deployment = ?", [deployment]
        if states:
            where += f" AND state IN ({', '.join('?' * len(states))})"
            args += list(states)
        if trigger is not None:
            where += " AND trigger = ?"
            args.append(trigger)
        rows = self._rows(
            f"SELECT * FROM deploys WHERE {where} ORDER BY id DESC LIMIT ? OFFSET ?",  # noqa: S608
            [*args, limit, offset],
        )
        total = -1
        if count:
            found = self._one(f"SELECT COUNT(*) FROM deploys WHERE {where}", args)  # noqa: S608
            total = int(found[0]) if found else 0
        return [self._shape(r) for r in rows], total

    def in_flight(self, deployment: str) -> list[Deploy]:
        """Deploys of `deployment` still queued or running, oldest first."""
        rows = self._rows(
            # `+deployment`: by the state index (few deploys are unfinished), not by scanning
            # every deploy of the deployment.
            "SELECT * FROM deploys WHERE +deployment = ? AND state IN (?, ?) ORDER BY id",
            [deployment, deploys.QUEUED, deploys.RUNNING],
        )
        return [self._shape(r) for r in rows]

    def last_succeeded(self, deployment: str) -> Deploy | None:
        """The newest successful deploy of `deployment`."""
        for row in self._rows(
            "SELECT * FROM deploys WHERE deployment = ? AND state = ? ORDER BY id DESC LIMIT 1",
            [deployment, deploys.SUCCEEDED],
        ):
            return self._shape(row)
        return None

    def deployed_commit(self, deployment: str, commit: str) -> int | None:
        """The newest successful deploy of `commit` in `deployment`, if any."""
        row = self._one(
            "SELECT MAX(id) FROM deploys WHERE deployment = ? AND commit_sha = ? AND state = ?",
            [deployment, commit, deploys.SUCCEEDED],
        )
        return int(row[0]) if row and row[0] else None

    def _shape(self, row: dict[str, Any]) -> Deploy:
        options = json.loads(row["options"] or "{}")
        steps = tuple(
            StepRecord(s["name"], s["state"], s["started_at"], s["finished_at"], s["summary"])
            for s in self._rows(
                "SELECT * FROM steps WHERE deploy_id = ? ORDER BY position", [row["id"]]
            )
        )
        return Deploy(
            id=row["id"],
            deployment=row["deployment"],
            state=row["state"],
            trigger=row["trigger"],
            action=row["action"],
            actor=row["actor"] or "",
            ref=row["ref"] or "",
            commit=row["commit_sha"],
            tree=row["tree_sha"],
            description=row["description"] or "",
            options=Options(
                force=bool(options.get("force")),
                pytest=bool(options.get("pytest")),
                allow_dirty=bool(options.get("allow_dirty")),
                override_freeze=bool(options.get("override_freeze")),
                image=bool(options.get("image")),
            ),
            image=row["image"],
            tag=row["tag"],
            digest=row["digest"],
            step=row["step"],
            pid=row["pid"],
            error=row["error"],
            rollback_of=row["rollback_of"],
            promoted_from=row["promoted_from"],
            promoted_from_id=row["promoted_from_id"],
            cancelled_by=row["cancelled_by"],
            kind=row["kind"],
            report=json.loads(row["report"]) if row["report"] else None,
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            steps=steps,
        )

    # -- steps ---------------------------------------------------------------

    @_writes
    def plan_steps(self, deploy_id: int, steps: list[tuple[str, str]]) -> None:
        """Write the planned steps: (name, skip reason or '') in order."""
        with self._lock:
            self.db.table("steps").insert_all(
                [
                    {
                        "deploy_id": deploy_id,
                        "name": name,
                        "position": i,
                        "state": "skipped" if skip else "pending",
                        "summary": skip or None,
                    }
                    for i, (name, skip) in enumerate(steps)
                ],
                replace=True,
            )

    @_writes
    def step_started(self, deploy_id: int, name: str) -> None:
        """Mark a step running (and the deploy's current step) before it acts."""
        with self._lock:
            self.db.execute(
                "UPDATE steps SET state = 'running', started_at = ? "
                "WHERE deploy_id = ? AND name = ?",
                [now(), deploy_id, name],
            )
            self.db.execute("UPDATE deploys SET step = ? WHERE id = ?", [name, deploy_id])

    @_writes
    def step_finished(self, deploy_id: int, name: str, state: str, summary: str) -> None:
        """Mark a step succeeded, failed, cancelled or interrupted, with a one-line summary."""
        with self._lock:
            self.db.execute(
                "UPDATE steps SET state = ?, finished_at = ?, summary = ? "
                "WHERE deploy_id = ? AND name = ?",
                [state, now(), summary, deploy_id, name],
            )

    def running_steps(self, deploy_id: int) -> list[str]:
        """Names of the steps recorded as running, in plan order."""
        return [
            r["name"]
            for r in self._rows(
                "SELECT name FROM steps WHERE deploy_id = ? AND state = 'running' "
                "ORDER BY position",
                [deploy_id],
            )
        ]

    # -- artifacts (JUnit XML, ...) ------------------------------------------

    @_writes
    def put_artifact(self, deploy_id: int, name: str, content: str) -> None:
        """Keep a file with the deploy (capped at MAX_ARTIFACT characters)."""
        with self._lock:
            self.db.table("artifacts").insert(
                {
                    "deploy_id": deploy_id,
                    "name": name,
                    "content": content[:MAX_ARTIFACT],
                    "created_at": now(),
                },
                replace=True,
            )

    def artifact(self, deploy_id: int, name: str) -> str | None:
        """A file kept with the deploy, if any."""
        row = self._one(
            "SELECT content FROM artifacts WHERE deploy_id = ? AND name = ?", [deploy_id, name]
        )
        return str(row[0]) if row else None

    # -- log -----------------------------------------------------------------

    @_writes
    def append_log(self, deploy_id: int, step: str | None, lines: list[str]) -> list[LogLine]:
        """Store log lines of a deploy; return them as stored (with their ids)."""
        ts = now()
        out = []
        with self._atomic():  # one transaction for the lot
            for line in lines:
                cur = self.db.execute(
                    "INSERT INTO log (deploy_id, ts, step, line) VALUES (?, ?, ?, ?)",
                    [deploy_id, ts, step, line],
                )
                out.append(LogLine(int(cur.lastrowid or 0), ts, step, line))
        return out

    def log_lines(self, deploy_id: int, after: int = 0) -> list[LogLine]:
        """Log lines of a deploy with id > `after`, oldest first."""
        return [
            LogLine(r["id"], r["ts"], r["step"], r["line"])
            for r in self._rows(
                "SELECT id, ts, step, line FROM log WHERE deploy_id = ? AND id > ? ORDER BY id",
                [deploy_id, after],
            )
        ]

    # -- the outbox: events, and where each notification target is in them ---

    def last_event_id(self) -> int:
        """The id of the newest event (0 when there is none)."""
        row = self._one("SELECT MAX(id) FROM events")
        return int(row[0] or 0) if row else 0

    def events_after(self, cursor: int, limit: int = 100) -> list[DeployEvent]:
        """Events with id > `cursor`, oldest first."""
        return [
            DeployEvent(r["id"], r["deploy_id"], r["deployment"], r["event"], r["at"])
            for r in self._rows(
                "SELECT id, deploy_id, deployment, event, at FROM events WHERE id > ? "
                "ORDER BY id LIMIT ?",
                [cursor, limit],
            )
        ]

    def add_targets(self, names: list[str]) -> None:
        """Start following the outbox for targets not seen before, from its current end.

        A target added to the config later gets what happens from then on, not
        the whole history.
        """
        with self._atomic():
            for name in names:
                self.db.execute(
                    "INSERT INTO notify_targets (target, cursor, attempts) "
                    "VALUES (?, (SELECT COALESCE(MAX(id), 0) FROM events), 0) "
                    "ON CONFLICT DO NOTHING",
                    [name],
                )

    def forget_targets(self, keep: list[str]) -> None:
        """Stop following the targets not in `keep` (the daemon's config after a reload).

        One added back later starts afresh from the outbox's end, rather than
        sending everything that happened while it was gone.
        """
        with self._lock:
            self.db.execute(
                f"DELETE FROM notify_targets WHERE target NOT IN ({', '.join('?' * len(keep))})",  # noqa: S608
                keep,
            )

    def claim_target(self, name: str, holder: str, seconds: float) -> TargetState | None:
        """Take (or renew) the lease to deliver `name` for `seconds`; None if another holds it."""
        ts = now()
        with self._atomic():
            cur = self.db.execute(
                "UPDATE notify_targets SET holder = ?, held_until = ? WHERE target = ? "
                "AND (holder IS NULL OR holder = ? OR held_until < ?)",
                [holder, ts + seconds, name, holder, ts],
            )
            if cur.rowcount != 1:
                return None
            [row] = self._rows("SELECT * FROM notify_targets WHERE target = ?", [name], writer=True)
        return TargetState(
            row["target"], row["cursor"], row["attempts"] or 0, row["next_at"], row["last_error"]
        )

    def target_done(self, name: str, holder: str, cursor: int) -> bool:
        """Record that the target has dealt with every event up to `cursor`."""
        with self._lock:
            cur = self.db.execute(
                "UPDATE notify_targets SET cursor = ?, attempts = 0, next_at = NULL, "
                "last_error = NULL WHERE target = ? AND holder = ? AND cursor < ?",
                [cursor, name, holder, cursor],
            )
            return cur.rowcount == 1

    def target_failed(
        self, name: str, holder: str, attempts: int, next_at: float, error: str
    ) -> None:
        """Record a failed attempt at the target's next event, and when to try again."""
        with self._lock:
            self.db.execute(
                "UPDATE notify_targets SET attempts = ?, next_at = ?, last_error = ? "
                "WHERE target = ? AND holder = ?",
                [attempts, next_at, error[:500], name, holder],
            )

    def release_target(self, name: str, holder: str) -> None:
        """Give up the lease (another process may deliver at once)."""
        with self._lock:
            self.db.execute(
                "UPDATE notify_targets SET holder = NULL, held_until = NULL "
                "WHERE target = ? AND holder = ?",
                [name, holder],
            )

    def targets(self) -> list[TargetState]:
        """Every target the outbox knows, with its retry state."""
        return [
            TargetState(r["target"], r["cursor"], r["attempts"] or 0, r["next_at"], r["last_error"])
            for r in self._rows("SELECT * FROM notify_targets ORDER BY target")
        ]
