"""DAG deploys (dag_source = "git"), in milliseconds: real SQLite and git, fake Engine and
Cluster. Which kind a deploy is, what a DAG deploy runs and does not run, where the
branch Airflow reads ends up. The same paths run against a real Airflow in
tests/core/test_dag_deploys_airflow.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from daemon.adapters import repos
from daemon.adapters.airflow import BundleDag, BundleState, ImportFailure
from daemon.core import deploys, usecases
from daemon.steps import live
from tests.core.test_pipeline_states import WORKLOADS, World
from tests.support.projects import GOOD_DAG, git


def commit(w: World, files: dict[str, str], message: str = "change") -> str:
    for name, text in files.items():
        path = w.project / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    subprocess.run(["git", "-C", str(w.project), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(w.project), "commit", "-qm", message], check=True)
    return git(w.project, "rev-parse", "HEAD")


def rec_image(w: World, ident: int) -> str:
    rec = w.records.get(ident)
    assert rec is not None
    return f"{rec.image}@{rec.digest}"


def branch(w: World) -> str:
    server = repos.repo_path(w.settings.server.state_dir, "prod")
    return git(server, "rev-parse", "refs/heads/main")


async def first(w: World) -> deploys.Deploy:
    out = await w.run()
    assert (out.exit_code, out.record.kind) == (0, "image"), w.lines
    w.cluster.running_image = out.record.image_ref  # what the rollout left running
    return out.record


async def test_a_change_to_dags_only_is_checked_in_the_running_image_and_restarts_nothing(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, workloads=WORKLOADS, dag_source="git")
    image = await first(w)
    assert "-----> an image deploy: the first deploy of prod builds its image" in w.lines
    patched = list(w.cluster.patched)
    sha = commit(w, {"dags/example_dag.py": GOOD_DAG.format(dag_id="example_v2")})
    w.engine.calls.clear()
    out = await w.run()
    rec = out.record
    assert (out.exit_code, rec.state, rec.kind) == (0, "succeeded", "dags"), w.lines
    assert w.steps(rec.id) == {
        "checkout": "succeeded",
        "parse": "succeeded",
        "pytest": "skipped",
        "publish": "succeeded",
        "live": "skipped",
    }
    # Checked in the image that runs (by digest), nothing built, pushed or patched.
    assert w.engine.calls == [f"local_image {image.image}@{image.digest}", "parse"]
    assert w.cluster.patched == patched
    # It runs the same image: the record says so, and the branch names the new commit.
    assert (rec.image, rec.tag, rec.digest) == (image.image, image.tag, image.digest)
    assert branch(w) == sha == rec.commit
    assert "-----> a DAG deploy: 1 file changed since deploy #1" in " ".join(w.lines)
    skipped = next(s for s in rec.steps if s.name == "live")
    assert skipped.summary is not None and "refresh_interval" in skipped.summary


async def test_any_change_outside_dags_in_any_commit_since_what_runs_is_an_image_deploy(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, workloads=WORKLOADS, dag_source="git")
    await first(w)
    commit(w, {"requirements.txt": "apache-airflow-providers-http\n"}, "deps")
    commit(w, {"dags/example_dag.py": GOOD_DAG.format(dag_id="example_v2")}, "dag")
    out = await w.run()
    assert (out.exit_code, out.record.kind) == (0, "image"), w.lines
    assert "-----> an image deploy: requirements.txt changed since deploy #1" in " ".join(w.lines)
    assert "build" in " ".join(w.engine.calls)
    # include/ is no DAG change either; nor is an empty change.
    commit(w, {"include/helpers.py": "X = 1\n"})
    assert (await w.run()).record.kind == "image"
    subprocess.run(["git", "-C", str(w.project), "commit", "-q", "--allow-empty", "-m", "e"])
    assert (await w.run()).record.kind == "image"


async def test_forced_image_and_dag_source_image_build_for_a_dag_change(tmp_path: Path) -> None:
    w = World(tmp_path, workloads=WORKLOADS, dag_source="git")
    await first(w)
    commit(w, {"dags/example_dag.py": GOOD_DAG.format(dag_id="example_v2")})
    out = await w.run(w.request(image=True))
    assert out.record.kind == "image" and out.record.options.image
    assert "-----> an image deploy: asked for (-o image / --image)" in w.lines
    (tmp_path / "plain").mkdir()
    plain = World(tmp_path / "plain", workloads=WORKLOADS)
    await first(plain)
    commit(plain, {"dags/example_dag.py": GOOD_DAG.format(dag_id="example_v2")})
    assert (await plain.run()).record.kind == "image"


async def test_a_dag_deploy_whose_check_fails_leaves_the_branch_where_it_was(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, dag_source="git")
    image = await first(w)
    commit(w, {"dags/broken.py": "import nope\n"})
    w.engine.dag_errors = {"dags/broken.py": "No module named nope"}
    out = await w.run()
    assert (out.exit_code, out.record.state, out.record.step) == (1, "failed", "parse")
    assert out.record.kind == "dags"
    assert branch(w) == image.commit
    assert w.steps(out.record.id)["publish"] == "pending"


async def test_a_dag_deploy_says_when_the_cluster_runs_another_image(tmp_path: Path) -> None:
    w = World(tmp_path, workloads=WORKLOADS, dag_source="git")
    await first(w)
    w.cluster.running_image = "registry.test/airflow/prod:handmade@sha256:" + "e" * 64
    commit(w, {"dags/example_dag.py": GOOD_DAG.format(dag_id="example_v2")})
    w.engine.calls.clear()
    out = await w.run()
    assert out.exit_code == 0, w.lines
    assert any(
        "the cluster runs registry.test/airflow/prod:handmade@sha256:eee" in ln for ln in w.lines
    )
    # Checked in the recorded image while the cluster was read, then again in what the
    # cluster runs, whose verdict stands.
    assert w.engine.calls == [
        f"local_image {rec_image(w, 1)}",
        "parse",
        f"local_image {w.cluster.running_image}",
        "parse",
    ]
    rec = out.record
    assert (rec.image, rec.tag, rec.digest) == (
        "registry.test/airflow/prod",
        "handmade",
        "sha256:" + "e" * 64,
    )


async def test_rolling_back_a_dag_deploy_moves_the_branch_back_and_restarts_nothing(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, workloads=WORKLOADS, dag_source="git")
    image = await first(w)
    commit(w, {"dags/example_dag.py": GOOD_DAG.format(dag_id="example_v2")})
    dag = (await w.run()).record
    assert branch(w) == dag.commit
    patched = list(w.cluster.patched)
    # The default target: the newest deploy whose (image, commit) differs, here #1.
    request = usecases.rollback(
        w.settings, w.records, w.dep, None, trigger="cli", actor="ada@host", force=False
    )
    assert request.rollback_to is not None and request.rollback_to.id == image.id
    out = await w.pipeline.run(request, w.lines.append)
    assert (out.exit_code, out.record.kind, out.record.action) == (0, "dags", "rollback")
    assert branch(w) == image.commit
    assert w.cluster.patched == patched


async def test_an_image_rollback_with_dag_source_git_moves_the_branch_after_the_rollout(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, workloads=WORKLOADS, dag_source="git")
    one = await first(w)
    commit(w, {"requirements.txt": "x\n"})
    two = (await w.run()).record
    assert two.kind == "image" and branch(w) == two.commit
    request = usecases.rollback(
        w.settings, w.records, w.dep, None, trigger="cli", actor="ada@host", force=False
    )
    out = await w.pipeline.run(request, w.lines.append)
    assert (out.exit_code, out.record.kind) == (0, "image"), w.lines
    assert w.cluster.patched[-1][1] == one.image_ref
    assert branch(w) == one.commit


async def test_without_workloads_a_dag_source_git_deployment_may_roll_back_its_dags(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, dag_source="git")
    one = await first(w)
    commit(w, {"dags/example_dag.py": GOOD_DAG.format(dag_id="example_v2")})
    await w.run()
    request = usecases.rollback(
        w.settings, w.records, w.dep, None, trigger="cli", actor="ada@host", force=False
    )
    out = await w.pipeline.run(request, w.lines.append)
    assert (out.exit_code, out.record.kind) == (0, "dags"), w.lines
    assert branch(w) == one.commit


class FakeAirflow:
    """steps/live's AirflowAPI, answering from a script: each call the next state."""

    answers: list[BundleState] = []
    closed = 0

    def __init__(self, url: str, bundle: str, **_credentials: object) -> None:
        self.bundle = bundle

    async def bundle_state(self) -> BundleState:
        return (
            FakeAirflow.answers.pop(0) if len(FakeAirflow.answers) > 1 else FakeAirflow.answers[0]
        )

    async def close(self) -> None:
        FakeAirflow.closed += 1


