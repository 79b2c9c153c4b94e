"""Check out: export the commit's files (no .git) into the deploy's clean work dir.

A webhook deploy first fetches its commit from the deployment's configured
`fetch_url` (never from a URL in the payload) into the server repository.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from daemon.adapters import git
from daemon.core.context import DeployContext
from daemon.errors import Cancelled, CheckError, GitError

# Files deployd itself reads or writes in the checkout: never through a link.
OWN_FILES = (
    "Dockerfile",
    ".dockerignore",
    ".env",
    ".astro/test_dag_integrity_default.py",
    ".deployd.Dockerfile",
)


def refuse_escaping_links(root: Path) -> None:
    """Refuse a tree whose symlinks leave it, or that links files deployd reads or writes.

    The tree comes from a push: a link to /etc/... or to another deployment's hook
    would otherwise be followed by the daemon's own reads and writes.
    """
    top = root.resolve()
    for path in root.rglob("*"):
        if not path.is_symlink():
            continue
        rel = path.relative_to(root).as_posix()
        target = os.readlink(path)
        resolved = (path.parent / target).resolve()
        if os.path.isabs(target) or (resolved != top and top not in resolved.parents):
            raise CheckError(
                f"the commit has a symlink that points outside the project: "
                f"{rel} -> {target}; deployd does not follow it."
            )
        if rel in OWN_FILES:
            raise CheckError(f"{rel} is a symlink; deployd reads it, so it must be a file.")
    if (root / ".deployd.Dockerfile").exists():
        raise CheckError(".deployd.Dockerfile is deployd's own file name; rename that file.")


async def fetch_env(ctx: DeployContext) -> dict[str, str]:
    """The environment git fetches from the deployment's fetch_url with."""
    dep = ctx.deployment
    known_hosts = ctx.services.settings.server.state_dir / "known_hosts"
    await asyncio.to_thread(git.seed_known_hosts, known_hosts)
    return git.fetch_env(
        key_file=dep.fetch_key_file, token=dep.fetch_token, known_hosts=known_hosts
    )


async def fetch(ctx: DeployContext) -> str:
    """Fetch a webhook deploy's commit from fetch_url, if it is the branch's tip there."""
    req, dep = ctx.request, ctx.deployment
    if not dep.fetch_url:
        raise GitError(f"deployment {dep.name} has no fetch_url to fetch the commit from.")
    env = await fetch_env(ctx)
    t0 = time.monotonic()
    tip = await asyncio.to_thread(git.remote_tip, req.repo, dep.fetch_url, dep.branch, env)
    if tip != req.commit:
        # A delivery names a commit; only what the branch names at fetch_url now is
        # deployed, so a replayed (or late) delivery cannot bring back an older one.
        now = f"is at {tip[:12]}" if tip else "does not exist"
        raise Cancelled(
            f"not deployed: {dep.branch} at fetch_url {now}, not {req.commit[:12]}; "
            "a webhook deploys only the branch's tip (a newer delivery deploys it)."
        )
    fetched = await asyncio.to_thread(git.fetch_remote, req.repo, dep.fetch_url, req.commit, env)
    previous = ctx.previous
    if (
        previous is not None
        and previous.commit
        # False, not None: both commits are here and the new one does not descend.
        and await asyncio.to_thread(git.ancestry, req.repo, previous.commit, req.commit) is False
    ):
        # Allowed: the tip was just read from fetch_url, which a replay cannot change.
        ctx.say(
            f"       note: {req.commit[:12]} does not descend from {previous.commit[:12]} "
            f"(deploy #{previous.id}): {dep.branch} was force-pushed at fetch_url; "
            "deploying its tip",
            "checkout",
        )
    return f", fetched in {time.monotonic() - t0:.2f} s" if fetched else ""


async def run(ctx: DeployContext) -> str:
    """Write the commit's tree into ctx.source."""
    req = ctx.request
    fetched = await fetch(ctx) if req.fetch else ""
    await asyncio.to_thread(git.export, req.repo, req.commit, ctx.source, req.object_env)
    # The check containers run as the image's user (Astro's is `astro`, not root) and
    # read the project through a bind mount of this folder: it is theirs to read, while
    # the state dir above it stays private.
    ctx.source.chmod(0o755)
    ctx.tree = await asyncio.to_thread(git.tree, req.repo, req.commit, req.object_env)
    await ctx.record(ctx.services.records.update, ctx.id, tree_sha=ctx.tree)
    await asyncio.to_thread(refuse_escaping_links, ctx.source)
    files = sum(1 for p in ctx.source.rglob("*") if p.is_file())
    return f"{req.commit[:12]} ({files} files{fetched})"
