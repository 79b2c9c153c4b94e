"""pytest: run the project's `tests/` in a container of the new image; failures block.

pytest runs under a few lines of wrapper (stdlib + pytest, on the image's
Python) that print the JUnit XML after it, so the report is kept with the
deploy although the container's filesystem is gone.
"""

from __future__ import annotations

import contextlib
import json
import re

from daemon.core.context import DeployContext
from daemon.errors import CheckError
from daemon.steps.checks import sandbox

_SUMMARY = re.compile(
    r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)"
    r"(?:, \d+ \w+)*|no tests ran) in [0-9.]+s.*$"
)


# Wide enough that pytest's short summary keeps an error's reason whole.
PYTEST_ENV = {"COLUMNS": "400"}
JUNIT_MARK = "@@deployd-junit@@ "
JUNIT_NAME = "pytest-junit.xml"
SUMMARY_NAME = "pytest-summary.json"
_WRAPPER = """
import json, sys
import pytest
code = pytest.main(["tests/", "-p", "no:cacheprovider", "-q", "--color=no", "-rfE",
                    "--junitxml=/tmp/deployd-junit.xml"])
sys.stdout.flush()
try:
    with open("/tmp/deployd-junit.xml") as fh:
        xml = fh.read()
except OSError:
    xml = ""
sys.stdout.write("\\n" + MARK + json.dumps(xml) + "\\n")
sys.stdout.flush()
sys.exit(int(code))
""".replace("MARK", repr(JUNIT_MARK))


def counts(summary: str, failing: list[str], exit_code: int | None) -> dict[str, object]:
    """pytest's summary line as numbers, with the failing test ids."""
    out: dict[str, object] = {
        k: 0 for k in ("passed", "failed", "errors", "skipped", "xfailed", "xpassed")
    }
    for number, word in re.findall(r"(\d+) (\w+)", summary):
        key = "errors" if word in ("error", "errors") else word
        if key in out:
            out[key] = int(number)
    out["failing"] = failing
    out["exit_code"] = exit_code
    return out


def short_failure(line: str) -> str:
    """A line of pytest's short summary, shown in an error: the test id, and for an
    error (which happens outside a test: a module that cannot even be collected)
    also its reason, which is the only place it is said."""
    kind, _, rest = line.partition(" ")
    node, _, reason = rest.partition(" - ")
    if kind == "ERROR" and reason:
        return f"{node} ({reason.strip()[:200]})"
    return node


async def run(ctx: DeployContext) -> str:
    """Run `pytest tests/`; return pytest's summary or raise CheckError."""
    dep = ctx.deployment
    if not (ctx.source / "tests").is_dir():
        raise CheckError("pytest was asked for, but the project has no tests/ folder.")
    summary = ""
    failed: list[str] = []
    junit: list[str] = []

    def on_line(line: str) -> None:
        nonlocal summary
        if line.startswith(JUNIT_MARK):
            junit.append(line[len(JUNIT_MARK) :])
            return
        m = _SUMMARY.match(line.strip())
        if m:
            summary = m.group(1)
        if line.startswith(("FAILED ", "ERROR ")):
            failed.append(short_failure(line))
        ctx.say(line, "pytest")

    run, _ = await sandbox.run_python(ctx, "pytest", ["-c", _WRAPPER], PYTEST_ENV, on_line=on_line)
    records = ctx.services.records
    if junit:
        with contextlib.suppress(ValueError):
            xml = str(json.loads(junit[-1]))
            await ctx.record(records.put_artifact, ctx.id, JUNIT_NAME, xml)
    await ctx.record(
        records.put_artifact,
        ctx.id,
        SUMMARY_NAME,
        json.dumps(counts(summary, failed, run.exit_code)),
    )
    bad = sandbox.ended_badly(run, "pytest", dep.check_timeout_seconds)
    if bad:
        raise CheckError(bad + ".")
    if run.exit_code == 5:
        raise CheckError("pytest collected no tests in tests/.")
    if run.exit_code != 0:
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        raise CheckError(
            f"the tests failed: {summary or f'pytest exit status {run.exit_code}'}"
            f"{f' ({shown})' if shown else ''}. Force does not skip failing tests."
        )
    return summary or "passed"
