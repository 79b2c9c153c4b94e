"""The Kubernetes rollout against the API simulator, held honest by the real kubectl."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.adapters.kubernetes import rules as rollout
from tests.support.kubesim import KubeSim
from tests.support.projects import make_project
from tests.support.testenv import Deployd, Infra

pytestmark = pytest.mark.integration

SCENARIO = "kubesim.deployd.dev/scenario"
EXECUTOR = "AIRFLOW__KUBERNETES_EXECUTOR__WORKER_CONTAINER_"


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[KubeSim]:
    s = KubeSim(tmp_path / "kubesim").start()
    yield s
    s.stop()


def kubectl(sim: KubeSim, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["kubectl", "--kubeconfig", str(sim.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def create(sim: KubeSim, tmp_path: Path, obj: dict[str, Any]) -> None:
    path = tmp_path / f"{obj['metadata']['name']}.json"
    path.write_text(json.dumps(obj))
    kubectl(sim, "create", "-f", str(path), "--validate=false")


def scheduler(
    image: str, *, replicas: int = 2, scenario: str = "instant", deadline: int = 600
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "airflow-scheduler",
            "namespace": "airflow",
            "annotations": {SCENARIO: scenario},
        },
        "spec": {
            "replicas": replicas,
            "progressDeadlineSeconds": deadline,
            "selector": {"matchLabels": {"component": "scheduler"}},
            "template": {
                "metadata": {"labels": {"component": "scheduler"}},
                "spec": {
                    "initContainers": [
                        {
                            "name": "wait-for-airflow-migrations",
                            "image": image,
                            "args": ["airflow", "db", "check-migrations"],
                        }
                    ],
                    "containers": [
                        {
                            "name": "scheduler",
                            "image": image,
                            "env": [
                                {
                                    "name": f"{EXECUTOR}REPOSITORY",
                                    "value": image.rsplit(":", 1)[0],
                                },
                                {
                                    "name": f"{EXECUTOR}TAG",
                                    "value": image.rsplit(":", 1)[1],
                                },
                            ],
                        },
                        {"name": "log-groomer", "image": "busybox:1.36"},
                    ],
                },
            },
        },
    }


def worker(image: str, *, replicas: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "airflow-worker", "namespace": "airflow"},
        "spec": {
            "replicas": replicas,
            "serviceName": "airflow-worker",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": {"component": "worker"}},
            "template": {
                "metadata": {"labels": {"component": "worker"}},
                "spec": {
                    "terminationGracePeriodSeconds": 600,
                    "containers": [{"name": "worker", "image": image}],
                },
            },
        },
    }


def wait_rolled(sim: KubeSim, *workloads: str) -> None:
    for w in workloads:
        kubectl(sim, "rollout", "status", w, "--timeout=60s")


def deployd_for(
    tmp_path: Path, testenv: Infra, sim: KubeSim, name: str, **extra: object
) -> tuple[Deployd, str]:
    from tests.support.testenv import write_config

    image = f"{testenv.registry}/airflow/kube-{name}"
    state = tmp_path / "state"
    dep = {
        "name": name,
        "image": image,
        "namespace": "airflow",
        "workloads": ["deployment/airflow-scheduler", "statefulset/airflow-worker"],
        "worker_workloads": ["statefulset/airflow-worker"],
        "worker_grace_seconds": 3600,
        "rollout_timeout_seconds": 30,
        **extra,
    }
    config = write_config(tmp_path / "deployd.toml", testenv, state, deployments=[dep])
    config.write_text(config.read_text() + f'\n[kubernetes]\nkubeconfig = "{sim.kubeconfig}"\n')
    return Deployd(config, state), image


def deploy(
    d: Deployd, project: Path, name: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = d.run("deploy", name, str(project), "--json", timeout=300)
    rows = json.loads(d.run("deploys", "--json").stdout)
    return proc, rows[0]


def pod_template(sim: KubeSim, workload: str) -> dict[str, Any]:
    obj = json.loads(kubectl(sim, "get", workload, "-o", "json").stdout)
    return dict(obj["spec"]["template"])


def test_a_deploy_rolls_every_workload(tmp_path: Path, testenv: Infra, sim: KubeSim) -> None:
    d, image = deployd_for(tmp_path, testenv, sim, "rolls")
    create(sim, tmp_path, scheduler(f"{image}:before"))
    create(sim, tmp_path, worker(f"{image}:before"))
    wait_rolled(sim, "deployment/airflow-scheduler", "statefulset/airflow-worker")
    project = make_project(tmp_path / "p", testenv.airflow_image)
    proc, rec = deploy(d, project, "rolls")
    assert proc.returncode == 0, proc.stderr
    assert rec["state"] == "succeeded"
    ref = f"{image}:{rec['tag']}@{rec['digest']}"
    sched = pod_template(sim, "deployment/airflow-scheduler")
    images = {c["name"]: c["image"] for c in sched["spec"]["containers"]}
    assert images == {"scheduler": ref, "log-groomer": "busybox:1.36"}  # the sidecar is left alone
    env = {e["name"]: e["value"] for e in sched["spec"]["containers"][0]["env"]}
    assert env["AIRFLOW__KUBERNETES_EXECUTOR__WORKER_CONTAINER_REPOSITORY"] == image
    assert (
        env["AIRFLOW__KUBERNETES_EXECUTOR__WORKER_CONTAINER_TAG"] == f"{rec['tag']}@{rec['digest']}"
    )
    assert sched["metadata"]["annotations"]["deployd.dev/deploy-id"] == str(rec["id"])
    assert sched["metadata"]["annotations"]["deployd.dev/commit"] == rec["commit"]
    work = pod_template(sim, "statefulset/airflow-worker")
    assert work["spec"]["containers"][0]["image"] == ref
    assert work["spec"]["terminationGracePeriodSeconds"] == 3600
    # kubectl agrees the rollout is complete, and the pods run the new image.
    wait_rolled(sim, "deployment/airflow-scheduler", "statefulset/airflow-worker")
    pods = json.loads(kubectl(sim, "get", "pods", "-o", "json").stdout)["items"]
    running = {
        c["image"]
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        for c in p["status"].get("containerStatuses", [])
        if c["name"] != "log-groomer"
    }
    assert running == {ref}
    assert "statefulset/airflow-worker: " in proc.stderr  # progress went to the log
    steps = {s["name"]: s["state"] for s in rec["steps"]}
    assert steps["preflight"] == steps["roll"] == "succeeded"


def test_a_failed_rollout_is_rolled_back(tmp_path: Path, testenv: Infra, sim: KubeSim) -> None:
    d, image = deployd_for(tmp_path, testenv, sim, "rollback")
    create(sim, tmp_path, scheduler(f"{image}:before", scenario="never-ready", deadline=3))
    create(sim, tmp_path, worker(f"{image}:before"))
    wait_rolled(sim, "deployment/airflow-scheduler", "statefulset/airflow-worker")
    before = pod_template(sim, "deployment/airflow-scheduler")
    project = make_project(tmp_path / "p", testenv.airflow_image)
    proc, rec = deploy(d, project, "rollback")
    assert proc.returncode == 3, proc.stderr
    assert rec["state"] == "rolled_back" and rec["step"] == "roll"
    assert (
        'deployment/airflow-scheduler: deployment "airflow-scheduler" exceeded its '
        "progress deadline" in rec["error"]
    )
    # Every workload it patched runs what it ran before, and kubectl says it is rolled out.
    after = pod_template(sim, "deployment/airflow-scheduler")
    assert after["spec"]["containers"] == before["spec"]["containers"]
    assert after["metadata"].get("annotations") == before["metadata"].get("annotations")
    assert (
        pod_template(sim, "statefulset/airflow-worker")["spec"]["containers"][0]["image"]
        == f"{image}:before"
    )
    wait_rolled(sim, "deployment/airflow-scheduler", "statefulset/airflow-worker")
    history = kubectl(sim, "rollout", "history", "deployment/airflow-scheduler").stdout
    assert [ln.split()[0] for ln in history.splitlines()[2:] if ln.strip()] == ["2", "3"]


def test_preflight_names_what_is_missing_before_building(
    tmp_path: Path, testenv: Infra, sim: KubeSim
) -> None:
    d, image = deployd_for(tmp_path, testenv, sim, "preflight")
    create(sim, tmp_path, scheduler("quay.io/other/airflow:2.10"))
    project = make_project(tmp_path / "p", testenv.airflow_image)
    proc, rec = deploy(d, project, "preflight")
    assert proc.returncode == 4
    assert rec["state"] == "failed" and rec["step"] == "preflight"
    assert (
        f"deployment/airflow-scheduler in namespace airflow has no container running {image}"
        in rec["error"]
        and "scheduler=quay.io/other/airflow:2.10" in rec["error"]
    )
    assert {s["name"]: s["state"] for s in rec["steps"]}["build"] == "pending"
    create(sim, tmp_path, worker(f"{image}:x"))
    d2, _ = deployd_for(tmp_path, testenv, sim, "preflight", containers=["scheduler", "worker"])
    proc, rec = deploy(d2, project, "preflight")
    assert proc.returncode == 0, proc.stderr  # named containers: the foreign image is replaced


def test_read_only_credentials_are_refused_naming_the_verb(tmp_path: Path, testenv: Infra) -> None:
    sim = KubeSim(
        tmp_path / "kubesim", tls=True, token="admin-t0ken", read_token="read-t0ken"
    ).start()
    try:
        d, image = deployd_for(tmp_path, testenv, sim, "rbac")
        create(sim, tmp_path, scheduler(f"{image}:before"))
        create(sim, tmp_path, worker(f"{image}:before"))
        sim.write_kubeconfig(sim.kubeconfig, "read-t0ken")
        assert (
            kubectl(sim, "auth", "can-i", "patch", "deployments", check=False).stdout.strip()
            == "no"
        )
        proc, rec = deploy(d, make_project(tmp_path / "p", testenv.airflow_image), "rbac")
        assert proc.returncode == 4
        assert (
            "may not patch deployments.apps, patch statefulsets.apps, create jobs.batch, "
            "delete jobs.batch, delete pods in namespace airflow; grant them (RBAC)" in rec["error"]
        )
    finally:
        sim.stop()


@pytest.mark.parametrize("scenario", ["instant", "slow", "never-ready", "image-pull-error"])
def test_deployds_verdict_is_kubectls(tmp_path: Path, sim: KubeSim, scenario: str) -> None:
    """On the same object, deployd's rules and `kubectl rollout status` say the same thing."""
    create(sim, tmp_path, scheduler("r.example/a/s:1", replicas=3, scenario=scenario, deadline=2))
    create(sim, tmp_path, worker("r.example/a/s:1", replicas=3))
    time.sleep(0.2)
    kubectl(sim, "set", "image", "deployment/airflow-scheduler", "scheduler=r.example/a/s:2")
    kubectl(sim, "set", "image", "statefulset/airflow-worker", "worker=r.example/a/s:2")
    seen = set()
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        for kind, workload in (
            ("deployment", "deployment/airflow-scheduler"),
            ("statefulset", "statefulset/airflow-worker"),
        ):
            obj = json.loads(kubectl(sim, "get", workload, "-o", "json").stdout)
            theirs = kubectl(sim, "rollout", "status", workload, "--watch=false", check=False)
            # The object kubectl judged is at least as new; judge the same one again.
            again = json.loads(kubectl(sim, "get", workload, "-o", "json").stdout)
            if again["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
                continue
            ours = rollout.verdict(kind, obj)
            said = (theirs.stdout + theirs.stderr).strip()
            assert (theirs.returncode != 0) == ours.failed, (said, ours)
            assert ours.message in said, (said, ours)
            seen.add((kind, ours.done, ours.failed))
        time.sleep(0.1)
    if scenario in ("instant", "slow"):
        assert ("deployment", True, False) in seen
    else:
        assert ("deployment", False, True) in seen  # exceeded its progress deadline


def test_status_and_rollback(tmp_path: Path, testenv: Infra, sim: KubeSim) -> None:
    d, image = deployd_for(tmp_path, testenv, sim, "back")
    create(sim, tmp_path, scheduler(f"{image}:before"))
    create(sim, tmp_path, worker(f"{image}:before"))
    nothing = d.run("rollback", "back")
    assert nothing.returncode == 2 and "no earlier successful deploy" in nothing.stderr
    project = make_project(
        tmp_path / "p", testenv.airflow_image, dockerfile=f"FROM {testenv.airflow2_image}\n"
    )
    first = deploy(d, project, "back")[1]
    (project / "Dockerfile").write_text(f"FROM {testenv.airflow_image}\n")
    from tests.support.projects import commit_all

    commit_all(project, "Airflow 3")
    second = deploy(d, project, "back")[1]
    assert (first["state"], second["state"]) == ("succeeded", "succeeded")
    status = d.run("status", "back")
    assert status.returncode == 0, status.stderr
    ref2 = f"{image}:{second['tag']}@{second['digest']}"
    assert (
        f"deployment/airflow-scheduler: deploy #{second['id']}; deployment "
        '"airflow-scheduler" successfully rolled out' in status.stdout
    )
    assert f"running: 2 x {image}@{second['digest']}" in status.stdout, status.stdout  # imageID
    # Back to Airflow 2.10 from 3.3: the database was migrated, so only with --force.
    refused = d.run("rollback", "back")
    assert (
        refused.returncode == 2
        and "runs Airflow 2.10.5, the deployment runs 3.3.2" in refused.stderr
    )
    back = d.run("rollback", "back", "--force", "--json")
    assert back.returncode == 0, back.stderr
    rec = json.loads(back.stdout)
    assert rec["rollback_of"] == first["id"] and rec["digest"] == first["digest"]
    assert {s["name"]: s["state"] for s in rec["steps"]}["build"] == "skipped"
    assert (
        pod_template(sim, "deployment/airflow-scheduler")["spec"]["containers"][0]["image"]
        == f"{image}:{first['tag']}@{first['digest']}"
    )
    assert f"deploy #{rec['id']} (rollback to #{first['id']})" in d.run("status", "back").stdout
    # Forward again to a chosen deploy: a newer Airflow needs no --force.
    again = d.run("rollback", "back", str(second["id"]))
    assert again.returncode == 0, again.stderr
    assert (
        pod_template(sim, "deployment/airflow-scheduler")["spec"]["containers"][0]["image"] == ref2
    )
    bad = d.run("rollback", "back", "999")
    assert bad.returncode == 2 and "there is no deploy #999 of back" in bad.stderr


def test_an_airflow_upgrade_migrates_the_database_first(
    tmp_path: Path, testenv: Infra, sim: KubeSim
) -> None:
    d, image = deployd_for(tmp_path, testenv, sim, "upgrade")
    create(sim, tmp_path, scheduler(f"{image}:before"))
    create(sim, tmp_path, worker(f"{image}:before"))
    project = make_project(
        tmp_path / "p", testenv.airflow_image, dockerfile=f"FROM {testenv.airflow2_image}\n"
    )

    def jobs() -> list[dict[str, Any]]:
        return list(json.loads(kubectl(sim, "get", "jobs", "-o", "json").stdout)["items"])

    first = deploy(d, project, "upgrade")[1]
    assert first["state"] == "succeeded", first["error"]
    [job] = jobs()  # the first deploy: the running version is unknown, so it migrates
    pod = job["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["scheduler"]  # no sidecar
    assert pod["containers"][0]["command"] == ["airflow", "db", "migrate"]
    assert pod["containers"][0]["image"] == f"{image}:{first['tag']}@{first['digest']}"
    assert "initContainers" not in pod and pod["restartPolicy"] == "Never"
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert f"{EXECUTOR}REPOSITORY" in env  # the scheduler's settings come along
    from tests.support.projects import commit_all

    (project / "README.md").write_text("same Airflow\n")
    commit_all(project, "No upgrade")
    assert deploy(d, project, "upgrade")[1]["state"] == "succeeded"
    assert len(jobs()) == 1  # same version: no migration
    # An upgrade whose migration fails changes no workload.
    kubectl(
        sim,
        "patch",
        "deployment/airflow-scheduler",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"template": {"metadata": {"annotations": {SCENARIO: "fail"}}}}}),
    )
    wait_rolled(sim, "deployment/airflow-scheduler")
    before = pod_template(sim, "deployment/airflow-scheduler")
    (project / "Dockerfile").write_text(f"FROM {testenv.airflow_image}\n")
    commit_all(project, "Airflow 3")
    proc, rec = deploy(d, project, "upgrade")
    assert proc.returncode == 1 and rec["state"] == "failed" and rec["step"] == "roll"
    assert (
        "the database migration failed, so nothing was rolled: job/upgrade-migrate-3 "
        "failed: Job has reached the specified backoff limit" in rec["error"]
    )
    assert "Airflow 2.10.5 -> 3.3.2: airflow db migrate first" in proc.stderr
    assert pod_template(sim, "deployment/airflow-scheduler") == before


