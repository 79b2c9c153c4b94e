"""The kubelet, as far as kubectl can tell: pods start, get ready (or not), and stop."""

from __future__ import annotations

from typing import Any

from tests.support.kubesim.controllers.common import (
    PODS,
    SLOW_STEP,
    ControllerBase,
    image_id,
    strip_times,
)
from tests.support.kubesim.store import now


def container_status(c: dict[str, Any], ready: bool, scenario: str, age: float) -> dict[str, Any]:
    """A container's status `age` seconds into its pod's life under `scenario`."""
    status: dict[str, Any] = {
        "name": c.get("name"),
        "image": c.get("image"),
        "imageID": "",
        "ready": ready,
        "restartCount": 0,
        "started": ready,
    }
    if ready:
        status["imageID"] = image_id(str(c.get("image")))
        status["state"] = {"running": {"startedAt": now()}}
    elif scenario == "never-ready":
        status["imageID"] = image_id(str(c.get("image")))
        status["restartCount"] = int(age / 0.5)
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
    return status


class PodController(ControllerBase):
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
        age = t - state["born"]
        ready = healthy and age >= ready_after
        new_status = {
            "phase": "Running" if healthy and ready else "Pending",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [container_status(c, ready, scenario, age) for c in containers],
        }
        if ready and state.get("proven"):
            self.proven.add(state["proven"])
        if strip_times(pod.get("status")) != strip_times(new_status):
            self._write_status(PODS, pod, new_status)
