"""What every controller shares: constants, object helpers, and pod creation and removal."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from tests.support.kubesim.store import BY_PATH, Resource, Store, now

SCENARIO = "kubesim.deployd.dev/scenario"
DRAIN = "kubesim.deployd.dev/drain-seconds"  # pods of this workload take this long to stop
REVISION = "deployment.kubernetes.io/revision"
TICK = 0.05
SLOW_STEP = 0.4  # seconds per replica step in the `slow` scenario
MAX_TERMINATION = 0.3  # pods stop within min(grace, this) seconds

DEPLOYMENTS = BY_PATH[("apps", "v1", "deployments")]
STATEFULSETS = BY_PATH[("apps", "v1", "statefulsets")]
REPLICASETS = BY_PATH[("apps", "v1", "replicasets")]
REVISIONS = BY_PATH[("apps", "v1", "controllerrevisions")]
JOBS = BY_PATH[("batch", "v1", "jobs")]
PODS = BY_PATH[("", "v1", "pods")]
OWNER_KINDS = {
    "ReplicaSet": REPLICASETS,
    "Deployment": DEPLOYMENTS,
    "StatefulSet": STATEFULSETS,
    "Job": JOBS,
}
NO_PROOF = ("", "", "")  # the proven-key of a pod whose template needs no proving


def _pruned(value: Any) -> Any:
    """Without nulls and empty maps or lists: what defaulting and clients add or drop."""
    if isinstance(value, dict):
        out = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def template_hash(template: dict[str, Any]) -> str:
    clean = _pruned(json.loads(json.dumps(template)))
    labels = (clean.get("metadata") or {}).get("labels") or {}
    labels.pop("pod-template-hash", None)
    labels.pop("controller-revision-hash", None)
    digest = hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()
    return "".join(c for c in digest if c in "bcdfghjklmnpqrstvwxz2456789")[:10]


def copied(value: Any) -> Any:
    """A deep copy of a JSON value."""
    return json.loads(json.dumps(value))


def owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    return any(
        r.get("uid") == owner["metadata"]["uid"]
        for r in obj["metadata"].get("ownerReferences") or []
    )


def annotations(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"].get("annotations") or {}


def labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["metadata"].get("labels") or {}


def image_id(image: str) -> str:
    """What the kubelet reports: `repository@sha256:digest` (never the tag)."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    repo = name.rsplit(":", 1)[0] if ":" in last else name
    return f"{repo}@{digest or 'sha256:' + hashlib.sha256(image.encode()).hexdigest()}"


def is_ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def is_terminating(obj: dict[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


def condition(
    old_status: dict[str, Any], kind: str, status: str, reason: str, message: str
) -> dict[str, Any]:
    old = next((c for c in old_status.get("conditions") or [] if c.get("type") == kind), None)
    stamp = now()
    changed = old is None or old.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastUpdateTime": stamp
        if old is None or old.get("reason") != reason
        else old.get("lastUpdateTime", stamp),
        "lastTransitionTime": stamp if changed else old.get("lastTransitionTime", stamp),
    }


def strip_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: strip_times(v)
            for k, v in value.items()
            if k not in ("lastUpdateTime", "lastTransitionTime", "startedAt")
        }
    if isinstance(value, list):
        return [strip_times(v) for v in value]
    return value


class ControllerBase:
    """The state of one simulator's control loop, and the pod handling every kind uses."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # (kind, uid, template hash) -> the template ran ready once: scenarios no longer apply
        self.proven: set[tuple[str, str, str]] = set()
        self.pod_state: dict[str, dict[str, Any]] = {}  # pod uid -> timing facts
        self.progress: dict[str, tuple[float, Any]] = {}  # deployment uid -> (time, progress)
        self.last_step: dict[str, float] = {}
        # (namespace, name) -> wall-clock time a Deployment's rollout last became complete
        self.available_at: dict[tuple[str, str], float] = {}
        self._complete: dict[str, tuple[int, bool]] = {}
        self._became: list[tuple[str, str]] = []

    # -- scenarios -------------------------------------------------------------

    def _scenario(self, owner: dict[str, Any], kind: str, thash: str) -> str:
        if (kind, owner["metadata"]["uid"], thash) in self.proven:
            return "instant"
        return annotations(owner).get(SCENARIO) or "instant"

    # -- pods ------------------------------------------------------------------

    def _new_pod(
        self,
        ns: str,
        name: str,
        template: dict[str, Any],
        owner: dict[str, Any],
        extra_labels: dict[str, str],
        scenario: str,
        proven_key: tuple[str, str, str],
    ) -> None:
        spec = copied(template.get("spec") or {})
        meta = template.get("metadata") or {}
        pod = {
            "metadata": {
                "name": name,
                "labels": {**(meta.get("labels") or {}), **extra_labels},
                "annotations": dict(meta.get("annotations") or {}),
                "ownerReferences": [owner_ref(owner)],
            },
            "spec": spec,
            "status": {"phase": "Pending"},
        }
        created = self.store.create(PODS, ns, pod)
        self.pod_state[created["metadata"]["uid"]] = {
            "born": time.monotonic(),
            "scenario": scenario,
            "proven": proven_key,
        }

    def _terminate(self, pod: dict[str, Any]) -> None:
        if is_terminating(pod):
            return
        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        drain = MAX_TERMINATION
        for owner in self._owners(pod):
            drain = float(annotations(owner).get(DRAIN, drain))
        pod["metadata"]["deletionTimestamp"] = now()
        pod["metadata"]["deletionGracePeriodSeconds"] = grace
        self.store.replace(
            PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], pod, check_rv=False
        )
        state = self.pod_state.setdefault(pod["metadata"]["uid"], {"born": time.monotonic()})
        state["dies"] = time.monotonic() + min(float(grace), drain)

    def _owners(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        """The pod's owner and its owner's owner (ReplicaSet, then Deployment)."""
        out: list[dict[str, Any]] = []
        obj = pod
        for _ in range(2):
            ref = next(iter(obj["metadata"].get("ownerReferences") or []), None)
            if ref is None:
                break
            res = OWNER_KINDS.get(ref.get("kind", ""))
            found = (
                self.store.find(res, obj["metadata"].get("namespace"), ref["name"]) if res else None
            )
            if found is None:
                break
            out.append(found)
            obj = found
        return out

    def _pods_of(self, owner: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            p for p in self.store.list(PODS, owner["metadata"]["namespace"]) if owned_by(p, owner)
        ]

    def _live_pods(self, owner: dict[str, Any]) -> list[dict[str, Any]]:
        """The owner's pods that are not terminating."""
        return [p for p in self._pods_of(owner) if not is_terminating(p)]

    def _scale(self, res: Resource, obj: dict[str, Any], replicas: int) -> None:
        obj = self.store.get(res, obj["metadata"]["namespace"], obj["metadata"]["name"])
        obj["spec"]["replicas"] = replicas
        self.store.replace(
            res, obj["metadata"]["namespace"], obj["metadata"]["name"], obj, check_rv=False
        )

    def _write_status(self, res: Resource, obj: dict[str, Any], status: dict[str, Any]) -> None:
        obj["status"] = status
        self.store.replace(
            res,
            obj["metadata"]["namespace"],
            obj["metadata"]["name"],
            obj,
            subresource="status",
            check_rv=False,
        )
