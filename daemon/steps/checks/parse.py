"""Parse: import every DAG file Airflow would load, in a container of the new image.

The checker (daemon/steps/checks/checker/parse_dags.py) runs on the image's own Python and
prints one JSON report; this step turns it into readable lines, stores it with
the deploy and fails the deploy on import errors unless `force`. Depending on
`integrity_test`, the project's own `.astro/test_dag_integrity_default.py`
runs as well (or instead), with pytest, in the same sandbox.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from daemon.core.context import DeployContext
from daemon.core.ports import ContainerRun
from daemon.errors import CheckError
from daemon.steps.checks import integrity, sandbox
from daemon.steps.checks.checker import PARSE_DAGS, RESULT_MARK
from daemon.steps.checks.pytest import PYTEST_ENV, short_failure

TRACEBACK_LINES = 12
_PYTEST_SUMMARY = re.compile(r"^=*\s*(\d+ \w+(, \d+ \w+)*|no tests ran) in [0-9.]+s.*$")


async def run(ctx: DeployContext) -> str:
    """Run the DAG checks `integrity_test` asks for; return a summary or raise CheckError."""
    dep = ctx.deployment
    path = ctx.source / integrity.PROJECT_TEST
    # In a thread: the file is read and (for "auto") its syntax tree hashed, tens of ms.
    project_test = await asyncio.to_thread(
        lambda: path.read_text(errors="replace") if path.is_file() else None
    )
    builtin, project = await asyncio.to_thread(integrity.plan, dep.integrity_test, project_test)
    if project and project_test is None:
        raise CheckError(
            f"integrity_test is {dep.integrity_test!r}, but the project has no "
            f"{integrity.PROJECT_TEST}."
        )
    summaries, blocking = [], []
    if builtin:
        summary, error = await _builtin(ctx)
        summaries.append(summary)
        blocking += [error] if error else []
    if project:
        summary, error = await _project_test(ctx)
        summaries.append(summary)
        blocking += [error] if error else []
    summary = "; ".join(summaries)
    if blocking and not ctx.request.options.force:
        raise CheckError(" ".join(blocking) + " Fix them, or deploy anyway with force.")
    if blocking:
        summary += " (deployed anyway: force)"
    return summary


async def _project_test(ctx: DeployContext) -> tuple[str, str]:
    """pytest over the project's integrity test: (summary, blocking error or '')."""
    failed: list[str] = []
    outcome = ""

    def on_line(line: str) -> None:
        nonlocal outcome
        if line.startswith(("FAILED ", "ERROR ")):
            failed.append(short_failure(line))
        if _PYTEST_SUMMARY.match(line.strip()):
            outcome = line.strip("= ")
        ctx.say(line, "parse")

    ctx.say(f"-----> {integrity.PROJECT_TEST} (the project's integrity test)", "parse")
    run, _ = await sandbox.run_python(
        ctx,
        "parse",
        [
            "-m",
            "pytest",
            integrity.PROJECT_TEST,
            "-p",
            "no:cacheprovider",
            "-q",
            "--color=no",
            "-rfE",
        ],
        PYTEST_ENV,
        on_line=on_line,
    )
    bad = sandbox.ended_badly(
        run, "the project's integrity test", ctx.deployment.check_timeout_seconds
    )
    if bad:
        raise CheckError(bad + ".")
    summary = f"{integrity.PROJECT_TEST}: {outcome or f'exit status {run.exit_code}'}"
    if run.exit_code == 0:
        return summary, ""
    if run.exit_code == 5:  # pytest: no tests collected
        return summary, (
            f"{integrity.PROJECT_TEST} has no tests, so it cannot pass; add one, or set "
            'integrity_test = "builtin" to rely on deployd\'s check alone.'
        )
    shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    return summary, f"{integrity.PROJECT_TEST} failed: {shown or outcome or 'see the log'}."


