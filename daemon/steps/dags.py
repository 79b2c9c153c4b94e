"""DAG deploys (dag_source = "git"): which kind a deploy is, the image its checks run in,
and `publish`, which moves the branch Airflow reads.

    checkout ─► parse ─► [pytest] ─► publish (the branch) ─► live (steps/live.py)

Nothing is built, pushed or restarted: the DAGs are checked in the image that runs now
(the last successful deploy's, or what the cluster is found running), and Airflow's
GitDagBundle (or git-sync) reads deployd's branch, which names only checked commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from daemon.adapters import git, repos
from daemon.core import kinds
from daemon.core.context import DeployContext
from daemon.core.kinds import DAGS, IMAGE, Kind
from daemon.errors import CheckError, DeploydError, GitError

# How long git may take to move the branch after the pre-receive hook said yes.
GIT_UPDATE_SECONDS = 60.0
GIT_POLL_SECONDS = 0.05


def _outside(paths: list[str]) -> str:
    """'requirements.txt' or 'requirements.txt and 2 more': what made it an image deploy."""
    others = [p for p in paths if not p.startswith(kinds.DAGS_DIR)]
    more = f" and {len(others) - 1} more" if len(others) > 1 else ""
    return others[0] + more


async def decide(ctx: DeployContext) -> tuple[Kind, str]:
    """The kind of this deploy and why, from what changed since what runs now.

    Decided at the deploy's turn, under the lock: the base is the last successful deploy
    then (a deploy queued behind a failing one compares with what really runs).
    """
    dep, req, prev = ctx.deployment, ctx.request, ctx.previous
    if dep.dag_source != "git":
        return IMAGE, ""
    if req.promote_from is not None:
        return IMAGE, "a promotion ships an image"
    if req.rollback_to is not None:
        target = req.rollback_to
        if prev is not None and target.digest and target.digest == prev.digest:
            if prev.commit and target.commit:
                with contextlib.suppress(GitError):
                    ctx.changed = await asyncio.to_thread(
                        git.changed_paths, req.repo, prev.commit, target.commit
                    )
            return DAGS, f"deploy #{target.id} ran the image that runs now: its DAGs go back"
        return IMAGE, f"deploy #{target.id} ran another image than the one that runs now"
    if req.options.image:
        return IMAGE, "asked for (-o image / --image)"
    if prev is None or not prev.commit or not prev.digest:
        return IMAGE, f"the first deploy of {dep.name} builds its image"
    if req.fetch:
        await _prefetch(ctx)
    try:
        paths = await asyncio.to_thread(
            git.changed_paths, req.repo, prev.commit, req.commit, req.object_env
        )
    except GitError:
        return IMAGE, (
            f"deploy #{prev.id}'s commit {prev.commit[:12]} is not in the repository "
            "to compare with"
        )
    kind = kinds.kind_of(paths, first_deploy=False, forced_image=False)
    since = f"since deploy #{prev.id} ({prev.commit[:7]})"
    if kind == DAGS:
        ctx.changed = paths
        files = "1 file" if len(paths) == 1 else f"{len(paths)} files"
        return DAGS, f"{files} changed {since}, all under {kinds.DAGS_DIR}"
    if not paths:
        return IMAGE, f"nothing changed {since}: deploying it again rebuilds the image"
    return IMAGE, f"{_outside(paths)} changed {since}"


async def _prefetch(ctx: DeployContext) -> None:
    """Fetch a webhook deploy's commit to compare it (checkout fetches it properly, and
    says why if it cannot: here a failure only makes it an image deploy)."""
    from daemon.steps import checkout

    req, dep = ctx.request, ctx.deployment
    if not dep.fetch_url:
        return
    env = await checkout.fetch_env(ctx)
    try:
        await asyncio.to_thread(git.fetch_remote, req.repo, dep.fetch_url, req.commit, env)
    except DeploydError:
        return


async def parse_in_running_image(ctx: DeployContext) -> str:
    """The parse step of a DAG deploy: the usual checks, in the image that runs now.

    That is the last successful deploy's, pulled by digest if this Engine no longer has
    it. The cluster is read beside the check (a few hundred ms): if it runs another image
    (a hand-made `kubectl set image`), the log says so and the check runs again in that
    one, whose verdict stands.
    """
    from daemon.steps.checks import parse

    prev = ctx.previous
    assert prev is not None and prev.image and prev.digest
    cluster = asyncio.create_task(_cluster_image(ctx))
    failed: CheckError | None = None
    try:
        await _use_image(ctx, f"{prev.image}@{prev.digest}")
        summary = await parse.run(ctx)
    except CheckError as exc:
        failed = exc
    except BaseException:
        cluster.cancel()
        with contextlib.suppress(BaseException):
            await cluster
        raise
    found = await cluster
    if found and not found.endswith("@" + prev.digest):
        ctx.say(
            f"       the cluster runs {found}, not deploy #{prev.id}'s image; checking the "
            "DAGs again against what the cluster runs",
            "parse",
        )
        await _use_image(ctx, found)
        return await parse.run(ctx)
    if failed is not None:
        raise failed
    return summary


async def _use_image(ctx: DeployContext, reference: str) -> None:
    """Point the checks at `reference` (IMAGE@DIGEST, or what the cluster names) and record
    it as this deploy's image: a DAG deploy changes what runs only by its DAGs."""
    prev = ctx.previous
    assert prev is not None and prev.image
    images = ctx.services.images
    ctx.image_id, digest = await asyncio.to_thread(
        images.local_image, reference, lambda line: ctx.say(line, "parse")
    )
    image, tag = prev.image, prev.tag or ""
    if reference != f"{prev.image}@{prev.digest}":
        named = reference.partition("@")[0]
        image, tag = named, ""
        if named.rfind(":") > named.rfind("/"):
            image, tag = named.rsplit(":", 1)
    ctx.tag, ctx.digest = tag, digest or prev.digest or ""
    await ctx.record(
        ctx.services.records.update, ctx.id, image=image, tag=ctx.tag, digest=ctx.digest
    )
    ctx.say(f"       checking in {reference}, the image that runs now", "parse")


