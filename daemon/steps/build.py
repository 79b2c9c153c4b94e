"""Build: the project's own Dockerfile on the Docker Engine, output streamed."""

from __future__ import annotations

from daemon.adapters.background import run_abandonable
from daemon.core.context import DeployContext


def build_tag(ctx: DeployContext) -> str:
    """The local tag of this deploy's image (never pushed)."""
    return f"{ctx.deployment.image}:deployd-build-{ctx.id}"


async def run(ctx: DeployContext) -> str:
    """Build ctx.source; set ctx.image_id."""
    ctx.image_id = await run_abandonable(
        ctx.services.images.build,
        ctx.source,
        build_tag(ctx),
        ctx.labels,
        lambda line: ctx.say(line, "build"),
        ctx.stop,
    )
    return f"image {ctx.image_id.removeprefix('sha256:')[:12]}"
