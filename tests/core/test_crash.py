"""The crash test: SIGKILL the deploying process during each step in turn.

The next deploy of that deployment must find the dead deploy, record it
`interrupted` with the step it died in, and leave no container, lock or work
dir behind, then deploy normally.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.projects import GOOD_DAG, git, make_project
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration


def slow_project(root: Path, infra: Infra, step: str) -> Path:
    """A project that spends several seconds in `step`."""
    base = infra.airflow_image
    if step == "checkout":
        project = make_project(root, base)
        with open(root / "include" / "big.bin", "wb") as fh:
            fh.write(os.urandom(200 * 2**20))
        (root / ".dockerignore").write_text("include/big.bin\n")
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "Add a big file")
        return project
    # A nonce in each slow RUN keeps the Engine's layer cache (kept between
    # runs on one machine) from making the step instant.
    nonce = uuid.uuid4().hex
    if step == "build":
        return make_project(root, base, dockerfile=f"FROM {base}\nRUN echo {nonce} && sleep 60\n")
    if step == "parse":
        return make_project(
            root, base, dags={"slow.py": "# airflow dag\nimport time\ntime.sleep(60)\n"}
        )
    if step == "pytest":
        return make_project(
            root,
            base,
            files={
                "tests/dags/test_dag_example.py": "import time\n\ndef test_slow():\n"
                "    time.sleep(60)\n"
            },
        )
    if step == "push":
        return make_project(
            root,
            base,
            dockerfile=(
                f"FROM {base}\nRUN echo {nonce} && head -c 400000000 /dev/urandom > /opt/big.bin\n"
            ),
        )
    raise AssertionError(step)


def running_steps(db: Path, deploy_id: int) -> list[str]:
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=5)
    try:
        return [
            r[0]
            for r in conn.execute(
                "SELECT name FROM steps WHERE deploy_id = ? AND state = 'running'", [deploy_id]
            )
        ]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


@pytest.mark.parametrize("step", ["checkout", "build", "parse", "pytest", "push"])
def test_killed_during_step_is_marked_interrupted_and_cleaned(
    step: str, tmp_path: Path, testenv: Infra, make_deployd: Any, docker_api: Any
) -> None:
    name = f"crash-{step}"
    d = make_deployd(
        {
            "name": name,
            "image": f"{testenv.registry}/airflow/{name}",
            "import_timeout_seconds": 120,
            "check_timeout_seconds": 300,
        }
    )
    project = slow_project(tmp_path / "slow", testenv, step)
    args = ["deploy", name, str(project)] + (["--pytest"] if step == "pytest" else [])
    proc = d.start(*args)
    db = d.state_dir / "deployd.db"
    deadline = time.monotonic() + 240
    while step not in running_steps(db, 1):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"step {step} never started"
        time.sleep(0.005)
    if step != "checkout":
        time.sleep(0.5)  # let the step get going (containers started, layers moving)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.communicate()

    # The next deploy of the deployment recovers and then runs normally.
    quick = make_project(
        tmp_path / "quick", testenv.airflow_image, dags={"ok.py": GOOD_DAG.format(dag_id="ok")}
    )
    after = d.run("deploy", name, str(quick), "--json")
    assert after.returncode == 0, after.stderr
    assert "deploy #1 had died; marked interrupted" in after.stderr
    dead = d.record(1)
    assert dead["state"] == "interrupted"
    assert step in str(dead["step"]).split("+"), dead
    assert "stopped during" in str(dead["error"])
    steps = {s["name"]: s["state"] for s in dead["steps"]}  # type: ignore[attr-defined]
    assert steps[step] == "interrupted"
    assert docker_api.containers(all=True, filters={"label": "deployd.deploy-id=1"}) == []
    assert not (d.state_dir / "work" / name / "1").exists()
    assert json.loads(after.stdout)["state"] == "succeeded"
    # No deploy of this deployment is left holding or waiting for the lock.
    lock_dir = d.state_dir / "locks" / name
    assert sorted(p.name for p in lock_dir.iterdir()) == ["held.lock"]
    assert (lock_dir / "held.lock").read_text() == ""


def test_deploys_listing_marks_a_dead_deploy(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd({"name": "crash-list", "image": f"{testenv.registry}/airflow/crash-list"})
    project = slow_project(tmp_path / "slow", testenv, "build")
    proc = d.start("deploy", "crash-list", str(project))
    db = d.state_dir / "deployd.db"
    deadline = time.monotonic() + 120
    while "build" not in running_steps(db, 1):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.communicate()
    listing = d.run("deploys", "crash-list")
    assert listing.returncode == 0
    assert "interrupted" in listing.stdout and "stopped during build" in listing.stdout


@pytest.mark.parametrize(("sig", "step"), [(signal.SIGINT, "build"), (signal.SIGTERM, "parse")])
def test_ctrl_c_and_sigterm_cancel_cleanly(
    sig: signal.Signals,
    step: str,
    tmp_path: Path,
    testenv: Infra,
    make_deployd: Any,
    docker_api: Any,
) -> None:
    name = f"cancel-{step}"
    d = make_deployd(
        {"name": name, "image": f"{testenv.registry}/airflow/{name}", "import_timeout_seconds": 120}
    )
    project = slow_project(tmp_path / "slow", testenv, step)
    proc = d.start("deploy", name, str(project))
    db = d.state_dir / "deployd.db"
    deadline = time.monotonic() + 120
    while step not in running_steps(db, 1):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    time.sleep(0.5)
    proc.send_signal(sig)
    # The build sleeps 60 s and the DAG 60 s: the deploy must stop long before.
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 1, err
    assert "cancelled" in err
    rec = d.record(1)
    assert rec["state"] == "cancelled" and rec["finished_at"]
    steps = {s["name"]: s["state"] for s in rec["steps"]}  # type: ignore[attr-defined]
    assert steps[step] == "cancelled"
    assert docker_api.containers(all=True, filters={"label": f"deployd.deployment={name}"}) == []
    assert not (d.state_dir / "work" / name / "1").exists()
