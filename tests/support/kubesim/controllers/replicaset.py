"""The ReplicaSet controller: keep `spec.replicas` pods, removing unready ones first."""

from __future__ import annotations

from typing import Any

from tests.support.kubesim.controllers.common import (
    DEPLOYMENTS,
    NO_PROOF,
    PODS,
    REPLICASETS,
    ControllerBase,
    is_ready,
    labels,
)


class ReplicaSetController(ControllerBase):
    def _replicaset(self, rs: dict[str, Any], t: float) -> None:
        owner = self._deployment_of(rs)
        thash = labels(rs).get("pod-template-hash", "")
        scenario = self._scenario(owner, "Deployment", thash) if owner else "instant"
        proven = ("Deployment", owner["metadata"]["uid"], thash) if owner else NO_PROOF
        self._reconcile_pods(rs, scenario, proven)
        pods = self._live_pods(rs)
        ready = sum(1 for p in pods if is_ready(p))
        status = {
            "replicas": len(pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "observedGeneration": rs["metadata"]["generation"],
        }
        status = {k: v for k, v in status.items() if v or k == "replicas"}
        if (rs.get("status") or {}) != status:
            self._write_status(REPLICASETS, rs, status)

    def _deployment_of(self, rs: dict[str, Any]) -> dict[str, Any] | None:
        ref = next(iter(rs["metadata"].get("ownerReferences") or []), None)
        if not ref:
            return None
        return next(
            (
                d
                for d in self.store.list(DEPLOYMENTS, rs["metadata"]["namespace"])
                if d["metadata"]["uid"] == ref.get("uid")
            ),
            None,
        )

    def _reconcile_pods(
        self, rs: dict[str, Any], scenario: str, proven: tuple[str, str, str]
    ) -> None:
        """Create pods up to `spec.replicas`, or terminate the surplus (unready first)."""
        ns = rs["metadata"]["namespace"]
        pods = self._live_pods(rs)
        want = int((rs.get("spec") or {}).get("replicas", 0))
        template = (rs.get("spec") or {}).get("template") or {}
        while len(pods) < want:
            name = f"{rs['metadata']['name']}-{self.store.next_name():05d}"[:63]
            self._new_pod(ns, name, template, rs, {}, scenario, proven)
            pods.append(self.store.get(PODS, ns, name))
        surplus = max(0, len(pods) - want)
        for pod in sorted(pods, key=lambda p: (is_ready(p), p["metadata"]["name"]))[:surplus]:
            self._terminate(pod)