def test_draining_worker_pods_are_reported_not_waited_for(
    tmp_path: Path, testenv: Infra, sim: KubeSim
) -> None:
    d, image = deployd_for(
        tmp_path,
        testenv,
        sim,
        "drain",
        workloads=["deployment/airflow-worker"],
        worker_workloads=["deployment/airflow-worker"],
    )
    celery = scheduler(f"{image}:before")
    celery["metadata"]["name"] = "airflow-worker"
    celery["metadata"]["annotations"]["kubesim.deployd.dev/drain-seconds"] = "60"
    create(sim, tmp_path, celery)
    wait_rolled(sim, "deployment/airflow-worker")
    started = time.monotonic()
    proc, rec = deploy(d, make_project(tmp_path / "p", testenv.airflow_image), "drain")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 50  # the 60 s drain was not waited for
    assert (
        "deployment/airflow-worker: 2 old pods still draining (up to 3600 s to finish their "
        "tasks); not waited for" in proc.stderr
    )
    roll = next(s for s in rec["steps"] if s["name"] == "roll")
    assert roll["summary"].endswith("; 2 old worker pods draining")
    assert (
        pod_template(sim, "deployment/airflow-worker")["spec"]["terminationGracePeriodSeconds"]
        == 3600
    )


def test_status_and_rollback_over_ssh(tmp_path: Path, testenv: Infra, sim: KubeSim) -> None:
    from tests.support.sshserver import make_server

    srv = make_server(
        tmp_path / "srv",
        testenv,
        extra={
            "namespace": "airflow",
            "workloads": ["deployment/airflow-scheduler"],
            "rollout_timeout_seconds": 30,
        },
    )
    srv.config.write_text(
        srv.config.read_text() + f'\n[kubernetes]\nkubeconfig = "{sim.kubeconfig}"\n'
    )
    image = next(
        ln.split('"')[1]
        for ln in srv.config.read_text().splitlines()
        if ln.startswith("image = ") and "ssh-prod" in ln
    )
    create(sim, tmp_path, scheduler(f"{image}:before"))
    d = Deployd(srv.config, srv.state_dir)
    project = make_project(tmp_path / "p", testenv.airflow_image)
    first = deploy(d, project, "prod")[1]
    from tests.support.projects import commit_all

    (project / "README.md").write_text("v2\n")
    commit_all(project, "v2")
    second = deploy(d, project, "prod")[1]
    srv.start()
    try:
        status = srv.ssh("status", "prod")
        assert status.returncode == 0, status.stderr
        assert f"deployment/airflow-scheduler: deploy #{second['id']};" in status.stdout
        assert srv.ssh("rollback", "prod", key="bob").returncode == 1  # not bob's deployment
        back = srv.ssh("rollback", "prod", timeout=120)
        assert back.returncode == 0, back.stderr
        assert "-----> roll" in back.stderr and "succeeded" in back.stdout
        template = pod_template(sim, "deployment/airflow-scheduler")
        assert (
            template["spec"]["containers"][0]["image"]
            == f"{image}:{first['tag']}@{first['digest']}"
        )
        assert f"(rollback to #{first['id']})" in srv.ssh("status", "prod").stdout
    finally:
        srv.stop()


