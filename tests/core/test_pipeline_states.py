"""The pipeline's state transitions, in milliseconds: real SQLite and git, fake Engine and Cluster.

Each outcome a deploy can have is produced on purpose and checked in the
records: state, the step it ended in, the steps' states, the exit code, and
what the fakes were asked to do. The same paths run on the real Engine,
registry and simulator in tests/core/test_pipeline.py and tests/steps/.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from daemon import config
from daemon.adapters.records import Records
from daemon.core import deploys, usecases
from daemon.core.context import DeployRequest, Services
from daemon.core.deploys import Options
from daemon.core.pipeline import Pipeline
from daemon.core.policy import Lifecycle
from daemon.errors import BuildError, DependencyUnreachable, RegistryError
from tests.support.fakes import FakeCluster, FakeEngine
from tests.support.projects import git, make_project

WORKLOADS = ["deployment/airflow-scheduler", "statefulset/airflow-worker"]


def _settings(tmp_path: Path, **dep: object) -> config.Settings:
    fields = {"name": "prod", "image": "registry.test/airflow/prod", **dep}
    lines = ["[server]", f'state_dir = "{tmp_path / "state"}"', "", "[[deployment]]"]
    for key, value in fields.items():
        rendered = (
            "[" + ", ".join(f'"{v}"' for v in value) + "]"
            if isinstance(value, list)
            else str(value).lower()
            if isinstance(value, bool)
            else f'"{value}"'
        )
        lines.append(f"{key} = {rendered}")
    path = tmp_path / "deployd.toml"
    path.write_text("\n".join(lines) + "\n")
    return config.load(path)


class World:
    """A pipeline over a real records file and project repository, with fakes for the rest."""

    def __init__(self, tmp_path: Path, **dep: object) -> None:
        self.settings = _settings(tmp_path, **dep)
        self.records = Records(self.settings.server.state_dir / "deployd.db")
        self.engine = FakeEngine()
        self.cluster = FakeCluster()
        self.services = Services(
            self.settings, self.records, self.engine, connect=lambda _s, _d: self.cluster
        )
        self.pipeline = Pipeline(self.services)
        self.project = make_project(tmp_path / "project", "runtime:3.3")
        self.lines: list[str] = []

    @property
    def dep(self) -> config.Deployment:
        return self.settings.deployment("prod")

    def request(self, trigger: str = "cli", **options: object) -> DeployRequest:
        return usecases.deploy_checkout(
            self.dep,
            self.project,
            Options(**options),
            trigger=trigger,
            actor="ada@host",  # type: ignore[arg-type]
        )

    async def run(self, request: DeployRequest | None = None, deploy_id: int | None = None):  # type: ignore[no-untyped-def]
        return await self.pipeline.run(request or self.request(), self.lines.append, deploy_id)

    def steps(self, deploy_id: int) -> dict[str, str]:
        rec = self.records.get(deploy_id)
        assert rec is not None
        return {s.name: s.state for s in rec.steps}


async def test_success_records_every_step_and_moves_the_branch(tmp_path: Path) -> None:
    w = World(tmp_path, workloads=WORKLOADS)
    out = await w.run()
    rec = out.record
    assert (out.exit_code, rec.state, rec.step, rec.error) == (0, "succeeded", None, None)
    assert (rec.trigger, rec.action, rec.actor) == ("cli", "deploy", "ada@host")
    assert rec.tree == git(w.project, "rev-parse", "HEAD^{tree}")
    assert rec.digest and rec.digest.startswith("sha256:") and rec.tag
    assert rec.tag.endswith(f"-{rec.id}")
    assert rec.airflow_version == "3.3.2"
    assert w.steps(rec.id) == {
        "preflight": "succeeded",
        "checkout": "succeeded",
        "build": "succeeded",
        "parse": "succeeded",
        "pytest": "skipped",
        "push": "succeeded",
        "roll": "succeeded",
    }
    assert [image for _, image in w.cluster.patched] == [rec.image_ref] * 2
    server = w.settings.server.state_dir / "repos" / "prod.git"
    assert git(server, "rev-parse", "refs/heads/main") == rec.commit
    assert w.cluster.closed == 1


@pytest.mark.parametrize(
    ("fault", "step", "state", "code", "message"),
    [
        ("build", "build", "failed", 1, "the build failed"),
        ("unreachable", "build", "failed", 4, "cannot reach"),
        ("dags", "parse", "failed", 1, "1 DAG file(s) failed to import"),
        ("pytest", "pytest", "failed", 1, "tests"),
        ("push", "push", "failed", 1, "registry refused"),
        ("internal", "parse", "failed", 1, "internal error: KeyError"),
        ("rollout", "roll", "rolled_back", 3, "rolled back"),
    ],
)
async def test_each_failure_ends_in_its_state_at_its_step(
    tmp_path: Path, fault: str, step: str, state: str, code: int, message: str
) -> None:
    w = World(tmp_path, workloads=WORKLOADS)
    if fault == "build":
        w.engine.fail_build = BuildError("the build failed at Step 1/1: boom")
    elif fault == "unreachable":
        w.engine.fail_build = DependencyUnreachable("cannot reach the Docker Engine.")
    elif fault == "dags":
        w.engine.dag_errors = {"dags/example_dag.py": "No module named nope"}
    elif fault == "pytest":
        w.engine.pytest_exit = 1
    elif fault == "push":
        w.engine.fail_push = RegistryError("the registry refused the push.")
    elif fault == "internal":
        w.engine.fail_check = KeyError("surprise")
    elif fault == "rollout":
        w.cluster.failing = {"deployment/airflow-scheduler": "exceeded its progress deadline"}
    out = await w.run(w.request(pytest=fault == "pytest"))
    rec = out.record
    assert (rec.state, rec.step, out.exit_code) == (state, step, code), rec.error
    assert message in (rec.error or "")
    assert w.steps(rec.id)[step] == "failed"
    if state == "failed":
        assert "roll" not in [s for s, _ in w.cluster.patched]
        assert w.cluster.patched == []
        server = w.settings.server.state_dir / "repos" / "prod.git"
        assert not server.exists() or not git(server, "for-each-ref")
    else:
        assert w.cluster.restored == ["deployment/airflow-scheduler", "statefulset/airflow-worker"]


async def test_force_deploys_despite_dag_errors_but_never_failing_tests(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.engine.dag_errors = {"dags/example_dag.py": "boom"}
    out = await w.run(w.request(force=True))
    assert out.record.state == "succeeded"
    parse = next(s for s in out.record.steps if s.name == "parse")
    assert "deployed anyway: force" in (parse.summary or "")
    w.engine.pytest_exit = 1
    out = await w.run(w.request(force=True, pytest=True))
    assert (out.record.state, out.record.step) == ("failed", "pytest")


async def test_a_cancelled_deploy_is_recorded_cancelled_and_tags_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.engine.block_build = threading.Event()
    task = asyncio.create_task(w.run())
    while "build" not in " ".join(w.engine.calls):
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (rec,) = w.records.list_deploys("prod")
    assert (rec.state, rec.step, rec.error) == ("cancelled", "build", "the deploy was cancelled")
    assert w.steps(rec.id)["build"] == "cancelled" and not rec.tag
    assert w.engine.pushed == []


async def test_a_deploy_stopped_by_shutdown_is_interrupted(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.engine.block_build = threading.Event()
    task = asyncio.create_task(w.run())
    while "build" not in " ".join(w.engine.calls):
        await asyncio.sleep(0.01)
    w.pipeline.lifecycle = Lifecycle.INTERRUPTING
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (rec,) = w.records.list_deploys("prod")
    assert (rec.state, rec.step) == ("interrupted", "build")


async def test_a_queued_webhook_deploy_is_superseded_by_a_newer_one(tmp_path: Path) -> None:
    w = World(tmp_path)
    older = w.pipeline.enqueue(w.request("webhook"))
    newer = w.pipeline.enqueue(w.request("webhook"))
    pushed = w.pipeline.enqueue(w.request("ssh"))
    out = await w.run(w.request("webhook"), deploy_id=older)
    assert out.record.state == "superseded" and f"deploy #{newer}" in (out.record.error or "")
    assert w.engine.calls == []  # nothing was built for it
    assert w.records.state(pushed) == "queued"  # a push over SSH is never superseded


async def test_a_dead_deploy_is_marked_interrupted_by_the_next(tmp_path: Path) -> None:
    w = World(tmp_path)
    dead = w.pipeline.enqueue(w.request())
    w.records.plan_steps(dead, [("checkout", ""), ("build", "")])
    w.records.transition(dead, deploys.QUEUED, deploys.RUNNING, pid=2**22 + 7)
    w.records.step_started(dead, "build")
    out = await w.run()
    assert out.record.state == "succeeded"
    gone = w.records.get(dead)
    assert gone is not None and (gone.state, gone.step) == ("interrupted", "build")
    assert any(f"deploy #{dead} had died" in line for line in w.lines)


async def test_a_dead_queued_webhook_deploy_is_not_interrupted(tmp_path: Path) -> None:
    w = World(tmp_path)
    waiting = w.pipeline.enqueue(w.request("webhook"))
    w.records.update(waiting, pid=2**22 + 7)
    await w.run()
    assert w.records.state(waiting) == "queued"  # the daemon resumes it


async def test_a_rollback_reuses_the_image_and_keeps_the_branch(tmp_path: Path) -> None:
    w = World(tmp_path, workloads=WORKLOADS)
    first = (await w.run()).record
    (w.project / "dags" / "new.py").write_text("x = 1\n")
    git(w.project, "add", "-A")
    git(w.project, "commit", "-qm", "second")
    second = (await w.run()).record
    request = usecases.rollback(
        w.settings, w.records, w.dep, None, trigger="ssh", actor="alice", force=False
    )
    assert request.rollback_to is not None and request.rollback_to.id == first.id
    w.engine.calls.clear()
    out = await w.run(request)
    rec = out.record
    assert (rec.state, rec.action, rec.trigger, rec.rollback_of) == (
        "succeeded",
        "rollback",
        "ssh",
        first.id,
    )
    assert (rec.tag, rec.digest, rec.tree) == (first.tag, first.digest, first.tree)
    assert not any(c.startswith("build") for c in w.engine.calls)
    assert w.steps(rec.id)["build"] == "skipped"
    server = w.settings.server.state_dir / "repos" / "prod.git"
    assert git(server, "rev-parse", "refs/heads/main") == second.commit


async def test_a_rollback_to_an_older_airflow_is_refused_unless_forced(tmp_path: Path) -> None:
    w = World(tmp_path, workloads=WORKLOADS)
    w.engine.airflow_version = "2.10.5"
    old = (await w.run()).record
    w.engine.airflow_version = "3.3.2"
    await w.run()
    from daemon.errors import UsageError

    with pytest.raises(UsageError, match=r"Airflow 2\.10\.5"):
        usecases.rollback(
            w.settings, w.records, w.dep, old.id, trigger="cli", actor="a", force=False
        )
    forced = usecases.rollback(
        w.settings, w.records, w.dep, old.id, trigger="cli", actor="a", force=True
    )
    assert forced.rollback_to is not None and forced.rollback_to.id == old.id


async def test_followers_get_every_line_pushed_then_the_end(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.engine.block_build = threading.Event()
    task = asyncio.create_task(w.run())
    while not w.pipeline.live:
        await asyncio.sleep(0.01)
    ((deploy_id, live),) = w.pipeline.live.items()
    got: list[str] = []

    async def follow() -> None:
        async for row in usecases.follow_log(w.records, deploy_id, live=live):
            got.append(row.line)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    w.engine.block_build.set()
    await task
    await asyncio.wait_for(follower, 5)
    assert got == [row.line for row in w.records.log_lines(deploy_id)]
    assert got[0].startswith(f"-----> deploy #{deploy_id}") and "deployed" in got[-1]


async def test_a_follower_in_another_process_reads_the_records(tmp_path: Path) -> None:
    w = World(tmp_path)
    out = await w.run()
    rows = [r async for r in usecases.follow_log(w.records, out.record.id)]
    assert [r.line for r in rows] == [r.line for r in w.records.log_lines(out.record.id)]
    assert os.getpid() == out.record.pid
