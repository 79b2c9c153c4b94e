"""How records look outside: the JSON shape (CLI `--json`, HTTP API) and the text views
(CLI, SSH commands). Made here once, at the edge.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from daemon.core import deploys
from daemon.core.deploys import Deploy, LogLine
from daemon.core.freezes import Freeze, describe
from daemon.core.usecases import CancelAsked, Status


def deploy_json(d: Deploy) -> dict[str, Any]:
    """A deploy in the shape `--json` prints and the HTTP API returns."""
    return {
        "id": d.id,
        "deployment": d.deployment,
        "state": d.state,
        "trigger": d.trigger,
        "action": d.action,
        "kind": d.kind,
        "actor": d.actor,
        "ref": d.ref,
        "commit": d.commit,
        "tree": d.tree,
        "description": d.description,
        "options": {
            "force": d.options.force,
            "pytest": d.options.pytest,
            "allow_dirty": d.options.allow_dirty,
            "override_freeze": d.options.override_freeze,
            "image": d.options.image,
        },
        "image": d.image,
        "tag": d.tag,
        "digest": d.digest,
        "step": d.step,
        "pid": d.pid,
        "error": d.error,
        "rollback_of": d.rollback_of,
        "promoted_from": promoted_from_json(d),
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


def freeze_json(f: Freeze | None) -> dict[str, Any] | None:
    """A deployment's freeze in the shape `--json` prints and the API returns (or None)."""
    if f is None:
        return None
    return {"by": f.by, "reason": f.reason, "since": f.since, "until": f.until}


def freeze_lines(freezes: dict[str, Freeze | None]) -> list[str]:
    """The line above a `deploys` table for each frozen deployment."""
    return [describe(f) for f in freezes.values() if f is not None]


def promoted_from_json(d: Deploy) -> dict[str, Any] | None:
    """Where a promotion took its image from, as the API and the webhook event show it."""
    if not d.promoted_from:
        return None
    return {"deployment": d.promoted_from, "deploy_id": d.promoted_from_id}


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
        f"{'ID':>5}  {'DEPLOYMENT':<14} {'STATE':<12} {'KIND':<6} {'COMMIT':<8} "
        f"{'WHEN (UTC)':<19} {'TRIGGER':<8} {'ACTOR':<12} TAG / ERROR"
    ]
    for r in rows:
        what = r.tag if r.state == deploys.SUCCEEDED else (r.error or "")
        if r.promoted_from and r.state == deploys.SUCCEEDED:
            what = f"{what} (promoted from {r.promoted_from} #{r.promoted_from_id})"
        out.append(
            f"{r.id:>5}  {r.deployment:<14} {r.state:<12} {r.kind:<6} "
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
        "freeze": freeze_json(status.freeze),
    }


def status_lines(status: Status) -> list[str]:
    """What is deployed, what is under way, and what the cluster runs."""
    last, in_flight, cluster = status.deployed, status.in_flight, status.cluster
    out = [f"deployment {status.deployment}"]
    if status.freeze is not None:
        f = status.freeze
        until = f"until {when(f.until)} UTC" if f.until is not None else "until unfrozen"
        out.append(f"  frozen:   by {f.by} since {when(f.since)} UTC {until}: {f.reason}")
    if last is None:
        out.append("  deployed: nothing yet")
    else:
        what = f" (rollback to #{last.rollback_of})" if last.rollback_of else ""
        if last.promoted_from:
            what = f" (promoted from {last.promoted_from} #{last.promoted_from_id})"
        out.append(
            f"  deployed: deploy #{last.id}{what} of {(last.commit or '')[:12]} at "
            f"{when(last.finished_at)} UTC"
        )
        out.append(f"  image:    {last.image}:{last.tag}@{last.digest}")
        out.append(f"  kind:     {last.kind} deploy")
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
        for image, count in sorted(w["pods_running"].items()):
            differs = (
                f"  <- not deploy #{last.id}'s image" if last and runs_other(last, image) else ""
            )
            out.append(f"      running: {count} x {image}{differs}")
    return out


def runs_other(last: Deploy | None, image: str) -> bool:
    """Whether pods running `image` run another build of the deployment's image than
    its last successful deploy `last` pushed (`status` and the dashboard flag them)."""
    if last is None:
        return False
    return image.startswith(last.image or "") and not image.endswith(last.digest or "")


def cancel_asked_line(asked: CancelAsked) -> str:
    """What `cancel` says once the request is recorded (to stderr, before the deploy's lines)."""
    rec = asked.record
    if rec.final:  # it was queued: cancelled at once
        return f"deploy #{rec.id} of {rec.deployment} was queued: it leaves the queue"
    where = f"in {rec.step}" if rec.step else "starting"
    if asked.already:
        return (
            f"deploy #{rec.id} of {rec.deployment} ({where}): {rec.cancelled_by} asked for a "
            "cancel already; waiting for it to stop"
        )
    return f"deploy #{rec.id} of {rec.deployment} ({where}): cancel asked; waiting for it to stop"


def cancel_result(rec: Deploy) -> str:
    """The last line of `cancel`: how the deploy ended (`cancelled by <who> during <step>`)."""
    error = rec.error or ""
    if rec.state == deploys.CANCELLED and error.startswith("cancelled by "):
        return f"deploy #{rec.id} {error}"
    if rec.state == deploys.CANCELLED:
        return f"deploy #{rec.id} cancelled: {error}"
    return f"deploy #{rec.id} {rec.state} before the cancel took effect: {error or rec.image_ref}"


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
        "  git push -o override-freeze ...     (admin keys) deploy through a freeze",
        "",
        f"  ssh -p {port} git@HOST deploys [DEPLOYMENT]   history, newest first",
        f"  ssh -p {port} git@HOST status DEPLOYMENT      what is deployed and running",
        f"  ssh -p {port} git@HOST rollback DEPLOYMENT [DEPLOY_ID]   run an earlier image again",
        f"  ssh -p {port} git@HOST rollback DEPLOYMENT [DEPLOY_ID] --freeze [--reason TEXT]",
        "                                             ... and freeze it in the same step",
        f"  ssh -p {port} git@HOST promote SOURCE TARGET [DEPLOY_ID]   SOURCE's image to TARGET",
        f"  ssh -p {port} git@HOST freeze DEPLOYMENT [--until TIME] --reason TEXT",
        "                                             stop deploys (TIME: 2h, RFC 3339)",
        f"  ssh -p {port} git@HOST unfreeze DEPLOYMENT    deploys again",
        f"  ssh -p {port} git@HOST cancel DEPLOY_ID       stop a queued or running deploy",
        f"  ssh -p {port} git@HOST logs DEPLOY_ID         the log of one deploy",
        f"  ssh -p {port} git@HOST login                  a one-time link to the dashboard",
        f"  ssh -p {port} git@HOST help                   this text",
    ]