def test_status_tells_a_hand_edit_and_helm_apart(
    tmp_path: Path, testenv: Infra, sim: KubeSim
) -> None:
    d, image = deployd_for(
        tmp_path,
        testenv,
        sim,
        "truth",
        workloads=["deployment/airflow-scheduler"],
        worker_workloads=[],
    )
    create(sim, tmp_path, scheduler(f"{image}:before"))
    rec = deploy(d, make_project(tmp_path / "p", testenv.airflow_image), "truth")[1]
    assert rec["state"] == "succeeded"
    clean = d.run("status", "truth", "--json")
    assert clean.returncode == 0, clean.stderr
    [w] = json.loads(clean.stdout)["cluster"]
    assert w["managed_by"] == []
    assert w["pods_running"][f"{image}@{rec['digest']}"] == 2
    assert "not deploy #" not in d.run("status", "truth").stdout
    # Someone ran kubectl set image by hand, and Helm owns the Deployment.
    kubectl(sim, "set", "image", "deployment/airflow-scheduler", f"scheduler={image}:hand-made")
    kubectl(sim, "label", "deployment/airflow-scheduler", "app.kubernetes.io/managed-by=Helm")
    wait_rolled(sim, "deployment/airflow-scheduler")
    out = d.run("status", "truth").stdout
    assert "warning: managed by Helm; its next sync will undo deployd's patch" in out
    assert f"  <- not deploy #{rec['id']}'s image" in out
    assert f"scheduler: {image}:hand-made" in out


