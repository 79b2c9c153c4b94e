"""The Deployment controller: one ReplicaSet per pod template, rolled with surge and
unavailability budgets, and the status and conditions the real controller writes."""

from __future__ import annotations

import math
from typing import Any

from tests.support.kubesim.controllers.common import (
    DEPLOYMENTS,
    REPLICASETS,
    REVISION,
    SLOW_STEP,
    ControllerBase,
    annotations,
    condition,
    copied,
    is_ready,
    labels,
    owned_by,
    owner_ref,
    strip_times,
    template_hash,
)


def _surge(replicas: int) -> int:
    return max(1, math.ceil(replicas * 0.25))


def _max_unavailable(replicas: int) -> int:
    return math.floor(replicas * 0.25)


def _revision(rs: dict[str, Any]) -> int:
    return int(annotations(rs).get(REVISION, "0"))


def _replicas(obj: dict[str, Any], default: int) -> int:
    return int((obj.get("spec") or {}).get("replicas", default))


class DeploymentController(ControllerBase):
    def _deployment(self, dep: dict[str, Any], t: float) -> None:
        uid = dep["metadata"]["uid"]
        spec = dep.get("spec") or {}
        thash = template_hash(spec.get("template") or {})
        ns = dep["metadata"]["namespace"]
        owned = [rs for rs in self.store.list(REPLICASETS, ns) if owned_by(rs, dep)]
        new = self._current_replicaset(dep, owned, thash)
        olds = [rs for rs in owned if rs["metadata"]["uid"] != new["metadata"]["uid"]]
        scenario = self._scenario(dep, "Deployment", thash)
        new_pods = self._live_pods(new)
        old_pods = [p for rs in olds for p in self._live_pods(rs)]
        if scenario != "slow" or t - self.last_step.get(uid, 0.0) >= SLOW_STEP:
            self._roll(dep, new, olds, new_pods, old_pods, scenario, t)
        self._deployment_status(dep, new, new_pods, old_pods, t)

    # -- replicasets -----------------------------------------------------------

    def _current_replicaset(
        self, dep: dict[str, Any], owned: list[dict[str, Any]], thash: str
    ) -> dict[str, Any]:
        """The ReplicaSet of the current template: found, made, or (rolled back to) re-revised."""
        top = max((_revision(rs) for rs in owned), default=0)
        new = next((rs for rs in owned if labels(rs).get("pod-template-hash") == thash), None)
        if new is None:
            if not owned:  # what a workload is created with runs: scenarios are for changes
                self.proven.add(("Deployment", dep["metadata"]["uid"], thash))
            return self._create_replicaset(dep, thash, top + 1)
        if _revision(new) < top:
            new["metadata"]["annotations"][REVISION] = str(top + 1)  # rolled back to it
            ns = dep["metadata"]["namespace"]
            new = self.store.replace(REPLICASETS, ns, new["metadata"]["name"], new, check_rv=False)
        return new

    def _create_replicaset(self, dep: dict[str, Any], thash: str, revision: int) -> dict[str, Any]:
        spec = dep.get("spec") or {}
        rs_template = copied(spec.get("template") or {})
        rs_labels = rs_template.setdefault("metadata", {}).setdefault("labels", {})
        rs_labels["pod-template-hash"] = thash
        selector = copied(spec.get("selector") or {})
        selector.setdefault("matchLabels", {})["pod-template-hash"] = thash
        rs_annotations = {REVISION: str(revision)}
        cause = annotations(dep).get("kubernetes.io/change-cause")
        if cause:
            rs_annotations["kubernetes.io/change-cause"] = cause
        return self.store.create(
            REPLICASETS,
            dep["metadata"]["namespace"],
            {
                "metadata": {
                    "name": f"{dep['metadata']['name']}-{thash}",
                    "labels": rs_labels,
                    "annotations": rs_annotations,
                    "ownerReferences": [owner_ref(dep)],
                },
                "spec": {"replicas": 0, "selector": selector, "template": rs_template},
            },
        )

    # -- rolling ---------------------------------------------------------------

    def _roll(
        self,
        dep: dict[str, Any],
        new: dict[str, Any],
        olds: list[dict[str, Any]],
        new_pods: list[dict[str, Any]],
        old_pods: list[dict[str, Any]],
        scenario: str,
        t: float,
    ) -> None:
        """One step of RollingUpdate: grow the new ReplicaSet, then shrink the old ones."""
        uid = dep["metadata"]["uid"]
        replicas = _replicas(dep, 1)
        old_total = sum(_replicas(rs, 0) for rs in olds)
        new_count = _replicas(new, 0)
        room = replicas + _surge(replicas) - (new_count + old_total)
        want_new = min(replicas, new_count + max(0, room))
        if scenario == "slow":
            want_new = min(want_new, new_count + 1)
        if want_new != new_count:
            self._scale(REPLICASETS, new, want_new)
            self.last_step[uid] = t
        ready = sum(1 for p in new_pods + old_pods if is_ready(p))
        removable = ready - (replicas - _max_unavailable(replicas))
        unready_old = len(old_pods) - sum(1 for p in old_pods if is_ready(p))
        for rs in sorted(olds, key=lambda r: r["metadata"]["name"]):
            have = _replicas(rs, 0)
            if have == 0:
                continue
            cut = min(have, max(0, removable) + unready_old)
            if scenario == "slow":
                cut = min(cut, 1)
            if cut > 0:
                self._scale(REPLICASETS, rs, have - cut)
                removable -= cut
                self.last_step[uid] = t

    # -- status ----------------------------------------------------------------

    def _deployment_status(
        self,
        dep: dict[str, Any],
        new: dict[str, Any],
        new_pods: list[dict[str, Any]],
        old_pods: list[dict[str, Any]],
        t: float,
    ) -> None:
        """Status as the deployment controller writes it, with the revision annotation."""
        replicas = _replicas(dep, 1)
        all_pods = new_pods + old_pods
        available = sum(1 for p in all_pods if is_ready(p))
        complete, last_time = self._track_progress(dep, new, new_pods, old_pods, t)
        progressing = _progressing(dep, new["metadata"]["name"], complete, t - last_time)
        old_status = dep.get("status") or {}
        avail_ok = available >= replicas - _max_unavailable(replicas)
        conditions = [
            condition(
                old_status,
                "Available",
                "True" if avail_ok else "False",
                "MinimumReplicasAvailable" if avail_ok else "MinimumReplicasUnavailable",
                "Deployment has minimum availability."
                if avail_ok
                else "Deployment does not have minimum availability.",
            ),
            condition(old_status, "Progressing", *progressing),
        ]
        status = {
            "observedGeneration": dep["metadata"]["generation"],
            "replicas": len(all_pods),
            "updatedReplicas": len(new_pods),
            "readyReplicas": available,
            "availableReplicas": available,
            "conditions": conditions,
        }
        if len(all_pods) - available:
            status["unavailableReplicas"] = len(all_pods) - available
        status = {k: v for k, v in status.items() if v != 0 or k == "observedGeneration"}
        self._write_deployment(dep, new, status)

    def _track_progress(
        self,
        dep: dict[str, Any],
        new: dict[str, Any],
        new_pods: list[dict[str, Any]],
        old_pods: list[dict[str, Any]],
        t: float,
    ) -> tuple[bool, float]:
        """Whether the rollout is complete, and when it last made progress."""
        uid = dep["metadata"]["uid"]
        replicas = _replicas(dep, 1)
        updated = len(new_pods)
        new_ready = sum(1 for p in new_pods if is_ready(p))
        progress_key = (new["metadata"]["uid"], updated, new_ready, len(old_pods))
        last_time, last_key = self.progress.get(uid, (t, None))
        if progress_key != last_key:
            self.progress[uid] = (t, progress_key)
            last_time = t
        complete = updated == replicas and new_ready == replicas and not old_pods
        generation = dep["metadata"]["generation"]
        if complete and self._complete.get(uid) != (generation, True):
            self._became.append((dep["metadata"]["namespace"], dep["metadata"]["name"]))
        self._complete[uid] = (generation, complete)
        return complete, last_time

    def _write_deployment(
        self, dep: dict[str, Any], new: dict[str, Any], status: dict[str, Any]
    ) -> None:
        """Store the status, and the new ReplicaSet's revision, when either changed."""
        ns, name = dep["metadata"]["namespace"], dep["metadata"]["name"]
        revision = annotations(dep).get(REVISION)
        new_rev = annotations(new).get(REVISION)
        if strip_times(dep.get("status") or {}) == strip_times(status) and revision == new_rev:
            return
        if revision != new_rev:
            dep["metadata"].setdefault("annotations", {})[REVISION] = new_rev
            dep = self.store.replace(DEPLOYMENTS, ns, name, dep, check_rv=False)
        self._write_status(DEPLOYMENTS, dep, status)


def _progressing(
    dep: dict[str, Any], rs_name: str, complete: bool, stalled_for: float
) -> tuple[str, str, str]:
    """The Progressing condition's status, reason and message."""
    if complete:
        return (
            "True",
            "NewReplicaSetAvailable",
            f'ReplicaSet "{rs_name}" has successfully progressed.',
        )
    old_status = dep.get("status") or {}
    old = next(
        (c for c in old_status.get("conditions") or [] if c.get("type") == "Progressing"), None
    )
    deadline = float((dep.get("spec") or {}).get("progressDeadlineSeconds", 600))
    if (
        old
        and old.get("reason") == "ProgressDeadlineExceeded"
        and old_status.get("observedGeneration") == dep["metadata"]["generation"]
    ) or stalled_for > deadline:
        return (
            "False",
            "ProgressDeadlineExceeded",
            f'ReplicaSet "{rs_name}" has timed out progressing.',
        )
    return ("True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.')
