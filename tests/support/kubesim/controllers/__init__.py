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

One module per kind (deployment, replicaset, statefulset, job, pod), what they
share in `common`, and the loop that drives them in `loop`.
"""

from tests.support.kubesim.controllers.common import (
    DRAIN,
    MAX_TERMINATION,
    REVISION,
    SCENARIO,
    SLOW_STEP,
    TICK,
    template_hash,
)
from tests.support.kubesim.controllers.loop import Controllers

__all__ = [
    "DRAIN",
    "MAX_TERMINATION",
    "REVISION",
    "SCENARIO",
    "SLOW_STEP",
    "TICK",
    "Controllers",
    "template_hash",
]
