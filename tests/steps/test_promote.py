"""Promotions and freezes through the real `deployd` command: real git, Docker Engine, registry
(htpasswd auth) and the Kubernetes API simulator, held honest by kubectl.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.steps.test_roll import create, kubectl, pod_template, scheduler, sim, worker
from tests.support.kubesim import KubeSim
from tests.support.projects import commit_all, git, make_project
from tests.support.testenv import Deployd, Infra, write_config

pytestmark = pytest.mark.integration
__all__ = ["sim"]  # the simulator fixture, from tests/steps/test_roll.py


def two_deployments(
    tmp_path: Path, testenv: Infra, sim: KubeSim, **prod: object
) -> tuple[Deployd, str, str]:
    """staging (no workloads) and prod (scheduler + workers on the simulator), each its repo."""
    suffix = uuid.uuid4().hex[:8]
    staging_image = f"{testenv.registry}/airflow/promo-staging-{suffix}"
    prod_image = f"{testenv.registry}/airflow/promo-prod-{suffix}"
    config = write_config(
        tmp_path / "deployd.toml",
        testenv,
        tmp_path / "state",
        deployments=[
            {"name": "staging", "image": staging_image},
            {
                "name": "prod",
                "image": prod_image,
                "tag_template": "prod-{sha7}-{id}",
                "namespace": "airflow",
                "workloads": ["deployment/airflow-scheduler", "statefulset/airflow-worker"],
                "worker_workloads": ["statefulset/airflow-worker"],
                "rollout_timeout_seconds": 60,
                **prod,
            },
        ],
    )
    config.write_text(config.read_text() + f'\n[kubernetes]\nkubeconfig = "{sim.kubeconfig}"\n')
    create(sim, tmp_path, scheduler(f"{prod_image}:before"))
    create(sim, tmp_path, worker(f"{prod_image}:before"))
    return Deployd(config, tmp_path / "state"), staging_image, prod_image


def as_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def local_images(docker_api: Any, *repos: str) -> list[tuple[str, tuple[str, ...]]]:
    """The Engine's images tagged in `repos` (the Engine is shared with other tests)."""
    return sorted(
        (i["Id"], tuple(sorted(i.get("RepoTags") or [])))
        for i in docker_api.images()
        if any(t.rsplit(":", 1)[0] in repos for t in i.get("RepoTags") or [])
    )


def about(event: dict[str, Any], image_id: str, *repos: str) -> bool:
    """Whether an Engine event concerns this image or these repositories."""
    names = [str(event.get("id", "")), str(event.get("Actor", {}).get("Attributes", {}))]
    return image_id in names or any(r in n for r in repos for n in names)


def test_a_promotion_across_repositories_copies_in_the_registry_and_rolls_out(
    tmp_path: Path, testenv: Infra, sim: KubeSim, docker_api: Any
) -> None:
    d, staging_image, prod_image = two_deployments(tmp_path, testenv, sim, promote_from="staging")
    project = make_project(tmp_path / "p", testenv.airflow_image)
    refused = d.run("deploy", "prod", str(project))
    assert (refused.returncode, refused.stderr) == (
        2,
        "deployd: prod takes promotions from staging: deployd promote staging prod\n",
    )
    nothing = d.run("promote", "staging", "prod")
    assert (nothing.returncode, nothing.stderr) == (
        2,
        "deployd: staging has no successful deploy to promote.\n",
    )
    built_ns = time.time_ns()
    source = as_json(d.run("deploy", "staging", str(project), "--json"))
    digest = source["digest"]
    image_id = docker_api.inspect_image(f"{staging_image}:{source['tag']}")["Id"]
    before = local_images(docker_api, staging_image, prod_image)
    assert before  # the staging build's image is there, tagged
    start_ns = time.time_ns()
    t0 = time.monotonic()
    proc = d.run("promote", "staging", "prod", "--json", timeout=300)
    took = time.monotonic() - t0
    rec = as_json(proc)
    until = int(time.time()) + 1
    assert (rec["state"], rec["action"], rec["trigger"]) == ("succeeded", "promotion", "cli")
    assert rec["promoted_from"] == {"deployment": "staging", "deploy_id": source["id"]}
    assert (rec["image"], rec["digest"], rec["commit"]) == (prod_image, digest, source["commit"])
    assert rec["tag"] == f"prod-{source['commit'][:7]}-{rec['id']}"
    steps = {s["name"]: s["state"] for s in rec["steps"]}
    assert steps == {
        "preflight": "succeeded",
        "checkout": "skipped",
        "build": "skipped",
        "parse": "skipped",
        "pytest": "skipped",
        "push": "succeeded",
        "roll": "succeeded",
    }
    # The same manifest, so the same digest, in both repositories of the registry.
    assert testenv.manifest_digest(staging_image, source["tag"]) == digest
    assert testenv.manifest_digest(prod_image, rec["tag"]) == digest
    assert "Mounted from airflow/promo-staging-" in proc.stderr
    # Nothing went through the build host's Engine: no pull, push or tag, no new image.
    events = [
        e
        for e in docker_api.events(
            since=built_ns // 10**9, until=until, filters={"type": "image"}, decode=True
        )
        if e["timeNano"] >= built_ns and about(e, image_id, staging_image, prod_image)
    ]
    # (The filter sees the staging deploy's own build and push...)
    assert {"tag", "push"} <= {e["Action"] for e in events if e["timeNano"] < start_ns}
    # ... and nothing of the promotion.
    assert [e for e in events if e["timeNano"] >= start_ns] == []
    assert local_images(docker_api, staging_image, prod_image) == before
    # prod's workloads run the promoted image by digest, rolled out by kubectl's rules.
    ref = f"{prod_image}:{rec['tag']}@{digest}"
    assert (
        pod_template(sim, "deployment/airflow-scheduler")["spec"]["containers"][0]["image"] == ref
    )
    assert pod_template(sim, "statefulset/airflow-worker")["spec"]["containers"][0]["image"] == ref
    kubectl(sim, "rollout", "status", "deployment/airflow-scheduler", "--timeout=30s")
    # history, status and the server branch show where it came from.
    listing = d.run("deploys", "prod")
    assert f"{rec['tag']} (promoted from staging #{source['id']})" in listing.stdout
    status = d.run("status", "prod")
    assert status.returncode == 0, status.stderr
    assert f"deployed: deploy #{rec['id']} (promoted from staging #{source['id']}) of" in (
        status.stdout
    )
    server = d.state_dir / "repos" / "prod.git"
    assert git(server, "rev-parse", "refs/heads/main") == source["commit"]
    assert took < 60, took
    # A chosen deploy of the source, by id; and a deploy of another deployment is refused.
    (project / "README.md").write_text("v2\n")
    commit_all(project, "v2")
    newer = as_json(d.run("deploy", "staging", str(project), "--json"))
    back = as_json(d.run("promote", "staging", "prod", str(source["id"]), "--json"))
    assert (back["digest"], back["promoted_from"]["deploy_id"]) == (digest, source["id"])
    assert newer["digest"] != digest
    wrong = d.run("promote", "staging", "prod", str(rec["id"]))
    assert (wrong.returncode, wrong.stderr) == (
        2,
        f"deployd: there is no deploy #{rec['id']} of staging.\n",
    )


