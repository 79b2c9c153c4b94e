"""pytest: run the project's `tests/` in a container of the new image; failures block.

pytest runs under a few lines of wrapper (stdlib + pytest, on the image's
Python) that print the JUnit XML after it, so the report is kept with the
deploy although the container's filesystem is gone.
"""

from __future__ import annotations

import contextlib
import json
import re

from daemon.context import DeployContext
from daemon.errors import CheckError
from daemon.steps import sandbox

_SUMMARY = re.compile(
    r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)"
    r"(?:, \d+ \w+)*|no tests ran) in [0-9.]+s.*$"
)


JUNIT_MARK = "@@deployd-junit@@ "
JUNIT_NAME = "pytest-junit.xml"
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
            failed.append(line.split(" ", 1)[1].split(" - ")[0])
        ctx.say(line, "pytest")

    run, _ = await sandbox.run_python(ctx, "pytest", ["-c", _WRAPPER], {}, on_line=on_line)
    if junit:
        with contextlib.suppress(ValueError):
            ctx.services.records.put_artifact(ctx.id, JUNIT_NAME, str(json.loads(junit[-1])))
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
