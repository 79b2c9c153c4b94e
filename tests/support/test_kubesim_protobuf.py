"""The simulator's protobuf and field validation: Kubernetes' own .proto files, Go's JSON rules.

The wire bytes here are built the way kubectl's gogo-protobuf code writes them (every scalar of
a struct value, zeros too; pointers only when set), and the JSON they must give is what Go's
encoding/json writes for the same struct (test_kubesim.py checks it against kubectl itself).
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kubesim import KubeSim, protobuf, schema
from tests.support.kubesim.store import RESOURCES


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[KubeSim]:
    s = KubeSim(tmp_path / "kubesim").start()
    yield s
    s.stop()


def send(
    sim: KubeSim,
    method: str,
    path: str,
    body: bytes | None = None,
    ctype: str = protobuf.MEDIA_TYPE,
    accept: str = f"{protobuf.MEDIA_TYPE}, */*",
) -> tuple[int, dict[str, Any] | bytes, http.client.HTTPResponse]:
    """A request with raw bytes; JSON answers parsed, protobuf ones left as bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": ctype, "Accept": accept})
        resp = conn.getresponse()
        raw = resp.read()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return resp.status, json.loads(raw), resp
        return resp.status, raw, resp
    finally:
        conn.close()


DEPLOYS = "/apis/apps/v1/namespaces/airflow/deployments"


def deployment(image: str = "r/a:1", **spec: Any) -> dict[str, Any]:
    """A Deployment as Go's JSON has it (what kubectl's `-o json` prints)."""
    return {
        "kind": "Deployment",
        "apiVersion": "apps/v1",
        "metadata": {"name": "web", "labels": {"app": "web"}, "creationTimestamp": None},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}, "creationTimestamp": None},
                "spec": {"containers": [{"name": "web", "image": image, "resources": {}}]},
            },
            "strategy": {},
            **spec,
        },
        "status": {},
    }


def envelope(api_version: str, kind: str, msg: Any) -> bytes:
    s = schema.load()
    unknown = s.new(f"{schema.RUNTIME}.Unknown")
    unknown.typeMeta.apiVersion, unknown.typeMeta.kind = api_version, kind
    unknown.raw = msg.SerializeToString()
    return protobuf.MAGIC + unknown.SerializeToString()


# -- the schemas ---------------------------------------------------------------------


def test_the_kept_protos_compile_once_and_name_fields_as_kubernetes_json_does() -> None:
    first = schema.compiled()
    assert schema.compiled() == first and first.stat().st_size > 100_000  # cached, not redone
    s = schema.load()
    for res in RESOURCES:
        assert protobuf.message_for(res.group_version, res.kind) is not None, res
    # MessageToDict(preserving_proto_field_name=True) gives Kubernetes' JSON names: the proto
    # field names are the Go JSON names, except the inline structs and FieldsV1's raw bytes.
    odd = {
        (m.rsplit(".", 1)[1], s.message(m).fields_by_number[n].name)
        for (m, n), go in s.go_fields.items()
        if s.message(m).fields_by_number[n].name != go.json and not go.inline
    }
    assert odd == {("FieldsV1", "Raw")}
    assert {m.rsplit(".", 1)[1] for m in s.go_slices} == {"ExtraValue", "Verbs"}
    spec = s.message("k8s.io.api.apps.v1.DeploymentSpec")
    replicas = s.go_field(spec, spec.fields_by_name["replicas"])
    assert replicas is not None and replicas.pointer and replicas.omitempty
    strategy = s.go_field(spec, spec.fields_by_name["strategy"])
    assert strategy is not None and strategy.patch_strategy == "retainKeys"


# -- protobuf -> JSON ------------------------------------------------------------------


