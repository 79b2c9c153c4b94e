"""The Job controller: one pod, which succeeds or fails (scenario `succeed` or `fail`)."""

from __future__ import annotations

from typing import Any

from tests.support.kubesim.controllers.common import (
    JOBS,
    NO_PROOF,
    PODS,
    SCENARIO,
    ControllerBase,
    annotations,
    image_id,
)
from tests.support.kubesim.store import now

RUN_TIME = 0.3  # seconds a job's pod runs before it finishes


def _outcome(job: dict[str, Any]) -> str:
    template_meta = ((job.get("spec") or {}).get("template") or {}).get("metadata") or {}
    return (
        annotations(job).get(SCENARIO)
        or (template_meta.get("annotations") or {}).get(SCENARIO)
        or "succeed"
    )


def _finished(status: dict[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") for c in status.get("conditions") or [])


def _pod_status(pod: dict[str, Any], phase: str) -> dict[str, Any]:
    """A finished pod's status: every container terminated, with exit code 0 or 1."""
    ok = phase == "Succeeded"
    return {
        "phase": phase,
        "containerStatuses": [
            {
                "name": c.get("name"),
                "image": c.get("image"),
                "imageID": image_id(c.get("image", "")),
                "ready": False,
                "restartCount": 0,
                "state": {
                    "terminated": {
                        "exitCode": 0 if ok else 1,
                        "reason": "Completed" if ok else "Error",
                    }
                },
            }
            for c in (pod.get("spec") or {}).get("containers") or []
        ],
    }


def _job_status(job: dict[str, Any], phase: str, start_time: str) -> dict[str, Any]:
    """A finished job's status: Complete, or Failed with its backoff limit exceeded."""
    if phase == "Succeeded":
        return {
            "succeeded": 1,
            "startTime": start_time,
            "completionTime": now(),
            "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": now()}],
        }
    limit = int((job.get("spec") or {}).get("backoffLimit", 6))
    return {
        "failed": limit + 1,
        "startTime": start_time,
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


class JobController(ControllerBase):
    def _job(self, job: dict[str, Any], t: float) -> None:
        status = job.get("status") or {}
        if _finished(status):
            return
        pods = self._pods_of(job)
        outcome = _outcome(job)
        if not pods:
            self._start_job(job)
            return
        pod = pods[0]
        born = self.pod_state.get(pod["metadata"]["uid"], {}).get("born", t)
        if t - born < RUN_TIME:
            return
        phase = "Succeeded" if outcome == "succeed" else "Failed"
        self._write_status(PODS, pod, _pod_status(pod, phase))
        self._write_status(JOBS, job, _job_status(job, phase, status.get("startTime", now())))

    def _start_job(self, job: dict[str, Any]) -> None:
        """Create the job's pod (which the pod controller leaves to the job) and mark it active."""
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        template = (job.get("spec") or {}).get("template") or {}
        pod_name = f"{name}-{self.store.next_name():05d}"
        self._new_pod(ns, pod_name, template, job, {"job-name": name}, "instant", NO_PROOF)
        self.pod_state[self.store.get(PODS, ns, pod_name)["metadata"]["uid"]]["job"] = True
        self._write_status(JOBS, job, {"active": 1, "startTime": now()})
