"""The git adapter against real repositories."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from daemon.adapters import git
from daemon.core.kinds import DAGS, IMAGE, kind_of
from daemon.errors import DirtyWorkTree, GitError, InvalidName, UsageError
from tests.support.projects import commit_all, make_project
from tests.support.projects import git as run_git


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


def test_changed_paths_cover_every_commit_in_between(tmp_path: Path) -> None:
    repo = make_project(tmp_path / "p", "base:1")
    base = git.head(repo).commit
    (repo / "requirements.txt").write_text("pandas==2.2.0\n")
    commit_all(repo, "a new requirement")
    (repo / "dags" / "example_dag.py").write_text("# airflow dag, changed\n")
    tip = commit_all(repo, "a DAG edit")
    # The last commit alone is a DAG change; the push of both is not.
    assert git.changed_paths(repo, tip, tip) == []
    assert git.changed_paths(repo, run_git(repo, "rev-parse", "HEAD~1"), tip) == [
        "dags/example_dag.py"
    ]
    both = git.changed_paths(repo, base, tip)
    assert both == ["dags/example_dag.py", "requirements.txt"]
    assert kind_of(both, first_deploy=False, forced_image=False) == IMAGE


def test_a_change_reverted_on_the_way_is_no_change(tmp_path: Path) -> None:
    repo = make_project(tmp_path / "p", "base:1")
    base = git.head(repo).commit
    (repo / "Dockerfile").write_text("FROM base:2\n")
    commit_all(repo, "try base 2")
    (repo / "Dockerfile").write_text("FROM base:1\n")
    (repo / "dags" / "new.py").write_text("# airflow dag\n")
    tip = commit_all(repo, "back to base 1, and a new DAG")
    changed = git.changed_paths(repo, base, tip)
    assert changed == ["dags/new.py"]  # the image built from tip is the one that runs
    assert kind_of(changed, first_deploy=False, forced_image=False) == DAGS


def test_a_rename_counts_at_both_names(tmp_path: Path) -> None:
    repo = make_project(tmp_path / "p", "base:1", files={"include/helpers.py": "X = 1\n" * 20})
    base = git.head(repo).commit
    run_git(repo, "mv", "include/helpers.py", "dags/helpers.py")
    tip = commit_all(repo, "move the helpers")
    changed = git.changed_paths(repo, base, tip)
    assert changed == ["dags/helpers.py", "include/helpers.py"]
    assert kind_of(changed, first_deploy=False, forced_image=False) == IMAGE
    run_git(repo, "mv", "dags/example_dag.py", "dags/renamed.py")
    moved = commit_all(repo, "rename a DAG file")
    assert git.changed_paths(repo, tip, moved) == ["dags/example_dag.py", "dags/renamed.py"]


def test_hostile_path_names_come_through_whole(tmp_path: Path) -> None:
    repo = make_project(tmp_path / "p", "base:1")
    base = git.head(repo).commit
    hostile = ["dags/new\nline.py", "dags/\"quoted\" 'and' spaced.py", "dags/tab\there.py"]
    for name in hostile:
        (repo / name).write_text("# airflow dag\n")
    # A name that is not UTF-8 (Latin-1 e-acute): kept as the file system spells it.
    (repo / os.fsdecode(b"dags/caf\xe9.py")).write_text("# airflow dag\n")
    # And one outside dags/ whose name, split at its newline, would look like a DAG path.
    (repo / "include\ndags").mkdir()
    (repo / "include\ndags" / "x.py").write_text("X = 1\n")
    tip = commit_all(repo, "hostile names")
    changed = git.changed_paths(repo, base, tip)
    assert changed == sorted([*hostile, os.fsdecode(b"dags/caf\xe9.py"), "include\ndags/x.py"])
    assert kind_of(changed, first_deploy=False, forced_image=False) == IMAGE


def test_changed_paths_across_branches_and_bad_commits(tmp_path: Path) -> None:
    repo = make_project(tmp_path / "p", "base:1")
    base = git.head(repo).commit
    run_git(repo, "checkout", "-q", "-b", "other")
    (repo / "include" / "x.py").write_text("X = 1\n")
    other = commit_all(repo, "on another branch")
    run_git(repo, "checkout", "-q", "main")
    (repo / "dags" / "y.py").write_text("# airflow dag\n")
    tip = commit_all(repo, "on main")
    # Not an ancestor (a rollback moved the branch, a force-push): trees are compared.
    assert git.changed_paths(repo, other, tip) == ["dags/y.py", "include/x.py"]
    assert git.changed_paths(repo, base, tip) == ["dags/y.py"]
    with pytest.raises(InvalidName):
        git.changed_paths(repo, "HEAD~1", tip)
    with pytest.raises(GitError, match="git diff-tree failed"):
        git.changed_paths(repo, "0" * 40, tip)


def test_stored_reads_loose_and_packed_objects_as_git_does(tmp_path: Path) -> None:
    # A webhook's commit not fetched yet is answered without a git process; the
    # answer must be git's own, for loose objects, packs (after gc) and absent ones.
    repo = make_project(tmp_path / "p", "base:1")
    for n in range(5):
        (repo / "include" / f"f{n}.py").write_text(f"X = {n}\n")
        commit_all(repo, f"change {n}")
    listed = run_git(repo, "rev-list", "--objects", "--all").splitlines()
    shas = [line.split()[0] for line in listed]
    absent = ["0" * 40, "f" * 40, shas[0][:39] + ("0" if shas[0][-1] != "0" else "1")]

    def agree() -> None:
        for sha in shas + absent:
            there = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", sha], check=False)
            assert git.stored(repo, sha) is (there.returncode == 0), sha

    agree()
    assert not list((repo / ".git" / "objects" / "pack").glob("*.idx"))
    run_git(repo, "gc", "-q", "--prune=now")  # every object into one pack
    assert list((repo / ".git" / "objects" / "pack").glob("*.idx"))
    assert not (repo / ".git" / "objects" / shas[0][:2] / shas[0][2:]).exists()
    agree()
    head = git.head(repo).commit
    assert git.ancestry(repo, shas[0], head) is True
    assert git.ancestry(repo, "0" * 40, head) is None
    # What it cannot read, git answers: an object store with alternates.
    (repo / ".git" / "objects" / "info" / "alternates").write_text("/nonexistent\n")
    assert git.stored(repo, shas[0]) is None
    assert git.ancestry(repo, shas[0], head) is True
