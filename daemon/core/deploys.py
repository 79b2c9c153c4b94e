"""The deploy state machine, the step plan and tag naming: pure functions, no I/O.

States (SPEC.md): queued → running → succeeded | failed | rolled_back |
cancelled | superseded | interrupted. The pipeline asks `check_transition`
before every write, and writes before it acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from daemon.config import Deployment

QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
CANCELLED = "cancelled"
SUPERSEDED = "superseded"
INTERRUPTED = "interrupted"

FINAL_STATES = frozenset({SUCCEEDED, FAILED, ROLLED_BACK, CANCELLED, SUPERSEDED, INTERRUPTED})
_TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, SUPERSEDED, INTERRUPTED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, ROLLED_BACK, CANCELLED, INTERRUPTED}),
}

# The steps of a deploy, in order. `push` may start (as an upload under a
# staging tag) while `parse` and `pytest` run, but it only tags after them.
STEPS = ("preflight", "checkout", "build", "parse", "pytest", "push", "roll")


class TransitionError(ValueError):
    """A state change the machine does not allow."""


def check_transition(current: str, new: str) -> None:
    """Raise TransitionError unless a deploy may go from `current` to `new`."""
    if new not in _TRANSITIONS.get(current, frozenset()):
        raise TransitionError(f"a deploy cannot go from {current} to {new}")


@dataclass(frozen=True)
class Options:
    """What the requester asked for."""

    force: bool = False
    pytest: bool = False
    description: str = ""
    allow_dirty: bool = False


@dataclass(frozen=True)
class PlannedStep:
    """One step of a deploy and, if it will not run, why."""

    name: str
    skip_reason: str = ""

    @property
    def runs(self) -> bool:
        return not self.skip_reason


def plan(
    deployment: Deployment, options: Options, rollback_to: int | None = None
) -> tuple[PlannedStep, ...]:
    """Decide which steps a deploy runs; the order is STEPS."""
    wants_pytest = options.pytest or deployment.pytest
    no_workloads = "" if deployment.workloads else "skipped: no workloads"
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