def gogo_deployment(replicas: int | None) -> Any:
    """A Deployment message as gogo writes one: zero scalars of struct values included."""
    s = schema.load()
    d = s.new("k8s.io.api.apps.v1.Deployment")
    meta = d.metadata
    meta.name = "web"
    for key in ("generateName", "namespace", "selfLink", "uid", "resourceVersion"):
        setattr(meta, key, "")
    meta.generation = 0
    meta.creationTimestamp.SetInParent()  # a zero Time: an empty message on the wire
    meta.labels["app"] = "web"
    spec = d.spec
    if replicas is not None:
        spec.replicas = replicas  # a pointer: only when set
    spec.selector.matchLabels["app"] = "web"
    spec.minReadySeconds = 0
    spec.paused = False
    spec.strategy.type = ""
    tmpl = spec.template
    tmpl.metadata.labels["app"] = "web"
    tmpl.metadata.creationTimestamp.SetInParent()
    c = tmpl.spec.containers.add()
    c.name, c.image, c.imagePullPolicy, c.terminationMessagePath = "web", "r/a:1", "", ""
    c.stdin = False
    c.resources.SetInParent()
    port = c.ports.add()
    port.containerPort, port.name, port.hostPort, port.protocol = 8080, "", 0, ""
    tmpl.spec.restartPolicy = ""
    d.status.replicas = 0
    return d


def test_protobuf_gives_the_json_go_writes_for_the_struct() -> None:
    body = protobuf.decode(envelope("apps/v1", "Deployment", gogo_deployment(replicas=2)))
    want = deployment(replicas=2)
    want["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": 8080}]
    assert body == want
    # A pointer's zero is a value (replicas: 0 is not "unset"); an unset pointer stays out.
    assert (
        protobuf.decode(envelope("apps/v1", "Deployment", gogo_deployment(0)))["spec"]["replicas"]
        == 0
    )
    assert (
        "replicas"
        not in protobuf.decode(envelope("apps/v1", "Deployment", gogo_deployment(None)))["spec"]
    )


def test_kubernetes_types_with_their_own_json() -> None:
    s = schema.load()
    pod = s.new("k8s.io.api.core.v1.Pod")
    pod.metadata.name = "p"
    pod.metadata.creationTimestamp.seconds = 1_700_000_000
    pod.metadata.creationTimestamp.nanos = 5  # kube reads no nanos
    pod.metadata.deletionGracePeriodSeconds = 30  # int64
    entry = pod.metadata.managedFields.add()
    entry.manager, entry.fieldsType = "kubectl", "FieldsV1"
    entry.fieldsV1.Raw = b'{"f:spec":{}}'
    c = pod.spec.containers.add()
    c.name, c.image = "a", "r/a:1"
    c.resources.limits["cpu"].string = "500m"
    c.resources.limits["memory"].string = "128Mi"
    probe = c.readinessProbe.handler.httpGet  # Probe.handler is `json:",inline"`
    probe.path = "/health"
    probe.port.type, probe.port.intVal, probe.port.strVal = 1, 0, "http"
    c.livenessProbe.handler.tcpSocket.port.intVal = 8080
    vol = pod.spec.volumes.add()
    vol.name = "cfg"
    vol.volumeSource.configMap.localObjectReference.name = "airflow"  # two inlines deep
    got = protobuf.to_kube(pod)
    assert got["metadata"]["creationTimestamp"] == "2023-11-14T22:13:20Z"
    assert got["metadata"]["deletionGracePeriodSeconds"] == 30
    assert got["metadata"]["managedFields"] == [
        {"manager": "kubectl", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}
    ]
    container = got["spec"]["containers"][0]
    assert container["resources"] == {"limits": {"cpu": "500m", "memory": "128Mi"}}
    assert container["readinessProbe"] == {"httpGet": {"path": "/health", "port": "http"}}
    assert container["livenessProbe"] == {"tcpSocket": {"port": 8080}}
    assert got["spec"]["volumes"] == [{"name": "cfg", "configMap": {"name": "airflow"}}]
    # Non-omitempty fields Go writes when they are unset: null for nil, the zero struct's JSON.
    empty = protobuf.to_kube(s.new("k8s.io.api.core.v1.PodSpec"))
    assert empty == {"containers": None}

    event = s.new("k8s.io.api.core.v1.Event")
    event.eventTime.seconds, event.eventTime.nanos = 1_700_000_000, 123_456_789
    assert protobuf.to_kube(event)["eventTime"] == "2023-11-14T22:13:20.123456Z"
    revision = s.new("k8s.io.api.apps.v1.ControllerRevision")
    revision.data.raw = b'{"spec":{"template":{}}}'
    revision.revision = 3
    assert protobuf.to_kube(revision)["data"] == {"spec": {"template": {}}}
    assert protobuf.to_kube(revision)["revision"] == 3
    review = s.new("k8s.io.api.authorization.v1.SubjectAccessReview")
    review.spec.extra["scopes"].items.extend(["a", "b"])
    assert protobuf.to_kube(review)["spec"]["extra"] == {"scopes": ["a", "b"]}


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (1, "1ns"),
        (1500, "1.5µs"),
        (300_000_000, "300ms"),
        (1_500_000_000, "1.5s"),
        (90 * 10**9, "1m30s"),
        (3600 * 10**9, "1h0m0s"),
        (-(3723 * 10**9 + 5 * 10**8), "-1h2m3.5s"),
    ],
)
def test_durations_are_gos(ns: int, text: str) -> None:
    duration = schema.load().new(protobuf.DURATION)
    duration.duration = ns
    assert protobuf.to_kube(duration) == text
    assert protobuf.parse_go_duration(text) == ns
    with pytest.raises(ValueError):
        protobuf.parse_go_duration("1x")


