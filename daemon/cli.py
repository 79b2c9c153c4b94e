"""The `deployd` command: thin click commands over the core.

Arguments are parsed and validated here, the core is called, and errors are
mapped to the exit codes of SPEC.md. Progress goes to stderr, the result to
stdout; `--json` prints the record shape the HTTP API returns.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from daemon import config as config_mod
from daemon import names, views
from daemon.adapters.images import Images
from daemon.adapters.records import Records
from daemon.core import access, deploys, usecases
from daemon.core.context import DeployRequest, Services
from daemon.core.deploys import Deploy, Options
from daemon.core.freezes import describe
from daemon.core.pipeline import DeployOutcome, Pipeline
from daemon.errors import DeploydError, UsageError

F = TypeVar("F", bound=Callable[..., Any])


def _config_option(fn: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        default=None,
        help="Config file (default: $DEPLOYD_CONFIG, else /etc/deployd/deployd.toml).",
    )(fn)


def _errors(fn: F) -> F:
    """Turn DeploydError into one line on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeploydError as exc:
            click.echo(f"deployd: {exc.message}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def _settings(ctx: click.Context, config_path: str | None) -> config_mod.Settings:
    path = config_path or (ctx.obj or {}).get("config_path")
    return config_mod.load(config_mod.resolve_path(path, dict(os.environ)))


def _records(settings: config_mod.Settings) -> Records:
    return Records(settings.server.state_dir / "deployd.db")


def _services(settings: config_mod.Settings) -> Services:
    return Services(settings, _records(settings), Images(settings.docker, settings.registry))


@click.group()
@_config_option
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """deployd: deploy Apache Airflow projects on git push."""
    # The records, repositories and keys deployd writes are nobody else's to read,
    # whatever umask it was started with (the unit sets UMask=0077; a shell, 022).
    os.umask(0o077)
    ctx.obj = {"config_path": config_path}


@main.command("check-config")
@_config_option
@click.pass_context
@_errors
def check_config(ctx: click.Context, config_path: str | None) -> None:
    """Validate the config file and print the deployments it defines."""
    settings = _settings(ctx, config_path)
    click.echo(f"{settings.path}: ok")
    click.echo(f"state_dir {settings.server.state_dir}")
    for dep in settings.deployments:
        workloads = ", ".join(str(w) for w in dep.workloads) or "none"
        click.echo(
            f"deployment {dep.name}: branch {dep.branch} -> {dep.image} "
            f"(tag {dep.tag_template}; workloads: {workloads}; "
            f"pytest {'on' if dep.pytest else 'off'})"
        )
        if dep.promote_from:
            click.echo(f"  takes promotions from {dep.promote_from} only")
        for window in dep.freeze_windows:
            click.echo(f"  {window}")
    for key in settings.keys:
        scope = "admin" if key.admin else ", ".join(key.deployments) or "no deployments"
        click.echo(f"key {key.name}: {scope}{' (read-only)' if access.read_only(key) else ''}")


@main.command()
@_config_option
@click.pass_context
@_errors
def serve(ctx: click.Context, config_path: str | None) -> None:
    """Run the daemon: SSH git server, HTTP server, deploys."""
    from daemon import serve as serve_mod

    path = config_path or (ctx.obj or {}).get("config_path")
    settings = _settings(ctx, config_path)
    serve_mod.serve(settings.path if path is None else Path(path))


@main.command()
@_config_option
@click.argument("deployment")
@click.argument("path", type=click.Path(file_okay=False, path_type=Path), default=".")
@click.option("--force", is_flag=True, help="Deploy despite DAG import errors.")
@click.option("--pytest", "run_pytest", is_flag=True, help="Run pytest tests/ before pushing.")
@click.option("--description", default="", help="Recorded with the deploy (default: subject).")
@click.option(
    "--image",
    "force_image",
    is_flag=True,
    help="An image deploy (build and roll) even if only dags/ changed (dag_source = git).",
)
@click.option(
    "--allow-dirty",
    is_flag=True,
    help="Deploy HEAD even though the work tree has uncommitted changes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the deploy record as JSON.")
@click.pass_context
@_errors
def deploy(
    ctx: click.Context,
    config_path: str | None,
    deployment: str,
    path: Path,
    force: bool,
    run_pytest: bool,
    description: str,
    allow_dirty: bool,
    force_image: bool,
    as_json: bool,
) -> None:
    """Build, check and push the HEAD commit of the git repository at PATH."""
    settings = _settings(ctx, config_path)
    dep = settings.deployment(deployment)
    options = Options(
        force=force,
        pytest=run_pytest,
        description=description,
        allow_dirty=allow_dirty,
        image=force_image,
    )
    services = _services(settings)
    usecases.admit(services.records, dep, options)
    request = usecases.deploy_checkout(
        dep, path, options, trigger="cli", actor=usecases.local_actor()
    )
    services.images.ping()
    _run_and_exit(services, request, "deploy", as_json)


@main.command("deploys")
@_config_option
@click.argument("deployment", required=False)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@click.pass_context
@_errors
def list_deploys(
    ctx: click.Context, config_path: str | None, deployment: str | None, limit: int, as_json: bool
) -> None:
    """List recent deploys, newest first."""
    settings = _settings(ctx, config_path)
    if deployment is not None:
        settings.deployment(deployment)
    records = _records(settings)
    rows = usecases.history(settings, records, [deployment] if deployment else None, limit)
    if as_json:
        click.echo(json.dumps([views.deploy_json(r) for r in rows], indent=2))
        return
    shown = [settings.deployment(deployment)] if deployment else settings.deployments
    for line in views.freeze_lines({d.name: usecases.freeze_of(records, d) for d in shown}):
        click.echo(line)
    for line in views.deploy_table(rows):
        click.echo(line)


@main.command()
@_config_option
@click.argument("deploy_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the deploy ends.")
@click.option("--json", "as_json", is_flag=True, help="Print log lines as JSON objects.")
@click.pass_context
@_errors
def logs(
    ctx: click.Context, config_path: str | None, deploy_id: str, follow: bool, as_json: bool
) -> None:
    """Print the log of a deploy."""
    settings = _settings(ctx, config_path)
    ident = names.deploy_id(deploy_id)
    records = _records(settings)
    if records.get(ident) is None:
        raise UsageError(f"there is no deploy #{ident}.")

    async def show() -> None:
        async for row in usecases.follow_log(records, ident, follow=follow, settings=settings):
            click.echo(json.dumps(views.log_json(row)) if as_json else row.line)

    asyncio.run(show())


@main.command()
@_config_option
@click.argument("deployment")
@click.argument("deploy_id", required=False)
@click.option("--force", is_flag=True, help="Roll back across a change of Airflow version.")
@click.option(
    "--freeze", "and_freeze", is_flag=True, help="Freeze the deployment too, until unfrozen."
)
@click.option("--reason", default=None, help="Why it is frozen (with --freeze).")
@click.option("--json", "as_json", is_flag=True, help="Print the deploy record as JSON.")
@click.pass_context
@_errors
def rollback(
    ctx: click.Context,
    config_path: str | None,
    deployment: str,
    deploy_id: str | None,
    force: bool,
    and_freeze: bool,
    reason: str | None,
    as_json: bool,
) -> None:
    """Run an earlier successful deploy's image again (default: the one before)."""
    settings = _settings(ctx, config_path)
    dep = settings.deployment(deployment)
    if reason is not None and not and_freeze:
        raise UsageError("--reason goes with --freeze.")
    services = _services(settings)
    actor = usecases.local_actor()
    request = usecases.rollback(
        settings,
        services.records,
        dep,
        names.deploy_id(deploy_id) if deploy_id else None,
        trigger="cli",
        actor=actor,
        force=force,
    )
    if and_freeze:
        _rollback_freeze(services.records, dep, actor, reason or request.subject)
    _run_and_exit(services, request, "rollback", as_json)


def _rollback_freeze(records: Records, dep: config_mod.Deployment, actor: str, reason: str) -> None:
    """Freeze before the rollback is queued: no webhook deploy can undo it afterwards."""
    held, new = usecases.freeze_for_rollback(records, dep, by=actor, reason=reason)
    said = "froze" if new else "kept the freeze:"
    click.echo(f"deployd: {said} {describe(held)} (deployd unfreeze {dep.name} ends it)", err=True)


@main.command()
@_config_option
@click.argument("source")
@click.argument("target")
@click.argument("deploy_id", required=False)
@click.option("--force", is_flag=True, help="Promote an older Airflow than TARGET runs.")
@click.option("--json", "as_json", is_flag=True, help="Print the deploy record as JSON.")
@click.pass_context
@_errors
def promote(
    ctx: click.Context,
    config_path: str | None,
    source: str,
    target: str,
    deploy_id: str | None,
    force: bool,
    as_json: bool,
) -> None:
    """Deploy to TARGET the image SOURCE runs (or SOURCE's deploy DEPLOY_ID built), by digest."""
    settings = _settings(ctx, config_path)
    src, dst = settings.deployment(source), settings.deployment(target)
    services = _services(settings)
    request = usecases.promote(
        settings,
        services.records,
        src,
        dst,
        names.deploy_id(deploy_id) if deploy_id else None,
        trigger="cli",
        actor=usecases.local_actor(),
        force=force,
    )
    _run_and_exit(services, request, "promotion", as_json)


@main.command()
@_config_option
@click.argument("deployment")
@click.option("--reason", required=True, help="Why (shown to everyone who is refused).")
@click.option("--until", "until", default=None, help="RFC 3339 time or duration (30m, 2h, 1d).")
@click.option("--json", "as_json", is_flag=True, help="Print the freeze as JSON.")
@click.pass_context
@_errors
def freeze(
    ctx: click.Context,
    config_path: str | None,
    deployment: str,
    reason: str,
    until: str | None,
    as_json: bool,
) -> None:
    """Stop deploys of DEPLOYMENT (pushes, deploys, promotions); rollbacks still run."""
    settings = _settings(ctx, config_path)
    dep = settings.deployment(deployment)
    made = usecases.freeze(
        _records(settings), dep, by=usecases.local_actor(), reason=reason, until=until
    )
    if as_json:
        click.echo(json.dumps({"deployment": dep.name, "freeze": views.freeze_json(made)}))
    else:
        click.echo(describe(made))


@main.command()
@_config_option
@click.argument("deployment")
@click.option("--json", "as_json", is_flag=True, help="Print what freezes it now as JSON.")
@click.pass_context
@_errors
def unfreeze(ctx: click.Context, config_path: str | None, deployment: str, as_json: bool) -> None:
    """End the freeze of DEPLOYMENT: waiting webhook deploys run, pushes are taken again."""
    settings = _settings(ctx, config_path)
    dep = settings.deployment(deployment)
    records = _records(settings)
    ended = usecases.unfreeze(records, dep, by=usecases.local_actor())
    still = usecases.freeze_of(records, dep)
    if as_json:
        out = {"deployment": dep.name, "ended": views.freeze_json(ended)}
        click.echo(json.dumps({**out, "freeze": views.freeze_json(still)}))
        return
    click.echo(f"{dep.name} unfrozen (frozen by {ended.by}: {ended.reason})")
    if still is not None:
        click.echo(f"note: {describe(still)}")


@main.command()
@_config_option
@click.argument("deployment")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_context
@_errors
def status(ctx: click.Context, config_path: str | None, deployment: str, as_json: bool) -> None:
    """What is deployed, what is under way, and what the cluster really runs."""
    settings = _settings(ctx, config_path)
    dep = settings.deployment(deployment)
    now = asyncio.run(usecases.status(_services(settings), dep))
    if as_json:
        click.echo(json.dumps(views.status_json(now), indent=2))
    else:
        for line in views.status_lines(now):
            click.echo(line)
    if now.unreachable:
        sys.exit(4)


@main.command()
@_config_option
@click.argument("deploy_id")
@click.option("--json", "as_json", is_flag=True, help="Print the deploy record as JSON.")
@click.pass_context
@_errors
def cancel(ctx: click.Context, config_path: str | None, deploy_id: str, as_json: bool) -> None:
    """Cancel a queued or running deploy, whichever process runs it; wait until it stops."""
    settings = _settings(ctx, config_path)
    records = _records(settings)
    ident = names.deploy_id(deploy_id)
    asked = usecases.cancel(records, ident, by=usecases.local_actor())
    click.echo(f"deployd: {views.cancel_asked_line(asked)}", err=True)

    async def follow() -> None:
        lines = usecases.follow_log(records, ident, settings=settings, after=asked.log_mark)
        async for row in lines:
            click.echo(row.line, err=True)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        click.echo(f"deployd: the cancel stays asked; follow it: deployd logs {ident} -f", err=True)
        sys.exit(1)
    rec = records.get(ident)
    assert rec is not None
    if as_json:
        click.echo(json.dumps(views.deploy_json(rec), indent=2))
    else:
        click.echo(views.cancel_result(rec))
    sys.exit(0 if rec.state == deploys.CANCELLED else 1)


def _run_and_exit(services: Services, request: DeployRequest, what: str, as_json: bool) -> None:
    """Run a deploy in the foreground; print its record; notify; exit with its code."""
    # Targets new to the records start at the outbox's end: before this deploy's events.
    services.records.add_targets([t.name for t in services.settings.notify])
    try:
        outcome = asyncio.run(_until_signalled(Pipeline(services), request))
    except KeyboardInterrupt:
        click.echo(f"deployd: cancelled; the {what} is recorded as cancelled.", err=True)
        _notify(services)
        sys.exit(1)
    _print_outcome(outcome.record, as_json)
    _notify(services)
    sys.exit(outcome.exit_code)


def _notify(services: Services) -> None:
    """Send the pending notifications of targets no `deployd serve` holds (bounded)."""
    if not services.settings.notify:
        return
    from daemon.notify import outbox  # aiohttp: only for the commands that notify

    try:
        left = asyncio.run(outbox.deliver_pending(services.settings, services.records))
    except KeyboardInterrupt:
        return  # they stay in the outbox
    for target, count in sorted(left.items()):
        if count:
            click.echo(
                f"deployd: {count} notification(s) to {target} not sent yet; they stay in "
                "the outbox for `deployd serve` (or the next deploy).",
                err=True,
            )


def _print_outcome(rec: Deploy, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(views.deploy_json(rec), indent=2))
    elif rec.state == deploys.SUCCEEDED:
        click.echo(f"deploy #{rec.id} succeeded: {rec.image_ref}")
    else:
        click.echo(f"deploy #{rec.id} {rec.state}: {rec.error}")


async def _until_signalled(pipeline: Pipeline, request: DeployRequest) -> DeployOutcome:
    """Run a deploy; SIGTERM, like Ctrl-C, cancels it so that it is recorded `cancelled`."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await pipeline.run(request, sink=lambda line: click.echo(line, err=True))
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