def test_a_deploy_killed_mid_roll_is_reconciled_with_the_cluster(
    tmp_path: Path, testenv: Infra, sim: KubeSim
) -> None:
    import signal

    d, image = deployd_for(
        tmp_path,
        testenv,
        sim,
        "killed",
        workloads=["deployment/airflow-scheduler"],
        worker_workloads=[],
    )
    create(sim, tmp_path, scheduler(f"{image}:before", replicas=4, scenario="slow"))
    wait_rolled(sim, "deployment/airflow-scheduler")
    project = make_project(tmp_path / "p", testenv.airflow_image)
    proc = d.start("deploy", "killed", str(project))
    deadline = time.monotonic() + 120
    while True:
        rows = json.loads(d.run("deploys", "--json").stdout)
        if rows and rows[0]["step"] == "roll":
            break
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(0.5)  # patched, rolling slowly
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from tests.support.projects import commit_all

    (project / "README.md").write_text("again\n")
    commit_all(project, "Again")
    again, rec = deploy(d, project, "killed")
    assert again.returncode == 0, again.stderr
    killed = d.record(rec["id"] - 1)
    assert killed["state"] == "interrupted" and killed["step"] == "roll"
    # It keeps nothing: what it had patched was put back before the next deploy ran.
    assert (
        "At recovery: deployment/airflow-scheduler rolled back to what ran before; "
        "the cluster shows deployment/airflow-scheduler: not deployed by deployd"
        in str(killed["error"])
    )


