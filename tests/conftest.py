"""Fixtures: the real test environment (dockerd, registry, base images) and deployd runs.

Integration tests need `scripts/testenv.sh up` to have run (scripts/test.sh
does it); they fail, rather than skip, when it has not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.testenv import ENV_FILE, Deployd, Infra, read_infra, write_config

# Run alone, after the rest of the suite (which scripts/test.sh runs on two workers): these
# stop the shared Docker Engine (faults), or bound a time (an acknowledgement, a stop, a
# page load) that a neighbour busy building images would stretch on a 2-CPU machine. The
# OpenAPI conformance test too: under xdist schemathesis runs its operations as one item,
# not one item per operation.
SERIAL = (
    "tests/faults/",
    "tests/core/test_cancel_e2e.py",
    "tests/core/test_cancel.py",
    "tests/core/test_crash.py",
    "tests/core/test_logs.py",
    "tests/core/test_release.py",
    "tests/adapters/test_records.py",
    "tests/adapters/test_locks.py",
    "tests/notify/test_outbox.py",
    "tests/http/test_webhook_server.py",
    "tests/http/test_openapi_conformance.py",
    "tests/http/test_release_server.py",
    "tests/web/test_browser.py",
    "tests/web/test_pages.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the SERIAL files' tests `serial` (scripts/test.sh runs them alone)."""
    root = Path(str(config.rootpath))
    for item in items:
        where = Path(str(item.path)).relative_to(root).as_posix()
        if where.startswith(SERIAL):
            item.add_marker(pytest.mark.serial)


@pytest.fixture(scope="session", autouse=True)
def kubectl_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A discovery cache of this run's own for every kubectl the tests start.

    kubectl keeps discovery for 6 hours under ~/.kube/cache, keyed by host and
    port: a simulator on a reused port would otherwise be answered from an older
    one's (with other kinds, or none of the newer subresources).
    """
    before = os.environ.get("KUBECACHEDIR")
    os.environ["KUBECACHEDIR"] = str(tmp_path_factory.mktemp("kubectl-cache"))
    yield
    if before is None:
        os.environ.pop("KUBECACHEDIR", None)
    else:
        os.environ["KUBECACHEDIR"] = before


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
