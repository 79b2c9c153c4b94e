"""A DAG deploy pushed with the real OpenSSH client and git through the real asyncssh server
and both hooks (no Docker: the SSHWorld's fakes check and deploy).

The pre-receive hook's verdict comes once the checks pass; git moves the branch; the
post-receive hook relays the rest of the deploy while the pusher still watches.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.adapters import repos
from tests.ssh.test_read_keys import git_as, url
from tests.support.projects import GOOD_DAG, commit_all, git
from tests.support.sshworld import SSHWorld, serving


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[SSHWorld]:
    async with serving(SSHWorld(tmp_path, dag_source="git"), hooks=True) as w:
        yield w


async def test_a_pushed_dag_change_is_accepted_then_relayed_to_its_end(world: SSHWorld) -> None:
    w = world
    git(w.project, "remote", "add", "astro", url(w, "prod"))
    first = await git_as(w, "alice", "push", "astro", "main", cwd=w.project)
    assert first.returncode == 0, first.stderr
    assert "an image deploy: the first deploy of prod builds its image" in first.stderr
    one = w.records.get(1)
    assert one is not None
    w.cluster.running_image = one.image_ref  # what the rollout left running
    (w.project / "dags" / "example_dag.py").write_text(GOOD_DAG.format(dag_id="example_v2"))
    sha = commit_all(w.project, "a DAG change")
    w.engine.calls.clear()
    pushed = await git_as(w, "alice", "push", "astro", "main", cwd=w.project)
    assert pushed.returncode == 0, pushed.stderr
    out = pushed.stderr
    assert "remote: -----> a DAG deploy: 1 file changed since deploy #1" in out
    # After publish, the post-receive hook's lines: the deploy's end, as it happened.
    assert "remote: -----> publish" in out
    assert f"remote: -----> deployed the DAGs of {sha[:12]} as deploy #2" in out
    assert out.index("-----> publish") < out.index("-----> deployed the DAGs")
    rec = w.records.get(2)
    assert rec is not None and (rec.state, rec.kind) == ("succeeded", "dags")
    server_repo = repos.repo_path(w.state_dir, "prod")
    assert git(server_repo, "rev-parse", "refs/heads/main") == sha
    assert [c.split()[0] for c in w.engine.calls] == ["local_image", "parse"]


async def test_a_refused_dag_change_leaves_the_branch_and_the_push_fails(world: SSHWorld) -> None:
    w = world
    git(w.project, "remote", "add", "astro", url(w, "prod"))
    assert (await git_as(w, "alice", "push", "astro", "main", cwd=w.project)).returncode == 0
    before = git(repos.repo_path(w.state_dir, "prod"), "rev-parse", "refs/heads/main")
    (w.project / "dags" / "broken.py").write_text("import nope\n")
    commit_all(w.project, "broken")
    w.engine.dag_errors = {"dags/broken.py": "No module named nope"}
    pushed = await git_as(w, "alice", "push", "astro", "main", cwd=w.project)
    assert pushed.returncode != 0
    assert "dags/broken.py" in pushed.stderr
    assert git(repos.repo_path(w.state_dir, "prod"), "rev-parse", "refs/heads/main") == before
    rec = w.records.get(2)
    assert rec is not None and (rec.state, rec.kind, rec.step) == ("failed", "dags", "parse")


async def test_push_option_image_builds_for_a_dag_change(world: SSHWorld) -> None:
    w = world
    git(w.project, "remote", "add", "astro", url(w, "prod"))
    assert (await git_as(w, "alice", "push", "astro", "main", cwd=w.project)).returncode == 0
    (w.project / "dags" / "example_dag.py").write_text(GOOD_DAG.format(dag_id="example_v2"))
    commit_all(w.project, "a DAG change, built anyway")
    pushed = await git_as(w, "alice", "push", "-o", "image", "astro", "main", cwd=w.project)
    assert pushed.returncode == 0, pushed.stderr
    assert "remote: -----> an image deploy: asked for (-o image / --image)" in pushed.stderr
    rec = w.records.get(2)
    assert rec is not None and (rec.kind, rec.options.image) == ("image", True)
    assert any(c.startswith("build") for c in w.engine.calls)