async def _cluster_image(ctx: DeployContext) -> str:
    """The image the deployment's first managed container runs, as the cluster says ('' if
    it has no workloads or cannot be read: the records' answer stands)."""
    dep = ctx.deployment
    if not dep.workloads:
        return ""
    try:
        if ctx.cluster is None:
            ctx.cluster = ctx.services.cluster(dep)
        running = await ctx.cluster.running(dep)
    except DeploydError as exc:
        ctx.say(f"       note: cannot read what the cluster runs ({exc.message})", "parse")
        return ""
    for workload in running:
        images = workload.get("images") or {}
        for name in dep.containers or tuple(images):
            image = images.get(name)
            if image:
                return str(image)
    return ""


async def publish(ctx: DeployContext) -> str:
    """Move the branch Airflow reads to the checked commit.

    A push's branch is moved by git, once the pre-receive hook answers yes: the pusher
    gets that verdict now (`answer`), and this waits until git has moved the ref. Other
    deploys (CLI, webhook) move it here.
    """
    req, dep = ctx.request, ctx.deployment
    sha = req.commit
    if req.answer is not None and req.hold_lock is not None:
        if not req.answer.done():
            req.answer.set_result(None)
        await _git_moved(ctx)
        return f"{dep.branch} at {sha[:12]} (moved by git: the push was accepted)"
    await asyncio.to_thread(
        repos.record_deployed,
        ctx.services.settings.server.state_dir,
        dep.name,
        dep.branch,
        req.repo,
        sha,
    )
    return f"{dep.branch} at {sha[:12]}"


async def _git_moved(ctx: DeployContext) -> None:
    """Wait until git's receive-pack has pointed the ref at the commit."""
    req = ctx.request
    assert req.hold_lock is not None
    deadline = time.monotonic() + GIT_UPDATE_SECONDS
    while True:
        now = await asyncio.to_thread(git.resolve, req.repo, req.ref)
        if now == req.commit:
            return
        if req.hold_lock.done() or time.monotonic() > deadline:
            raise DeploydError(
                f"git did not move {req.ref.removeprefix('refs/heads/')} to "
                f"{req.commit[:12]} (it names {(now or 'nothing')[:12]}): the push was not "
                "stored; the pusher's git says why."
            )
        await asyncio.sleep(GIT_POLL_SECONDS)


async def move_back(ctx: DeployContext, commit: str) -> None:
    """Point the server repository's branch at `commit` again (a DAG deploy Airflow could
    not load, or one cancelled while live); the deploy's own repository may be a CLI
    user's checkout."""
    dep = ctx.deployment
    server = repos.repo_path(ctx.services.settings.server.state_dir, dep.name)
    await asyncio.to_thread(git.update_ref, server, f"refs/heads/{dep.branch}", commit)
