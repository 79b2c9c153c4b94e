"""pytest: run the project's `tests/` in a container of the new image; failures block."""

from __future__ import annotations

import re

from daemon.context import DeployContext
from daemon.errors import CheckError
from daemon.steps import sandbox

_SUMMARY = re.compile(
    r"^=*\s*(\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)"
    r"(?:, \d+ \w+)*|no tests ran) in [0-9.]+s.*$"
)


async def run(ctx: DeployContext) -> str:
    """Run `pytest tests/`; return pytest's summary or raise CheckError."""
    dep = ctx.deployment
    if not (ctx.source / "tests").is_dir():
        raise CheckError("pytest was asked for, but the project has no tests/ folder.")
    summary = ""

    def on_line(line: str) -> None:
        nonlocal summary
        m = _SUMMARY.match(line.strip())
        if m:
            summary = m.group(1)
        ctx.say(line, "pytest")

    run, _ = await sandbox.run_python(
        ctx,
        "pytest",
        ["-m", "pytest", "tests/", "-p", "no:cacheprovider", "-q", "--color=no"],
        {},
        on_line=on_line,
    )
    bad = sandbox.ended_badly(run, "pytest", dep.check_timeout_seconds)
    if bad:
        raise CheckError(bad + ".")
    if run.exit_code == 5:
        raise CheckError("pytest collected no tests in tests/.")
    if run.exit_code != 0:
        raise CheckError(
            f"the tests failed: {summary or f'pytest exit status {run.exit_code}'}."
            " Force does not skip failing tests."
        )
    return summary or "passed"
