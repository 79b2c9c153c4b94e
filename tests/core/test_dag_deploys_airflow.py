"""DAG deploys against a real Airflow: `deployd serve` (real git, OpenSSH, Docker Engine,
registry; the Kubernetes simulator held honest by kubectl) and the real `airflow
dag-processor` and `airflow api-server` in containers of the test image, whose GitDagBundle
clones deployd's SSH repository of the deployment with a read-only key.

One story, because an image build and Airflow's start cost tens of seconds: an image deploy;
a DAG change live in Airflow with nothing built or patched; a broken DAG refused (Airflow
stays on the old version); a rollback of the DAG deploy; an import error that only Airflow
sees, rolled back by deployd; a read-only key refused; a requirements change built as an
image deploy.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.steps.test_roll import create, pod_template, scheduler, wait_rolled
from tests.support.airflow import USERNAME, AirflowWorld, Refresh
from tests.support.kubesim import KubeSim
from tests.support.projects import make_project
from tests.support.sshserver import make_key, make_server
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration
T = TypeVar("T")

DAG = """\
from datetime import datetime

from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator

with DAG("example", start_date=datetime(2024, 1, 1), schedule=None, tags=["{tag}"]):
    EmptyOperator(task_id="start")
"""
# Found by deployd's check (the image puts include/ on the path) but not by this Airflow.
USES_INCLUDE = DAG.replace('"example"', '"helped"') + "\nimport helpers  # noqa\n"


def wait(what: str, pred: Callable[[], T | None], timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def record(state_dir: Path, ident: int) -> dict[str, Any]:
    with sqlite3.connect(state_dir / "deployd.db") as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM deploys WHERE id = ?", [ident]).fetchone()
        steps = conn.execute(
            "SELECT name, state, summary FROM steps WHERE deploy_id = ? ORDER BY position",
            [ident],
        ).fetchall()
    out = dict(row)
    out["steps"] = {s["name"]: (s["state"], s["summary"]) for s in steps}
    return out


def commit(repo: Path, files: dict[str, str | None], message: str) -> str:
    for name, text in files.items():
        path = repo / name
        if text is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", message], check=True)
    out = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_dag_deploys_are_checked_then_live_in_a_real_airflow(
    tmp_path: Path, testenv: Infra
) -> None:
    sim = KubeSim(tmp_path / "kubesim").start()
    root = tmp_path / f"srv-{uuid.uuid4().hex[:8]}"
    password = tmp_path / "airflow-password"
    srv = make_server(
        root,
        testenv,
        extra={
            "namespace": "airflow",
            "workloads": ["deployment/airflow-scheduler"],
            "rollout_timeout_seconds": 120,
            "dag_source": "git",
        },
    )
    key_pub = make_key(root / "keys" / "airflow")
    airflow = AirflowWorld(
        testenv,
        tmp_path / "airflow",
        bundle="prod",
        repo_url=srv.url("prod"),
        subdir="dags",
        key_file=root / "keys" / "airflow",
        refresh=Refresh(refresh_interval=2, check_interval=1),
    )
    password.write_text(airflow.password + "\n")
    text = srv.config.read_text().replace(
        'dag_source = "git"',
        'dag_source = "git"\n'
        f"airflow_api_url = {json.dumps(airflow.base_url)}\n"
        f"airflow_username = {json.dumps(USERNAME)}\n"
        f"airflow_password_file = {json.dumps(str(password))}",
        1,
    )
    text += (
        f'\n[[key]]\nname = "airflow"\npublic_key = "{key_pub}"\n'
        'deployments = ["prod"]\naccess = "read"\n'
        f'\n[kubernetes]\nkubeconfig = "{sim.kubeconfig}"\n'
    )
    srv.config.write_text(text)
    image = next(ln.split('"')[1] for ln in text.splitlines() if "ssh-prod" in ln)
    create(sim, tmp_path, scheduler(f"{image}:before", deadline=600))
    wait_rolled(sim, "deployment/airflow-scheduler")
    repo = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dockerfile=f"FROM {testenv.airflow_image}\n"
        "ENV PYTHONPATH=/usr/local/airflow/include:/opt/airflow-site\n",
        dags={"example_dag.py": DAG.format(tag="v1")},
        files={"include/helpers.py": "X = 1\n"},
    )
    subprocess.run(["git", "-C", str(repo), "remote", "add", "astro", srv.url()], check=True)
    v1 = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    srv.start()
    try:
        # 1. The first deploy builds and rolls the image.
        first = srv.git(repo, "push", "astro", "main")
        assert first.returncode == 0, first.stderr
        assert record(srv.state_dir, 1)["kind"] == "image"
        rolled = pod_template(sim, "deployment/airflow-scheduler")
        with airflow:
            dag = airflow.wait_for(
                lambda: (d := airflow.dag("example")) and d["bundle_version"] == v1 and d,
                120,
                "Airflow to parse the first commit",
            )
            assert dag["bundle_name"] == "prod"

            # 2. A DAG change: checked in the running image, live in Airflow, nothing
            # built, pushed or patched.
            v2 = commit(repo, {"dags/example_dag.py": DAG.format(tag="v2")}, "v2")
            pushed = srv.git(repo, "push", "astro", "main")
            assert pushed.returncode == 0, pushed.stderr
            out = pushed.stderr
            assert "remote: -----> a DAG deploy: 1 file changed since deploy #1" in out
            assert (
                "live in Airflow after" in out
                and f"(bundle prod at {v2[:7]}, 0 import errors)" in out
            )
            rec = record(srv.state_dir, 2)
            assert (rec["state"], rec["kind"]) == ("succeeded", "dags")
            assert set(rec["steps"]) == {"checkout", "parse", "pytest", "publish", "live"}
            assert rec["digest"] == record(srv.state_dir, 1)["digest"]
            assert "Step 1/" not in out  # no build
            assert pod_template(sim, "deployment/airflow-scheduler") == rolled
            live = airflow.dag("example")
            assert live is not None and live["bundle_version"] == v2
            assert [t["name"] for t in live["tags"]] == ["v2"]

            # 3. A DAG that fails deployd's check: refused; Airflow stays on v2.
            # (Airflow's safe mode, like deployd's check, reads only files naming
            # "airflow" and "dag".)
            broken = "from airflow.sdk import DAG\nimport nope_nope\n"
            commit(repo, {"dags/broken.py": broken}, "broken")
            refused = srv.git(repo, "push", "astro", "main")
            assert refused.returncode != 0
            assert "dags/broken.py: ModuleNotFoundError" in refused.stderr
            assert record(srv.state_dir, 3)["kind"] == "dags"
            subprocess.run(["git", "-C", str(repo), "reset", "-q", "--hard", v2], check=True)
            time.sleep(3)  # longer than the bundle's refresh_interval: nothing to pick up
            still = airflow.dag("example")
            assert still is not None and still["bundle_version"] == v2
            assert airflow.import_errors() == []

            # 4. Roll the DAG deploy back: the branch moves, Airflow serves v1 again.
            back = srv.ssh("rollback", "prod")
            assert back.returncode == 0, back.stderr
            rec = record(srv.state_dir, 4)
            assert (rec["state"], rec["kind"], rec["action"]) == ("succeeded", "dags", "rollback")
            assert f"bundle prod at {v1[:7]}" in (rec["steps"]["live"][1] or "")
            again = airflow.dag("example")
            assert again is not None and again["bundle_version"] == v1
            assert [t["name"] for t in again["tags"]] == ["v1"]
            assert pod_template(sim, "deployment/airflow-scheduler") == rolled

            # 5. An import error only Airflow sees: deployd moves the branch back.
            subprocess.run(["git", "-C", str(repo), "fetch", "-q", "astro"], env=srv.git_env())
            subprocess.run(["git", "-C", str(repo), "reset", "-q", "--hard", v1], check=True)
            commit(repo, {"dags/helped.py": USES_INCLUDE}, "helped")
            bad = srv.git(repo, "push", "astro", "main")
            # git stored the push (the check passed); the deploy then rolled it back.
            assert "remote: -----> deploy #5 rolled_back: Airflow could not import" in bad.stderr
            assert "helped.py" in bad.stderr and "helpers" in bad.stderr
            rec = record(srv.state_dir, 5)
            assert (rec["state"], rec["kind"]) == ("rolled_back", "dags")
            server_head = subprocess.run(
                ["git", "-C", str(srv.state_dir / "repos" / "prod.git"), "rev-parse", "main"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            assert server_head == v1
            airflow.wait_for(
                lambda: not airflow.import_errors(), 60, "Airflow to drop the import error"
            )

            # 6. Airflow's read-only key may clone, not push or roll back.
            ro = srv.ssh("rollback", "prod", key="airflow")
            assert ro.returncode != 0 and "read-only" in ro.stderr
            ropush = srv.git(repo, "push", "astro", "main", key="airflow")
            assert ropush.returncode != 0 and "read-only" in ropush.stderr

            # 7. A change outside dags/ goes the image path: built and rolled.
            commit(repo, {"dags/helped.py": None, "requirements.txt": "# more\n"}, "deps")
            image_push = srv.git(repo, "push", "astro", "main")
            assert image_push.returncode == 0, image_push.stderr
            assert "an image deploy: " in image_push.stderr
            assert "requirements.txt changed since deploy #4" in image_push.stderr
            rec = record(srv.state_dir, 6)
            assert (rec["state"], rec["kind"]) == ("succeeded", "image")
            assert pod_template(sim, "deployment/airflow-scheduler") != rolled
    finally:
        srv.stop()
        sim.stop()