def test_freeze_unfreeze_and_rollback_freeze_from_the_cli(
    tmp_path: Path, testenv: Infra, sim: KubeSim
) -> None:
    d, _, image = two_deployments(tmp_path, testenv, sim)
    project = make_project(tmp_path / "p", testenv.airflow_image)
    first = as_json(d.run("deploy", "prod", str(project), "--json"))
    (project / "README.md").write_text("v2\n")
    commit_all(project, "v2")
    second = as_json(d.run("deploy", "prod", str(project), "--json"))
    made = d.run("freeze", "prod", "--reason", "release freeze", "--until", "1h")
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("prod is frozen by ") and made.stdout.endswith(
        " UTC: release freeze\n"
    )
    shown = as_json(d.run("freeze", "staging", "--reason", "for json", "--json"))
    assert shown["deployment"] == "staging" and shown["freeze"]["reason"] == "for json"
    assert shown["freeze"]["until"] is None
    assert d.run("unfreeze", "staging").returncode == 0
    # Frozen: deploys, promotions and a second freeze are refused (exit 2), rollbacks run.
    (project / "README.md").write_text("v3\n")
    commit_all(project, "v3")
    refused = d.run("deploy", "prod", str(project))
    assert refused.returncode == 2
    assert refused.stderr.startswith("deployd: prod is frozen by ")
    assert refused.stderr.endswith(": release freeze. Nothing was deployed.\n")
    again = d.run("freeze", "prod", "--reason", "other")
    assert again.returncode == 2 and "unfreeze first: deployd unfreeze prod" in again.stderr
    status = d.run("status", "prod")
    assert "  frozen:   by " in status.stdout and "release freeze" in status.stdout
    freeze = as_json(d.run("status", "prod", "--json"))["freeze"]
    assert freeze["reason"] == "release freeze" and freeze["until"] - freeze["since"] == (
        pytest.approx(3600, abs=2)
    )
    listing = d.run("deploys", "prod").stdout.splitlines()
    assert listing[0].startswith("prod is frozen by ") and listing[1].split()[:2] == [
        "ID",
        "DEPLOYMENT",
    ]
    back = d.run("rollback", "prod", "--json", timeout=300)
    assert as_json(back)["rollback_of"] == first["id"]
    ended = d.run("unfreeze", "prod")
    assert ended.returncode == 0 and ended.stdout.startswith("prod unfrozen (frozen by ")
    gone = d.run("unfreeze", "prod")
    assert (gone.returncode, gone.stderr) == (2, "deployd: prod is not frozen.\n")
    # rollback --freeze: frozen before the rollback runs, until someone unfreezes.
    alone = d.run("rollback", "prod", "--reason", "x")
    assert (alone.returncode, alone.stderr) == (2, "deployd: --reason goes with --freeze.\n")
    frozen_back = d.run(
        "rollback", "prod", str(second["id"]), "--freeze", "--reason", "bad release", "--json"
    )
    assert as_json(frozen_back)["rollback_of"] == second["id"]
    assert "deployd: froze prod is frozen by " in frozen_back.stderr
    held = as_json(d.run("status", "prod", "--json"))["freeze"]
    assert (held["reason"], held["until"]) == ("bad release", None)
    template = pod_template(sim, "deployment/airflow-scheduler")
    assert template["spec"]["containers"][0]["image"] == (
        f"{image}:{second['tag']}@{second['digest']}"
    )
    for bad, message in (
        (["--until", "2020-01-01T00:00:00Z"], "is in the past"),
        (["--until", "someday"], "neither an RFC 3339 time"),
    ):
        d.run("unfreeze", "prod")
        proc = d.run("freeze", "prod", "--reason", "x", *bad)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
