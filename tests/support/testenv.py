"""The test environment scripts/testenv.sh starts (dockerd, registry, base images), as
tests and benchmarks read it, and the real `deployd` command run against a config."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ENV_FILE = Path(os.environ.get("DEPLOYD_TESTENV_RUN", "/run/deployd-testenv")) / "env"
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Infra:
    """What scripts/testenv.sh started."""

    docker_host: str
    registry: str
    registry_user: str
    registry_password_file: Path
    busybox_image: str
    airflow_image: str
    airflow2_image: str = ""

    @property
    def registry_password(self) -> str:
        return self.registry_password_file.read_text().strip()

    def manifest_digest(self, repository: str, tag: str) -> str | None:
        """The digest the registry serves for repository:tag, or None if it has none."""
        name = repository.split("/", 1)[1]
        req = urllib.request.Request(
            f"http://{self.registry}/v2/{name}/manifests/{tag}",
            method="HEAD",
            headers={
                "Accept": "application/vnd.docker.distribution.manifest.v2+json",
                "Authorization": "Basic "
                + base64.b64encode(
                    f"{self.registry_user}:{self.registry_password}".encode()
                ).decode(),
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return str(resp.headers["Docker-Content-Digest"])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def read_infra() -> Infra:
    """The test environment scripts/testenv.sh wrote (tests and benchmarks)."""
    values = dict(line.split("=", 1) for line in ENV_FILE.read_text().splitlines() if "=" in line)
    return Infra(
        docker_host=values["DOCKER_HOST"],
        registry=values["DEPLOYD_TEST_REGISTRY"],
        registry_user=values["DEPLOYD_TEST_REGISTRY_USER"],
        registry_password_file=Path(values["DEPLOYD_TEST_REGISTRY_PASSWORD_FILE"]),
        busybox_image=values["DEPLOYD_TEST_BUSYBOX_IMAGE"],
        airflow_image=values["DEPLOYD_TEST_AIRFLOW_IMAGE"],
        airflow2_image=values.get("DEPLOYD_TEST_AIRFLOW2_IMAGE", ""),
    )


def write_config(
    path: Path,
    testenv: Infra,
    state_dir: Path,
    *,
    deployments: list[dict[str, object]],
    registry: dict[str, str] | None = None,
) -> Path:
    """Write a deployd.toml for the test environment."""
    reg = (
        registry
        if registry is not None
        else {
            "url": testenv.registry,
            "username": testenv.registry_user,
            "password_file": str(testenv.registry_password_file),
        }
    )
    lines = [
        "[server]",
        f'state_dir = "{state_dir}"',
        "",
        "[docker]",
        f'host = "{testenv.docker_host}"',
        "",
        "[registry]",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in reg.items()]
    for dep in deployments:
        lines += ["", "[[deployment]]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in dep.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Deployd:
    """Runs the real `deployd` command in a subprocess against one config."""

    config: Path
    state_dir: Path

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "daemon.cli", "--config", str(self.config), *args]

    def run(
        self,
        *args: str,
        cwd: Path | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=timeout,
            env=_env(),
            check=False,
        )

    def start(self, *args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env=_env(),
        )

    def record(self, deploy_id: int) -> dict[str, object]:
        proc = self.run("deploys", "--json", "--limit", "1000")
        assert proc.returncode == 0, proc.stderr
        for rec in json.loads(proc.stdout):
            if rec["id"] == deploy_id:
                return dict(rec)
        raise AssertionError(f"no deploy #{deploy_id}")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYD_")}
    env["PYTHONPATH"] = str(ROOT)
    return env
