"""The deploy state machine, the step plan and tag naming: pure functions, no I/O.

States (SPEC.md): queued → running → succeeded | failed | rolled_back |
cancelled | superseded | interrupted. The pipeline asks `check_transition`
before every write, and writes before it acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from daemon.config import Deployment
from daemon.core.kinds import DAGS, IMAGE, KINDS
from daemon.core.states import (
    CANCELLED,
    FAILED,
    FINAL_STATES,
    INTERRUPTED,
    QUEUED,
    ROLLED_BACK,
    RUNNING,
    STARTED,
    SUCCEEDED,
    SUPERSEDED,
    TRANSITIONS,
)

__all__ = [
    "CANCELLED",
    "DAGS",
    "FAILED",
    "FINAL_STATES",
    "IMAGE",
    "INTERRUPTED",
    "KINDS",
    "QUEUED",
    "ROLLED_BACK",
    "RUNNING",
    "SUCCEEDED",
    "SUPERSEDED",
]

# The steps of a deploy, in order. `push` may start (as an upload under a
# staging tag) while `parse` and `pytest` run, but it only tags after them.
# A DAG deploy (core/kinds.py) runs checkout, parse, [pytest], publish (the branch
# Airflow reads moves) and live (Airflow reports the new DAGs parsed).
STEPS = ("preflight", "checkout", "build", "parse", "pytest", "push", "roll", "publish", "live")


class TransitionError(ValueError):
    """A state change the machine does not allow."""


def check_transition(current: str, new: str) -> None:
    """Raise TransitionError unless a deploy may go from `current` to `new`."""
    if new not in TRANSITIONS.get(current, frozenset()):
        raise TransitionError(f"a deploy cannot go from {current} to {new}")


@dataclass(frozen=True)
class Options:
    """What the requester asked for."""

    force: bool = False
    pytest: bool = False
    description: str = ""
    allow_dirty: bool = False
    # An admin's push through a freeze (`git push -o override-freeze`), recorded.
    override_freeze: bool = False
    # An image deploy even if only DAGs changed (`git push -o image`, `deploy --image`).
    image: bool = False


# Where a deploy came from, and what it does (two fields, one meaning each).
TRIGGERS = ("ssh", "webhook", "cli", "api", "dashboard")
DEPLOY = "deploy"
ROLLBACK = "rollback"
PROMOTION = "promotion"
ACTIONS = (DEPLOY, ROLLBACK, PROMOTION)


@dataclass(frozen=True)
class StepRecord:
    """One step of a recorded deploy."""

    name: str
    state: str
    started_at: float | None = None
    finished_at: float | None = None
    summary: str | None = None


@dataclass(frozen=True)
class Deploy:
    """A deploy as recorded: who asked for what, how far it got, what it produced."""

    id: int
    deployment: str
    state: str
    trigger: str
    action: str
    actor: str
    ref: str
    commit: str | None
    created_at: float
    options: Options = Options()
    description: str = ""
    tree: str | None = None
    image: str | None = None
    tag: str | None = None
    digest: str | None = None
    step: str | None = None
    pid: int | None = None
    error: str | None = None
    rollback_of: int | None = None
    promoted_from: str | None = None  # the deployment a promotion took its image from
    promoted_from_id: int | None = None  # ... and that deployment's deploy
    cancelled_by: str | None = None  # who asked for the cancel (set when asked)
    kind: str = IMAGE  # what it ships: kinds.IMAGE or kinds.DAGS (core/kinds.py)
    report: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    steps: tuple[StepRecord, ...] = ()

    @property
    def final(self) -> bool:
        """Whether the deploy has ended (one of FINAL_STATES)."""
        return self.state in FINAL_STATES

    @property
    def airflow_version(self) -> str | None:
        """The Airflow version its DAG check found in the image, if it ran."""
        return airflow_version(self.report)

    @property
    def image_ref(self) -> str:
        """`IMAGE:TAG@DIGEST` of what it deployed ('' if it pushed nothing)."""
        return f"{self.image}:{self.tag}@{self.digest}" if self.digest else ""


@dataclass(frozen=True)
class LogLine:
    """One stored line of a deploy's log."""

    id: int
    ts: float
    step: str | None
    line: str


