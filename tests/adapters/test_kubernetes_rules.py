"""kubectl's rollout-status rules and deployd's own for draining workers (rules.py), as tables.

tests/steps/test_roll.py holds the same verdicts against the real `kubectl rollout status`.
"""

from __future__ import annotations

from typing import Any

import pytest

from daemon.adapters.kubernetes import rules


def deployment(
    *,
    replicas: int | None = 3,
    generation: int = 2,
    observed: int = 2,
    updated: int = 3,
    total: int = 3,
    available: int = 3,
    conditions: list[dict[str, str]] | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "web", "generation": generation}
    if revision is not None:
        meta["annotations"] = {"deployment.kubernetes.io/revision": revision}
    spec = {} if replicas is None else {"replicas": replicas}
    status = {
        "observedGeneration": observed,
        "updatedReplicas": updated,
        "replicas": total,
        "availableReplicas": available,
        "conditions": conditions or [],
    }
    return {"metadata": meta, "spec": spec, "status": status}


DEADLINE = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}


@pytest.mark.parametrize(
    ("obj", "done", "failed", "message"),
    [
        (deployment(), True, False, 'deployment "web" successfully rolled out'),
        (
            deployment(observed=1),
            False,
            False,
            "Waiting for deployment spec update to be observed...",
        ),
        (
            deployment(conditions=[DEADLINE], updated=1),
            False,
            True,
            'deployment "web" exceeded its progress deadline',
        ),
        (
            deployment(updated=1),
            False,
            False,
            'Waiting for deployment "web" rollout to finish: 1 out of 3 new replicas have been '
            "updated...",
        ),
        (
            deployment(total=5),
            False,
            False,
            'Waiting for deployment "web" rollout to finish: 2 old replicas are pending '
            "termination...",
        ),
        (
            deployment(available=2),
            False,
            False,
            'Waiting for deployment "web" rollout to finish: 2 of 3 updated replicas are '
            "available...",
        ),
        (  # kubectl skips the replicas test when spec.replicas is unset
            deployment(replicas=None, updated=1, total=1, available=1),
            True,
            False,
            'deployment "web" successfully rolled out',
        ),
        ({}, True, False, 'deployment "" successfully rolled out'),
    ],
)
def test_deployment_verdict(obj: dict[str, Any], done: bool, failed: bool, message: str) -> None:
    assert rules.verdict("deployment", obj) == rules.Verdict(done, message, failed)


@pytest.mark.parametrize(
    ("revision", "asked", "failed"),
    [("3", 3, False), ("4", 3, True), (None, 3, False), ("x", 3, False), ("4", None, False)],
)
def test_deployment_revision_check(revision: str | None, asked: int | None, failed: bool) -> None:
    got = rules.deployment(deployment(revision=revision), asked)
    assert got.failed == failed
    if failed:
        assert got.message == ("desired revision (3) is different from the running revision (4)")


def statefulset(
    *,
    strategy: dict[str, Any] | None = None,
    replicas: int | None = 3,
    generation: int = 2,
    observed: int = 2,
    ready: int = 3,
    updated: int = 3,
    current: int = 3,
    update_rev: str | None = "w-b",
    current_rev: str | None = "w-b",
) -> dict[str, Any]:
    spec: dict[str, Any] = {} if replicas is None else {"replicas": replicas}
    if strategy is not None:
        spec["updateStrategy"] = strategy
    status: dict[str, Any] = {
        "observedGeneration": observed,
        "readyReplicas": ready,
        "updatedReplicas": updated,
        "currentReplicas": current,
    }
    if update_rev is not None:
        status["updateRevision"] = update_rev
    if current_rev is not None:
        status["currentRevision"] = current_rev
    return {"metadata": {"name": "w", "generation": generation}, "spec": spec, "status": status}


PARTITION = {"type": "RollingUpdate", "rollingUpdate": {"partition": 1}}


@pytest.mark.parametrize(
    ("obj", "done", "failed", "message"),
    [
        (
            statefulset(),
            True,
            False,
            "statefulset rolling update complete 3 pods at revision w-b...",
        ),
        (
            statefulset(strategy={"type": "OnDelete"}),
            False,
            True,
            "rollout status is only available for RollingUpdate strategy type",
        ),
        (
            statefulset(observed=0, generation=0),
            False,
            False,
            "Waiting for statefulset spec update to be observed...",
        ),
        (
            statefulset(observed=1),
            False,
            False,
            "Waiting for statefulset spec update to be observed...",
        ),
        (statefulset(ready=1), False, False, "Waiting for 2 pods to be ready..."),
        (
            statefulset(strategy=PARTITION, updated=1),
            False,
            False,
            "Waiting for partitioned roll out to finish: 1 out of 2 new pods have been updated...",
        ),
        (
            statefulset(strategy=PARTITION, updated=2),
            True,
            False,
            "partitioned roll out complete: 2 new pods have been updated...",
        ),
        (
            statefulset(current_rev="w-a", updated=1),
            False,
            False,
            "waiting for statefulset rolling update to complete 1 pods at revision w-b...",
        ),
    ],
)
def test_statefulset_verdict(obj: dict[str, Any], done: bool, failed: bool, message: str) -> None:
    assert rules.verdict("statefulset", obj) == rules.Verdict(done, message, failed)


@pytest.mark.parametrize(
    ("obj", "done", "message"),
    [
        (
            statefulset(updated=1, current_rev="w-a", ready=1),
            True,
            "new template taken (revision w-b); 1 of 3 pods updated, the rest follow as they "
            "finish their tasks",
        ),
        (
            statefulset(replicas=None, updated=0),
            True,
            "new template taken (revision w-b); 0 of ? pods updated, the rest follow as they "
            "finish their tasks",
        ),
        (statefulset(observed=1), False, "Waiting for statefulset spec update to be observed..."),
        (statefulset(update_rev=None), False, "Waiting for the statefulset's update revision..."),
        (  # an OnDelete worker would be refused by preflight before it got here
            statefulset(strategy={"type": "OnDelete"}, updated=0),
            True,
            "new template taken (revision w-b); 0 of 3 pods updated, the rest follow as they "
            "finish their tasks",
        ),
    ],
)
def test_settled_worker_statefulset(obj: dict[str, Any], done: bool, message: str) -> None:
    assert rules.settled(obj) == rules.Verdict(done, message)


@pytest.mark.parametrize(
    ("conditions", "want"),
    [
        ([], rules.Verdict(False, "job/m is running")),
        (
            [{"type": "Complete", "status": "True"}],
            rules.Verdict(True, "job/m complete"),
        ),
        (
            [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            ],
            rules.Verdict(
                False, "job/m failed: Job has reached the specified backoff limit", failed=True
            ),
        ),
        (
            [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}],
            rules.Verdict(False, "job/m failed: DeadlineExceeded", failed=True),
        ),
        (
            [{"type": "Complete", "status": "False"}, {"type": "Suspended", "status": "True"}],
            rules.Verdict(False, "job/m is running"),
        ),
    ],
)
def test_job_verdict(conditions: list[dict[str, str]], want: rules.Verdict) -> None:
    assert rules.job({"metadata": {"name": "m"}, "status": {"conditions": conditions}}) == want
