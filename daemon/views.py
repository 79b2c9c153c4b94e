"""How records look outside: the JSON shape (CLI `--json`, HTTP API) and the text views
(CLI, SSH commands). Made here once, at the edge.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from daemon.core import deploys
from daemon.core.deploys import Deploy, LogLine
from daemon.core.usecases import Status


def deploy_json(d: Deploy) -> dict[str, Any]:
    """A deploy in the shape `--json` prints and the HTTP API returns."""
    return {
        "id": d.id,
        "deployment": d.deployment,
        "state": d.state,
        "trigger": d.trigger,
        "action": d.action,
        "actor": d.actor,
        "ref": d.ref,
        "commit": d.commit,
        "tree": d.tree,
        "description": d.description,
        "options": {
            "force": d.options.force,
            "pytest": d.options.pytest,
            "allow_dirty": d.options.allow_dirty,
        },
        "image": d.image,
        "tag": d.tag,
        "digest": d.digest,
        "step": d.step,
        "pid": d.pid,
        "error": d.error,
        "rollback_of": d.rollback_of,
        "promoted_from": (
            {"deployment": d.promoted_from, "deploy_id": d.promoted_from_id}
            if d.promoted_from
            else None
        ),
        "cancelled_by": d.cancelled_by,
        "report": d.report,
        "created_at": d.created_at,
        "started_at": d.started_at,
        "finished_at": d.finished_at,
        "steps": [
            {
                "name": s.name,
                "state": s.state,
                "started_at": s.started_at,
                "finished_at": s.finished_at,
                "summary": s.summary,
            }
            for s in d.steps
        ],
    }


def log_json(row: LogLine) -> dict[str, Any]:
    """A log line in the shape `logs --json` prints and the API streams."""
    return {"ts": row.ts, "step": row.step, "line": row.line}


def when(ts: float | None) -> str:
    """A record timestamp as UTC text."""
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def deploy_table(rows: list[Deploy]) -> list[str]:
    """The `deploys` listing, newest first."""
    if not rows:
        return ["no deploys yet"]
    out = [
        f"{'ID':>5}  {'DEPLOYMENT':<14} {'STATE':<12} {'COMMIT':<8} {'WHEN (UTC)':<19} "
        f"{'TRIGGER':<8} {'ACTOR':<12} TAG / ERROR"
    ]
    for r in rows:
        what = r.tag if r.state == deploys.SUCCEEDED else (r.error or "")
        out.append(
            f"{r.id:>5}  {r.deployment:<14} {r.state:<12} "
            f"{(r.commit or '')[:7]:<8} {when(r.created_at):<19} {r.trigger:<8} "
            f"{r.actor[:12]:<12} {what}"
        )
    return out


def status_json(status: Status) -> dict[str, Any]:
    """`status --json`."""
    return {
        "deployment": status.deployment,
        "deployed": deploy_json(status.deployed) if status.deployed else None,
        "in_flight": [deploy_json(d) for d in status.in_flight],
        "cluster": status.cluster,
    }


def status_lines(status: Status) -> list[str]:
    """What is deployed, what is under way, and what the cluster runs."""
    last, in_flight, cluster = status.deployed, status.in_flight, status.cluster
    out = [f"deployment {status.deployment}"]
    if last is None:
        out.append("  deployed: nothing yet")
    else:
        what = f" (rollback to #{last.rollback_of})" if last.rollback_of else ""
        out.append(
            f"  deployed: deploy #{last.id}{what} of {(last.commit or '')[:12]} at "
            f"{when(last.finished_at)} UTC"
        )
        out.append(f"  image:    {last.image}:{last.tag}@{last.digest}")
    for rec in in_flight:
        out.append(f"  {rec.state}: deploy #{rec.id} of {(rec.commit or '')[:12]} by {rec.actor}")
    if isinstance(cluster, str):
        out.append(f"  cluster:  {cluster}")
    elif not cluster:
        out.append("  cluster:  no workloads configured")
    for w in cluster if isinstance(cluster, list) else []:
        if "error" in w:
            out.append(f"  {w['workload']}: {w['error']}")
            continue
        by = f"deploy #{w['deploy_id']}" if w["deploy_id"] else "not deployed by deployd"
        out.append(f"  {w['workload']}: {by}; {w['rollout']}")
        for tool in w.get("managed_by") or []:
            out.append(f"      warning: managed by {tool}; its next sync will undo deployd's patch")
        for name, image in sorted(w["images"].items()):
            out.append(f"      {name}: {image}")
        digest = (last.digest if last else None) or ""
        repo = (last.image if last else None) or ""
        for image, count in sorted(w["pods_running"].items()):
            differs = (
                f"  <- not deploy #{last.id}'s image"
                if last and image.startswith(repo) and not image.endswith(digest)
                else ""
            )
            out.append(f"      running: {count} x {image}{differs}")
    return out


def help_lines(port: str) -> list[str]:
    """What a key can do over SSH."""
    return [
        "deployd: deploy Apache Airflow projects with git push.",
        "",
        f"  git remote add astro ssh://git@HOST:{port}/DEPLOYMENT",
        "  git push astro main                 deploy (progress shows as remote: lines)",
        "  git push -o force astro main        deploy despite DAG import errors",
        "  git push -o pytest astro main       run tests/ before pushing the image",
        "  git push -o description=TEXT ...    record a description",
        "",
        f"  ssh -p {port} git@HOST deploys [DEPLOYMENT]   history, newest first",
        f"  ssh -p {port} git@HOST status DEPLOYMENT      what is deployed and running",
        f"  ssh -p {port} git@HOST rollback DEPLOYMENT [DEPLOY_ID]   run an earlier image again",
        f"  ssh -p {port} git@HOST logs DEPLOY_ID         the log of one deploy",
        f"  ssh -p {port} git@HOST help                   this text",
    ]
