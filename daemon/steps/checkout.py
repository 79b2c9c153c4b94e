"""Check out: export the commit's files (no .git) into the deploy's clean work dir."""

from __future__ import annotations

import asyncio

from daemon import git
from daemon.context import DeployContext


async def run(ctx: DeployContext) -> str:
    """Write the commit's tree into ctx.source."""
    req = ctx.request
    await asyncio.to_thread(git.export, req.repo, req.commit, ctx.source, req.object_env)
    files = sum(1 for p in ctx.source.rglob("*") if p.is_file())
    return f"{req.commit[:12]} ({files} files)"