def test_statefulsets_stuck_or_draining(tmp_path: Path, testenv: Infra, sim: KubeSim) -> None:
    """A crash-looping StatefulSet is rolled back (its stuck pod replaced); a worker
    StatefulSet whose pods drain for a long time is not waited for."""
    d, image = deployd_for(
        tmp_path,
        testenv,
        sim,
        "sts",
        workloads=["statefulset/airflow-triggerer", "statefulset/airflow-worker"],
        rollout_timeout_seconds=6,
    )
    triggerer = worker(f"{image}:before", replicas=2)
    triggerer["metadata"] = {
        "name": "airflow-triggerer",
        "namespace": "airflow",
        "annotations": {SCENARIO: "never-ready"},
    }
    triggerer["spec"]["selector"]["matchLabels"] = {"component": "triggerer"}
    triggerer["spec"]["template"]["metadata"]["labels"] = {"component": "triggerer"}
    create(sim, tmp_path, triggerer)
    draining = worker(f"{image}:before", replicas=2)
    draining["metadata"]["annotations"] = {"kubesim.deployd.dev/drain-seconds": "60"}
    create(sim, tmp_path, draining)
    wait_rolled(sim, "statefulset/airflow-triggerer", "statefulset/airflow-worker")
    proc, rec = deploy(d, make_project(tmp_path / "p", testenv.airflow_image), "sts")
    assert proc.returncode == 3, proc.stderr
    assert "statefulset/airflow-triggerer not ready after 6 s" in rec["error"]
    # The worker did not hold the deploy up: it took the template, its pods drain.
    assert "statefulset/airflow-worker: new template taken" in proc.stderr
    # The triggerer's crash-looping pod was replaced from the restored template.
    wait_rolled(sim, "statefulset/airflow-triggerer")
    pods = json.loads(
        kubectl(sim, "get", "pods", "-l", "component=triggerer", "-o", "json").stdout
    )["items"]
    assert {c["image"] for p in pods for c in p["status"]["containerStatuses"]} == {
        f"{image}:before"
    }


