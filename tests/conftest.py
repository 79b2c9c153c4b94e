"""Fixtures: the real test environment (dockerd, registry, base images) and deployd runs.

Integration tests need `scripts/testenv.sh up` to have run (scripts/test.sh
does it); they fail, rather than skip, when it has not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.testenv import ENV_FILE, Deployd, Infra, read_infra, write_config


@pytest.fixture(scope="session")
def testenv() -> Infra:
    """The running test environment (fails with instructions if it is not up)."""
    if not ENV_FILE.is_file():
        pytest.fail(
            f"{ENV_FILE} is missing: run `bash scripts/testenv.sh up` first (scripts/test.sh does)."
        )
    return read_infra()


@pytest.fixture(scope="session")
def docker_api(testenv: Infra):  # type: ignore[no-untyped-def]
    import docker

    return docker.APIClient(base_url=testenv.docker_host, version="1.41")


@pytest.fixture
def make_deployd(tmp_path: Path, testenv: Infra):  # type: ignore[no-untyped-def]
    """Factory: a Deployd over a fresh state_dir with the given deployments."""

    def factory(
        *deployments: dict[str, object],
        registry: dict[str, str] | None = None,
    ) -> Deployd:
        state = tmp_path / "state"
        config = write_config(
            tmp_path / "deployd.toml",
            testenv,
            state,
            deployments=list(deployments),
            registry=registry,
        )
        return Deployd(config, state)

    return factory