def test_json_and_protobuf_round_trip() -> None:
    obj = deployment(
        "r/a:2",
        replicas=0,
        revisionHistoryLimit=0,
        strategy={
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1},
        },
    )
    obj["metadata"]["creationTimestamp"] = "2024-01-02T03:04:05Z"
    pod = obj["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = 0
    pod["containers"][0].update(
        env=[
            {"name": "A", "value": "1"},
            {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "b"}}},
        ],
        resources={"requests": {"cpu": "250m"}},
        readinessProbe={"exec": {"command": ["true"]}, "periodSeconds": 5},
    )
    assert protobuf.decode(protobuf.encode(obj)) == obj


# -- field validation ---------------------------------------------------------------


def test_strict_decoding_names_unknown_and_duplicate_fields_and_keeps_the_rest() -> None:
    desc = protobuf.message_for("apps/v1", "Deployment")
    assert desc is not None
    raw = json.dumps(deployment())[:-1] + ', "spec": ' + json.dumps(deployment()["spec"]) + "}"
    obj = protobuf.loads(raw)  # "spec" twice
    obj["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    obj["spec"]["bogus"] = {"x": 1}
    obj["metadata"]["annotations"] = {"any.key/is": "fine"}
    kept, found = protobuf.check(obj, desc)
    assert found.strict_errors() == [
        'unknown field "spec.template.spec.containers[0].imagePullPolicyy"',
        'unknown field "spec.bogus"',
        'duplicate field "spec"',
    ]
    assert "bogus" not in kept["spec"] and "bogus" in obj["spec"]
    assert kept["spec"]["template"]["spec"]["containers"][0] == {
        "name": "web",
        "image": "r/a:1",
        "resources": {},
    }
    _, found = protobuf.check({"spec": {"replicas": "2"}}, desc)
    assert found.type_error == (
        "json: cannot unmarshal string into Go struct field DeploymentSpec.spec.replicas "
        "of type int32"
    )


def test_create_and_replace_with_protobuf_over_http(sim: KubeSim) -> None:
    status, body, _ = send(sim, "POST", DEPLOYS, protobuf.encode(deployment(replicas=3)))
    assert status == 201 and isinstance(body, dict)  # kubectl accepts JSON too: JSON it is
    assert body["spec"]["replicas"] == 3 and body["metadata"]["uid"]
    body["spec"]["replicas"] = 0
    del body["metadata"]["resourceVersion"]  # unconditional: the controller writes meanwhile
    status, body, _ = send(sim, "PUT", f"{DEPLOYS}/web", protobuf.encode(body))
    assert status == 200 and isinstance(body, dict) and body["spec"]["replicas"] == 0
    # A client that takes protobuf only is answered in protobuf, errors too.
    status, raw, resp = send(sim, "GET", f"{DEPLOYS}/web", accept=protobuf.MEDIA_TYPE)
    assert status == 200 and resp.getheader("Content-Type") == protobuf.MEDIA_TYPE
    assert isinstance(raw, bytes) and protobuf.decode(raw)["spec"]["replicas"] == 0
    status, raw, _ = send(sim, "GET", DEPLOYS, accept=protobuf.MEDIA_TYPE)
    assert status == 200 and isinstance(raw, bytes)
    listed = protobuf.decode(raw)
    assert listed["kind"] == "DeploymentList" and [i["metadata"]["name"] for i in listed["items"]]
    status, _, _ = send(sim, "GET", f"{DEPLOYS}?watch=true", accept=protobuf.MEDIA_TYPE)
    assert status == 406  # watch streams are JSON here
    status, raw, _ = send(sim, "GET", f"{DEPLOYS}/nope", accept=protobuf.MEDIA_TYPE)
    assert status == 404 and isinstance(raw, bytes)
    gone = protobuf.decode(raw)
    assert gone["kind"] == "Status" and gone["reason"] == "NotFound" and gone["code"] == 404
    assert gone["message"] == 'deployments.apps "nope" not found'
    # An envelope for a kind that is not kept, and one that is not protobuf at all.
    status, body, _ = send(sim, "POST", DEPLOYS, envelope("x.io/v1", "Thing", gone_msg()))
    assert status == 415 and isinstance(body, dict) and "Thing" in body["message"]
    status, body, _ = send(sim, "POST", DEPLOYS, b"not protobuf")
    assert status == 400 and isinstance(body, dict) and body["reason"] == "BadRequest"


def gone_msg() -> Any:
    return schema.load().new(f"{schema.META}.Status")


def test_field_validation_warn_strict_and_ignore(sim: KubeSim) -> None:
    obj = deployment()
    obj["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    data = json.dumps(obj).encode()
    status, body, _ = send(
        sim, "POST", f"{DEPLOYS}?fieldValidation=Strict", data, "application/json"
    )
    assert (
        status == 400
        and isinstance(body, dict)
        and body["message"]
        == (
            'Deployment in version "v1" cannot be handled as a Deployment: strict decoding error: '
            'unknown field "spec.template.spec.containers[0].imagePullPolicyy"'
        )
    )
    status, body, resp = send(sim, "POST", DEPLOYS, data, "application/json")  # Warn: default
    assert status == 201 and isinstance(body, dict)
    assert resp.getheader("Warning") == (
        '299 - "unknown field \\"spec.template.spec.containers[0].imagePullPolicyy\\""'
    )
    assert "imagePullPolicyy" not in body["spec"]["template"]["spec"]["containers"][0]
    obj["metadata"]["name"] = "quiet"
    status, body, resp = send(
        sim,
        "POST",
        f"{DEPLOYS}?fieldValidation=Ignore",
        json.dumps(obj).encode(),
        "application/json",
    )
    assert status == 201 and resp.getheader("Warning") is None
    status, body, _ = send(
        sim,
        "PATCH",
        f"{DEPLOYS}/quiet?fieldValidation=Strict",
        b'{"spec": {"replicaz": 3}}',
        "application/merge-patch+json",
    )
    assert status == 400 and isinstance(body, dict)
    assert body["message"].endswith('strict decoding error: unknown field "spec.replicaz"')
    status, body, _ = send(sim, "POST", f"{DEPLOYS}?fieldValidation=Loud", data, "application/json")
    assert status == 400 and isinstance(body, dict) and "Unsupported value" in body["message"]


def test_an_access_review_in_protobuf_is_read_by_the_compiled_schema(tmp_path: Path) -> None:
    s = KubeSim(tmp_path / "k", token="admin", read_token="reader").start()
    try:
        review = schema.load().new("k8s.io.api.authorization.v1.SelfSubjectAccessReview")
        attrs = review.spec.resourceAttributes
        attrs.namespace, attrs.verb, attrs.group, attrs.resource = "airflow", "patch", "apps", ""
        attrs.resource = "deployments"
        body = envelope("authorization.k8s.io/v1", "SelfSubjectAccessReview", review)
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            body=body,
            headers={"Content-Type": protobuf.MEDIA_TYPE, "Authorization": "Bearer reader"},
        )
        answer = json.loads(conn.getresponse().read())
        conn.close()
        assert answer["status"] == {"allowed": False}
        assert answer["spec"]["resourceAttributes"] == {
            "namespace": "airflow",
            "verb": "patch",
            "group": "apps",
            "resource": "deployments",
        }
    finally:
        s.stop()


def test_openapi_v3_declares_field_validation_and_patch_strategies(sim: KubeSim) -> None:
    status, root, _ = send(sim, "GET", "/openapi/v3", accept="application/json")
    assert status == 200 and isinstance(root, dict)
    assert set(root["paths"]) == {
        "api/v1",
        "apis/apps/v1",
        "apis/authorization.k8s.io/v1",
        "apis/batch/v1",
    }
    url = root["paths"]["apis/apps/v1"]["serverRelativeURL"]
    status, doc, _ = send(sim, "GET", url, accept="application/json")
    assert status == 200 and isinstance(doc, dict)
    patch = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"]
    assert patch["x-kubernetes-group-version-kind"] == {
        "group": "apps",
        "version": "v1",
        "kind": "Deployment",
    }
    assert {"fieldValidation"} <= {p["name"] for p in patch["parameters"]}
    assert "application/strategic-merge-patch+json" in patch["requestBody"]["content"]
    scale = doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"]
    assert scale["put"]["x-kubernetes-group-version-kind"]["kind"] == "Scale"
    schemas = doc["components"]["schemas"]
    containers = schemas["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"]
    assert containers["x-kubernetes-patch-merge-key"] == "name"
    assert containers["x-kubernetes-patch-strategy"] == "merge"
    assert "containers" in schemas["io.k8s.api.core.v1.PodSpec"]["required"]
    probe = schemas["io.k8s.api.core.v1.Probe"]["properties"]
    assert {"httpGet", "exec", "periodSeconds"} <= set(probe)  # the inline handler, flattened
    ports = schemas["io.k8s.api.core.v1.Container"]["properties"]["ports"]
    assert ports["x-kubernetes-list-map-keys"] == ["containerPort", "protocol"]
    assert schemas["io.k8s.api.apps.v1.Deployment"]["x-kubernetes-group-version-kind"] == [
        {"group": "apps", "version": "v1", "kind": "Deployment"}
    ]
    status, _, _ = send(sim, "GET", "/openapi/v3/apis/nope/v1", accept="application/json")
    assert status == 404


def test_protobuf_bytes_fields_are_base64_as_in_go() -> None:
    """Go writes []byte as standard base64, as proto3 JSON does: nothing to convert."""
    s = schema.load()
    msg = s.new("k8s.io.api.core.v1.ConfigMap")
    msg.binaryData["k"] = b"\x00\xff"
    assert protobuf.to_kube(msg)["binaryData"] == {"k": base64.b64encode(b"\x00\xff").decode()}
