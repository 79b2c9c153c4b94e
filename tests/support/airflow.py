"""A real Airflow 3 for tests: `airflow dag-processor` and `airflow api-server` in containers.

Both run from the test image (deployd-test/airflow:3.3.2, which scripts/testenv.sh gives git,
ssh and apache-airflow-providers-git) on the host network, so they reach a `deployd serve` on
loopback, and share one SQLite metadata database made once with `airflow db migrate` in a
bind-mounted state dir. The dag-processor reads one GitDagBundle (an `ssh://` URL with a key,
or a local repository for adapter tests) with the fast refresh settings deployd recommends;
the api-server uses the simple auth manager with a known user.

Starting Airflow costs seconds (see STARTUP), so one world should serve a whole module:

    @pytest.fixture(scope="module")
    def airflow(testenv, tmp_path_factory):
        with AirflowWorld(testenv, tmp_path_factory.mktemp("airflow"), ...) as world:
            yield world

Containers carry the label `deployd.test=airflow-world` (a crashed run's leftovers can be
removed by it) and are removed at exit, also when starting fails.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import docker
from docker.models.containers import Container

from tests.support.testenv import Infra

LABEL = "deployd.test"
LABEL_VALUE = "airflow-world"
USERNAME = "deployd"
ROLE = "viewer"  # what deployd needs: read DAGs and import errors
SECTION_ENV = "AIRFLOW__{section}__{key}"
T = TypeVar("T")


@dataclass(frozen=True)
class Refresh:
    """How fast Airflow notices a moved branch: the settings deployd recommends.

    `refresh_interval` (the bundle's own kwarg) is how old the bundle may get before the
    dag-processor fetches it again; `[dag_processor] bundle_refresh_check_interval` is how often
    it asks whether a bundle is due. `min_file_process_interval` decides when files that did not
    change in a commit are parsed again (and so when their DAGs report the new bundle version).
    """

    refresh_interval: int = 1
    check_interval: int = 1
    min_file_process_interval: int = 30


def free_port() -> int:
    """A loopback port nothing listens on now (the api-server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bundle_config(
    bundle: str,
    ref: str,
    *,
    refresh_interval: int,
    conn_id: str | None,
    repo_url: str | None,
    subdir: str | None = None,
) -> list[dict[str, object]]:
    """The `[dag_processor] dag_bundle_config_list` value for one GitDagBundle.

    `subdir = "dags"` keeps Airflow to the project's dags/ folder: otherwise it parses every
    .py file of the repository (tests/, .astro/) as a DAG file.
    """
    kwargs: dict[str, object] = {"tracking_ref": ref, "refresh_interval": refresh_interval}
    if subdir:
        kwargs["subdir"] = subdir
    if conn_id:
        kwargs["git_conn_id"] = conn_id
    if repo_url:
        kwargs["repo_url"] = repo_url
    return [
        {
            "name": bundle,
            "classpath": "airflow.providers.git.bundles.git.GitDagBundle",
            "kwargs": kwargs,
        }
    ]


def git_connection(
    url: str, *, key_file: str | None, known_hosts_file: str | None
) -> dict[str, object]:
    """An Airflow git connection (AIRFLOW_CONN_<ID> JSON) that clones `url` with a key.

    Without a known_hosts file host keys are not checked (a test server's key is new each run);
    with one, `strict_host_key_checking = "yes"`, as a production setup should pin deployd's key.
    """
    extra: dict[str, str] = {}
    if key_file:
        extra["key_file"] = key_file
    if known_hosts_file:
        extra["strict_host_key_checking"] = "yes"
        extra["known_hosts_file"] = known_hosts_file
    else:
        extra["strict_host_key_checking"] = "no"
    return {"conn_type": "git", "host": url, "extra": extra}


class WorldError(AssertionError):
    """Airflow did not come up or a wait timed out; the message carries the containers' logs."""


class AirflowWorld:
    """A dag-processor and an api-server over one GitDagBundle, as a context manager."""

    def __init__(
        self,
        testenv: Infra,
        state_dir: Path,
        *,
        bundle: str,
        repo_url: str,
        ref: str = "main",
        subdir: str | None = None,
        key_file: Path | None = None,
        known_hosts_file: Path | None = None,
        refresh: Refresh = Refresh(),
        jwt_expiration_seconds: int = 86400,
        image: str | None = None,
        start_timeout: float = 180.0,
    ) -> None:
        self.testenv = testenv
        self.state_dir = state_dir.resolve()
        self.bundle = bundle
        self.repo_url = repo_url
        self.ref = ref
        self.subdir = subdir
        self.key_file = key_file
        self.known_hosts_file = known_hosts_file
        self.refresh = refresh
        self.jwt_expiration_seconds = jwt_expiration_seconds
        self.image = image or testenv.airflow_image
        self.start_timeout = start_timeout
        self.password = secrets.token_urlsafe(16)
        self._jwt_secret = secrets.token_urlsafe(32)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.world_id = secrets.token_hex(4)
        self.containers: dict[str, Container] = {}
        self.startup_seconds = 0.0
        self._docker = docker.DockerClient(base_url=testenv.docker_host, version="1.41")

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> AirflowWorld:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Migrate the database, start both components, wait until the API answers."""
        began = time.monotonic()
        self._prepare_state()
        self._migrate()
        self._run("dag-processor", ["python3", "-m", "airflow", "dag-processor"])
        self._run(
            "api-server",
            [
                "python3",
                "-m",
                "airflow",
                "api-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
        )
        self.wait_for(self._api_answers, self.start_timeout, "the api-server to answer")
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Remove every container of this world (idempotent)."""
        for container in self._docker.containers.list(
            all=True, filters={"label": f"{LABEL}.world={self.world_id}"}
        ):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        self.containers.clear()

    # -- what runs --------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        return self.state_dir / "home"

    def environment(self) -> dict[str, str]:
        """Airflow's configuration for both components (environment variables)."""
        conn_id: str | None = None
        repo_url: str | None = self.repo_url
        env = {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USERNAME}:{ROLE}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": self._jwt_secret,
            "AIRFLOW__API_AUTH__JWT_EXPIRATION_TIME": str(self.jwt_expiration_seconds),
            # Expiry is meant exactly in the token renewal tests (the default leeway is 10 s).
            "AIRFLOW__API_AUTH__JWT_LEEWAY": "0",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(self.state_dir / "bundles"),
            "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": str(
                self.refresh.check_interval
            ),
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(
                self.refresh.min_file_process_interval
            ),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }
        if self.repo_url.startswith("ssh://") or self.key_file is not None:
            conn_id = "deployd_git"
            repo_url = None
            env["AIRFLOW_CONN_DEPLOYD_GIT"] = json.dumps(
                git_connection(
                    self.repo_url,
                    key_file=str(self._ssh_dir / "id") if self.key_file else None,
                    known_hosts_file=str(self._ssh_dir / "known_hosts")
                    if self.known_hosts_file
                    else None,
                )
            )
        env["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = json.dumps(
            bundle_config(
                self.bundle,
                self.ref,
                refresh_interval=self.refresh.refresh_interval,
                subdir=self.subdir,
                conn_id=conn_id,
                repo_url=repo_url,
            )
        )
        return env

    @property
    def _ssh_dir(self) -> Path:
        return self.state_dir / "ssh"

    def _prepare_state(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "bundles").mkdir(exist_ok=True)
        # The simple auth manager keeps a generated password per user unless the file has one.
        (self.home / "passwords.json").write_text(json.dumps({USERNAME: self.password}))
        if self.key_file or self.known_hosts_file:
            self._ssh_dir.mkdir(mode=0o700, exist_ok=True)
        if self.key_file:
            shutil.copyfile(self.key_file, self._ssh_dir / "id")
            (self._ssh_dir / "id").chmod(0o600)  # ssh refuses a key others may read
        if self.known_hosts_file:
            shutil.copyfile(self.known_hosts_file, self._ssh_dir / "known_hosts")

    def _mounts(self) -> dict[str, dict[str, str]]:
        """The state dir, and a local repository, at the same paths inside as outside."""
        volumes = {str(self.state_dir): {"bind": str(self.state_dir), "mode": "rw"}}
        local = self.local_repo()
        if local is not None:
            volumes[str(local)] = {"bind": str(local), "mode": "ro"}
        return volumes

    def local_repo(self) -> Path | None:
        """The repository's directory when the bundle reads a local one (not over SSH)."""
        if self.repo_url.startswith("file://"):
            return Path(self.repo_url.removeprefix("file://"))
        if self.repo_url.startswith("/"):
            return Path(self.repo_url)
        return None

    def _labels(self, role: str) -> dict[str, str]:
        return {LABEL: LABEL_VALUE, f"{LABEL}.world": self.world_id, f"{LABEL}.role": role}

    def _migrate(self) -> None:
        container = self._docker.containers.run(
            self.image,
            ["python3", "-m", "airflow", "db", "migrate"],
            environment=self.environment(),
            volumes=self._mounts(),
            network_mode="host",
            labels=self._labels("migrate"),
            detach=True,
        )
        try:
            result = container.wait(timeout=self.start_timeout)
            if result["StatusCode"] != 0:
                raise WorldError(
                    f"airflow db migrate exited {result['StatusCode']}:\n"
                    + container.logs().decode(errors="replace")[-5000:]
                )
        finally:
            container.remove(force=True)

    def _run(self, role: str, command: list[str]) -> None:
        self.containers[role] = self._docker.containers.run(
            self.image,
            command,
            environment=self.environment(),
            volumes=self._mounts(),
            network_mode="host",
            labels=self._labels(role),
            name=f"airflow-world-{self.world_id}-{role}",
            detach=True,
        )

    def _api_answers(self) -> bool:
        for role, container in self.containers.items():
            container.reload()
            if container.status not in ("created", "running"):
                raise WorldError(f"the {role} container is {container.status}")
        try:
            with urllib.request.urlopen(f"{self.base_url}/api/v2/monitor/health", timeout=2):
                return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    # -- helpers for tests ------------------------------------------------------------------

    def logs(self, tail: int = 200) -> str:
        """The last lines of each component's log, for a failure message."""
        parts = []
        for role, container in self.containers.items():
            try:
                text = container.logs(tail=tail).decode(errors="replace")
            except docker.errors.APIError as exc:
                text = f"(no logs: {exc})"
            parts.append(f"----- {role} -----\n{text}")
        return "\n".join(parts)

    def wait_for(self, pred: Callable[[], T | None], timeout: float, what: str = "") -> T:
        """Poll `pred` until it returns something truthy; on timeout fail with the logs."""
        deadline = time.monotonic() + timeout
        while True:
            value = pred()
            if value:
                return value
            if time.monotonic() > deadline:
                message = f"waited {timeout:.0f} s for {what or pred!r}\n{self.logs()}"
                print(message)
                raise WorldError(message)
            time.sleep(0.1)

    def token(self, password: str | None = None) -> str:
        """A fresh JWT for the world's user (Airflow's POST /auth/token)."""
        body = json.dumps({"username": USERNAME, "password": password or self.password}).encode()
        request = urllib.request.Request(
            f"{self.base_url}/auth/token",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return str(json.loads(resp.read())["access_token"])

    def get(self, path: str, token: str | None = None) -> Any:
        """GET /api/v2/<path> with a token; the decoded JSON."""
        request = urllib.request.Request(
            f"{self.base_url}/api/v2/{path.lstrip('/')}",
            headers={"Authorization": f"Bearer {token or self.token()}"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def status_of(self, path: str, token: str) -> int:
        """The HTTP status GET /api/v2/<path> answers with that token."""
        try:
            request = urllib.request.Request(
                f"{self.base_url}/api/v2/{path.lstrip('/')}",
                headers={"Authorization": f"Bearer {token}"},
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        """The REST JSON of one DAG, or None while Airflow does not know it."""
        try:
            return dict(self.get(f"dags/{dag_id}"))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def dag_versions(self, dag_id: str) -> list[dict[str, Any]]:
        """The DAG's versions (GET /dags/{id}/dagVersions), oldest first."""
        try:
            return list(
                self.get(f"dags/{dag_id}/dagVersions?order_by=version_number&limit=100")[
                    "dag_versions"
                ]
            )
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise

    def import_errors(self) -> list[dict[str, Any]]:
        """Every import error Airflow reports (first 100)."""
        return list(self.get("importErrors?limit=100")["import_errors"])

    def memory_mb(self) -> dict[str, float]:
        """Memory each running component uses now (cgroup usage, MB)."""
        usage = {}
        for role, container in self.containers.items():
            stats = container.stats(stream=False)
            usage[role] = stats.get("memory_stats", {}).get("usage", 0) / 2**20
        return usage
