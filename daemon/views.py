"""Text views of the records, shared by the CLI and the SSH commands."""

from __future__ import annotations

import datetime as dt
from typing import Any

from daemon.core import deploys


def when(ts: float | None) -> str:
    """A record timestamp as UTC text."""
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def deploy_table(rows: list[dict[str, Any]]) -> list[str]:
    """The `deploys` listing, newest first."""
    if not rows:
        return ["no deploys yet"]
    out = [
        f"{'ID':>5}  {'DEPLOYMENT':<14} {'STATE':<12} {'COMMIT':<8} {'WHEN (UTC)':<19} "
        f"{'TRIGGER':<8} {'ACTOR':<12} TAG / ERROR"
    ]
    for r in rows:
        what = r["tag"] if r["state"] == deploys.SUCCEEDED else (r["error"] or "")
        out.append(
            f"{r['id']:>5}  {r['deployment']:<14} {r['state']:<12} "
            f"{(r['commit'] or '')[:7]:<8} {when(r['created_at']):<19} {r['trigger']:<8} "
            f"{(r['actor'] or '')[:12]:<12} {what}"
        )
    return out


def status_lines(
    deployment: str,
    last: dict[str, Any] | None,
    in_flight: list[dict[str, Any]],
    cluster: list[dict[str, Any]] | str | None = None,
) -> list[str]:
    """What is deployed, what is under way, and (if read) what the cluster runs."""
    out = [f"deployment {deployment}"]
    if last is None:
        out.append("  deployed: nothing yet")
    else:
        what = f" (rollback to #{last['rollback_of']})" if last.get("rollback_of") else ""
        out.append(
            f"  deployed: deploy #{last['id']}{what} of {(last['commit'] or '')[:12]} at "
            f"{when(last['finished_at'])} UTC"
        )
        out.append(f"  image:    {last['image']}:{last['tag']}@{last['digest']}")
    for rec in in_flight:
        out.append(
            f"  {rec['state']}: deploy #{rec['id']} of {(rec['commit'] or '')[:12]} "
            f"by {rec['actor']}"
        )
    if cluster is None:
        out.append("  cluster:  not read over SSH (use `deployd status` on the build host)")
    elif isinstance(cluster, str):
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
        digest = (last or {}).get("digest") or ""
        repo = (last or {}).get("image") or ""
        for image, count in sorted(w["pods_running"].items()):
            differs = (
                f"  <- not deploy #{last['id']}'s image"
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
