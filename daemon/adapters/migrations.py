"""The records' schema, one versioned migration at a time (applied by Records.migrate).

A migration is never edited once released: a change is a new one appended here.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlite_utils


def _migration_1(db: sqlite_utils.Database) -> None:
    db.table("deploys").create(
        {
            "id": int,
            "deployment": str,
            "state": str,
            "trigger": str,
            "actor": str,
            "ref": str,
            "commit_sha": str,
            "tree_sha": str,
            "description": str,
            "options": str,
            "image": str,
            "tag": str,
            "digest": str,
            "step": str,
            "error": str,
            "report": str,
            "rollback_of": int,
            "pid": int,
            "created_at": float,
            "started_at": float,
            "finished_at": float,
        },
        pk="id",
        not_null={"deployment", "state", "trigger", "created_at"},
    )
    db.table("deploys").create_index(["deployment", "id"])
    db.table("deploys").create_index(["state"])
    db.table("steps").create(
        {
            "deploy_id": int,
            "name": str,
            "position": int,
            "state": str,
            "started_at": float,
            "finished_at": float,
            "summary": str,
        },
        pk=("deploy_id", "name"),
        foreign_keys=[("deploy_id", "deploys", "id")],
    )
    db.table("log").create(
        {"id": int, "deploy_id": int, "ts": float, "step": str, "line": str},
        pk="id",
        foreign_keys=[("deploy_id", "deploys", "id")],
    )
    db.table("log").create_index(["deploy_id", "id"])


def _migration_2(db: sqlite_utils.Database) -> None:
    db.table("artifacts").create(
        {"deploy_id": int, "name": str, "content": str, "created_at": float},
        pk=("deploy_id", "name"),
        foreign_keys=[("deploy_id", "deploys", "id")],
    )


def _migration_3(db: sqlite_utils.Database) -> None:
    # One row per webhook delivery, written before it is acknowledged: a
    # redelivery (same hook and delivery id) finds it and deploys nothing.
    db.table("deliveries").create(
        {
            "hook_id": str,
            "delivery_id": str,
            "event": str,
            "received_at": float,
            "status": int,
            "answer": str,
            "deploy_ids": str,
        },
        pk=("hook_id", "delivery_id"),
    )


def _migration_4(db: sqlite_utils.Database) -> None:
    # `trigger` says where a deploy came from; `action` what it does. Before this,
    # a rollback was known only by its rollback_of.
    db.execute("ALTER TABLE deploys ADD COLUMN action TEXT NOT NULL DEFAULT 'deploy'")
    db.execute("UPDATE deploys SET action = 'rollback' WHERE rollback_of IS NOT NULL")


def _migration_5(db: sqlite_utils.Database) -> None:
    # The outbox: one row per state change of a deploy (started, and each final
    # state), written in the transaction that makes the change, by whichever
    # process runs the deploy. Notifications are sent from it in order, and the
    # metrics count from it. AUTOINCREMENT: an id is never reused after pruning.
    db.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, deploy_id INTEGER NOT NULL "
        "REFERENCES deploys(id), deployment TEXT NOT NULL, event TEXT NOT NULL, at REAL NOT NULL)"
    )
    # Per notification target: the last event it has dealt with (sent, or not
    # for it), who delivers it now (a lease, so that `deployd serve` and a
    # `deployd deploy` never both send), and the state of the current retry.
    db.table("notify_targets").create(
        {
            "target": str,
            "cursor": int,
            "holder": str,
            "held_until": float,
            "attempts": int,
            "next_at": float,
            "last_error": str,
        },
        pk="target",
        not_null={"cursor"},
    )


def _migration_6(db: sqlite_utils.Database) -> None:
    # Release management: where a promoted deploy's image came from, who cancelled
    # a deploy (set when the cancel is asked for: the process running it stops),
    # and the freezes of each deployment, kept as history (the current one has
    # no ended_at, and an `until` still ahead if it has one).
    db.execute("ALTER TABLE deploys ADD COLUMN promoted_from TEXT")
    db.execute("ALTER TABLE deploys ADD COLUMN promoted_from_id INTEGER")
    db.execute("ALTER TABLE deploys ADD COLUMN cancelled_by TEXT")
    db.execute(
        "CREATE TABLE freezes (id INTEGER PRIMARY KEY AUTOINCREMENT, deployment TEXT NOT NULL, "
        "frozen_by TEXT NOT NULL, reason TEXT NOT NULL, since REAL NOT NULL, until REAL, "
        "ended_at REAL, ended_by TEXT)"
    )
    db.execute("CREATE INDEX freezes_deployment ON freezes (deployment, ended_at)")


def _migration_7(db: sqlite_utils.Database) -> None:
    # The dashboard's sign-in: one-time login tokens (made by `ssh ... login`) and the
    # browser sessions they start. Only SHA-256 hashes of the tokens and cookies are
    # kept, so the database alone signs nobody in; each row names the key (and its
    # public key) whose permissions it carries, checked against the config on use.
    db.execute(
        "CREATE TABLE web_logins (token_hash TEXT PRIMARY KEY, key_name TEXT NOT NULL, "
        "public_key TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL, "
        "used_at REAL)"
    )
    db.execute(
        "CREATE TABLE web_sessions (id TEXT PRIMARY KEY, cookie_hash TEXT NOT NULL UNIQUE, "
        "key_name TEXT NOT NULL, public_key TEXT NOT NULL, created_at REAL NOT NULL, "
        "expires_at REAL NOT NULL)"
    )


def _migration_8(db: sqlite_utils.Database) -> None:
    # What each deploy ships (core/kinds.py): "image" (build and roll out) or "dags"
    # (DAGs checked in the running image, the branch moved). Every deploy before this
    # built an image, so that is what the existing rows get.
    db.execute("ALTER TABLE deploys ADD COLUMN kind TEXT NOT NULL DEFAULT 'image'")


MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
)

SCHEMA_VERSION = len(MIGRATIONS)
