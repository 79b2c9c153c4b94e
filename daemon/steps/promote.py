"""A promotion's push step: the source deployment's image, by digest, tagged in the target's
repository registry-side (no rebuild, no re-check, nothing pulled through the build host).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from daemon.adapters.background import run_stoppable
from daemon.core import deploys
from daemon.core.context import DeployContext
from daemon.errors import RegistryError


async def adopt(ctx: DeployContext) -> None:
    """Take on what the source deploy learnt of its image (tree, DAG report: Airflow version)."""
    source = ctx.request.promote_from
    assert source is not None
    ctx.tree, ctx.report = source.tree or "", source.report
    await ctx.record(
        ctx.services.records.update,
        ctx.id,
        tree_sha=source.tree,
        report=json.dumps(source.report) if source.report else None,
    )


async def run(ctx: DeployContext) -> str:
    """Tag the source deploy's image as IMAGE:TAG of this deployment; record tag and digest."""
    source = ctx.request.promote_from
    assert source is not None and source.image and source.digest
    repo = ctx.deployment.image
    ctx.tag = deploys.image_tag(
        ctx.deployment.tag_template,
        deploy_id=ctx.id,
        commit=ctx.request.commit,
        when=datetime.now(UTC),
    )
    # Stoppable: a cancel sets ctx.stop and waits for the copy to end (never walks away).
    digest = await run_stoppable(
        ctx.services.images.retag,
        ctx.stop,
        source.image,
        source.digest,
        repo,
        ctx.tag,
        lambda line: ctx.say(f"       {line}", "push"),
        ctx.stop,
    )
    if digest != source.digest:
        raise RegistryError(f"the copy in {repo} has digest {digest}, not {source.digest}.")
    ctx.digest = digest
    await ctx.record(ctx.services.records.update, ctx.id, image=repo, tag=ctx.tag, digest=digest)
    how = "tagged" if source.image == repo else f"copied from {source.image} and tagged"
    return f"{repo}:{ctx.tag}@{digest} ({how} in the registry)"
