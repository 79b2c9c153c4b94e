"""Freezes, pure: `--until TIME`, reasons, scheduled windows and which freeze holds."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from daemon.config import Deployment, FreezeWindow
from daemon.core.freezes import (
    WINDOW,
    Freeze,
    check_reason,
    describe,
    effective,
    parse_until,
    window_freeze,
    window_start,
)
from daemon.errors import UsageError

NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC).timestamp()  # a Friday
BERLIN = ZoneInfo("Europe/Berlin")


def at(*args: int, tz: dt.tzinfo = BERLIN) -> float:
    return dt.datetime(*args, tzinfo=tz).timestamp()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1w", 604800), ("1h30m", 5400)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_until(text, NOW) == NOW + seconds


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("2026-12-24T08:00:00Z", dt.datetime(2026, 12, 24, 8, tzinfo=dt.UTC)),
        ("2026-12-24T08:00:00+01:00", dt.datetime(2026, 12, 24, 7, tzinfo=dt.UTC)),
        ("2026-12-24T08:00:00.5z", dt.datetime(2026, 12, 24, 8, 0, 0, 500000, tzinfo=dt.UTC)),
        ("2026-12-24 08:00:00-05:00", dt.datetime(2026, 12, 24, 13, tzinfo=dt.UTC)),
    ],
)
def test_rfc3339_times(text: str, when: dt.datetime) -> None:
    assert parse_until(text, NOW) == when.timestamp()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0s", "at least a second"),
        ("2 hours", "neither an RFC 3339 time"),
        ("2026-12-24T08:00:00", "has no UTC offset"),
        ("2026-12-01T08:00:00Z", "is in the past"),
        ("tomorrow", "neither an RFC 3339 time"),
        ("-1h", "neither an RFC 3339 time"),
    ],
)
def test_bad_times_are_refused_saying_what_is_accepted(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_until(text, NOW)


def test_a_reason_is_one_printable_line() -> None:
    assert check_reason("  release\tfreeze  ") == "release freeze"
    with pytest.raises(UsageError, match="needs a reason"):
        check_reason("   ")
    with pytest.raises(UsageError, match="printable"):
        check_reason("x\x1b[2J")
    with pytest.raises(UsageError, match="at most 500"):
        check_reason("x" * 501)


def weekend(timezone: str = "Europe/Berlin") -> Deployment:
    # No deploys from Friday 16:00 to Monday 08:00 (64 h), Berlin time.
    return Deployment(
        "prod",
        "r.example.com/a/prod",
        freeze_windows=(FreezeWindow("0 16 * * 5", 230400, timezone),),
    )


def test_a_window_holds_from_its_start_for_its_duration_in_its_time_zone() -> None:
    dep = weekend()
    assert window_freeze(dep, at(2026, 12, 4, 15, 59, 59)) is None
    start = at(2026, 12, 4, 16, 0)
    held = window_freeze(dep, start)
    assert held == Freeze("prod", WINDOW, str(dep.freeze_windows[0]), start, start + 230400)
    assert held.reason == 'freeze window "0 16 * * 5" (Europe/Berlin, 230400 s)'
    assert held.window and held.on(start)
    assert window_freeze(dep, at(2026, 12, 6, 23, 0)) == held  # Sunday night
    assert window_freeze(dep, at(2026, 12, 7, 7, 59, 59)) == held
    assert window_freeze(dep, at(2026, 12, 7, 8, 0)) is None  # Monday 08:00: over
    # The same cron in UTC starts an hour later than in Berlin (CET is UTC+1).
    assert window_freeze(weekend("UTC"), at(2026, 12, 4, 16, 30)) is None
    assert window_freeze(weekend("UTC"), at(2026, 12, 4, 17, 0)) is not None


def test_a_window_across_a_daylight_saving_change_keeps_its_local_start() -> None:
    # Berlin moves to summer time on Sunday 2027-03-28: Friday 16:00 is still 16:00 local.
    dep = Deployment(
        "prod", "r/a", freeze_windows=(FreezeWindow("0 16 * * 5", 3600, "Europe/Berlin"),)
    )
    assert window_start(dep.freeze_windows[0], at(2027, 4, 2, 16, 30)) == at(2027, 4, 2, 16, 0)
    assert window_start(dep.freeze_windows[0], at(2027, 3, 26, 16, 30)) == at(2027, 3, 26, 16, 0)


def test_of_several_windows_the_one_ending_last_is_shown() -> None:
    dep = Deployment(
        "prod",
        "r/a",
        freeze_windows=(
            FreezeWindow("0 12 * * *", 3600, "UTC"),
            FreezeWindow("30 11 * * *", 7200, "UTC"),
        ),
    )
    held = window_freeze(dep, NOW + 60)
    assert held is not None and held.until == at(2026, 12, 4, 13, 30, tz=dt.UTC)


def test_a_recorded_freeze_comes_before_a_window_and_expires_at_its_until() -> None:
    dep = weekend()
    friday_night = at(2026, 12, 4, 20, 0)
    mine = Freeze("prod", "alice", "incident", friday_night - 60, friday_night + 60, id=3)
    assert effective(mine, dep, friday_night) == mine
    later = effective(mine, dep, friday_night + 61)  # alice's is over; the window still holds
    assert later is not None and later.by == WINDOW
    assert effective(mine, Deployment("prod", "r/a"), friday_night + 61) is None
    ended = Freeze("prod", "alice", "incident", 0, None, id=3, ended_at=1, ended_by="bob")
    assert not ended.on(friday_night) and effective(ended, Deployment("prod", "r/a"), 5) is None


def test_the_description_says_who_why_since_and_until() -> None:
    f = Freeze("prod", "alice", "release freeze", NOW, NOW + 7200, id=1)
    assert describe(f) == (
        "prod is frozen by alice since 2026-12-04 12:00:00 UTC until 2026-12-04 14:00:00 UTC: "
        "release freeze"
    )
    forever = Freeze("prod", "alice", "incident", NOW, None, id=2)
    assert describe(forever).endswith("since 2026-12-04 12:00:00 UTC until unfrozen: incident")
