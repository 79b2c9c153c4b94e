"""Choosing a deploy's kind from the paths it changes (core/kinds.py)."""

from __future__ import annotations

import pytest

from daemon.core.kinds import DAGS, IMAGE, kind_of


@pytest.mark.parametrize(
    ("paths", "want"),
    [
        (["dags/etl.py"], DAGS),
        (["dags/etl.py", "dags/sub/dir/report.sql", "dags/.airflowignore"], DAGS),
        (["dags/etl.py", "requirements.txt"], IMAGE),
        (["include/helpers.py"], IMAGE),
        (["Dockerfile"], IMAGE),
        (["dags"], IMAGE),  # a file named dags, not the directory
        (["dags2/etl.py"], IMAGE),
        (["Dags/etl.py"], IMAGE),  # exactly that prefix, case and all
        (["x/dags/etl.py"], IMAGE),
        (['dags/\nnewline "quoted".py', "dags/caf\udce9.py"], DAGS),
        # a rename from include/ into dags/: git.changed_paths gives both names
        (["dags/helpers.py", "include/helpers.py"], IMAGE),
        ([], IMAGE),  # nothing changed: a redeploy, which wants the image path
    ],
)
def test_kind_from_the_changed_paths(paths: list[str], want: str) -> None:
    assert kind_of(paths, first_deploy=False, forced_image=False) == want


def test_the_first_deploy_and_a_forced_one_build_an_image() -> None:
    only_dags = ["dags/etl.py"]
    assert kind_of(only_dags, first_deploy=True, forced_image=False) == IMAGE
    assert kind_of(only_dags, first_deploy=False, forced_image=True) == IMAGE
    assert kind_of(iter(only_dags), first_deploy=False, forced_image=False) == DAGS
