"""The checkout refuses trees whose symlinks would lead deployd's own reads and writes away."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.errors import CheckError
from daemon.steps.checkout import refuse_escaping_links


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "dags").mkdir(parents=True)
    (root / "dags" / "a.py").write_text("x")
    (root / "Dockerfile").write_text("FROM x\n")
    return root


def test_links_inside_the_tree_are_fine(tmp_path: Path) -> None:
    root = tree(tmp_path)
    os.symlink("../dags/a.py", root / "dags" / "b.py")
    (root / "include").mkdir()
    os.symlink("../dags", root / "include" / "dags")
    refuse_escaping_links(root)


@pytest.mark.parametrize(
    ("name", "target", "message"),
    [
        ("include/passwd", "/etc/passwd", "points outside the project"),
        ("include/up", "../../../etc", "points outside the project"),
        (
            ".deployd.Dockerfile",
            "/var/lib/deployd/repos/prod.git/hooks/pre-receive",
            "points outside the project",
        ),
        (".env", "dags/a.py", ".env is a symlink"),
        (".dockerignore", "dags/a.py", ".dockerignore is a symlink"),
    ],
)
def test_escaping_or_own_file_links_are_refused(
    tmp_path: Path, name: str, target: str, message: str
) -> None:
    root = tree(tmp_path)
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, root / name)
    with pytest.raises(CheckError, match=message):
        refuse_escaping_links(root)


def test_our_own_file_name_is_refused(tmp_path: Path) -> None:
    root = tree(tmp_path)
    (root / ".deployd.Dockerfile").write_text("FROM evil\n")
    with pytest.raises(CheckError, match="deployd's own file name"):
        refuse_escaping_links(root)