def airflow_world(tmp_path: Path) -> World:
    (tmp_path / "pw").write_text("s3cret\n")
    return World(
        tmp_path,
        dag_source="git",
        airflow_api_url="http://airflow.test:8080",
        airflow_username="deployd",
        airflow_password_file=str(tmp_path / "pw"),
    )


@pytest.fixture
def fake_airflow(monkeypatch: pytest.MonkeyPatch) -> type[FakeAirflow]:
    monkeypatch.setattr(live, "AirflowAPI", FakeAirflow)
    monkeypatch.setattr(live, "POLL_SECONDS", 0.01)
    return FakeAirflow


async def test_live_waits_for_airflow_then_reports_the_time(
    tmp_path: Path, fake_airflow: type[FakeAirflow]
) -> None:
    w = airflow_world(tmp_path)
    one = await first(w)
    sha = commit(w, {"dags/example_dag.py": GOOD_DAG.format(dag_id="example") + "# v2\n"})
    old = BundleState("prod", (BundleDag("example_dag", "example_dag.py", one.commit, 1.0),))
    new = BundleState("prod", (BundleDag("example_dag", "example_dag.py", sha, 2.0),))
    FakeAirflow.answers = [old, old, new]
    out = await w.run()
    assert (out.exit_code, out.record.state, out.record.kind) == (0, "succeeded", "dags"), w.lines
    step = next(s for s in out.record.steps if s.name == "live")
    assert step.summary is not None
    assert step.summary.startswith("live in Airflow after ")
    assert step.summary.endswith(f"(bundle prod at {sha[:7]}, 0 import errors)")
    assert branch(w) == sha and FakeAirflow.closed >= 1


async def test_an_import_error_only_airflow_sees_moves_the_branch_back_from_the_cli(
    tmp_path: Path, fake_airflow: type[FakeAirflow]
) -> None:
    w = airflow_world(tmp_path)
    one = await first(w)
    commit(w, {"dags/example_dag.py": GOOD_DAG.format(dag_id="example") + "import helpers\n"})
    failing = ImportFailure(
        "example_dag.py", "ModuleNotFoundError: No module named 'helpers'", "tb", 2e9
    )
    FakeAirflow.answers = [
        BundleState(
            "prod",
            (BundleDag("example_dag", "example_dag.py", one.commit, 1.0),),
            import_errors=(failing,),
        )
    ]
    out = await w.run()  # a CLI deploy: its repository is the user's checkout
    rec = out.record
    assert (out.exit_code, rec.state, rec.step) == (3, "rolled_back", "live"), w.lines
    assert rec.error is not None and rec.error.startswith(
        "Airflow could not import example_dag.py: ModuleNotFoundError"
    )
    assert branch(w) == one.commit  # the server repository's branch, not the checkout's
