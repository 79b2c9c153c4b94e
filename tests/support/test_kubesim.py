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


@pytest.fixture(autouse=True)
def kube_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubectl cache of this test's own: kubectl keeps discovery for 6 hours by host and
    port, and a port is soon used again by another simulator (maybe an older one)."""
    monkeypatch.setenv("KUBECACHEDIR", str(tmp_path / "kube-cache"))


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


# -- what a person types: kubectl's typed commands, scale and apply ---------------------

SERVER_SET = ("uid", "resourceVersion", "creationTimestamp", "generation", "namespace")


def as_sent(obj: dict[str, Any]) -> dict[str, Any]:
    """An object without what the server and its controllers add (and status)."""
    obj = json.loads(json.dumps(obj))
    obj.pop("status", None)
    for key in SERVER_SET:
        obj["metadata"].pop(key, None)
    notes = obj["metadata"].get("annotations") or {}
    notes.pop("deployment.kubernetes.io/revision", None)
    if not notes:
        obj["metadata"].pop("annotations", None)
    return obj


def test_kubectl_create_deployment_and_job_are_read_from_protobuf(sim: KubeSim) -> None:
    """kubectl sends these as protobuf (the simulator answered 500 before it read protobuf);
    what is stored is what kubectl itself renders as JSON for the same object."""
    commands = [
        ["create", "deployment", "web", "--image=r/a:1", "--port=8080", "-v=7"],
        ["create", "deployment", "idle", "--image=r/a:1", "--replicas=0", "--", "sleep", "9"],
        ["create", "job", "migrate", "--image=r/a:1", "--", "airflow", "db", "migrate"],
    ]
    rendered = []
    for args in commands:
        cut = args.index("--") if "--" in args else len(args)
        out = kubectl(sim, *args[:cut], "--dry-run=client", "-o", "json", *args[cut:])
        rendered.append(as_sent(json.loads(out.stdout)))
        out = kubectl(sim, *args)
        assert out.stdout.endswith(f"/{args[2]} created\n")
        if "-v=7" in args:
            assert "Content-Type: application/vnd.kubernetes.protobuf" in out.stderr
    got = kubectl(sim, "get", "deployment/web", "deployment/idle", "job/migrate", "-o", "json")
    items = json.loads(got.stdout)["items"]
    assert [as_sent(obj) for obj in items] == rendered
    assert items[1]["spec"]["replicas"] == 0  # a pointer's zero: not "unset", not 1


def test_kubectl_scale_writes_the_scale_subresource(sim: KubeSim, tmp_path: Path) -> None:
    """`kubectl scale` patches .../scale (404 before the simulator served it)."""
    kubectl(sim, "create", "deployment", "web", "--image=r/a:1", "--replicas=2")
    assert kubectl(sim, "scale", "deployment/web", "--replicas=4").stdout.strip() == (
        "deployment.apps/web scaled"
    )
    scale = json.loads(
        kubectl(sim, "get", "deployment/web", "--subresource=scale", "-o", "json").stdout
    )
    assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"] == {"replicas": 4} and scale["status"]["selector"] == "app=web"
    # With --current-replicas kubectl reads the Scale and PUTs it back, a precondition.
    kubectl(sim, "scale", "deployment/web", "--current-replicas=4", "--replicas=1")
    stale = kubectl(
        sim, "scale", "deployment/web", "--current-replicas=4", "--replicas=2", check=False
    )
    assert stale.returncode != 0 and "Expected replicas to be 4, was 1" in stale.stderr
    create(sim, tmp_path, worker("r/a:1", replicas=1))
    kubectl(sim, "scale", "statefulset/airflow-worker", "--replicas=3")
    replicas = kubectl(
        sim,
        "get",
        "deployment/web",
        "statefulset/airflow-worker",
        "-o",
        "jsonpath={..spec.replicas}",
    ).stdout
    assert replicas.split() == ["1", "3"]


MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: IMAGE
        ports: [{containerPort: 8080}]
        resources:
          limits: {cpu: 500m, memory: 128Mi}
      - name: sidecar
        image: r/sidecar:1
---
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - {name: migrate, image: r/a:1}
"""