def test_api_faults_are_retried_and_refusals_are_clear(
    tmp_path: Path, testenv: Infra, sim: KubeSim
) -> None:
    from tests.support.kubesim import Fault

    d, image = deployd_for(
        tmp_path,
        testenv,
        sim,
        "faults",
        workloads=["deployment/airflow-scheduler"],
        worker_workloads=[],
    )
    create(sim, tmp_path, scheduler(f"{image}:before"))
    wait_rolled(sim, "deployment/airflow-scheduler")
    target = "/deployments/airflow-scheduler"
    sim.call(
        sim.sim.faults.extend,
        [
            Fault(status=500, count=1, path=target, method="GET"),  # a read fails once
            Fault(status=409, count=1, path=target, method="PATCH"),  # the patch conflicts
            Fault(status=503, count=1, path=target, method="PATCH"),  # then the server is busy
            Fault(status=0, drop_watch_after=1, count=2, path="/deployments"),  # watches drop
        ],
    )
    before = len(sim.sim.requests)
    proc, rec = deploy(d, make_project(tmp_path / "p", testenv.airflow_image), "faults")
    assert proc.returncode == 0, proc.stderr
    assert rec["state"] == "succeeded"
    patches = [p for m, p in sim.sim.requests[before:] if m == "PATCH" and target in p]
    assert len(patches) == 3  # 409, 503, then accepted
    assert sim.sim.faults == []
    # 401: a token the cluster does not know fails at once, naming the refusal.
    tls = KubeSim(tmp_path / "tls", tls=True, token="good").start()
    try:
        tls.write_kubeconfig(tls.kubeconfig, "stale-token")
        (tmp_path / "second").mkdir()
        d2, _ = deployd_for(
            tmp_path / "second",
            testenv,
            tls,
            "faults",
            workloads=["deployment/airflow-scheduler"],
            worker_workloads=[],
        )
        proc, rec = deploy(d2, make_project(tmp_path / "p2", testenv.airflow_image), "faults")
        assert proc.returncode == 4 and rec["step"] == "preflight"
        assert "Kubernetes refused checking permissions: Unauthorized" in rec["error"]
    finally:
        tls.stop()
