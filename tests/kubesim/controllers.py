"""Controllers that move workloads the way Kubernetes does, closely enough for kubectl.

Deployment → ReplicaSets (one per pod template, `pod-template-hash`, the
revision annotation) → Pods; StatefulSet → ControllerRevisions → ordinal Pods,
updated from the highest ordinal down; Job → one Pod. Replica counts move over
time, conditions follow the real controllers' (Progressing / Available,
ProgressDeadlineExceeded), and pods carry container statuses with image and
imageID and terminate after (a capped share of) their grace period.

Scenario per workload, annotation `kubesim.deployd.dev/scenario`: `instant`
(default), `slow`, `never-ready` (crash loop), `image-pull-error`; a Job's
`succeed` (default) or `fail`. A scenario applies to pod templates the workload
was not created with and has not yet run successfully, so rolling back to a
good template recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from typing import Any

from tests.kubesim.store import BY_PATH, Resource, Store, now

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


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    return any(
        r.get("uid") == owner["metadata"]["uid"]
        for r in obj["metadata"].get("ownerReferences") or []
    )


def _image_id(image: str) -> str:
    """What the kubelet reports: `repository@sha256:digest` (never the tag)."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    repo = name.rsplit(":", 1)[0] if ":" in last else name
    return f"{repo}@{digest or 'sha256:' + hashlib.sha256(image.encode()).hexdigest()}"