async def _builtin(ctx: DeployContext) -> tuple[str, str]:
    """deployd's checker: (summary, blocking error or '')."""
    dep = ctx.deployment
    images = ctx.services.images
    result_lines: list[str] = []

    def on_line(line: str) -> None:
        if line.startswith(RESULT_MARK):
            result_lines.append(line[len(RESULT_MARK) :])
        else:
            ctx.say(line, "parse")

    # In a thread: the Engine's /info (the first time) and the checker's source file.
    ncpu = await asyncio.to_thread(images.ncpu)
    source = await asyncio.to_thread(PARSE_DAGS.read_text, encoding="utf-8")
    parallel = max(1, min(int(dep.check_cpus), ncpu))
    config = {"import_timeout": dep.import_timeout_seconds + 5, "parallel": parallel}
    run, _ = await sandbox.run_python(
        ctx, "parse", ["-c", source], {"DEPLOYD_CHECK": config}, on_line=on_line
    )
    trusted(run, result_lines, dep.check_timeout_seconds)
    try:
        report = json.loads(result_lines[0])
        if not isinstance(report, dict) or not isinstance(report.get("files", {}), dict):
            raise ValueError("not a report")
    except ValueError as exc:
        raise CheckError(f"the DAG check printed a malformed report ({exc}).") from exc
    ctx.report = _stored(report)
    await ctx.record(ctx.services.records.update, ctx.id, report=json.dumps(ctx.report))
    if report.get("fatal"):
        for line in str(report["fatal"]).splitlines()[-TRACEBACK_LINES:]:
            ctx.say("       " + line, "parse")
        raise CheckError("Airflow could not be imported in the built image; see the log.")
    files: dict[str, Any] = report["files"]
    errors = {f: e for f, e in files.items() if e["status"] == "error"}
    allowed = [f for f, e in files.items() if e["status"] == "allowed"]
    for name, entry in errors.items():
        for line in describe(name, entry):
            ctx.say(line, "parse")
    for name, entry in files.items():
        if entry.get("lookups"):
            answered = ", ".join(sorted({f"{x['kind']} {x['name']}" for x in entry["lookups"]}))
            ctx.say(
                f"       {name}: answered with placeholders at parse time: {answered}"[:400],
                "parse",
            )
    dags = sum(len(e["dags"]) for e in files.values())
    summary = f"{len(files)} files, {dags} DAGs, {len(errors)} import errors"
    if allowed:
        summary += f", {len(allowed)} allowed by .astro/dag_integrity_exceptions.txt"
    if not errors:
        return summary, ""
    listed = "; ".join(f"{n}: {_short(e)}" for n, e in list(errors.items())[:5])
    more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
    return summary, f"{len(errors)} DAG file(s) failed to import: {listed}{more}."


def trusted(run: ContainerRun, reports: list[str], timeout: int) -> None:
    """Raise CheckError unless the checker ended normally with exactly one report.

    DAG code runs beside the checker and shares its stdout: it can print a report
    line of its own, or stop the checker after printing one. A report counts only
    if it is the only one and the checker itself exited 0.
    """
    bad = sandbox.ended_badly(run, "the DAG check", timeout)
    if bad:
        raise CheckError(bad + ".")
    if run.exit_code != 0:
        raise CheckError(
            f"the DAG check did not end normally (exit status {run.exit_code}), so no "
            "report of it is trusted; a DAG file may have stopped it. See the log above."
        )
    if len(reports) != 1:
        raise CheckError(
            "the DAG check ended without a report; see the log above."
            if not reports
            else f"the DAG check's output holds {len(reports)} reports where the checker "
            "prints one: something else (DAG code) wrote one, so none is trusted."
        )


def describe(name: str, entry: dict[str, Any]) -> list[str]:
    """Readable lines for one file's import error."""
    err = entry["error"]
    out = [f"       {name}: {_short(entry)}"]
    tb = [ln for ln in str(err.get("traceback") or "").splitlines() if ln.strip()]
    for line in tb[-TRACEBACK_LINES:]:
        out.append("           " + line)
    if entry.get("output_bytes", 0) > 4096:
        out.append(f"           (the file printed {entry['output_bytes']} bytes while importing)")
    return out


def _short(entry: dict[str, Any]) -> str:
    err = entry["error"]
    where = f" at line {err['line']}" if err.get("line") else ""
    return f"{err['kind']}{where}: {err['message']}"[:300]


def _stored(report: dict[str, Any]) -> dict[str, Any]:
    """The report as stored with the deploy (file output trimmed)."""
    files = {}
    for name, entry in report.get("files", {}).items():
        files[name] = {k: v for k, v in entry.items() if k != "output"}
        files[name]["output_head"] = str(entry.get("output", ""))[:1024]
    return {**report, "files": files}
