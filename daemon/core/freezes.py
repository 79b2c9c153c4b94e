"""Freezes: what stops deploys of a deployment for a while, and when that ends (pure).

A freeze is recorded by someone (`deployd freeze`, until a time or until
unfrozen) or comes from a scheduled `[[deployment.freeze_window]]` of the
config, which behaves exactly like one (by `freeze_window`). While frozen,
pushes, CLI deploys and promotions are refused, webhook deploys wait, and
rollbacks run (a freeze is what you do during an incident).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from croniter import croniter

from daemon.config import Deployment, FreezeWindow
from daemon.errors import UsageError

WINDOW = "freeze_window"  # who froze a deployment that is inside a freeze window
MAX_REASON = 500
_DURATION = re.compile(r"(?:[0-9]+[smhdw])+")
_PART = re.compile(r"([0-9]+)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# The last time a freeze may end: the views print it as a date, and dates end with 9999.
_LATEST = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp()


@dataclass(frozen=True)
class Freeze:
    """A freeze of one deployment: who, why, since when and until when."""

    deployment: str
    by: str
    reason: str
    since: float
    until: float | None  # None: until someone unfreezes it
    id: int | None = None  # None: a freeze window's, not recorded
    ended_at: float | None = None
    ended_by: str | None = None

    @property
    def window(self) -> bool:
        """Whether it comes from a freeze window of the config (nobody can unfreeze it)."""
        return self.id is None

    def on(self, now: float) -> bool:
        """Whether it holds at `now`."""
        return self.ended_at is None and (self.until is None or now < self.until)


def parse_until(text: str, now: float) -> float:
    """`--until TIME` as a Unix time: RFC 3339 (`2026-12-24T08:00:00+01:00`, `...Z`)
    or a duration from `now` (`90s`, `30m`, `2h`, `1d`, `1h30m`)."""
    value = text.strip()
    text = text if len(text) <= 40 else text[:40] + "..."  # for the messages: one short line
    too_late = UsageError(f"--until {text!r}: a freeze ends before the year 10000.")
    if _DURATION.fullmatch(value):
        if len(value) > 40:  # int() refuses thousands of digits; 40 (unpadded) end past 9999
            raise too_late
        seconds = sum(int(n) * _UNIT[u] for n, u in _PART.findall(value))
        if seconds <= 0:
            raise UsageError(f"--until {text!r}: a freeze lasts at least a second.")
        if now + seconds > _LATEST:
            raise too_late
        return now + seconds
    try:
        when = dt.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise UsageError(
            f"--until {text!r} is neither an RFC 3339 time (2026-12-24T08:00:00Z) "
            "nor a duration (30m, 2h, 1d)."
        ) from None
    if when.tzinfo is None:
        raise UsageError(
            f"--until {text!r} has no UTC offset: add Z or one such as +01:00 (RFC 3339)."
        )
    until = when.timestamp()
    if until <= now:
        raise UsageError(f"--until {text!r} is in the past.")
    if until > _LATEST:  # 9999-12-31T23:59:59-01:00
        raise too_late
    return until


def check_reason(reason: str) -> str:
    """A freeze's reason: one line of printable text, required."""
    reason = " ".join(reason.split())
    if not reason:
        raise UsageError("a freeze needs a reason (--reason TEXT): others will read it.")
    if len(reason) > MAX_REASON or not reason.isprintable():
        raise UsageError(
            f"the reason must be one line of printable text, at most {MAX_REASON} characters."
        )
    return reason


def window_start(window: FreezeWindow, now: float) -> float:
    """The Unix time of the window's latest start at or before `now`."""
    tz = ZoneInfo(window.timezone)
    # croniter's get_prev is strictly before its base: a start at `now` itself counts.
    base = dt.datetime.fromtimestamp(math.floor(now) + 1, tz)
    start: dt.datetime = croniter(window.cron, base).get_prev(dt.datetime)
    return start.timestamp()


def window_freeze(dep: Deployment, now: float) -> Freeze | None:
    """The freeze of the deployment's window that holds at `now` (the one ending last)."""
    found: Freeze | None = None
    for window in dep.freeze_windows:
        start = window_start(window, now)
        end = start + window.duration_seconds
        if now < end and (found is None or (found.until or 0) < end):
            found = Freeze(dep.name, WINDOW, str(window), start, end)
    return found


def effective(recorded: Freeze | None, dep: Deployment, now: float) -> Freeze | None:
    """What freezes `dep` at `now`: its recorded freeze, else a window's, else nothing."""
    if recorded is not None and recorded.on(now):
        return recorded
    return window_freeze(dep, now)


def utc(ts: float) -> str:
    """A Unix time as people read it in messages (UTC, to the second)."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe(freeze: Freeze) -> str:
    """One line: `prod is frozen by alice since ... until ...: the reason`."""
    until = f"until {utc(freeze.until)}" if freeze.until is not None else "until unfrozen"
    return (
        f"{freeze.deployment} is frozen by {freeze.by} since {utc(freeze.since)} "
        f"{until}: {freeze.reason}"
    )
