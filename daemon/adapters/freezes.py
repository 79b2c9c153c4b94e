"""The freezes table (migration 6): each deployment's freezes, kept as history.

The current freeze of a deployment is its row without `ended_at` whose `until`
(if any) is still ahead; starting one while another holds is refused in the
same statement, so two people freezing at once get one freeze. Other
processes (`deployd freeze` on the build host, the daemon) read the table, so
a freeze or an unfreeze anywhere is seen everywhere.
"""

from __future__ import annotations

from typing import Any

from daemon.adapters.records import Records, now
from daemon.config import Deployment
from daemon.core.freezes import Freeze, effective

_COLUMNS = "id, deployment, frozen_by, reason, since, until, ended_at, ended_by"
_ON = "deployment = ? AND ended_at IS NULL AND (until IS NULL OR until > ?)"


def _freeze(row: tuple[Any, ...] | dict[str, Any]) -> Freeze:
    values = tuple(row.values()) if isinstance(row, dict) else row
    ident, deployment, by, reason, since, until, ended_at, ended_by = values
    return Freeze(deployment, by, reason, since, until, ident, ended_at, ended_by)


def start(
    records: Records, deployment: str, *, by: str, reason: str, until: float | None
) -> Freeze | None:
    """Record a freeze from now; None (nothing written) if one already holds."""
    at = now()
    rows = records.write(
        f"INSERT INTO freezes (deployment, frozen_by, reason, since, until) "  # noqa: S608
        f"SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM freezes WHERE {_ON}) "
        f"RETURNING {_COLUMNS}",
        [deployment, by, reason, at, until, deployment, at],
    )
    return _freeze(rows[0]) if rows else None


def end(records: Records, deployment: str, *, by: str) -> Freeze | None:
    """End the freeze that holds now; it, as ended, or None if none held."""
    at = now()
    rows = records.write(
        f"UPDATE freezes SET ended_at = ?, ended_by = ? WHERE {_ON} "  # noqa: S608
        f"RETURNING {_COLUMNS}",
        [at, by, deployment, at],
    )
    return _freeze(rows[0]) if rows else None


def recorded(records: Records, deployment: str, at: float | None = None) -> Freeze | None:
    """The recorded freeze of `deployment` that holds at `at` (default: now)."""
    when = now() if at is None else at
    rows = records.read(
        f"SELECT {_COLUMNS} FROM freezes WHERE {_ON} ORDER BY id DESC LIMIT 1",  # noqa: S608
        [deployment, when],
    )
    return _freeze(rows[0]) if rows else None


def current(records: Records, dep: Deployment, at: float | None = None) -> Freeze | None:
    """What freezes `dep` at `at` (default: now): a recorded freeze, else a freeze window."""
    when = now() if at is None else at
    return effective(recorded(records, dep.name, when), dep, when)


def history(records: Records, deployment: str, limit: int = 20) -> list[Freeze]:
    """The deployment's freezes, newest first (ended ones too)."""
    rows = records.read(
        f"SELECT {_COLUMNS} FROM freezes WHERE deployment = ? ORDER BY id DESC LIMIT ?",  # noqa: S608
        [deployment, limit],
    )
    return [_freeze(r) for r in rows]
