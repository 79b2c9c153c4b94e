"""`rollback DEPLOYMENT [DEPLOY_ID]`: run an earlier deploy's image again, without building.

The target is a successful deploy of the deployment (by default the newest one
that ran a different image than what runs now). A rollback is a deploy of its
own: preflight, then the roll (with the same automatic rollback if it fails);
the build, checks and push are skipped, and the server branch does not move.
To an older Airflow version it is refused unless forced: the newer version
has migrated the metadata database.
"""

from __future__ import annotations

from typing import Any

from daemon.adapters import repos
from daemon.adapters.records import Records
from daemon.config import Deployment, Settings
from daemon.core import deploys
from daemon.core.context import DeployRequest
from daemon.core.deploys import Options
from daemon.errors import UsageError


def target(records: Records, dep: Deployment, deploy_id: int | None) -> dict[str, Any]:
    """The successful deploy to roll back to."""
    if not dep.workloads:
        raise UsageError(
            f"deployment {dep.name} names no workloads: nothing on a cluster to roll back."
        )
    current = records.last_succeeded(dep.name)
    if deploy_id is not None:
        rec = records.get(deploy_id)
        if rec is None or rec["deployment"] != dep.name:
            raise UsageError(f"there is no deploy #{deploy_id} of {dep.name}.")
        if rec["state"] != deploys.SUCCEEDED or not rec["digest"]:
            raise UsageError(
                f"deploy #{deploy_id} is {rec['state']}: only a successful deploy "
                "can be rolled back to."
            )
        return rec
    running = _image(current) if current else None
    for rec in records.list_deploys(dep.name, limit=1000):
        if rec["state"] == deploys.SUCCEEDED and rec["digest"] and _image(rec) != running:
            return rec
    raise UsageError(f"there is no earlier successful deploy of {dep.name} to roll back to.")


def check_versions(records: Records, dep: Deployment, rec: dict[str, Any], force: bool) -> None:
    """Refuse a rollback to an older Airflow version unless forced."""
    current = records.last_succeeded(dep.name)
    now = ((current or {}).get("report") or {}).get("airflow_version")
    then = (rec.get("report") or {}).get("airflow_version")
    if now and then and deploys.version_key(then) < deploys.version_key(now) and not force:
        raise UsageError(
            f"deploy #{rec['id']} runs Airflow {then}, the deployment runs {now}: "
            "the database was migrated by the newer version. Roll forward instead, "
            "or pass --force if you know the older version copes."
        )


def request(
    settings: Settings,
    dep: Deployment,
    rec: dict[str, Any],
    *,
    trigger: str,
    actor: str,
    force: bool,
) -> DeployRequest:
    return DeployRequest(
        deployment=dep,
        repo=repos.repo_path(settings.server.state_dir, dep.name),
        commit=rec["commit"],
        ref=rec["ref"] or "",
        subject=f"rollback to deploy #{rec['id']}",
        trigger=trigger,
        actor=actor,
        options=Options(force=force, description=f"rollback to deploy #{rec['id']}"),
        rollback_to=rec,
    )


def _image(rec: dict[str, Any]) -> tuple[str, str]:
    return (rec["image"], rec["digest"])