class Controllers:
    """The control loop of one simulator."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._task: asyncio.Task[None] | None = None
        # (kind, uid, template hash) -> the template ran ready once: scenarios no longer apply
        self.proven: set[tuple[str, str, str]] = set()
        self.pod_state: dict[str, dict[str, Any]] = {}  # pod uid -> timing facts
        self.progress: dict[str, tuple[float, Any]] = {}  # deployment uid -> (time, progress)
        self.last_step: dict[str, float] = {}
        # (namespace, name) -> wall-clock time a Deployment's rollout last became complete
        self.available_at: dict[tuple[str, str], float] = {}
        self._complete: dict[str, tuple[int, bool]] = {}
        self._became: list[tuple[str, str]] = []

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def deleted(self, res: Resource, obj: dict[str, Any]) -> None:
        """Cascade: deleting a workload deletes what it owns (foreground, at once)."""
        for child_res in (REPLICASETS, REVISIONS, PODS):
            for child in self.store.list(child_res, obj["metadata"].get("namespace")):
                if _owned_by(child, obj):
                    self.store.delete(
                        child_res, child["metadata"]["namespace"], child["metadata"]["name"]
                    )
                    self.deleted(child_res, child)

    async def _loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a bug here must not kill the simulator silently
                import traceback

                traceback.print_exc()
            await asyncio.sleep(TICK)

    def tick(self) -> None:
        t = time.monotonic()
        for dep in self.store.list(DEPLOYMENTS, None):
            self._deployment(dep, t)
        for rs in self.store.list(REPLICASETS, None):
            self._replicaset(rs, t)
        for sts in self.store.list(STATEFULSETS, None):
            self._statefulset(sts, t)
        for job in self.store.list(JOBS, None):
            self._job(job, t)
        for pod in self.store.list(PODS, None):
            self._pod(pod, t)
        # Clients can see a status once the tick yields: that is when it became available.
        stamp = time.time()
        for key in self._became:
            self.available_at[key] = stamp
        self._became.clear()

    # -- scenarios -------------------------------------------------------------

    def _scenario(self, owner: dict[str, Any], kind: str, thash: str) -> str:
        if (kind, owner["metadata"]["uid"], thash) in self.proven:
            return "instant"
        return (owner["metadata"].get("annotations") or {}).get(SCENARIO) or "instant"

    # -- pods ------------------------------------------------------------------

    def _new_pod(
        self,
        ns: str,
        name: str,
        template: dict[str, Any],
        owner: dict[str, Any],
        labels: dict[str, str],
        scenario: str,
        proven_key: tuple[str, str, str],
    ) -> None:
        spec = json.loads(json.dumps(template.get("spec") or {}))
        meta = template.get("metadata") or {}
        pod = {
            "metadata": {
                "name": name,
                "labels": {**(meta.get("labels") or {}), **labels},
                "annotations": dict(meta.get("annotations") or {}),
                "ownerReferences": [_owner(owner)],
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
        if pod["metadata"].get("deletionTimestamp"):
            return
        grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        drain = MAX_TERMINATION
        for owner in self._owners(pod):
            drain = float((owner["metadata"].get("annotations") or {}).get(DRAIN, drain))
        pod["metadata"]["deletionTimestamp"] = now()
        pod["metadata"]["deletionGracePeriodSeconds"] = grace
        self.store.replace(
            PODS, pod["metadata"]["namespace"], pod["metadata"]["name"], pod, check_rv=False
        )
        state = self.pod_state.setdefault(pod["metadata"]["uid"], {"born": time.monotonic()})
        state["dies"] = time.monotonic() + min(float(grace), drain)

    def _pod(self, pod: dict[str, Any], t: float) -> None:
        uid = pod["metadata"]["uid"]
        state = self.pod_state.setdefault(uid, {"born": t, "scenario": "instant"})
        if "dies" in state:
            if t >= state["dies"]:
                self.store.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
                self.pod_state.pop(uid, None)
            return
        if state.get("job"):
            return  # jobs move their pods themselves
        scenario = state.get("scenario", "instant")
        containers = (pod.get("spec") or {}).get("containers") or []
        ready_after = SLOW_STEP if scenario == "slow" else 0.0
        healthy = scenario in ("instant", "slow")
        ready = healthy and t - state["born"] >= ready_after
        statuses = []
        for c in containers:
            status: dict[str, Any] = {
                "name": c.get("name"),
                "image": c.get("image"),
                "imageID": "",
                "ready": ready,
                "restartCount": 0,
                "started": ready,
            }
            if ready:
                status["imageID"] = _image_id(str(c.get("image")))
                status["state"] = {"running": {"startedAt": now()}}
            elif scenario == "never-ready":
                status["imageID"] = _image_id(str(c.get("image")))
                status["restartCount"] = int((t - state["born"]) / 0.5)
                status["state"] = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": "back-off restarting failed container",
                    }
                }
            elif scenario == "image-pull-error":
                status["state"] = {
                    "waiting": {
                        "reason": "ImagePullBackOff",
                        "message": f'Back-off pulling image "{c.get("image")}"',
                    }
                }
            else:
                status["state"] = {"waiting": {"reason": "ContainerCreating"}}
            statuses.append(status)
        new_status = {
            "phase": "Running" if healthy and ready else "Pending",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": statuses,
        }
        if ready and state.get("proven"):
            self.proven.add(state["proven"])
        if _strip_times(pod.get("status")) != _strip_times(new_status):
            pod["status"] = new_status
            self.store.replace(
                PODS,
                pod["metadata"]["namespace"],
                pod["metadata"]["name"],
                pod,
                subresource="status",
                check_rv=False,
            )

    def _owners(self, pod: dict[str, Any]) -> list[dict[str, Any]]:
        """The pod's owner and its owner's owner (ReplicaSet, then Deployment)."""
        out: list[dict[str, Any]] = []
        obj = pod
        for _ in range(2):
            ref = next(iter(obj["metadata"].get("ownerReferences") or []), None)
            if ref is None:
                break
            res = {"ReplicaSet": REPLICASETS, "Deployment": DEPLOYMENTS,
                   "StatefulSet": STATEFULSETS, "Job": JOBS}.get(ref.get("kind", ""))
            found = self.store.find(res, obj["metadata"].get("namespace"), ref["name"]) \
                if res else None
            if found is None:
                break
            out.append(found)
            obj = found
        return out

    def _pods_of(self, owner: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            p for p in self.store.list(PODS, owner["metadata"]["namespace"]) if _owned_by(p, owner)
        ]

    # -- deployments -----------------------------------------------------------

    def _deployment(self, dep: dict[str, Any], t: float) -> None:
        ns, name, uid = (
            dep["metadata"]["namespace"],
            dep["metadata"]["name"],
            dep["metadata"]["uid"],
        )
        spec = dep.get("spec") or {}
        template = spec.get("template") or {}
        thash = template_hash(template)
        replicas = int(spec.get("replicas", 1))
        owned = [rs for rs in self.store.list(REPLICASETS, ns) if _owned_by(rs, dep)]
        revisions = [
            int((rs["metadata"].get("annotations") or {}).get(REVISION, "0")) for rs in owned
        ]
        top = max(revisions, default=0)
        new = next(
            (
                rs
                for rs in owned
                if (rs["metadata"].get("labels") or {}).get("pod-template-hash") == thash
            ),
            None,
        )
        if new is None:
            if not owned:  # what a workload is created with runs: scenarios are for changes
                self.proven.add(("Deployment", uid, thash))
            rs_template = json.loads(json.dumps(template))
            rs_template.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = (
                thash
            )
            selector = json.loads(json.dumps(spec.get("selector") or {}))
            selector.setdefault("matchLabels", {})["pod-template-hash"] = thash
            annotations = {REVISION: str(top + 1)}
            cause = (dep["metadata"].get("annotations") or {}).get("kubernetes.io/change-cause")
            if cause:
                annotations["kubernetes.io/change-cause"] = cause
            new = self.store.create(
                REPLICASETS,
                ns,
                {
                    "metadata": {
                        "name": f"{name}-{thash}",
                        "labels": rs_template["metadata"]["labels"],
                        "annotations": annotations,
                        "ownerReferences": [_owner(dep)],
                    },
                    "spec": {"replicas": 0, "selector": selector, "template": rs_template},
                },
            )
            owned.append(new)
        elif int((new["metadata"].get("annotations") or {}).get(REVISION, "0")) < top:
            new["metadata"]["annotations"][REVISION] = str(top + 1)  # rolled back to it
            new = self.store.replace(REPLICASETS, ns, new["metadata"]["name"], new, check_rv=False)
        olds = [rs for rs in owned if rs["metadata"]["uid"] != new["metadata"]["uid"]]
        scenario = self._scenario(dep, "Deployment", thash)
        surge = max(1, math.ceil(replicas * 0.25))
        max_unavailable = math.floor(replicas * 0.25)
        new_pods = [p for p in self._pods_of(new) if not p["metadata"].get("deletionTimestamp")]
        new_ready = sum(1 for p in new_pods if _ready(p))
        old_pods = [
            p
            for rs in olds
            for p in self._pods_of(rs)
            if not p["metadata"].get("deletionTimestamp")
        ]
        old_ready = sum(1 for p in old_pods if _ready(p))
        step_ok = scenario != "slow" or t - self.last_step.get(uid, 0.0) >= SLOW_STEP
        if step_ok:
            old_total = sum(int((rs.get("spec") or {}).get("replicas", 0)) for rs in olds)
            new_count = int((new.get("spec") or {}).get("replicas", 0))
            room = replicas + surge - (new_count + old_total)
            want_new = min(replicas, new_count + max(0, room))
            if scenario == "slow":
                want_new = min(want_new, new_count + 1)
            if want_new != new_count:
                self._scale(REPLICASETS, new, want_new)
                self.last_step[uid] = t
            removable = (new_ready + old_ready) - (replicas - max_unavailable)
            unready_old = len(old_pods) - old_ready
            for rs in sorted(olds, key=lambda r: r["metadata"]["name"]):
                have = int((rs.get("spec") or {}).get("replicas", 0))
                if have == 0:
                    continue
                cut = min(have, max(0, removable) + unready_old)
                if scenario == "slow":
                    cut = min(cut, 1)
                if cut > 0:
                    self._scale(REPLICASETS, rs, have - cut)
                    removable -= cut
                    self.last_step[uid] = t
        # status, as the deployment controller writes it
        all_pods = new_pods + old_pods
        available = sum(1 for p in all_pods if _ready(p))
        updated = len(new_pods)
        progress_key = (new["metadata"]["uid"], updated, new_ready, len(old_pods))
        last_time, last_key = self.progress.get(uid, (t, None))
        if progress_key != last_key:
            self.progress[uid] = (t, progress_key)
            last_time = t
        complete = updated == replicas and new_ready == replicas and not old_pods
        generation = dep["metadata"]["generation"]
        if complete and self._complete.get(uid) != (generation, True):
            self._became.append((ns, name))
        self._complete[uid] = (generation, complete)
        deadline = float(spec.get("progressDeadlineSeconds", 600))
        old_status = dep.get("status") or {}
        old_progressing = next(
            (c for c in old_status.get("conditions") or [] if c.get("type") == "Progressing"), None
        )
        rs_name = new["metadata"]["name"]
        if complete:
            progressing = (
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{rs_name}" has successfully progressed.',
            )
        elif (
            old_progressing
            and old_progressing.get("reason") == "ProgressDeadlineExceeded"
            and old_status.get("observedGeneration") == dep["metadata"]["generation"]
        ) or t - last_time > deadline:
            progressing = (
                "False",
                "ProgressDeadlineExceeded",
                f'ReplicaSet "{rs_name}" has timed out progressing.',
            )
        else:
            progressing = ("True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.')
        avail_ok = available >= replicas - max_unavailable
        conditions = [
            _condition(
                old_status,
                "Available",
                "True" if avail_ok else "False",
                "MinimumReplicasAvailable" if avail_ok else "MinimumReplicasUnavailable",
                "Deployment has minimum availability."
                if avail_ok
                else "Deployment does not have minimum availability.",
            ),
            _condition(old_status, "Progressing", *progressing),
        ]
        status = {
            "observedGeneration": dep["metadata"]["generation"],
            "replicas": len(all_pods),
            "updatedReplicas": updated,
            "readyReplicas": available,
            "availableReplicas": available,
            "conditions": conditions,
        }
        if len(all_pods) - available:
            status["unavailableReplicas"] = len(all_pods) - available
        for k in list(status):
            if status[k] == 0 and k != "observedGeneration":
                del status[k]
        annotations = dep["metadata"].get("annotations") or {}
        new_rev = (new["metadata"].get("annotations") or {}).get(REVISION)
        if _strip_times(old_status) != _strip_times(status) or annotations.get(REVISION) != new_rev:
            if annotations.get(REVISION) != new_rev:
                dep["metadata"].setdefault("annotations", {})[REVISION] = new_rev
                dep = self.store.replace(DEPLOYMENTS, ns, name, dep, check_rv=False)
            dep["status"] = status
            self.store.replace(DEPLOYMENTS, ns, name, dep, subresource="status", check_rv=False)

    def _scale(self, res: Resource, obj: dict[str, Any], replicas: int) -> None:
        obj = self.store.get(res, obj["metadata"]["namespace"], obj["metadata"]["name"])
        obj["spec"]["replicas"] = replicas
        self.store.replace(
            res, obj["metadata"]["namespace"], obj["metadata"]["name"], obj, check_rv=False
        )

    def _replicaset(self, rs: dict[str, Any], t: float) -> None:
        ns = rs["metadata"]["namespace"]
        owner_ref = next(iter(rs["metadata"].get("ownerReferences") or []), None)
        owner = None
        if owner_ref:
            owner = next(
                (
                    d
                    for d in self.store.list(DEPLOYMENTS, ns)
                    if d["metadata"]["uid"] == owner_ref.get("uid")
                ),
                None,
            )
        thash = (rs["metadata"].get("labels") or {}).get("pod-template-hash", "")
        scenario = self._scenario(owner, "Deployment", thash) if owner else "instant"
        proven = ("Deployment", owner["metadata"]["uid"], thash) if owner else ("", "", "")
        pods = [p for p in self._pods_of(rs) if not p["metadata"].get("deletionTimestamp")]
        want = int((rs.get("spec") or {}).get("replicas", 0))
        template = (rs.get("spec") or {}).get("template") or {}
        while len(pods) < want:
            name = f"{rs['metadata']['name']}-{self.store.next_name():05d}"[:63]
            self._new_pod(ns, name, template, rs, {}, scenario, proven)
            pods.append(self.store.get(PODS, ns, name))
        for pod in sorted(pods, key=lambda p: (_ready(p), p["metadata"]["name"]))[
            : max(0, len(pods) - want)
        ]:
            self._terminate(pod)
        pods = [p for p in self._pods_of(rs) if not p["metadata"].get("deletionTimestamp")]
        ready = sum(1 for p in pods if _ready(p))
        status = {
            "replicas": len(pods),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "observedGeneration": rs["metadata"]["generation"],
        }
        status = {k: v for k, v in status.items() if v or k == "replicas"}
        if (rs.get("status") or {}) != status:
            rs["status"] = status
            self.store.replace(
                REPLICASETS, ns, rs["metadata"]["name"], rs, subresource="status", check_rv=False
            )

    # -- statefulsets ----------------------------------------------------------

    def _statefulset(self, sts: dict[str, Any], t: float) -> None:
        ns, name = sts["metadata"]["namespace"], sts["metadata"]["name"]
        spec = sts.get("spec") or {}
        template = spec.get("template") or {}
        thash = template_hash(template)
        update_rev = f"{name}-{thash}"
        replicas = int(spec.get("replicas", 1))
        revs = [r for r in self.store.list(REVISIONS, ns) if _owned_by(r, sts)]
        if not any(r["metadata"]["name"] == update_rev for r in revs):
            if not revs:
                self.proven.add(("StatefulSet", sts["metadata"]["uid"], thash))
            number = max((int(r.get("revision", 0)) for r in revs), default=0) + 1
            data_template = json.loads(json.dumps(template))
            data_template["$patch"] = "replace"
            self.store.create(
                REVISIONS,
                ns,
                {
                    "metadata": {
                        "name": update_rev,
                        "labels": dict((spec.get("selector") or {}).get("matchLabels") or {})
                        | {"controller.kubernetes.io/hash": thash},
                        "ownerReferences": [_owner(sts)],
                    },
                    "data": {"spec": {"template": data_template}},
                    "revision": number,
                },
            )
        else:
            rev = next(r for r in revs if r["metadata"]["name"] == update_rev)
            top = max(int(r.get("revision", 0)) for r in revs)
            if int(rev.get("revision", 0)) < top:  # rolled back to an earlier template
                rev["revision"] = top + 1
                self.store.replace(REVISIONS, ns, update_rev, rev, check_rv=False)
        status = sts.get("status") or {}
        current_rev = status.get("currentRevision") or update_rev
        scenario = self._scenario(sts, "StatefulSet", thash)
        partition = int(
            ((spec.get("updateStrategy") or {}).get("rollingUpdate") or {}).get("partition", 0)
        )
        pods = {p["metadata"]["name"]: p for p in self._pods_of(sts)}
        step_ok = (
            scenario != "slow" or t - self.last_step.get(sts["metadata"]["uid"], 0) >= SLOW_STEP
        )
        busy = any(p["metadata"].get("deletionTimestamp") or not _ready(p) for p in pods.values())
        for ordinal in range(replicas):
            pod_name = f"{name}-{ordinal}"
            if pod_name in pods:
                continue
            if busy or not step_ok:
                break  # OrderedReady: one at a time, each ready before the next
            use_rev = update_rev if ordinal >= partition else current_rev
            rev_obj = self.store.find(REVISIONS, ns, use_rev)
            use_template = template
            if rev_obj is not None and use_rev != update_rev:
                use_template = {
                    k: v for k, v in rev_obj["data"]["spec"]["template"].items() if k != "$patch"
                }
            rev_hash = use_rev.rsplit("-", 1)[1]
            self._new_pod(
                ns,
                pod_name,
                use_template,
                sts,
                {
                    "controller-revision-hash": use_rev,
                    "statefulset.kubernetes.io/pod-name": pod_name,
                },
                self._scenario(sts, "StatefulSet", rev_hash),
                ("StatefulSet", sts["metadata"]["uid"], rev_hash),
            )
            self.last_step[sts["metadata"]["uid"]] = t
            busy = True
            break
        for pod_name, pod in sorted(pods.items()):
            ordinal = int(pod_name.rsplit("-", 1)[1])
            if ordinal >= replicas and not pod["metadata"].get("deletionTimestamp"):
                self._terminate(pod)
        if not busy and step_ok:
            for ordinal in reversed(range(partition, replicas)):
                pod = pods.get(f"{name}-{ordinal}")
                if pod is None or pod["metadata"].get("deletionTimestamp"):
                    continue
                if (pod["metadata"].get("labels") or {}).get(
                    "controller-revision-hash"
                ) != update_rev:
                    self._terminate(pod)
                    self.last_step[sts["metadata"]["uid"]] = t
                    break
        pods = {
            p["metadata"]["name"]: p
            for p in self._pods_of(sts)
            if not p["metadata"].get("deletionTimestamp")
        }
        ready = sum(1 for p in pods.values() if _ready(p))
        updated = sum(
            1
            for p in pods.values()
            if (p["metadata"].get("labels") or {}).get("controller-revision-hash") == update_rev
        )
        if updated == replicas and ready == replicas and len(pods) == replicas:
            current_rev = update_rev
        current = sum(
            1
            for p in pods.values()
            if (p["metadata"].get("labels") or {}).get("controller-revision-hash") == current_rev
        )
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
        if status != new_status:
            sts["status"] = new_status
            self.store.replace(STATEFULSETS, ns, name, sts, subresource="status", check_rv=False)

    # -- jobs ------------------------------------------------------------------

    def _job(self, job: dict[str, Any], t: float) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        status = job.get("status") or {}
        if any(c.get("type") in ("Complete", "Failed") for c in status.get("conditions") or []):
            return
        pods = self._pods_of(job)
        template_meta = ((job.get("spec") or {}).get("template") or {}).get("metadata") or {}
        outcome = (
            (job["metadata"].get("annotations") or {}).get(SCENARIO)
            or (template_meta.get("annotations") or {}).get(SCENARIO)
            or "succeed"
        )
        if not pods:
            template = (job.get("spec") or {}).get("template") or {}
            pod_name = f"{name}-{self.store.next_name():05d}"
            self._new_pod(ns, pod_name, template, job, {"job-name": name}, "instant", ("", "", ""))
            self.pod_state[self.store.get(PODS, ns, pod_name)["metadata"]["uid"]]["job"] = True
            job["status"] = {"active": 1, "startTime": now()}
            self.store.replace(JOBS, ns, name, job, subresource="status", check_rv=False)
            return
        pod = pods[0]
        born = self.pod_state.get(pod["metadata"]["uid"], {}).get("born", t)
        if t - born < 0.3:
            return
        phase = "Succeeded" if outcome == "succeed" else "Failed"
        pod["status"] = {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": c.get("name"),
                    "image": c.get("image"),
                    "imageID": _image_id(c.get("image", "")),
                    "ready": False,
                    "restartCount": 0,
                    "state": {
                        "terminated": {
                            "exitCode": 0 if phase == "Succeeded" else 1,
                            "reason": "Completed" if phase == "Succeeded" else "Error",
                        }
                    },
                }
                for c in (pod.get("spec") or {}).get("containers") or []
            ],
        }
        self.store.replace(
            PODS, ns, pod["metadata"]["name"], pod, subresource="status", check_rv=False
        )
        if phase == "Succeeded":
            job["status"] = {
                "succeeded": 1,
                "startTime": status.get("startTime", now()),
                "completionTime": now(),
                "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": now()}],
            }
        else:
            limit = int((job.get("spec") or {}).get("backoffLimit", 6))
            job["status"] = {
                "failed": limit + 1,
                "startTime": status.get("startTime", now()),
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                        "lastTransitionTime": now(),
                    }
                ],
            }
        self.store.replace(JOBS, ns, name, job, subresource="status", check_rv=False)


def _ready(pod: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def _condition(
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


def _strip_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _strip_times(v)
            for k, v in value.items()
            if k not in ("lastUpdateTime", "lastTransitionTime", "startedAt")
        }
    if isinstance(value, list):
        return [_strip_times(v) for v in value]
    return value
