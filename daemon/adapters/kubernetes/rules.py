"""When is a rollout done, or failed? kubectl's own rules, as pure functions over the object.

These follow `kubectl rollout status` (k8s.io/kubectl/pkg/polymorphichelpers/
rollout_status.go) so that deployd's verdict on a workload is kubectl's: the
same conditions, in the same order, with the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """Where a rollout stands: done, failed (with why), or still going (with progress)."""

    done: bool
    message: str
    failed: bool = False


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int) else 0


def deployment(obj: dict[str, Any], revision: int | None = None) -> Verdict:
    """kubectl's DeploymentStatusViewer."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    name = meta.get("name", "")
    if revision is not None:
        current = (meta.get("annotations") or {}).get("deployment.kubernetes.io/revision")
        if current is not None and current.isdecimal() and int(current) != revision:
            return Verdict(
                False,
                f"desired revision ({revision}) is different from the running revision ({current})",
                failed=True,
            )
    if _int(meta.get("generation")) > _int(status.get("observedGeneration")):
        return Verdict(False, "Waiting for deployment spec update to be observed...")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return Verdict(
                False, f'deployment "{name}" exceeded its progress deadline', failed=True
            )
    replicas = spec.get("replicas")  # kubectl skips this test when the field is unset
    updated = _int(status.get("updatedReplicas"))
    total = _int(status.get("replicas"))
    available = _int(status.get("availableReplicas"))
    if isinstance(replicas, int) and updated < replicas:
        return Verdict(
            False,
            f'Waiting for deployment "{name}" rollout to finish: {updated} out '
            f"of {replicas} new replicas have been updated...",
        )
    if total > updated:
        return Verdict(
            False,
            f'Waiting for deployment "{name}" rollout to finish: '
            f"{total - updated} old replicas are pending termination...",
        )
    if available < updated:
        return Verdict(
            False,
            f'Waiting for deployment "{name}" rollout to finish: {available} '
            f"of {updated} updated replicas are available...",
        )
    return Verdict(True, f'deployment "{name}" successfully rolled out')


def statefulset(obj: dict[str, Any]) -> Verdict:
    """kubectl's StatefulSetStatusViewer."""
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    strategy = spec.get("updateStrategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        return Verdict(
            False, "rollout status is only available for RollingUpdate strategy type", failed=True
        )
    if _int(status.get("observedGeneration")) == 0 or _int(meta.get("generation")) > _int(
        status.get("observedGeneration")
    ):
        return Verdict(False, "Waiting for statefulset spec update to be observed...")
    replicas = spec.get("replicas")
    ready = _int(status.get("readyReplicas"))
    if isinstance(replicas, int) and ready < replicas:
        return Verdict(False, f"Waiting for {replicas - ready} pods to be ready...")
    rolling = strategy.get("rollingUpdate")
    if isinstance(rolling, dict):  # kubectl: any rollingUpdate block means "partitioned"
        updated = _int(status.get("updatedReplicas"))
        partition = rolling.get("partition")
        if (
            isinstance(replicas, int)
            and isinstance(partition, int)
            and updated < replicas - partition
        ):
            return Verdict(
                False,
                f"Waiting for partitioned roll out to finish: {updated} out of "
                f"{replicas - partition} new pods have been updated...",
            )
        return Verdict(
            True, f"partitioned roll out complete: {updated} new pods have been updated..."
        )
    if status.get("updateRevision") != status.get("currentRevision"):
        return Verdict(
            False,
            f"waiting for statefulset rolling update to complete "
            f"{_int(status.get('updatedReplicas'))} pods at revision "
            f"{status.get('updateRevision')}...",
        )
    current = _int(status.get("currentReplicas"))
    return Verdict(
        True,
        f"statefulset rolling update complete {current} pods at revision "
        f"{status.get('currentRevision')}...",
    )


def settled(obj: dict[str, Any]) -> Verdict:
    """A worker StatefulSet whose old pods may drain their tasks for hours.

    The StatefulSet controller replaces pod N only once the old pod N has
    stopped, so waiting by kubectl's rule would wait for every drain in turn.
    deployd counts it rolled once the controller has taken the new template;
    the pods move to it as they finish their tasks, and the roll reports them.
    """
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if _int(meta.get("generation")) > _int(status.get("observedGeneration")):
        return Verdict(False, "Waiting for statefulset spec update to be observed...")
    revision = status.get("updateRevision")
    if not revision:
        return Verdict(False, "Waiting for the statefulset's update revision...")
    updated = _int(status.get("updatedReplicas"))
    replicas = (obj.get("spec") or {}).get("replicas")
    return Verdict(
        True,
        f"new template taken (revision {revision}); {updated} of "
        f"{replicas if isinstance(replicas, int) else '?'} pods updated, the rest "
        "follow as they finish their tasks",
    )


def job(obj: dict[str, Any]) -> Verdict:
    """A Job by its conditions, as `kubectl wait --for=condition=complete` reads them."""
    name = (obj.get("metadata") or {}).get("name", "")
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return Verdict(True, f"job/{name} complete")
        if cond.get("type") == "Failed":
            why = cond.get("message") or cond.get("reason")
            return Verdict(False, f"job/{name} failed: {why}", failed=True)
    return Verdict(False, f"job/{name} is running")


def verdict(kind: str, obj: dict[str, Any]) -> Verdict:
    """The verdict for a workload of `kind` (`deployment` or `statefulset`)."""
    return deployment(obj) if kind == "deployment" else statefulset(obj)
