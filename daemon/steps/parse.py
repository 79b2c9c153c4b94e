"""Parse: import every DAG file Airflow would load, in a container of the new image.

The checker (daemon/checker/parse_dags.py) runs on the image's own Python and
prints one JSON report; this step turns it into readable lines, stores it with
the deploy and fails the deploy on import errors unless `force`.
"""

from __future__ import annotations

import json
from typing import Any

from daemon.checker import PARSE_DAGS, RESULT_MARK
from daemon.context import DeployContext
from daemon.errors import CheckError
from daemon.steps import sandbox

TRACEBACK_LINES = 12


async def run(ctx: DeployContext) -> str:
    """Check the DAGs; return a summary or raise CheckError."""
    dep = ctx.deployment
    images = ctx.services.images
    result_lines: list[str] = []

    def on_line(line: str) -> None:
        if line.startswith(RESULT_MARK):
            result_lines.append(line[len(RESULT_MARK) :])
        else:
            ctx.say(line, "parse")

    parallel = max(1, min(int(dep.check_cpus), images.ncpu()))
    config = {"import_timeout": dep.import_timeout_seconds + 5, "parallel": parallel}
    source = PARSE_DAGS.read_text(encoding="utf-8")
    run, _ = await sandbox.run_python(
        ctx, "parse", ["-c", source], {"DEPLOYD_CHECK": config}, on_line=on_line
    )
    if not result_lines:
        bad = sandbox.ended_badly(run, "the DAG check", dep.check_timeout_seconds)
        if bad:
            raise CheckError(bad + ".")
        raise CheckError(
            f"the DAG check ended (exit status {run.exit_code}) without a report; "
            "see the log above."
        )
    report = json.loads(result_lines[-1])
    ctx.services.records.update(ctx.id, report=json.dumps(_stored(report)))
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
    dags = sum(len(e["dags"]) for e in files.values())
    summary = f"{len(files)} files, {dags} DAGs, {len(errors)} import errors"
    if allowed:
        summary += f", {len(allowed)} allowed by .astro/dag_integrity_exceptions.txt"
    if errors and not ctx.request.options.force:
        listed = "; ".join(f"{n}: {_short(e)}" for n, e in list(errors.items())[:5])
        more = f" and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise CheckError(
            f"{len(errors)} DAG file(s) failed to import: {listed}{more}. "
            "Fix them, or deploy anyway with force."
        )
    if errors:
        summary += " (deployed anyway: force)"
    return summary


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
