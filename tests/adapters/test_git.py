"""The git adapter against real repositories."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.adapters import git
from daemon.errors import DirtyWorkTree, UsageError
from tests.support.projects import commit_all, make_project


def test_head_export_and_clean(tmp_path: Path) -> None:
    repo = make_project(tmp_path / "p", "base:1", message="Add the example DAG")
    head = git.head(repo)
    assert len(head.commit) == 40 and len(head.tree) == 40
    assert head.ref == "refs/heads/main" and head.subject == "Add the example DAG"
    git.ensure_clean(repo)
    dest = tmp_path / "out"
    git.export(repo, head.commit, dest)
    assert (dest / "dags" / "example_dag.py").is_file()
    assert (dest / ".astro" / "config.yaml").is_file()
    assert not (dest / ".git").exists()


def test_export_takes_the_commit_not_the_work_tree(tmp_path: Path) -> None:
    repo = make_project(tmp_path / "p", "base:1")
    first = git.head(repo).commit
    (repo / "dags" / "new.py").write_text("# airflow dag\n")
    commit_all(repo, "second")
    git.export(repo, first, tmp_path / "out")
    assert not (tmp_path / "out" / "dags" / "new.py").exists()


def test_dirty_tree_is_refused(tmp_path: Path) -> None:
    repo = make_project(tmp_path / "p", "base:1")
    (repo / "dags" / "example_dag.py").write_text("changed")
    (repo / "untracked.txt").write_text("x")
    with pytest.raises(DirtyWorkTree, match=r"dags/example_dag\.py, untracked\.txt.*--allow-dirty"):
        git.ensure_clean(repo)


def test_not_a_repository(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a git work tree"):
        git.head(tmp_path)
