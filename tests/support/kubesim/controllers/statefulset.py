"""The StatefulSet controller: ControllerRevisions, and ordinal pods made one at a time
(OrderedReady) and updated from the highest ordinal down to the partition."""

from __future__ import annotations

from typing import Any

from tests.support.kubesim.controllers.common import (
    REVISIONS,
    SLOW_STEP,
    STATEFULSETS,
    ControllerBase,
    copied,
    is_ready,
    is_terminating,
    labels,
    owned_by,
    owner_ref,
    template_hash,
)

REVISION_HASH = "controller-revision-hash"


def _replicas(sts: dict[str, Any]) -> int:
    return int((sts.get("spec") or {}).get("replicas", 1))


def _partition(sts: dict[str, Any]) -> int:
    strategy = (sts.get("spec") or {}).get("updateStrategy") or {}
    return int((strategy.get("rollingUpdate") or {}).get("partition", 0))


def _ordinal(pod_name: str) -> int:
    return int(pod_name.rsplit("-", 1)[1])


class StatefulSetController(ControllerBase):
    def _statefulset(self, sts: dict[str, Any], t: float) -> None:
        name, uid = sts["metadata"]["name"], sts["metadata"]["uid"]
        thash = template_hash((sts.get("spec") or {}).get("template") or {})
        update_rev = f"{name}-{thash}"
        self._sync_revision(sts, thash, update_rev)
        current_rev = (sts.get("status") or {}).get("currentRevision") or update_rev
        scenario = self._scenario(sts, "StatefulSet", thash)
        pods = {p["metadata"]["name"]: p for p in self._pods_of(sts)}
        step_ok = scenario != "slow" or t - self.last_step.get(uid, 0) >= SLOW_STEP
        busy = any(is_terminating(p) or not is_ready(p) for p in pods.values())
        if not busy and step_ok:
            busy = self._create_next(sts, pods, update_rev, current_rev, t)
        for pod_name, pod in sorted(pods.items()):
            if _ordinal(pod_name) >= _replicas(sts) and not is_terminating(pod):
                self._terminate(pod)
        if not busy and step_ok:
            self._update_next(sts, pods, update_rev, t)
        self._statefulset_status(sts, update_rev, current_rev)

    def _sync_revision(self, sts: dict[str, Any], thash: str, update_rev: str) -> None:
        """Make the ControllerRevision of the current template, or renumber it on a rollback."""
        ns = sts["metadata"]["namespace"]
        revs = [r for r in self.store.list(REVISIONS, ns) if owned_by(r, sts)]
        rev = next((r for r in revs if r["metadata"]["name"] == update_rev), None)
        if rev is not None:
            top = max(int(r.get("revision", 0)) for r in revs)
            if int(rev.get("revision", 0)) < top:  # rolled back to an earlier template
                rev["revision"] = top + 1
                self.store.replace(REVISIONS, ns, update_rev, rev, check_rv=False)
            return
        if not revs:
            self.proven.add(("StatefulSet", sts["metadata"]["uid"], thash))
        spec = sts.get("spec") or {}
        data_template = copied(spec.get("template") or {})
        data_template["$patch"] = "replace"
        self.store.create(
            REVISIONS,
            ns,
            {
                "metadata": {
                    "name": update_rev,
                    "labels": dict((spec.get("selector") or {}).get("matchLabels") or {})
                    | {"controller.kubernetes.io/hash": thash},
                    "ownerReferences": [owner_ref(sts)],
                },
                "data": {"spec": {"template": data_template}},
                "revision": max((int(r.get("revision", 0)) for r in revs), default=0) + 1,
            },
        )

    def _create_next(
        self,
        sts: dict[str, Any],
        pods: dict[str, dict[str, Any]],
        update_rev: str,
        current_rev: str,
        t: float,
    ) -> bool:
        """Create the lowest missing ordinal's pod, if any is missing: whether one was made."""
        name = sts["metadata"]["name"]
        missing = (o for o in range(_replicas(sts)) if f"{name}-{o}" not in pods)
        ordinal = next(missing, None)
        if ordinal is None:
            return False
        use_rev = update_rev if ordinal >= _partition(sts) else current_rev
        template = (sts.get("spec") or {}).get("template") or {}
        rev_obj = self.store.find(REVISIONS, sts["metadata"]["namespace"], use_rev)
        if rev_obj is not None and use_rev != update_rev:
            template = {
                k: v for k, v in rev_obj["data"]["spec"]["template"].items() if k != "$patch"
            }
        rev_hash = use_rev.rsplit("-", 1)[1]
        pod_name = f"{name}-{ordinal}"
        self._new_pod(
            sts["metadata"]["namespace"],
            pod_name,
            template,
            sts,
            {REVISION_HASH: use_rev, "statefulset.kubernetes.io/pod-name": pod_name},
            self._scenario(sts, "StatefulSet", rev_hash),
            ("StatefulSet", sts["metadata"]["uid"], rev_hash),
        )
        self.last_step[sts["metadata"]["uid"]] = t
        return True

    def _update_next(
        self, sts: dict[str, Any], pods: dict[str, dict[str, Any]], update_rev: str, t: float
    ) -> None:
        """Terminate the highest outdated ordinal at or above the partition, if any."""
        name = sts["metadata"]["name"]
        for ordinal in reversed(range(_partition(sts), _replicas(sts))):
            pod = pods.get(f"{name}-{ordinal}")
            if pod is None or is_terminating(pod):
                continue
            if labels(pod).get(REVISION_HASH) != update_rev:
                self._terminate(pod)
                self.last_step[sts["metadata"]["uid"]] = t
                break

    def _statefulset_status(self, sts: dict[str, Any], update_rev: str, current_rev: str) -> None:
        replicas = _replicas(sts)
        pods = [p for p in self._pods_of(sts) if not is_terminating(p)]
        ready = sum(1 for p in pods if is_ready(p))
        updated = sum(1 for p in pods if labels(p).get(REVISION_HASH) == update_rev)
        if updated == replicas and ready == replicas and len(pods) == replicas:
            current_rev = update_rev
        current = sum(1 for p in pods if labels(p).get(REVISION_HASH) == current_rev)
        new_status = {
            "observedGeneration": sts["metadata"]["generation"],
            "replicas": len(pods),
            "readyReplicas": ready,
            "currentReplicas": current,
            "updatedReplicas": updated,
            "availableReplicas": ready,
            "currentRevision": current_rev,
            "updateRevision": update_rev,
            "collisionCount": 0,
        }
        if (sts.get("status") or {}) != new_status:
            self._write_status(STATEFULSETS, sts, new_status)
