"""Roll: patch the Kubernetes workloads to the new image and wait for the rollout.

The rollout itself arrives with its own issue; until then a deployment that
names workloads is refused before anything is built (see pipeline.preflight),
so this step only ever runs for deployments without workloads, and is skipped.
"""

from __future__ import annotations

from daemon.context import DeployContext
from daemon.errors import DeploydError


async def run(ctx: DeployContext) -> str:
    """Roll the workloads (not available yet: refused in preflight)."""
    raise DeploydError(
        f"deployment {ctx.deployment.name} names workloads, but this deployd cannot roll "
        "Kubernetes workloads yet."
    )
