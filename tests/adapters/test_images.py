"""The Docker adapter against the real Engine: the project reaches a check container."""

from __future__ import annotations

import contextlib
import http.server
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from daemon.adapters.images import Images
from daemon.config import DockerSettings, RegistrySettings
from daemon.core.ports import Sandbox
from daemon.errors import BuildError
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration


class RemoteStyleImages(Images):
    """The same real Engine, treated as remote: the project must travel in a volume."""

    @property
    def local(self) -> bool:
        return False


@pytest.mark.parametrize("cls", [Images, RemoteStyleImages])
def test_project_files_reach_the_check_read_only(
    cls: type[Images], tmp_path: Path, testenv: Infra, docker_api: Any
) -> None:
    project = tmp_path / "project"
    (project / "dags").mkdir(parents=True)
    (project / "dags" / "a.py").write_text("print('hello from a.py')\n")
    images = cls(DockerSettings(testenv.docker_host), RegistrySettings())
    lines: list[str] = []
    labels = {"deployd.deployment": "images-test", "deployd.deploy-id": "1"}
    run = images.run_sandboxed(
        testenv.busybox_image,
        [
            "/bin/sh",
            "-c",
            "cat dags/a.py && (echo x > dags/b 2>/dev/null && echo WRITABLE || echo READ-ONLY)",
        ],
        project=project,
        mount_at="/project",
        environment={},
        sandbox=Sandbox(memory_mb=128, cpus=1, timeout_seconds=60),
        labels=labels,
        on_line=lines.append,
    )
    assert run.exit_code == 0, lines
    assert "print('hello from a.py')" in lines and "READ-ONLY" in lines
    left = docker_api.volumes(filters={"label": "deployd.deployment=images-test"})
    assert not (left or {}).get("Volumes")
    assert (
        docker_api.containers(all=True, filters={"label": "deployd.deployment=images-test"}) == []
    )


@pytest.mark.parametrize("allowed", [False, True])
def test_add_of_a_url_on_the_build_hosts_loopback(
    tmp_path: Path, testenv: Infra, docker_api: Any, allowed: bool
) -> None:
    # The Engine downloads ADD URLs itself, from the host's network: a secret served on the
    # build host's loopback is in reach of any pushed Dockerfile unless deployd refuses it.
    asked: list[str] = []

    class Secret(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            body = b"metadata-token\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Secret)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    context = tmp_path / "ctx"
    context.mkdir()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/latest/meta-data/token"
    (context / "Dockerfile").write_text(
        f"FROM {testenv.busybox_image}\n# a comment\nADD --chown=0:0 \\\n    {url} /token\n"
    )
    images = Images(
        DockerSettings(testenv.docker_host, allow_remote_add=allowed), RegistrySettings()
    )
    labels = {"deployd.deployment": "add-test", "deployd.deploy-id": "1"}
    tag = f"deployd-test/add-url:{int(allowed)}"
    try:
        if allowed:
            images.build(context, tag, labels, lambda _line: None)
            assert asked == ["/latest/meta-data/token"]  # the risk is real
        else:
            with pytest.raises(BuildError, match=r"Dockerfile line 3: ADD http://127\.0\.0\.1"):
                images.build(context, tag, labels, lambda _line: None)
            assert asked == []  # and nothing was fetched
    finally:
        httpd.shutdown()
        with contextlib.suppress(Exception):
            docker_api.remove_image(tag, force=True)


def test_a_check_printing_40_mb_without_a_newline_is_read_whole_and_in_time(
    tmp_path: Path, testenv: Infra
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    images = Images(DockerSettings(testenv.docker_host), RegistrySettings())
    lines: list[str] = []
    run = images.run_sandboxed(
        testenv.busybox_image,
        ["/bin/sh", "-c", "head -c 40000000 /dev/zero | tr '\\0' x; echo; echo done"],
        project=project,
        mount_at="/project",
        environment={},
        sandbox=Sandbox(memory_mb=256, cpus=1, timeout_seconds=60),
        labels={"deployd.deployment": "images-test", "deployd.deploy-id": "2"},
        on_line=lines.append,
    )
    assert run.exit_code == 0
    # Every line arrived (a quadratic reader was still busy when the container ended).
    assert lines[-1] == "done" and len(lines) == 2, [line[:80] for line in lines]
    assert lines[0].endswith("more bytes of this line not kept]")


def test_an_image_pruned_from_the_engine_is_pulled_back_by_digest(
    tmp_path: Path, testenv: Infra, docker_api: Any
) -> None:
    # A DAG deploy checks in the image that runs, which keep_images may have pruned locally.
    registry = RegistrySettings(testenv.registry, testenv.registry_user, testenv.registry_password)
    images = Images(DockerSettings(testenv.docker_host), registry)
    repository = f"{testenv.registry}/airflow/local-image-{uuid.uuid4().hex[:8]}"
    source = docker_api.inspect_image(testenv.busybox_image)["Id"]
    images.tag(source, repository, "one")
    digest = images.push(repository, "one", lambda _line: None)
    try:
        here, found = images.local_image(f"{repository}@{digest}", lambda _line: None)
        assert (here, found) == (source, digest)
        docker_api.remove_image(f"{repository}:one")
        assert not any(
            d.startswith(repository + "@") for d in docker_api.inspect_image(source)["RepoDigests"]
        )
        lines: list[str] = []
        pulled, found = images.local_image(f"{repository}:one@{digest}", lines.append)
        assert found == digest and pulled == source
        assert lines == [
            f"       pulling {repository}@{digest}: this Docker Engine no longer has it"
        ]
    finally:
        with contextlib.suppress(Exception):
            docker_api.remove_image(f"{repository}@{digest}")
