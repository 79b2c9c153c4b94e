"""Push: upload the image while the checks run, then set the deploy tag and record the digest.

The upload goes under a fixed staging tag (not a deploy tag) so the layers
are in the registry by the time the checks pass; the deploy tag is pushed only
after them, which then moves only the manifest.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from daemon.adapters.background import run_stoppable
from daemon.core import deploys
from daemon.core.context import DeployContext
from daemon.core.ports import STAGING_TAG


async def upload(ctx: DeployContext) -> str:
    """Push the built image under the staging tag; return its digest."""
    images = ctx.services.images
    repo = ctx.deployment.image
    await asyncio.to_thread(images.tag, ctx.image_id, repo, STAGING_TAG)
    # Stopped (a failed check, a cancel): the push's stream is cut, so the Engine
    # abandons the upload; this waits for that.
    return await run_stoppable(
        images.push, ctx.stop, repo, STAGING_TAG, lambda line: ctx.say(line, "push"), ctx.stop
    )


async def run(ctx: DeployContext) -> str:
    """Wait for the upload, then push IMAGE:TAG and record tag and digest."""
    images = ctx.services.images
    repo = ctx.deployment.image
    if ctx.upload is not None:
        await ctx.upload
    ctx.tag = deploys.image_tag(
        ctx.deployment.tag_template,
        deploy_id=ctx.id,
        commit=ctx.request.commit,
        when=datetime.now(UTC),
    )
    await asyncio.to_thread(images.tag, ctx.image_id, repo, ctx.tag)
    try:
        ctx.digest = await run_stoppable(
            images.push, ctx.stop, repo, ctx.tag, lambda line: ctx.say(line, "push"), ctx.stop
        )
    except BaseException:
        # Not pushed (or stopped): no local tag names a deploy that has none either.
        await asyncio.to_thread(images.untag, repo, ctx.tag)
        raise
    finally:
        await asyncio.to_thread(images.untag, repo, STAGING_TAG)
    await ctx.record(
        ctx.services.records.update, ctx.id, image=repo, tag=ctx.tag, digest=ctx.digest
    )
    return f"{repo}:{ctx.tag}@{ctx.digest}"
