"""The one validation of names that come from outside."""

from __future__ import annotations

import pytest

from daemon import names
from daemon.errors import InvalidName


@pytest.mark.parametrize("good", ["prod", "a", "staging-2", "0abc", "a" * 63])
def test_deployment_names_accepted(good: str) -> None:
    assert names.deployment_name(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", "-prod", "Prod", "prod_1", "a" * 64, "../etc", "prod\n", "prod.git", "pr od", "/prod"],
)
def test_deployment_names_refused(bad: str) -> None:
    with pytest.raises(InvalidName):
        names.deployment_name(bad)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a..b",
        "a/",
        ".hidden",
        "x.lock",
        "a b",
        "a~1",
        "a^",
        "-x",
        "a//b",
        "a/.b",
        "a:b",
        "a\\b",
    ],
)
def test_branch_names_refused(bad: str) -> None:
    with pytest.raises(InvalidName):
        names.branch_name(bad)


def test_branch_names_accepted() -> None:
    assert names.branch_name("release/2024-10") == "release/2024-10"


@pytest.mark.parametrize("bad", ["0", "-1", "1e3", "12a", " 3", "9" * 19, "", "٣"])
def test_deploy_ids_refused(bad: str) -> None:
    with pytest.raises(InvalidName):
        names.deploy_id(bad)


def test_deploy_ids_and_shas() -> None:
    assert names.deploy_id("42") == 42
    sha = "a" * 40
    assert names.commit_sha(sha) == sha
    with pytest.raises(InvalidName):
        names.commit_sha("A" * 40)
