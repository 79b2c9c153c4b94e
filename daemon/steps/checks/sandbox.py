"""Running a command in a check container of the new image: shared by parse and pytest."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from daemon.adapters.background import run_stoppable
from daemon.core.context import DeployContext
from daemon.core.ports import ContainerRun, Sandbox
from daemon.steps.checks import dotenv

# Finds the image's Python (Astro images have `python`, slim ones `python3`)
# without a shell string built from input: the arguments pass through "$@".
_PYTHON = ["/bin/sh", "-c", 'exec "$(command -v python3 || command -v python)" "$@"', "python"]


def environment(ctx: DeployContext, mount_at: str, extra: dict[str, Any]) -> dict[str, str]:
    """The environment of a check container: Airflow pointed at scratch and the project."""
    dep = ctx.deployment
    env = project_env(ctx)
    env.update(
        {
            "AIRFLOW_HOME": "/tmp/airflow",
            "AIRFLOW__CORE__DAGS_FOLDER": f"{mount_at}/dags",
            "AIRFLOW__CORE__PLUGINS_FOLDER": f"{mount_at}/plugins",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": str(dep.import_timeout_seconds),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////tmp/airflow/airflow.db",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "HOME": "/tmp",
            "TMPDIR": "/tmp",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in extra.items()})
    return env


def project_env(ctx: DeployContext) -> dict[str, str]:
    """The pushed tree's `.env`, given to the check containers as Astro does."""
    path = ctx.source / ".env"
    if not path.is_file() or path.is_symlink():
        return {}
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[: 1 << 20]
    except OSError:
        return {}
    return dotenv.parse(text)


async def run_python(
    ctx: DeployContext, step: str, args: list[str], extra_env: dict[str, Any], on_line: Any = None
) -> tuple[ContainerRun, str]:
    """Run the image's Python with `args` in the sandbox; return the run and the mount point."""
    dep = ctx.deployment
    images = ctx.services.images
    mount_at = await asyncio.to_thread(images.workdir, ctx.image_id)
    sandbox = Sandbox(
        memory_mb=dep.check_memory_mb,
        cpus=dep.check_cpus,
        timeout_seconds=dep.check_timeout_seconds,
    )
    env = environment(ctx, mount_at, extra_env)
    line_sink = on_line or (lambda line: ctx.say(line, step))
    # Stopped (a cancel, a failed upload beside it): the container is killed and
    # removed, and this waits for that.
    run = await run_stoppable(
        functools.partial(
            images.run_sandboxed,
            ctx.image_id,
            [*_PYTHON, *args],
            project=ctx.source,
            mount_at=mount_at,
            environment=env,
            sandbox=sandbox,
            labels=ctx.labels,
            on_line=line_sink,
            stop=ctx.stop,
        ),
        ctx.stop,
    )
    return run, mount_at


def ended_badly(run: ContainerRun, what: str, timeout: int) -> str:
    """Why a check container did not finish normally, or '' if it did."""
    if run.timed_out:
        return f"{what} did not finish within {timeout} s (check_timeout_seconds)"
    if run.exit_code is None:
        return f"{what} was stopped"
    if run.oom_killed and run.exit_code != 0:
        # OOMKilled is set when any process in the container was killed; it
        # only explains the outcome when the main process failed too.
        return f"{what} was killed: it ran out of memory (check_memory_mb)"
    return ""
