"""Pure decisions about pushes and SSH commands."""

from __future__ import annotations

import pytest

from daemon.ssh.pushrules import (
    ZERO,
    Command,
    RefUpdate,
    Refused,
    decide,
    parse_command,
    parse_options,
    parse_updates,
)

A, B = "a" * 40, "b" * 40


def test_push_to_the_branch_is_a_deploy() -> None:
    plan = decide([RefUpdate(A, B, "refs/heads/main")], "main", ["force", "description=Hot fix"])
    assert (plan.commit, plan.old, plan.ref) == (B, A, "refs/heads/main")
    assert plan.options.force and not plan.options.pytest
    assert plan.options.description == "Hot fix"


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([RefUpdate(A, B, "refs/heads/dev")], "git push astro dev:main"),
        ([RefUpdate(ZERO, B, "refs/tags/v1")], "tags are not deployed"),
        ([RefUpdate(A, ZERO, "refs/heads/main")], "deleting main is not allowed"),
        ([RefUpdate(A, B, "refs/heads/main"), RefUpdate(A, B, "refs/heads/x")], "one branch"),
        ([], "one branch"),
    ],
)
def test_other_pushes_are_refused_with_what_to_do(updates: list[RefUpdate], message: str) -> None:
    with pytest.raises(Refused, match=message):
        decide(updates, "main", [])


@pytest.mark.parametrize(
    "raw",
    [
        ["yolo"],
        ["description=" + "x" * 600],
        ["description=two\nlines"],
        ["force=1"],
        ["description=csi \x9b31m"],  # C1 controls
        ["description=\x1b[2J"],
        ["description=del\x7f"],
        ["description=evil\u202eexe"],
    ],
)
def test_bad_push_options(raw: list[str]) -> None:
    with pytest.raises(Refused):
        parse_options(raw)


def test_parse_updates_validates() -> None:
    assert parse_updates([[A, B, "refs/heads/main"]]) == [RefUpdate(A, B, "refs/heads/main")]
    for bad in ([["x", B, "refs/heads/main"]], [[A, B]], [[A, B, "main"]], ["nope"]):
        with pytest.raises(Exception):  # noqa: B017 - Refused or InvalidName
            parse_updates(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("git-receive-pack 'prod'", Command("git-receive-pack", ("prod",))),
        ("git-receive-pack '/prod.git'", Command("git-receive-pack", ("prod",))),
        ("git-upload-pack '/prod'", Command("git-upload-pack", ("prod",))),
        ("git-upload-pack prod", Command("git-upload-pack", ("prod",))),
        ("deploys", Command("deploys")),
        ("deploys prod", Command("deploys", ("prod",))),
        ("status prod", Command("status", ("prod",))),
        ("logs 42", Command("logs", ("42",))),
        ("rollback prod", Command("rollback", ("prod",))),
        ("rollback prod 7", Command("rollback", ("prod", "7"))),
        ("help", Command("help")),
    ],
)
def test_known_commands(line: str, command: Command) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(
    "line",
    [
        None,
        "",
        "sh",
        "git-receive-pack 'prod'; id",
        "git-upload-pack '--help'",
        "git-receive-pack '../../etc'",
        "git-receive-pack 'prod/../x'",
        "git-upload-pack 'prod",
        "git-upload-pack 'pr\0od'",
        "deploys a b",
        "logs -1",
        "logs 1 2",
        "status",
        "rollback",
        "rollback prod x",
        "rollback prod 1 2",
        "rollback ../x",
        "x" * 5000,
        "git upload-pack 'prod'",
    ],
)
def test_everything_else_is_refused(line: str | None) -> None:
    with pytest.raises(Exception) as info:
        parse_command(line)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("line", "need"),
    [
        ("git-upload-pack 'prod'", "read"),
        ("deploys", "read"),
        ("status prod", "read"),
        ("logs 4", "read"),
        ("help", "read"),
        ("login", "read"),
        ("git-receive-pack 'prod'", "deploy"),
        ("rollback prod", "deploy"),
        ("rollback prod --freeze", "deploy"),
        ("promote staging prod", "deploy"),
        ("freeze prod --reason x", "deploy"),
        ("unfreeze prod", "deploy"),
        ("cancel 4", "deploy"),
    ],
)
def test_each_command_says_the_access_it_needs(line: str, need: str) -> None:
    # What a read key (access = "read") may run: only what changes nothing.
    assert parse_command(line).access == need
