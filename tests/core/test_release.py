"""Promotions and freezes through the pipeline and the use cases, in milliseconds: real SQLite
and git, the FakeEngine and FakeCluster for the rest (the same paths on the real Engine,
registry and simulator: tests/test_release.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from daemon import config
from daemon.adapters import freezes
from daemon.adapters.records import Records
from daemon.core import pipeline as pipeline_mod
from daemon.core import usecases
from daemon.core.context import DeployRequest, Services
from daemon.core.deploys import Deploy, Options
from daemon.core.pipeline import DeployOutcome, Pipeline
from daemon.errors import Refusal, UsageError
from tests.support.fakes import FakeCluster, FakeEngine
from tests.support.projects import git, make_project

WORKLOADS = '["deployment/airflow-scheduler", "statefulset/airflow-worker"]'


def write_config(tmp_path: Path, prod: str = "", staging: str = "") -> config.Settings:
    """staging, then prod (with workloads); `prod` and `staging` add lines to each."""
    path = tmp_path / "deployd.toml"
    path.write_text(
        f'[server]\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[[deployment]]\nname = "staging"\nimage = "registry.test/airflow/staging"\n{staging}\n'
        f'[[deployment]]\nname = "prod"\nimage = "registry.test/airflow/prod"\n'
        f'tag_template = "prod-{{sha7}}-{{id}}"\nworkloads = {WORKLOADS}\n{prod}\n'
    )
    return config.load(path)


class World:
    """Two deployments, staging and prod (with workloads), over one pipeline."""

    def __init__(self, tmp_path: Path, prod: str = "", staging: str = "") -> None:
        self.tmp = tmp_path
        self.settings = write_config(tmp_path, prod, staging)
        self.records = Records(self.settings.server.state_dir / "deployd.db")
        self.engine = FakeEngine()
        self.cluster = FakeCluster()
        self.services = Services(
            self.settings, self.records, self.engine, connect=lambda _s, _d: self.cluster
        )
        self.pipeline = Pipeline(self.services)
        self.project = make_project(tmp_path / "project", "runtime:3.3")
        self.lines: list[str] = []

    def dep(self, name: str) -> config.Deployment:
        return self.settings.deployment(name)

    def request(self, name: str = "prod", trigger: str = "cli", **options: Any) -> DeployRequest:
        req = usecases.deploy_checkout(
            self.dep(name), self.project, Options(**options), trigger=trigger, actor="ada@host"
        )
        return req

    async def run(self, request: DeployRequest, deploy_id: int | None = None) -> DeployOutcome:
        return await self.pipeline.run(request, self.lines.append, deploy_id)

    async def deployed(self, name: str = "prod") -> Deploy:
        out = await self.run(self.request(name))
        assert out.record.state == "succeeded", out.record.error
        return out.record

    def promotion(self, deploy_id: int | None = None, **kw: Any) -> DeployRequest:
        return usecases.promote(
            self.settings,
            self.records,
            self.dep("staging"),
            self.dep("prod"),
            deploy_id,
            trigger="cli",
            actor="ada@host",
            **kw,
        )

    def commit(self, name: str) -> str:
        (self.project / "dags" / f"{name}.py").write_text("x = 1\n")
        git(self.project, "add", "-A")
        git(self.project, "commit", "-qm", name)
        return git(self.project, "rev-parse", "HEAD")

    def another_process(self) -> Records:
        """The records as `deployd freeze` run on the build host sees them."""
        return Records(self.settings.server.state_dir / "deployd.db")


async def until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def log_of(w: World, deploy_id: int) -> list[str]:
    return [row.line for row in w.records.log_lines(deploy_id)]


@pytest.fixture
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_mod, "FREEZE_POLL_SECONDS", 0.05)


# -- promotion ----------------------------------------------------------------------------


async def test_a_promotion_tags_the_checked_image_and_rolls_it_out(tmp_path: Path) -> None:
    w = World(tmp_path)
    source = await w.deployed("staging")
    w.engine.calls.clear()
    out = await w.run(w.promotion())
    rec = out.record
    assert (out.exit_code, rec.state, rec.action, rec.trigger) == (
        0,
        "succeeded",
        "promotion",
        "cli",
    )
    assert (rec.promoted_from, rec.promoted_from_id) == ("staging", source.id)
    assert (rec.commit, rec.tree, rec.report) == (source.commit, source.tree, source.report)
    assert (rec.image, rec.digest) == ("registry.test/airflow/prod", source.digest)
    assert rec.tag == f"prod-{(source.commit or '')[:7]}-{rec.id}"  # prod's own tag template
    assert rec.description.startswith(f"promoted from staging (deploy #{source.id}): ")
    # Nothing built, checked or pushed from the Engine: one registry-side retag.
    assert w.engine.calls == [
        f"retag registry.test/airflow/staging@{source.digest} registry.test/airflow/prod:{rec.tag}"
    ]
    steps = {s.name: (s.state, s.summary) for s in rec.steps}
    for name in ("checkout", "build", "parse", "pytest"):
        assert steps[name] == (
            "skipped",
            f"skipped: the image of staging's deploy #{source.id}, checked there",
        )
    assert steps["preflight"][0] == steps["push"][0] == steps["roll"][0] == "succeeded"
    assert "copied from registry.test/airflow/staging and tagged in the registry" in str(
        steps["push"][1]
    )
    assert [image for _, image in w.cluster.patched] == [rec.image_ref] * 2
    # prod's server branch names the promoted commit.
    server = w.settings.server.state_dir / "repos" / "prod.git"
    assert git(server, "rev-parse", "refs/heads/main") == source.commit


async def test_a_chosen_deploy_of_the_source_is_promoted(tmp_path: Path) -> None:
    w = World(tmp_path)
    first = await w.deployed("staging")
    w.commit("second")
    second = await w.deployed("staging")
    assert first.digest != second.digest
    request = w.promotion(first.id)
    assert request.promote_from is not None and request.promote_from.id == first.id
    rec = (await w.run(request)).record
    assert (rec.digest, rec.promoted_from_id) == (first.digest, first.id)
    assert w.promotion().promote_from == second  # by default: what staging runs now


async def test_promotion_refusals(tmp_path: Path) -> None:
    w = World(tmp_path)
    with pytest.raises(UsageError, match=r"^staging has no successful deploy to promote.$"):
        w.promotion()
    prod = await w.deployed("prod")
    with pytest.raises(UsageError, match=f"^there is no deploy #{prod.id} of staging.$"):
        w.promotion(prod.id)
    w.engine.dag_errors = {"dags/example_dag.py": "boom"}
    broken = (await w.run(w.request("staging"))).record
    with pytest.raises(UsageError, match="is failed: only a successful deploy's image"):
        w.promotion(broken.id)
    with pytest.raises(UsageError, match="cannot be promoted to itself"):
        usecases.promote(
            w.settings, w.records, w.dep("prod"), w.dep("prod"), None, trigger="cli", actor="a"
        )
    assert w.records.in_flight("prod") == []  # nothing was queued


async def test_a_promotion_of_an_older_airflow_needs_force(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.engine.airflow_version = "2.10.5"
    await w.deployed("staging")
    w.engine.airflow_version = "3.3.2"
    await w.deployed("prod")
    with pytest.raises(UsageError, match=r"Airflow 2\.10\.5, prod runs 3\.3\.2"):
        w.promotion()
    assert w.promotion(force=True).options.force


async def test_a_promotion_to_another_registry_is_refused(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.deployed("staging")
    other = dataclasses.replace(w.dep("prod"), image="elsewhere.example.com/airflow/prod")
    with pytest.raises(UsageError, match="are on different registries"):
        usecases.promote(
            w.settings, w.records, w.dep("staging"), other, None, trigger="cli", actor="a"
        )


async def test_promote_from_makes_promotion_the_only_way_in(tmp_path: Path) -> None:
    w = World(tmp_path, prod='promote_from = "staging"')
    message = "prod takes promotions from staging: deployd promote staging prod"
    with pytest.raises(Refusal, match=f"^{message}$"):
        usecases.admit(w.records, w.dep("prod"), Options())
    usecases.admit(w.records, w.dep("staging"), Options())
    await w.deployed("staging")
    promoted = (await w.run(w.promotion())).record
    assert promoted.state == "succeeded"
    # Rollbacks stay allowed.
    w.commit("again")
    await w.deployed("staging")
    await w.run(w.promotion())
    back = usecases.rollback(
        w.settings, w.records, w.dep("prod"), promoted.id, trigger="cli", actor="a", force=False
    )
    assert (await w.run(back)).record.state == "succeeded"


async def test_a_deployment_refuses_promotions_from_another_source(tmp_path: Path) -> None:
    qa = '[[deployment]]\nname = "qa"\nimage = "registry.test/airflow/qa"\n'
    w = World(tmp_path, prod='promote_from = "staging"\n\n' + qa)
    await w.deployed("qa")
    with pytest.raises(Refusal) as refused:
        usecases.promote(
            w.settings, w.records, w.dep("qa"), w.dep("prod"), None, trigger="cli", actor="a"
        )
    assert refused.value.message == (
        "prod takes promotions from staging, not from qa: deployd promote staging prod"
    )
    assert refused.value.exit_code == 2


async def test_a_promotion_between_dag_sources_is_refused(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.deployed("staging")
    staging = replace(w.dep("staging"), dag_source="git")
    for source, target in ((staging, w.dep("prod")), (w.dep("prod"), staging)):
        with pytest.raises(Refusal) as refused:
            usecases.promote(w.settings, w.records, source, target, None, trigger="cli", actor="a")
        assert "(dag_source)" in refused.value.message and refused.value.exit_code == 2
    assert w.records.in_flight("prod") == []


# -- freezes: the records ---------------------------------------------------------------


def test_one_freeze_at_a_time_kept_as_history(tmp_path: Path) -> None:
    w = World(tmp_path)
    prod = w.dep("prod")
    made = usecases.freeze(w.records, prod, by="alice", reason="release freeze", until="2h")
    assert (made.by, made.reason, made.ended_at) == ("alice", "release freeze", None)
    assert made.until is not None and abs(made.until - made.since - 7200) < 1
    other = w.another_process()
    with pytest.raises(
        Refusal, match=r"prod is frozen by alice since .*: release freeze; to change"
    ):
        usecases.freeze(other, prod, by="bob", reason="mine")
    assert usecases.freeze_of(other, prod) == made  # seen from another process too
    assert usecases.freeze_of(w.records, w.dep("staging")) is None
    ended = usecases.unfreeze(other, prod, by="bob")
    assert (ended.id, ended.ended_by) == (made.id, "bob") and ended.ended_at is not None
    assert usecases.freeze_of(w.records, prod) is None
    with pytest.raises(Refusal, match=r"^prod is not frozen.$"):
        usecases.unfreeze(w.records, prod, by="bob")
    again = usecases.freeze(w.records, prod, by="carol", reason="incident")
    assert [f.id for f in freezes.history(w.records, "prod")] == [again.id, made.id]


def test_two_processes_freezing_at_once_make_one_freeze(tmp_path: Path) -> None:
    w = World(tmp_path)
    barrier = threading.Barrier(8)
    made: list[object] = []

    def freeze(n: int) -> None:
        records = w.another_process()
        barrier.wait()
        made.append(freezes.start(records, "prod", by=f"k{n}", reason="x", until=None))

    threads = [threading.Thread(target=freeze, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len([m for m in made if m is not None]) == 1
    assert len(freezes.history(w.records, "prod")) == 1


def test_a_freeze_past_its_until_holds_no_more(tmp_path: Path) -> None:
    w = World(tmp_path)
    made = freezes.start(w.records, "prod", by="a", reason="x", until=time.time() + 0.2)
    assert made is not None and usecases.freeze_of(w.records, w.dep("prod")) == made
    time.sleep(0.3)
    assert usecases.freeze_of(w.records, w.dep("prod")) is None
    with pytest.raises(Refusal, match="not frozen"):
        usecases.unfreeze(w.records, w.dep("prod"), by="a")
    assert usecases.freeze(w.records, w.dep("prod"), by="b", reason="y").by == "b"


def window_now(seconds_left: float) -> str:
    """A [[deployment.freeze_window]] that started this minute and ends in `seconds_left`."""
    now = dt.datetime.now(dt.UTC)
    started = now.replace(second=0, microsecond=0)
    duration = int((now - started).total_seconds() + seconds_left) + 1
    return (
        f'\n[[deployment.freeze_window]]\ncron = "{now.minute} {now.hour} * * *"\n'
        f'duration_seconds = {duration}\ntimezone = "UTC"\n'
    )


def test_a_window_cannot_be_unfrozen_and_a_freeze_may_be_added_to_it(tmp_path: Path) -> None:
    w = World(tmp_path, prod=window_now(3600))
    prod = w.dep("prod")
    held = usecases.freeze_of(w.records, prod)
    assert held is not None and held.by == "freeze_window" and held.window
    with pytest.raises(Refusal, match="a freeze window ends by itself"):
        usecases.unfreeze(w.records, prod, by="alice")
    mine = usecases.freeze(w.records, prod, by="alice", reason="incident")
    assert usecases.freeze_of(w.records, prod) == mine  # the recorded one is shown first
    usecases.unfreeze(w.records, prod, by="alice")
    assert usecases.freeze_of(w.records, prod) == held


# -- freezes: deploys -----------------------------------------------------------------


async def test_a_frozen_deployment_refuses_new_code_at_once(tmp_path: Path) -> None:
    w = World(tmp_path)
    usecases.freeze(w.records, w.dep("prod"), by="alice", reason="release freeze")
    with pytest.raises(Refusal) as refused:
        usecases.admit(w.records, w.dep("prod"), Options())
    assert refused.value.exit_code == 2
    assert refused.value.message.startswith("prod is frozen by alice since ")
    assert refused.value.message.endswith("until unfrozen: release freeze. Nothing was deployed.")
    usecases.admit(w.records, w.dep("prod"), Options(override_freeze=True))
    usecases.admit(w.records, w.dep("staging"), Options())
    await w.deployed("staging")
    with pytest.raises(Refusal, match=r"prod is frozen by alice .*Nothing was promoted.$"):
        w.promotion()


async def test_a_deploy_queued_before_the_freeze_is_refused_at_its_turn(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.engine.block_build = threading.Event()
    running = asyncio.create_task(w.run(w.request()))
    await until(lambda: any(c.startswith("build") for c in w.engine.calls))
    queued = asyncio.create_task(w.run(w.request(trigger="ssh")))
    await until(lambda: len(w.records.in_flight("prod")) == 2)
    usecases.freeze(w.another_process(), w.dep("prod"), by="alice", reason="release freeze")
    w.engine.block_build.set()
    assert (await running).record.state == "succeeded"  # a freeze does not stop a running deploy
    out = await queued
    assert (out.record.state, out.exit_code) == ("cancelled", 2)
    assert (out.record.error or "").startswith("prod is frozen by alice since ")
    assert (out.record.error or "").endswith(": release freeze. Nothing was deployed.")
    assert any(line.startswith("-----> refused: prod is frozen by alice") for line in w.lines)
    assert [c for c in w.engine.calls if c.startswith("build")] == [w.engine.calls[0]]


async def test_an_admins_override_runs_through_a_freeze_and_is_recorded(tmp_path: Path) -> None:
    w = World(tmp_path)
    usecases.freeze(w.records, w.dep("prod"), by="alice", reason="release freeze")
    out = await w.run(w.request(trigger="ssh", override_freeze=True))
    assert out.record.state == "succeeded" and out.record.options.override_freeze


def webhook(w: World, name: str = "prod") -> DeployRequest:
    return dataclasses.replace(w.request(name), trigger="webhook", actor="github:ada")


async def test_a_webhook_deploy_waits_for_an_unfreeze_from_another_process(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    usecases.freeze(w.records, w.dep("prod"), by="alice", reason="release freeze")
    ident = w.pipeline.enqueue(webhook(w))
    task = asyncio.create_task(w.run(webhook(w), deploy_id=ident))
    await until(lambda: any("this deploy waits for the freeze to end" in x for x in w.lines))
    await asyncio.sleep(0.3)
    assert w.records.state(ident) == "queued" and w.engine.calls == []
    t0 = time.monotonic()
    usecases.unfreeze(w.another_process(), w.dep("prod"), by="bob")
    out = await asyncio.wait_for(task, 10)
    assert time.monotonic() - t0 < 2.5  # the freezes table is read every second
    assert out.record.state == "succeeded"
    assert "       prod is no longer frozen; this deploy goes on" in log_of(w, ident)


async def test_a_webhook_deploy_runs_when_the_freeze_reaches_its_until(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    made = freezes.start(w.records, "prod", by="alice", reason="short", until=time.time() + 0.8)
    assert made is not None and made.until is not None
    out = await asyncio.wait_for(w.run(webhook(w)), 10)
    assert out.record.state == "succeeded"
    assert out.record.started_at is not None and out.record.started_at >= made.until
    assert out.record.started_at - made.until < 0.5  # a timer for `until`, not the next poll


async def test_a_webhook_deploy_waits_out_a_freeze_window(tmp_path: Path) -> None:
    w = World(tmp_path, prod=window_now(0.2))
    held = usecases.freeze_of(w.records, w.dep("prod"))
    assert held is not None and held.until is not None
    out = await asyncio.wait_for(w.run(webhook(w)), 10)
    assert out.record.state == "succeeded"
    assert out.record.started_at is not None and out.record.started_at >= held.until
    assert any("is frozen by freeze_window since" in x for x in log_of(w, out.record.id))


async def test_waiting_webhook_deploys_coalesce_and_rollbacks_run_meanwhile(
    tmp_path: Path, fast_poll: None
) -> None:
    w = World(tmp_path)
    first = await w.deployed("prod")
    w.commit("second")
    await w.deployed("prod")
    usecases.freeze(w.records, w.dep("prod"), by="alice", reason="incident")
    older = w.pipeline.enqueue(webhook(w))
    waiting = asyncio.create_task(w.run(webhook(w), deploy_id=older))
    await until(lambda: any("waits for the freeze" in x for x in log_of(w, older)))
    # A rollback while frozen: it runs, the waiting webhook deploy does not hold it up.
    back = usecases.rollback(
        w.settings, w.records, w.dep("prod"), first.id, trigger="cli", actor="a", force=False
    )
    rolled = await asyncio.wait_for(w.run(back), 10)
    assert rolled.record.state == "succeeded"
    assert w.records.state(older) == "queued"
    # A newer delivery supersedes the waiting one, as without a freeze.
    newer = w.pipeline.enqueue(webhook(w))
    w.records.supersede_queued("prod", "webhook", newer)
    out = await asyncio.wait_for(waiting, 10)
    assert out.record.state == "superseded"
    last = asyncio.create_task(w.run(webhook(w), deploy_id=newer))
    await asyncio.sleep(0.2)
    assert w.records.state(newer) == "queued"
    usecases.unfreeze(w.records, w.dep("prod"), by="alice")
    assert (await asyncio.wait_for(last, 10)).record.state == "succeeded"


async def test_frozen_while_waiting_for_the_lock_a_webhook_deploy_lets_a_rollback_by(
    tmp_path: Path, fast_poll: None
) -> None:
    w = World(tmp_path)
    first = await w.deployed("prod")
    w.engine.block_build = threading.Event()
    running = asyncio.create_task(w.run(w.request()))
    await until(lambda: any(c.startswith("build") for c in w.engine.calls[1:]))
    hook = webhook(w)
    hook_id = w.pipeline.enqueue(hook)
    waiting = asyncio.create_task(w.run(hook, deploy_id=hook_id))
    await until(lambda: any("queued behind deploy" in x for x in log_of(w, hook_id)))
    # rollback --freeze: the freeze first, then the rollback queues (behind the webhook deploy).
    usecases.freeze_for_rollback(w.records, w.dep("prod"), by="alice", reason="bad release")
    back = usecases.rollback(
        w.settings, w.records, w.dep("prod"), first.id, trigger="cli", actor="a", force=False
    )
    rollback = asyncio.create_task(w.run(back))
    w.engine.block_build.set()
    assert (await running).record.state == "succeeded"
    rolled = (await asyncio.wait_for(rollback, 10)).record
    assert rolled.state == "succeeded" and rolled.digest == first.digest
    assert w.records.state(hook_id) == "queued"  # it did not undo the rollback
    assert w.records.last_succeeded("prod") == w.records.get(rolled.id)
    usecases.unfreeze(w.records, w.dep("prod"), by="alice")
    assert (await asyncio.wait_for(waiting, 10)).record.state == "succeeded"


def test_rollback_freeze_keeps_a_freeze_already_there(tmp_path: Path) -> None:
    w = World(tmp_path)
    prod = w.dep("prod")
    made, new = usecases.freeze_for_rollback(w.records, prod, by="alice", reason="bad release")
    assert new and (made.reason, made.until) == ("bad release", None)
    kept, new = usecases.freeze_for_rollback(w.records, prod, by="bob", reason="other")
    assert not new and kept == made


# -- pure: the plan and the policy ----------------------------------------------------


def test_a_promotions_plan_builds_and_checks_nothing() -> None:
    from daemon.core import deploys

    dep = config.Deployment(
        "prod", "r.test/a/prod", workloads=(config.Workload("deployment", "s"),)
    )
    steps = deploys.plan(dep, Options(pytest=True), promoted_from=("staging", 7))
    assert [(s.name, s.runs) for s in steps] == [
        ("preflight", True),
        ("checkout", False),
        ("build", False),
        ("parse", False),
        ("pytest", False),
        ("push", True),
        ("roll", True),
    ]
    assert steps[1].skip_reason == "skipped: the image of staging's deploy #7, checked there"


@pytest.mark.parametrize(
    ("trigger", "action", "frozen", "branch"),
    [
        ("webhook", "deploy", "waits", "deployd"),
        ("ssh", "deploy", "refused", "git"),
        ("cli", "deploy", "refused", "deployd"),
        ("ssh", "promotion", "refused", "deployd"),
        ("api", "promotion", "refused", "deployd"),
        ("cli", "rollback", "runs", "nobody"),
        ("ssh", "rollback", "runs", "nobody"),
    ],
)
def test_what_a_freeze_does_to_each_deploy(
    trigger: str, action: str, frozen: str, branch: str
) -> None:
    from daemon.core.policy import policy

    rules = policy(trigger, action)
    assert (rules.frozen.value, rules.branch.value) == (frozen, branch)