def event_of(state: str) -> str:
    """The outbox event for a deploy that has just reached `state` (states.EVENTS)."""
    return STARTED if state == RUNNING else state


@dataclass(frozen=True)
class DeployEvent:
    """One row of the outbox: a deploy reached a state (core/deploys.EVENTS)."""

    id: int
    deploy_id: int
    deployment: str
    event: str
    at: float


@dataclass(frozen=True)
class TargetState:
    """Where one notification target is in the outbox, and its current retry."""

    target: str
    cursor: int
    attempts: int = 0
    next_at: float | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class PlannedStep:
    """One step of a deploy and, if it will not run, why."""

    name: str
    skip_reason: str = ""

    @property
    def runs(self) -> bool:
        return not self.skip_reason


def plan(
    deployment: Deployment,
    options: Options,
    rollback_to: int | None = None,
    promoted_from: tuple[str, int] | None = None,
    kind: str = IMAGE,
) -> tuple[PlannedStep, ...]:
    """Decide which steps a deploy runs; the order is STEPS.

    A DAG deploy (`kind` DAGS) builds, pushes and rolls nothing: its checks run in the
    image that runs now, `publish` moves the branch Airflow reads, and `live` follows
    Airflow's API (when the deployment has one) until the new commit is parsed. A
    rollback of a DAG deploy is one too: it checks the target's DAGs again.

    A promotion (`promoted_from`: the source deployment and its deploy) builds and
    checks nothing: its push step tags the source's image, by digest, in this
    deployment's repository.
    """
    wants_pytest = options.pytest or deployment.pytest
    no_workloads = "" if deployment.workloads else "skipped: no workloads"
    if kind == DAGS:
        no_api = (
            ""
            if deployment.airflow is not None
            else "skipped: no airflow_api_url; Airflow picks the commit up within its "
            "bundle's refresh_interval"
        )
        return (
            PlannedStep("checkout"),
            PlannedStep("parse"),
            PlannedStep("pytest", "" if wants_pytest else "skipped: not requested"),
            PlannedStep("publish"),
            PlannedStep("live", no_api),
        )
    if promoted_from is not None:
        source, source_id = promoted_from
        reused = f"skipped: the image of {source}'s deploy #{source_id}, checked there"
        return (
            PlannedStep("preflight", no_workloads),
            *(PlannedStep(name, reused) for name in ("checkout", "build", "parse", "pytest")),
            PlannedStep("push"),
            PlannedStep("roll", no_workloads),
        )
    if rollback_to is not None:
        reused = f"skipped: rollback to the image of deploy #{rollback_to}"
        return (
            PlannedStep("preflight", no_workloads),
            *(
                PlannedStep(name, reused)
                for name in ("checkout", "build", "parse", "pytest", "push")
            ),
            PlannedStep("roll", no_workloads),
        )
    return (
        PlannedStep("preflight", no_workloads),
        PlannedStep("checkout"),
        PlannedStep("build"),
        PlannedStep("parse"),
        PlannedStep("pytest", "" if wants_pytest else "skipped: not requested"),
        PlannedStep("push"),
        PlannedStep("roll", no_workloads),
    )


def airflow_version(report: dict[str, Any] | None) -> str | None:
    """The Airflow version a DAG check report found in the image, if any."""
    version = (report or {}).get("airflow_version")
    return str(version) if version else None


def version_key(text: str | None) -> tuple[int, ...]:
    """An Airflow version ("3.3.2") as a tuple that orders like versions."""
    return tuple(int(p) for p in (text or "").split(".")[:3] if p.isdecimal())


def image_tag(template: str, *, deploy_id: int, commit: str, when: datetime) -> str:
    """Render a deployment's tag_template for one deploy (unique: it contains {id})."""
    return template.format(
        time=when.strftime("%Y-%m-%dT%H-%M-%S"),
        sha7=commit[:7],
        sha=commit,
        id=deploy_id,
    )
