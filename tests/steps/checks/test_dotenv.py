"""The project's .env parser."""

from __future__ import annotations

from daemon.steps.checks import dotenv


def test_assignments_comments_quotes_and_export() -> None:
    text = """
# a comment
AIRFLOW_CONN_DB=postgres://u:p@h/db
export TEAM="data platform"
SINGLE='a b'
INLINE=value # trailing comment
EMPTY=
"""
    assert dotenv.parse(text) == {
        "AIRFLOW_CONN_DB": "postgres://u:p@h/db",
        "TEAM": "data platform",
        "SINGLE": "a b",
        "INLINE": "value",
        "EMPTY": "",
    }


def test_hostile_lines_are_skipped() -> None:
    text = "1BAD=x\nno equals here\nBAD NAME=x\nOK=1\nNUL=a\0b\nBIG=" + "x" * 40000 + "\n"
    assert dotenv.parse(text) == {"OK": "1"}
    assert len(dotenv.parse("\n".join(f"V{i}=1" for i in range(1000)))) == dotenv.MAX_VARS
