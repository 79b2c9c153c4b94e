"""The pure deploy core: state machine, plan, tag naming."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from daemon.config import Deployment, Workload
from daemon.core import deploys
from daemon.core.deploys import Options, TransitionError


def test_allowed_transitions() -> None:
    deploys.check_transition("queued", "running")
    deploys.check_transition("queued", "superseded")
    deploys.check_transition("running", "rolled_back")
    deploys.check_transition("running", "interrupted")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("queued", "succeeded"),
        ("succeeded", "failed"),
        ("running", "queued"),
        ("failed", "running"),
        ("running", "superseded"),
        ("interrupted", "running"),
    ],
)
def test_refused_transitions(a: str, b: str) -> None:
    with pytest.raises(TransitionError):
        deploys.check_transition(a, b)


def test_plan_skips_pytest_and_roll_by_default() -> None:
    plan = deploys.plan(Deployment(name="p", image="r.io/a/b"), Options())
    assert [s.name for s in plan] == [s for s in deploys.STEPS if s not in ("publish", "live")]
    skipped = {s.name: s.skip_reason for s in plan if not s.runs}
    assert skipped == {
        "preflight": "skipped: no workloads",
        "pytest": "skipped: not requested",
        "roll": "skipped: no workloads",
    }


def test_a_dag_deploy_checks_publishes_and_follows_airflow_only() -> None:
    dep = Deployment(name="p", image="r.io/a/b", dag_source="git")
    plan = deploys.plan(dep, Options(pytest=True), kind=deploys.DAGS)
    assert [(s.name, s.runs) for s in plan] == [
        ("checkout", True),
        ("parse", True),
        ("pytest", True),
        ("publish", True),
        ("live", False),  # no airflow_api_url
    ]
    assert plan[-1].skip_reason.startswith("skipped: no airflow_api_url")
    # The steps keep STEPS' order.
    assert [s.name for s in plan] == [s for s in deploys.STEPS if s in {p.name for p in plan}]


def test_plan_runs_pytest_when_asked_or_configured() -> None:
    dep = Deployment(name="p", image="r.io/a/b")
    assert deploys.plan(dep, Options(pytest=True))[3].runs
    assert deploys.plan(Deployment(name="p", image="r.io/a/b", pytest=True), Options())[3].runs
    with_workloads = Deployment(
        name="p", image="r.io/a/b", workloads=(Workload("deployment", "x"),)
    )
    assert deploys.plan(with_workloads, Options())[5].runs


def test_image_tag_renders_template() -> None:
    when = datetime(2024, 10, 1, 12, 30, 5, tzinfo=UTC)
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert (
        deploys.image_tag("deploy-{time}-{sha7}-{id}", deploy_id=41, commit=sha, when=when)
        == "deploy-2024-10-01T12-30-05-0123456-41"
    )
    assert deploys.image_tag("{sha}-{id}", deploy_id=1, commit=sha, when=when) == f"{sha}-1"
