"""The API simulator answers like kube-apiserver: checked over HTTP and with the real kubectl."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.steps.test_roll import create, kubectl, scheduler, worker
from tests.support.kubesim import Fault, KubeSim
from tests.support.kubesim.patch import json_patch, merge_patch, strategic_merge


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[KubeSim]:
    s = KubeSim(tmp_path / "kubesim").start()
    yield s
    s.stop()


def call(
    sim: KubeSim, method: str, path: str, body: Any = None, ctype: str = "application/json"
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": ctype})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw.strip() else None
    finally:
        conn.close()


DEPLOYS = "/apis/apps/v1/namespaces/airflow/deployments"


def test_strategic_merge_patch_merges_containers_by_name() -> None:
    current = {
        "spec": {
            "containers": [
                {"name": "a", "image": "x:1", "env": [{"name": "K", "value": "1"}]},
                {"name": "b", "image": "y:1"},
            ]
        }
    }
    out = strategic_merge(
        current,
        {
            "spec": {
                "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
                "containers": [{"name": "a", "image": "x:2", "env": [{"name": "L", "value": "2"}]}],
            }
        },
    )
    assert [c["name"] for c in out["spec"]["containers"]] == ["b", "a"]
    a = out["spec"]["containers"][1]
    assert a["image"] == "x:2" and [e["name"] for e in a["env"]] == ["K", "L"]
    gone = strategic_merge(out, {"spec": {"containers": [{"name": "b", "$patch": "delete"}]}})
    assert [c["name"] for c in gone["spec"]["containers"]] == ["a"]
    replaced = strategic_merge(current, {"spec": {"$patch": "replace", "x": 1}})
    assert replaced == {"spec": {"x": 1}}
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None}}) == {"a": {"c": 2}}
    assert json_patch(
        {"a": [1, 2]},
        [{"op": "add", "path": "/a/-", "value": 3}, {"op": "replace", "path": "/a/0", "value": 0}],
    ) == {"a": [0, 2, 3]}


def test_api_errors_are_status_objects(sim: KubeSim, tmp_path: Path) -> None:
    status, body = call(sim, "GET", f"{DEPLOYS}/nope")
    assert status == 404 and body["kind"] == "Status" and body["reason"] == "NotFound"
    assert body["message"] == 'deployments.apps "nope" not found'
    create(sim, tmp_path, scheduler("r/a:1"))
    status, body = call(sim, "POST", DEPLOYS, scheduler("r/a:1"))
    assert status == 409 and body["reason"] == "AlreadyExists"
    current = call(sim, "GET", f"{DEPLOYS}/airflow-scheduler")[1]
    stale = dict(current, metadata={**current["metadata"], "resourceVersion": "1"})
    status, body = call(sim, "PUT", f"{DEPLOYS}/airflow-scheduler", stale)
    assert status == 409 and body["reason"] == "Conflict"
    status, body = call(
        sim,
        "PATCH",
        f"{DEPLOYS}/airflow-scheduler",
        {"spec": {}},
        ctype="application/apply-patch+yaml",
    )
    assert status == 415 and body["reason"] == "UnsupportedMediaType"
    status, body = call(
        sim,
        "PATCH",
        f"{DEPLOYS}/airflow-scheduler",
        {"spec": {"template": {"spec": {"containers": [{"name": "scheduler", "image": None}]}}}},
        ctype="application/strategic-merge-patch+json",
    )
    assert (
        status == 422 and body["reason"] == "Invalid" and "image: Required value" in body["message"]
    )
    # dryRun=All answers the result and changes nothing.
    status, body = call(
        sim,
        "PATCH",
        f"{DEPLOYS}/airflow-scheduler?dryRun=All",
        {"metadata": {"labels": {"x": "y"}}},
        ctype="application/merge-patch+json",
    )
    assert status == 200 and body["metadata"]["labels"] == {"x": "y"}
    assert "labels" not in call(sim, "GET", f"{DEPLOYS}/airflow-scheduler")[1]["metadata"]


@pytest.mark.integration  # seconds of real kubectl against simulated timings
def test_watch_replays_from_a_resource_version_and_410s_when_too_old(
    sim: KubeSim, tmp_path: Path
) -> None:
    create(sim, tmp_path, scheduler("r/a:1"))
    listed = call(sim, "GET", f"{DEPLOYS}?fieldSelector=metadata.name%3Dairflow-scheduler")[1]
    rv = listed["metadata"]["resourceVersion"]
    kubectl(sim, "set", "image", "deployment/airflow-scheduler", "scheduler=r/a:2")
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=30)
    conn.request(
        "GET",
        f"{DEPLOYS}?watch=true&resourceVersion={rv}&timeoutSeconds=2"
        "&fieldSelector=metadata.name%3Dairflow-scheduler",
    )
    events = [json.loads(line) for line in conn.getresponse().read().splitlines()]
    conn.close()
    assert events and all(e["type"] == "MODIFIED" for e in events)
    assert any(
        e["object"]["spec"]["template"]["spec"]["containers"][0]["image"] == "r/a:2" for e in events
    )
    sim.call(lambda: sim.sim.store.events.extend([sim.sim.store.events[-1]] * 1000))
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=30)
    conn.request("GET", f"{DEPLOYS}?watch=true&resourceVersion=1")
    [gone] = [json.loads(line) for line in conn.getresponse().read().splitlines()]
    conn.close()
    assert gone["type"] == "ERROR" and gone["object"]["code"] == 410


@pytest.mark.integration  # seconds of real kubectl against simulated timings
def test_kubectl_rolls_and_undoes_a_statefulset(sim: KubeSim, tmp_path: Path) -> None:
    create(sim, tmp_path, worker("r/a:1", replicas=3))
    kubectl(sim, "rollout", "status", "statefulset/airflow-worker", "--timeout=30s")
    kubectl(sim, "set", "image", "statefulset/airflow-worker", "worker=r/a:2")
    out = kubectl(sim, "rollout", "status", "statefulset/airflow-worker", "--timeout=30s").stdout
    assert "rolling update complete 3 pods at revision airflow-worker-" in out
    history = kubectl(sim, "rollout", "history", "statefulset/airflow-worker").stdout
    assert [ln.split()[0] for ln in history.splitlines()[2:] if ln.strip()] == ["1", "2"]
    kubectl(sim, "rollout", "undo", "statefulset/airflow-worker")
    kubectl(sim, "rollout", "status", "statefulset/airflow-worker", "--timeout=30s")
    image = kubectl(
        sim,
        "get",
        "statefulset/airflow-worker",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ).stdout
    assert image == "r/a:1"
    pods = json.loads(kubectl(sim, "get", "pods", "-l", "component=worker", "-o", "json").stdout)[
        "items"
    ]
    assert sorted(p["metadata"]["name"] for p in pods) == [f"airflow-worker-{i}" for i in range(3)]
    assert {c["image"] for p in pods for c in p["status"]["containerStatuses"]} == {"r/a:1"}
    assert all(
        c["imageID"].startswith("r/a@sha256:")
        for p in pods
        for c in p["status"]["containerStatuses"]
    )


def test_api_faults_and_a_job(sim: KubeSim, tmp_path: Path) -> None:
    sim.sim.faults.append(Fault(status=500, count=2, path="/deployments"))
    assert call(sim, "GET", DEPLOYS)[0] == 500
    assert call(sim, "GET", DEPLOYS)[0] == 500
    assert call(sim, "GET", DEPLOYS)[0] == 200
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "migrate"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "m", "image": "r/a:2"}]}
            },
        },
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    kubectl(sim, "create", "-f", str(tmp_path / "job.json"), "--validate=false")
    kubectl(sim, "wait", "--for=condition=complete", "job/migrate", "--timeout=20s")


def test_token_auth_needs_tls_and_is_enforced(tmp_path: Path) -> None:
    s = KubeSim(tmp_path / "tls", tls=True, token="t0ken").start()
    try:
        assert kubectl(s, "get", "deployments", "-o", "name").returncode == 0
        s.write_kubeconfig(s.kubeconfig, "wrong")
        denied = kubectl(s, "get", "deployments", check=False)
        assert denied.returncode != 0 and "Unauthorized" in denied.stderr + denied.stdout
    finally:
        s.stop()


def test_runs_on_its_own(tmp_path: Path) -> None:
    from tests.support.sshserver import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.kubesim",
            "--port",
            str(port),
            "--kubeconfig",
            str(tmp_path / "kc"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout is not None
        assert f"listening on http://127.0.0.1:{port}" in proc.stdout.readline()
        deadline = time.monotonic() + 10
        while True:
            out = subprocess.run(
                ["kubectl", "--kubeconfig", str(tmp_path / "kc"), "version", "-o", "json"],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode == 0 or time.monotonic() > deadline:
                break
        assert json.loads(out.stdout)["serverVersion"]["gitVersion"].endswith("kubesim")
    finally:
        proc.terminate()
        proc.wait(10)
