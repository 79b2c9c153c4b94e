"""Build: the project's own Dockerfile on the Docker Engine, output streamed."""

from __future__ import annotations

from daemon.adapters.background import run_stoppable
from daemon.core.context import DeployContext


def build_tag(ctx: DeployContext) -> str:
    """The local tag of this deploy's image (never pushed)."""
    return f"{ctx.deployment.image}:deployd-build-{ctx.id}"


async def run(ctx: DeployContext) -> str:
    """Build ctx.source; set ctx.image_id."""
    # Stopped (a cancel, Ctrl-C): the build's stream is cut and its step's container
    # removed, and this waits for that before the deploy goes on to clean up.
    ctx.image_id = await run_stoppable(
        ctx.services.images.build,
        ctx.stop,
        ctx.source,
        build_tag(ctx),
        ctx.labels,
        lambda line: ctx.say(line, "build"),
        ctx.stop,
    )
    return f"image {ctx.image_id.removeprefix('sha256:')[:12]}"
