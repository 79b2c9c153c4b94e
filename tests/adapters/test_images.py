"""The Docker adapter against the real Engine: the project reaches a check container."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.adapters.images import Images
from daemon.config import RegistrySettings
from daemon.core.ports import Sandbox
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
    images = cls(testenv.docker_host, RegistrySettings())
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
