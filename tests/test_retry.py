"""Backoff and Retry-After: the waits before trying again."""

from __future__ import annotations

from daemon.retry import backoff, retry_after_seconds


def test_backoff_doubles_from_its_base_up_to_its_cap() -> None:
    assert [backoff(n, 1.0, 300.0) for n in range(1, 12)] == [
        1,
        2,
        4,
        8,
        16,
        32,
        64,
        128,
        256,
        300,
        300,
    ]
    assert backoff(10_000, 1.0, 300.0) == 300.0  # no overflow after a day of failures
    assert backoff(3, 0.01, 1.0) == 0.04


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    assert retry_after_seconds("1", 0) == 1.0
    assert retry_after_seconds(" 120 ", 0) == 120.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412478) == 2.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 -0000", 1445412478) == 2.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412490) == 0.0  # past
    assert retry_after_seconds("-5", 0) == 0.0
    for unreadable in (None, "", "soon", "nan", "inf"):
        assert retry_after_seconds(unreadable, 0) is None
