"""How pytest's output becomes the pusher's error and the stored summary."""

from __future__ import annotations

from daemon.steps.checks.pytest import counts, short_failure


def test_summary_counts() -> None:
    got = counts("2 failed, 5 passed, 1 skipped, 3 errors", ["t::a"], 1)
    assert got == {
        "passed": 5,
        "failed": 2,
        "errors": 3,
        "skipped": 1,
        "xfailed": 0,
        "xpassed": 0,
        "failing": ["t::a"],
        "exit_code": 1,
    }
    assert counts("1 error", [], 2)["errors"] == 1
    assert counts("", [], None)["passed"] == 0


def test_short_failures_keep_an_errors_reason() -> None:
    failed = short_failure("FAILED tests/test_x.py::test_y - assert 1 == 2")
    assert failed == "tests/test_x.py::test_y"
    assert (
        short_failure("ERROR .astro/t.py - TypeError: bad keyword 'include_examples'")
        == ".astro/t.py (TypeError: bad keyword 'include_examples')"
    )
    assert short_failure("ERROR tests/test_z.py") == "tests/test_z.py"
    assert len(short_failure("ERROR a.py - " + "x" * 1000)) < 220
