"""The registry client: copying an image between repositories, registry-side.

The pure parts (names, challenges) are fast; the copy runs against the real
registry of scripts/testenv.sh (htpasswd basic auth). Images are made in it
directly through the Distribution API (blobs and manifests uploaded by the
test), so no Engine is involved and every request the copy makes is seen.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import uuid
from typing import Any

import httpx2
import pytest

from daemon.adapters import registry
from daemon.adapters.registry import OCI_INDEX, OCI_MANIFEST, Registry
from daemon.config import RegistrySettings
from daemon.errors import RegistryError, UsageError
from tests.support.testenv import Infra


def test_repository_names_split_by_dockers_rule() -> None:
    assert registry.split("127.0.0.1:5959/airflow/prod") == ("127.0.0.1:5959", "airflow/prod")
    assert registry.split("registry.example.com/a/b/c") == ("registry.example.com", "a/b/c")
    assert registry.split("localhost/x") == ("localhost", "x")
    assert registry.split("acme/airflow") == ("docker.io", "acme/airflow")
    assert registry.split("airflow") == ("docker.io", "library/airflow")


def test_loopback_registries_are_plain_http_others_https() -> None:
    assert registry.base_url("127.0.0.1:5959") == "http://127.0.0.1:5959"
    assert registry.base_url("localhost:5000") == "http://localhost:5000"
    assert registry.base_url("[::1]:5000") == "http://[::1]:5000"
    assert registry.base_url("registry.example.com") == "https://registry.example.com"
    assert registry.base_url("127.0.0.1.example.com") == "https://127.0.0.1.example.com"
    assert registry.base_url("docker.io") == "https://registry-1.docker.io"


def test_challenges_are_read_as_scheme_and_parameters() -> None:
    assert registry.challenge('Basic realm="deployd-test"') == ("basic", {"realm": "deployd-test"})
    scheme, params = registry.challenge(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:airflow/prod:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example.com/token",
        "service": "registry.example.com",
        "scope": "repository:airflow/prod:pull,push",
    }
    assert registry.challenge("") == ("", {})


def test_a_copy_to_another_registry_host_is_refused_before_any_request() -> None:
    seen: list[httpx2.Request] = []
    with (
        Registry(RegistrySettings(), event_hooks={"request": [seen.append]}) as client,
        pytest.raises(UsageError, match="different registries"),
    ):
        client.copy("a.example.com/x", "sha256:" + "0" * 64, "b.example.com/x", "t", print)
    assert seen == []


# -- against the real registry --------------------------------------------------------------


class Seeder:
    """Uploads blobs and manifests to the test registry, as a build's push would."""

    def __init__(self, infra: Infra) -> None:
        self.infra = infra
        self.http = httpx2.Client(
            base_url=f"http://{infra.registry}",
            auth=(infra.registry_user, infra.registry_password),
            timeout=30,
        )

    def blob(self, repo: str, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        start = self.http.post(f"/v2/{repo}/blobs/uploads/")
        assert start.status_code == 202, start.text
        # The upload's Location carries its own query (its state): the digest joins it.
        where = httpx2.URL(start.headers["Location"]).copy_merge_params({"digest": digest})
        done = self.http.put(where, content=data)
        assert done.status_code == 201, done.text
        return {"digest": digest, "size": len(data)}

    def image(self, repo: str, text: str) -> tuple[str, bytes, list[str]]:
        """An OCI image of one layer holding a file with `text`: (digest, manifest, blobs)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("hello.txt")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
        layer = gzip.compress(buf.getvalue(), mtime=0)
        diff_id = "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "config": {"Labels": {"text": text}},
            }
        ).encode()
        c, lyr = self.blob(repo, config), self.blob(repo, layer)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **c},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **lyr}],
            },
            indent=3,  # not as the client would re-serialise it: the bytes must travel as they are
        ).encode()
        digest = self.manifest(repo, "seed", manifest, OCI_MANIFEST)
        return digest, manifest, [c["digest"], lyr["digest"]]

    def manifest(self, repo: str, ref: str, body: bytes, media: str) -> str:
        resp = self.http.put(
            f"/v2/{repo}/manifests/{ref}", content=body, headers={"Content-Type": media}
        )
        assert resp.status_code == 201, resp.text
        return str(resp.headers["Docker-Content-Digest"])

    def get(self, repo: str, ref: str) -> httpx2.Response:
        accept = ", ".join(registry.MANIFEST_TYPES)
        return self.http.get(f"/v2/{repo}/manifests/{ref}", headers={"Accept": accept})

    def has_blob(self, repo: str, digest: str) -> bool:
        return self.http.head(f"/v2/{repo}/blobs/{digest}").status_code == 200


@pytest.fixture
def seeder(testenv: Infra) -> Seeder:
    return Seeder(testenv)


def settings_for(infra: Infra, password: str | None = None) -> RegistrySettings:
    return RegistrySettings(
        infra.registry, infra.registry_user, password if password else infra.registry_password
    )


def recording(
    seen: list[tuple[str, str]], answers: list[int] | None = None
) -> dict[str, list[Any]]:
    hooks: dict[str, list[Any]] = {"request": [lambda r: seen.append((r.method, r.url.path))]}
    if answers is not None:
        hooks["response"] = [lambda r: answers.append(r.status_code)]
    return hooks


@pytest.mark.integration
def test_an_image_is_copied_across_repositories_by_mounting_its_blobs(
    testenv: Infra, seeder: Seeder
) -> None:
    src, dst = f"promo/src-{uuid.uuid4().hex[:8]}", f"promo/dst-{uuid.uuid4().hex[:8]}"
    digest, manifest, blobs = seeder.image(src, "staging")
    seen: list[tuple[str, str]] = []
    answers: list[int] = []
    lines: list[str] = []
    with Registry(settings_for(testenv), event_hooks=recording(seen, answers)) as client:
        got = client.copy(
            f"{testenv.registry}/{src}",
            digest,
            f"{testenv.registry}/{dst}",
            "deploy-7",
            lines.append,
        )
    assert got == digest
    # The target repository serves the very same bytes, so the very same digest.
    served = seeder.get(dst, "deploy-7")
    assert served.status_code == 200
    assert served.headers["Docker-Content-Digest"] == digest and served.content == manifest
    assert all(seeder.has_blob(dst, b) for b in blobs)
    # Each blob was mounted from the source; none was read or uploaded through this host.
    mounts = [p for m, p in seen if m == "POST"]
    assert mounts == [f"/v2/{dst}/blobs/uploads/"] * 2
    assert not [p for m, p in seen if m in ("PATCH", "PUT") and "/blobs/" in p]
    assert not [p for m, p in seen if m == "GET" and "/blobs/" in p]
    assert [p for m, p in seen if m == "PUT"] == [f"/v2/{dst}/manifests/deploy-7"]
    assert f"{blobs[1][7:19]}: Mounted from {src}" in lines
    # Basic auth, as the registry asked for it: one 401 challenge, then credentials.
    assert seen[0] == seen[1] == ("GET", f"/v2/{src}/manifests/{digest}")
    assert answers[0] == 401 and 401 not in answers[1:]
    # Again into the same repository under another tag: the blobs are there already.
    seen.clear()
    with Registry(settings_for(testenv), event_hooks=recording(seen)) as client:
        assert (
            client.copy(
                f"{testenv.registry}/{src}", digest, f"{testenv.registry}/{dst}", "deploy-8", print
            )
            == digest
        )
    assert not [p for m, p in seen if m == "POST"]
    assert seeder.get(dst, "deploy-8").headers["Docker-Content-Digest"] == digest


@pytest.mark.integration
def test_an_index_is_copied_with_each_of_its_manifests(testenv: Infra, seeder: Seeder) -> None:
    src, dst = f"promo/idx-src-{uuid.uuid4().hex[:8]}", f"promo/idx-dst-{uuid.uuid4().hex[:8]}"
    amd, amd_body, amd_blobs = seeder.image(src, "amd64")
    arm, arm_body, arm_blobs = seeder.image(src, "arm64")
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": d, "size": len(b), "platform": p}
                for d, b, p in (
                    (amd, amd_body, {"architecture": "amd64", "os": "linux"}),
                    (arm, arm_body, {"architecture": "arm64", "os": "linux"}),
                )
            ],
        }
    ).encode()
    digest = seeder.manifest(src, "multi", index, OCI_INDEX)
    with Registry(settings_for(testenv)) as client:
        assert (
            client.copy(
                f"{testenv.registry}/{src}", digest, f"{testenv.registry}/{dst}", "deploy-1", print
            )
            == digest
        )
    assert seeder.get(dst, "deploy-1").content == index
    for child, body in ((amd, amd_body), (arm, arm_body)):
        assert seeder.get(dst, child).content == body
    assert all(seeder.has_blob(dst, b) for b in [*amd_blobs, *arm_blobs])


@pytest.mark.integration
def test_within_one_repository_only_the_tag_is_added(testenv: Infra, seeder: Seeder) -> None:
    repo = f"promo/same-{uuid.uuid4().hex[:8]}"
    digest, manifest, _ = seeder.image(repo, "one repo")
    seen: list[tuple[str, str]] = []
    with Registry(settings_for(testenv), event_hooks=recording(seen)) as client:
        client.copy(
            f"{testenv.registry}/{repo}", digest, f"{testenv.registry}/{repo}", "prod-3", print
        )
    assert seeder.get(repo, "prod-3").content == manifest
    assert {m for m, _ in seen} == {"GET", "PUT"}  # the manifest, then the same bytes again


@pytest.mark.integration
def test_refusals_and_missing_images_are_clear(testenv: Infra, seeder: Seeder) -> None:
    src, dst = f"promo/bad-{uuid.uuid4().hex[:8]}", f"promo/bad-dst-{uuid.uuid4().hex[:8]}"
    digest, _, _ = seeder.image(src, "x")
    source, target = f"{testenv.registry}/{src}", f"{testenv.registry}/{dst}"
    with (
        Registry(settings_for(testenv, password="wrong")) as client,
        pytest.raises(RegistryError, match=r"refused reading the manifest.*password_file"),
    ):
        client.copy(source, digest, target, "t", print)
    with (
        Registry(RegistrySettings()) as client,
        pytest.raises(RegistryError, match="asks for a login"),
    ):
        client.copy(source, digest, target, "t", print)
    # Credentials for another registry are not sent to this one.
    other = RegistrySettings("registry.example.com", testenv.registry_user, "x")
    with Registry(other) as client, pytest.raises(RegistryError, match="asks for a login"):
        client.copy(source, digest, target, "t", print)
    gone = "sha256:" + "1" * 64
    with (
        Registry(settings_for(testenv)) as client,
        pytest.raises(RegistryError, match="not in the registry any more"),
    ):
        client.copy(source, gone, target, "t", print)
    assert seeder.get(dst, "t").status_code == 404
