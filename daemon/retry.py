"""Waiting before trying again: exponential backoff and the HTTP Retry-After header.

Pure functions, shared by the commit statuses (adapters/github.py) and the
notifications (notify/outbox.py).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math


def backoff(attempt: int, base: float, cap: float) -> float:
    """The wait after failed attempt number `attempt` (1, 2, ...): base doubling, capped."""
    return min(cap, base * 2.0 ** min(max(attempt - 1, 0), 62))


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After value (delay seconds or an HTTP-date) as seconds from `now`.

    None when there is none or it cannot be read; never negative (a date in the
    past means at once).
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": a time in UTC with no zone claimed
            when = when.replace(tzinfo=dt.UTC)
        return max(0.0, when.timestamp() - now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
