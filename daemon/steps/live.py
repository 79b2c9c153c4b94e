"""Live: follow Airflow's API until the DAG deploy's commit is what Airflow has parsed.

After `publish` the branch names the new commit; Airflow's GitDagBundle picks it up within
its refresh interval and the DAG processor parses it. This step asks Airflow (the
deployment's `airflow_api_url`) until the DAGs of the files the deploy changed report the
new bundle version, and says how long that took. If Airflow reports an import error in a
changed file that deployd's own check did not see (another Python, a missing connection
at parse time), the branch goes back to the commit that ran before and the deploy ends
`rolled_back` with Airflow's error: Airflow then parses the old DAGs again.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.adapters.airflow import AirflowAPI, BundleState, ImportFailure
from daemon.core import kinds
from daemon.core.context import DeployContext
from daemon.errors import DeploydError, RolledBack
from daemon.steps import dags

POLL_SECONDS = 0.25


def bundle_names(paths: list[str]) -> set[str]:
    """The names the changed repository paths may have in the bundle: as they are (the
    bundle is the repository) or without `dags/` (a bundle with subdir = "dags")."""
    out = set(paths)
    out |= {p.removeprefix(kinds.DAGS_DIR) for p in paths if p.startswith(kinds.DAGS_DIR)}
    return out


@dataclass(frozen=True)
class Expect:
    """What Airflow must show once the commit is live, from deployd's own check.

    `dags`: the DAG ids the changed files define (the check's report); `gone`: the bundle
    names of changed files the commit deletes, whose DAGs must leave Airflow's list.
    Without a report (integrity_test = "project") `known` is False: then live means the
    changed files' DAGs, and at least one DAG of the bundle, report the commit.
    """

    dags: frozenset[str] = frozenset()
    gone: frozenset[str] = frozenset()
    known: bool = True

    @property
    def nothing(self) -> bool:
        """A change Airflow has nothing to show for (a helper module, a README)."""
        return self.known and not self.dags and not self.gone


def expect(report: dict[str, Any] | None, changed: list[str], tree: Path) -> Expect:
    """The Expect of a deploy whose check reported `report` over the checkout in `tree`."""
    gone = frozenset(bundle_names([p for p in changed if not (tree / p).exists()]))
    files = (report or {}).get("files")
    if not isinstance(files, dict):
        return Expect(gone=gone, known=False)
    dags: set[str] = set()
    for path in changed:
        entry = files.get(path)
        if isinstance(entry, dict) and entry.get("status") == "ok":
            dags |= {str(d) for d in entry.get("dags") or []}
    return Expect(frozenset(dags), gone)


def verdict(
    state: BundleState, commit: str, changed: set[str], expected: Expect, since: float
) -> tuple[bool, tuple[ImportFailure, ...]]:
    """(live, new import errors in changed files) for one answer of Airflow.

    Airflow re-parses at once only the files whose content changed (others wait for
    min_file_process_interval), so live is judged on those: every DAG they define reports
    the new commit, and the DAGs of deleted files are gone.
    """
    failures = tuple(e for e in state.errors_in(changed) if e.timestamp >= since)
    if failures:
        return False, failures
    lingering = any(d.relative_fileloc in expected.gone for d in state.dags)
    at_commit = {d.dag_id for d in state.dags if d.bundle_version == commit}
    if expected.known:
        return expected.dags <= at_commit and not lingering, ()
    ours = [d for d in state.dags if d.relative_fileloc in changed]
    live = bool(at_commit) and all(d.bundle_version == commit for d in ours)
    return live and not lingering, ()


async def run(ctx: DeployContext) -> str:
    """Wait (up to rollout_timeout_seconds) until Airflow serves the new commit's DAGs."""
    dep, prev = ctx.deployment, ctx.previous
    conf = dep.airflow
    assert conf is not None and prev is not None and prev.commit
    commit = ctx.request.commit
    changed = bundle_names(ctx.changed)
    expected = expect(ctx.report, ctx.changed, ctx.source)
    if expected.nothing:
        return (
            f"the change defines no DAG for Airflow to report: it parses {commit[:7]} "
            "within its bundle's refresh_interval"
        )
    api = AirflowAPI(
        conf.url, conf.bundle, username=conf.username, password=conf.password, token=conf.token
    )
    # Airflow stamps an import error with the parse's time: one older than the publish
    # (less a second of clock skew between hosts) is about an earlier commit.
    since = time.time() - 1.0
    started = time.monotonic()
    deadline = started + dep.rollout_timeout_seconds
    told = ""
    try:
        while True:
            try:
                state = await api.bundle_state()
            except DeploydError as exc:
                if exc.message != told:
                    ctx.say(
                        f"       cannot read Airflow's API: {exc.message}; still waiting", "live"
                    )
                    told = exc.message
            else:
                live, failures = verdict(state, commit, changed, expected, since)
                if failures:
                    await _back(ctx, prev.commit, failures)
                if live:
                    took = time.monotonic() - started
                    return (
                        f"live in Airflow after {took:.1f} s (bundle {conf.bundle} at "
                        f"{commit[:7]}, {len(state.import_errors)} import errors)"
                    )
            if time.monotonic() > deadline:
                raise DeploydError(
                    f"Airflow did not report bundle {conf.bundle} at {commit[:7]} within "
                    f"{dep.rollout_timeout_seconds} s; {dep.branch} names it (its DAGs passed "
                    "deployd's check): see the dag-processor's log."
                )
            await asyncio.sleep(POLL_SECONDS)
    except asyncio.CancelledError:
        # A cancel puts back what ran before: the branch Airflow reads, too.
        await asyncio.shield(dags.move_back(ctx, prev.commit))
        ctx.say(f"       {dep.branch} is back at {prev.commit[:12]}", "live")
        raise
    finally:
        await api.close()


async def _back(ctx: DeployContext, commit: str, failures: tuple[ImportFailure, ...]) -> None:
    """Move the branch back and end the deploy rolled_back with Airflow's error."""
    first = failures[0]
    await dags.move_back(ctx, commit)
    for failure in failures:
        ctx.say(f"       Airflow: {failure.filename}: {failure.message}", "live")
    more = f" (and {len(failures) - 1} more files)" if len(failures) > 1 else ""
    raise RolledBack(
        f"Airflow could not import {first.filename}: {first.message}{more}; "
        f"{ctx.deployment.branch} is back at {commit[:12]}, which Airflow parses again."
    )