@pytest.mark.parametrize(
    "validate", ["strict", pytest.param("false", marks=pytest.mark.integration)]
)
def test_kubectl_apply_creates_then_patches(sim: KubeSim, tmp_path: Path, validate: str) -> None:
    """`kubectl apply -f` validates through /openapi/v3 (it failed to download OpenAPI
    before), creates with the last-applied annotation, then sends a strategic merge patch."""
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(MANIFEST.replace("IMAGE", "r/a:1"))
    first = kubectl(sim, "apply", f"--validate={validate}", "-f", str(manifest))
    assert first.stdout.split("\n")[:2] == [
        "deployment.apps/web created",
        "job.batch/migrate created",
    ]
    assert first.stderr == ""
    manifest.write_text(MANIFEST.replace("IMAGE", "r/a:2"))
    second = kubectl(sim, "apply", f"--validate={validate}", "-f", str(manifest), "-v=7")
    assert "deployment.apps/web configured\njob.batch/migrate unchanged" in second.stdout
    assert "Content-Type: application/strategic-merge-patch+json" in second.stderr
    assert "warning" not in second.stderr.lower()  # the patch came from the OpenAPI schemas
    got = json.loads(kubectl(sim, "get", "deployment/web", "-o", "json").stdout)
    containers = got["spec"]["template"]["spec"]["containers"]
    assert [(c["name"], c["image"]) for c in containers] == [
        ("web", "r/a:2"),
        ("sidecar", "r/sidecar:1"),
    ]
    assert containers[0]["resources"] == {"limits": {"cpu": "500m", "memory": "128Mi"}}
    applied = json.loads(
        got["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
    )
    assert applied["spec"]["template"]["spec"]["containers"][0]["image"] == "r/a:2"
    assert not [p for _, p in sim.sim.requests if p.startswith("/openapi/v2")]  # v3 sufficed
    third = kubectl(sim, "apply", f"--validate={validate}", "-f", str(manifest))
    assert third.stdout.split("\n")[:2] == [
        "deployment.apps/web unchanged",
        "job.batch/migrate unchanged",
    ]


def test_kubectl_explain_reads_the_served_openapi(sim: KubeSim) -> None:
    out = kubectl(sim, "explain", "deployment.spec.strategy.rollingUpdate.maxSurge").stdout
    assert "FIELD: maxSurge <IntOrString>" in out
    assert "The maximum number of pods that can be scheduled above" in out


@pytest.mark.integration  # a second of kubectl; the HTTP-level test is in the fast tier
def test_kubectl_validation_of_unknown_fields_is_the_servers(sim: KubeSim, tmp_path: Path) -> None:
    """kubectl leaves validation to a server whose OpenAPI offers fieldValidation: Strict by
    default (an error naming the field), Warn (a warning; the field is dropped), or none."""
    manifest = tmp_path / "typo.yaml"
    manifest.write_text(
        MANIFEST.replace("IMAGE", "r/a:1").replace(
            "ports:", "imagePullPolicyy: Always\n        ports:"
        )
    )
    field = "spec.template.spec.containers[0].imagePullPolicyy"
    strict = kubectl(sim, "apply", "-f", str(manifest), check=False)
    assert strict.returncode != 0
    assert f'strict decoding error: unknown field "{field}"' in strict.stderr
    warned = kubectl(sim, "apply", "--validate=warn", "-f", str(manifest))
    assert f'Warning: unknown field "{field}"' in warned.stderr
    kubectl(sim, "delete", "-f", str(manifest))
    quiet = kubectl(sim, "create", "--validate=false", "-f", str(manifest))
    assert "Warning" not in quiet.stderr
    got = json.loads(kubectl(sim, "get", "deployment/web", "-o", "json").stdout)
    assert "imagePullPolicyy" not in got["spec"]["template"]["spec"]["containers"][0]


def test_kubectl_auth_can_i_is_read_from_protobuf(tmp_path: Path) -> None:
    s = KubeSim(tmp_path / "tls", tls=True, token="admin-t0ken", read_token="read-t0ken").start()
    try:
        s.write_kubeconfig(s.kubeconfig, "read-t0ken")
        assert kubectl(s, "auth", "can-i", "list", "deployments").stdout.strip() == "yes"
        denied = kubectl(s, "auth", "can-i", "patch", "deployments", check=False)
        assert denied.returncode == 1 and denied.stdout.strip() == "no"
    finally:
        s.stop()
