"""End to end through the real `deployd deploy` command: real git, Docker Engine, registry.

Each test builds a real Astro project (Airflow 3.3 image made locally by
scripts/testenv.sh) and checks what a user sees (exit code, stdout, stderr)
and what was recorded and pushed.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from daemon.core.ports import instance
from tests.support.projects import GOOD_DAG, commit_all, make_project, ten_dag_project
from tests.support.testenv import Deployd, Infra

pytestmark = pytest.mark.integration


def deploy(
    d: Deployd,
    project: Path,
    name: str,
    *args: str,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    proc = d.run("deploy", name, str(project), "--json", *args)
    try:
        rec = json.loads(proc.stdout)
    except json.JSONDecodeError:
        rec = None
    return proc, rec


def repo_for(testenv: Infra, name: str) -> str:
    return f"{testenv.registry}/airflow/{name}"


def leftovers(docker_api: Any, state_dir: Path, deploy_id: int) -> list[str]:
    """Containers of this deployd's deploy `deploy_id`: other tests' deployds share the
    Engine (and their own deploy #1) while the suite runs on two workers."""
    mine = [f"deployd.instance={instance(state_dir)}", f"deployd.deploy-id={deploy_id}"]
    return [c["Id"] for c in docker_api.containers(all=True, filters={"label": mine})]


def test_deploy_of_a_real_airflow_project(
    tmp_path: Path, testenv: Infra, make_deployd: Any, docker_api: Any
) -> None:
    image = repo_for(testenv, "e2e")
    d = make_deployd({"name": "e2e", "image": image})
    project = ten_dag_project(tmp_path / "proj", testenv.airflow_image)
    proc, rec = deploy(d, project, "e2e")
    assert proc.returncode == 0, proc.stderr
    assert rec is not None and rec["state"] == "succeeded"
    assert (
        rec["commit"]
        == subprocess.check_output(
            ["git", "-C", str(project), "rev-parse", "HEAD"], text=True
        ).strip()
    )
    assert rec["trigger"] == "cli" and rec["ref"] == "refs/heads/main"
    assert rec["description"] == "Initial project"
    assert re.fullmatch(r"deploy-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d-[0-9a-f]{7}-\d+", rec["tag"])
    assert rec["digest"].startswith("sha256:")
    # The registry serves exactly the recorded digest under the deploy tag.
    assert testenv.manifest_digest(image, rec["tag"]) == rec["digest"]
    # The upload went under the staging tag, which stays for the next deploy to reuse.
    assert testenv.manifest_digest(image, "deployd-staging") is not None
    states = {s["name"]: s["state"] for s in rec["steps"]}
    assert states == {
        "checkout": "succeeded",
        "build": "succeeded",
        "parse": "succeeded",
        "pytest": "skipped",
        "push": "succeeded",
        "roll": "skipped",
        "preflight": "skipped",
    }
    assert "10 files, 10 DAGs, 0 import errors" in json.dumps(rec["steps"])
    assert rec["report"]["airflow_version"] == "3.3.2"
    # Progress went to stderr, step by step.
    for step in ("checkout", "build", "parse", "push"):
        assert f"-----> {step}" in proc.stderr
    # Labels on the image record commit, deploy id and deployment.
    labels = docker_api.inspect_image(f"{image}:{rec['tag']}")["Config"]["Labels"]
    assert labels["deployd.commit"] == rec["commit"]
    assert labels["deployd.deploy-id"] == str(rec["id"])
    assert labels["deployd.deployment"] == "e2e"
    # Nothing left behind.
    assert leftovers(docker_api, d.state_dir, rec["id"]) == []
    assert not any((d.state_dir / "work" / "e2e").iterdir())
    # The listing and the log show it.
    listing = d.run("deploys", "e2e")
    assert listing.returncode == 0 and rec["tag"] in listing.stdout
    log = d.run("logs", str(rec["id"]))
    assert log.returncode == 0 and "-----> parse" in log.stdout and rec["digest"] in log.stdout

    # A one-file change redeploys with a new unique tag.
    (project / "dags" / "dag_03.py").write_text(GOOD_DAG.format(dag_id="dag_03_v2"))
    commit_all(project, "Rename dag_03")
    proc2, rec2 = deploy(d, project, "e2e")
    assert proc2.returncode == 0, proc2.stderr
    assert rec2 is not None and rec2["tag"] != rec["tag"] and rec2["digest"] != rec["digest"]
    assert testenv.manifest_digest(image, rec2["tag"]) == rec2["digest"]
    assert rec2["description"] == "Rename dag_03"


def test_dockerignore_is_honoured(
    tmp_path: Path, testenv: Infra, make_deployd: Any, docker_api: Any
) -> None:
    image = repo_for(testenv, "ignore")
    d = make_deployd({"name": "ignore", "image": image})
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        files={
            ".dockerignore": "secret.txt\n",
            "secret.txt": "do not ship\n",
            "kept.txt": "ship\n",
        },
    )
    proc, rec = deploy(d, project, "ignore")
    assert proc.returncode == 0, proc.stderr
    assert rec is not None
    out = _run_in_image(docker_api, f"{image}:{rec['tag']}", ["ls", "-a", "/usr/local/airflow"])
    assert "kept.txt" in out and "secret.txt" not in out
    # deployd's labelled copy of the Dockerfile never reaches the image.
    assert ".deployd.Dockerfile" not in out and "Dockerfile" in out
    # Without a .dockerignore of the project's own, nothing of deployd's is shipped either.
    (project / ".dockerignore").unlink()
    commit_all(project, "Drop .dockerignore")
    proc, rec = deploy(d, project, "ignore")
    assert proc.returncode == 0, proc.stderr
    assert rec is not None
    out = _run_in_image(docker_api, f"{image}:{rec['tag']}", ["ls", "-a", "/usr/local/airflow"])
    assert "secret.txt" in out
    assert ".deployd.Dockerfile" not in out and ".dockerignore" not in out


def _run_in_image(docker_api: Any, image: str, argv: list[str]) -> str:
    c = docker_api.create_container(image, command=argv, network_disabled=True)
    try:
        docker_api.start(c["Id"])
        docker_api.wait(c["Id"], timeout=60)
        return str(docker_api.logs(c["Id"]).decode())
    finally:
        docker_api.remove_container(c["Id"], force=True)


def test_no_dockerfile(tmp_path: Path, testenv: Infra, make_deployd: Any) -> None:
    d = make_deployd({"name": "nodockerfile", "image": repo_for(testenv, "nodockerfile")})
    project = make_project(tmp_path / "p", testenv.airflow_image)
    (project / "Dockerfile").unlink()
    commit_all(project, "Remove the Dockerfile")
    proc, rec = deploy(d, project, "nodockerfile")
    assert proc.returncode == 1
    assert rec is not None and rec["state"] == "failed" and rec["step"] == "build"
    assert "no Dockerfile" in rec["error"]


def test_failing_dockerfile_names_the_instruction(
    tmp_path: Path, testenv: Infra, make_deployd: Any, docker_api: Any
) -> None:
    d = make_deployd({"name": "badbuild", "image": repo_for(testenv, "badbuild")})
    project = make_project(
        tmp_path / "p",
        testenv.busybox_image,
        dockerfile=(
            f"FROM {testenv.busybox_image}\nRUN echo compiling the plugins\n"
            "RUN echo step two output && exit 3\n"
        ),
    )
    proc, rec = deploy(d, project, "badbuild")
    assert proc.returncode == 1
    assert rec is not None and rec["state"] == "failed" and rec["step"] == "build"
    assert "Step 3/" in rec["error"] and "RUN echo step two output && exit 3" in rec["error"]
    assert "returned a non-zero code: 3" in rec["error"]
    assert "step two output" in proc.stderr
    assert leftovers(docker_api, d.state_dir, rec["id"]) == []


BAD_DAGS = {
    "good.py": GOOD_DAG.format(dag_id="good"),
    "syntax_error.py": "from airflow.sdk import DAG\n\nwith DAG('x' as d:\n    pass\n",
    "missing_module.py": "from airflow.sdk import DAG\nimport pandas_that_does_not_exist\n",
    "hangs.py": "# airflow dag\nimport time\nwhile True:\n    time.sleep(0.1)\n",
    "hungry.py": "# airflow dag\nblocks = []\nwhile True:\n"
    "    blocks.append(bytearray(50 * 2**20))\n",
    "chatty.py": "# airflow dag\nimport sys\nfor _ in range(100_000):\n"
    "    sys.stdout.write('x' * 500 + '\\n')\n" + GOOD_DAG.format(dag_id="chatty"),
    "exits.py": "# airflow dag\nimport sys\nsys.exit(3)\n",
    # Ignores Airflow's own import timeout (SIGALRM): deployd's cut-off must name it.
    "stubborn.py": "# airflow dag\nimport signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
    "while True:\n    pass\n",
    "helper.py": "def helper():\n    return 1\n",  # no 'airflow'/'dag': never imported
    "ignored_by_glob.py": "# airflow dag\nraise RuntimeError('must be ignored')\n",
}


def test_dag_import_errors_block_and_are_named(
    tmp_path: Path, testenv: Infra, make_deployd: Any, docker_api: Any
) -> None:
    image = repo_for(testenv, "baddags")
    d = make_deployd(
        {"name": "baddags", "image": image, "import_timeout_seconds": 3, "check_memory_mb": 768}
    )
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dags=BAD_DAGS,
        files={"dags/.airflowignore": "ignored_by_*.py\n"},
    )
    started = time.monotonic()
    proc, rec = deploy(d, project, "baddags")
    assert time.monotonic() - started < 120
    assert proc.returncode == 1, proc.stderr
    assert rec is not None and rec["state"] == "failed" and rec["step"] == "parse"
    files = rec["report"]["files"]
    assert set(files) == {
        f"dags/{n}" for n in BAD_DAGS if n not in ("helper.py", "ignored_by_glob.py")
    }
    assert files["dags/good.py"]["status"] == "ok" and files["dags/good.py"]["dags"] == ["good"]
    assert files["dags/chatty.py"]["status"] == "ok"
    assert files["dags/chatty.py"]["output_bytes"] > 50_000_000
    err = {n.split("/")[1]: f.get("error") for n, f in files.items()}
    assert err["syntax_error.py"]["kind"] == "SyntaxError" and err["syntax_error.py"]["line"] == 3
    assert err["missing_module.py"]["kind"] == "ModuleNotFoundError"
    assert err["missing_module.py"]["line"] == 2
    assert "pandas_that_does_not_exist" in err["missing_module.py"]["message"]
    assert err["hangs.py"]["kind"] == "AirflowTaskTimeout"
    assert err["stubborn.py"]["kind"] == "Timeout"
    assert "did not finish importing within" in err["stubborn.py"]["message"]
    assert err["hungry.py"]["kind"] == "Crash" and "out of memory" in err["hungry.py"]["message"]
    assert "sys.exit(3)" in err["exits.py"]["message"] or err["exits.py"]["kind"] == "SystemExit"
    # The pusher sees every broken file with its reason, in one line and in detail.
    for name in ("syntax_error.py", "missing_module.py", "hangs.py", "hungry.py", "stubborn.py"):
        assert f"dags/{name}" in proc.stderr
    assert "failed to import" in rec["error"]
    # 50 MB of output never reached the log.
    assert len(proc.stderr) < 200_000
    assert leftovers(docker_api, d.state_dir, rec["id"]) == []
    assert testenv.manifest_digest(image, f"deploy-x-{rec['id']}") is None

    # force: still shown and recorded, but deployed.
    proc2, rec2 = deploy(d, project, "baddags", "--force")
    assert proc2.returncode == 0, proc2.stderr
    assert rec2 is not None and rec2["state"] == "succeeded" and rec2["options"]["force"]
    assert rec2["report"]["files"]["dags/syntax_error.py"]["status"] == "error"
    assert "dags/syntax_error.py" in proc2.stderr and "deployed anyway" in proc2.stderr


def test_exceptions_file_allows_a_broken_dag(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd({"name": "allowed", "image": repo_for(testenv, "allowed")})
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dags={
            "good.py": GOOD_DAG.format(dag_id="good"),
            "legacy.py": "from airflow.sdk import DAG\nimport legacy_thing\n",
        },
        files={".astro/dag_integrity_exceptions.txt": "# known broken\ndags/legacy.py\n"},
    )
    proc, rec = deploy(d, project, "allowed")
    assert proc.returncode == 0, proc.stderr
    assert rec is not None and rec["report"]["files"]["dags/legacy.py"]["status"] == "allowed"


def test_pytest_failures_block_even_with_force(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd({"name": "tests", "image": repo_for(testenv, "tests")})
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        files={
            "tests/dags/test_dag_example.py": "def test_ok():\n    assert True\n\n"
            "def test_broken():\n    assert 1 == 2\n"
        },
    )
    proc, rec = deploy(d, project, "tests", "--pytest", "--force")
    assert proc.returncode == 1
    assert rec is not None and rec["step"] == "pytest" and "1 failed, 1 passed" in rec["error"]
    assert "tests/dags/test_dag_example.py::test_broken" in rec["error"]
    assert "test_broken" in proc.stderr
    junit = _artifact(d, rec["id"], "pytest-junit.xml")
    assert '<testcase classname="tests.dags.test_dag_example" name="test_broken"' in junit
    assert "<failure" in junit
    counts = json.loads(_artifact(d, rec["id"], "pytest-summary.json"))
    assert {k: counts[k] for k in ("passed", "failed", "errors")} == {
        "passed": 1,
        "failed": 1,
        "errors": 0,
    }
    assert counts["failing"] == ["tests/dags/test_dag_example.py::test_broken"]

    (project / "tests/dags/test_dag_example.py").write_text("def test_ok():\n    assert True\n")
    commit_all(project, "Fix the test")
    proc, rec = deploy(d, project, "tests", "--pytest")
    assert proc.returncode == 0, proc.stderr
    assert rec is not None
    assert {s["name"]: s["summary"] for s in rec["steps"]}["pytest"] == "1 passed"


def _artifact(d: Deployd, deploy_id: int, name: str) -> str:
    from daemon.adapters.records import Records

    content = Records(d.state_dir / "deployd.db").artifact(deploy_id, name)
    assert content is not None, f"no {name} kept with deploy #{deploy_id}"
    return content


def test_registry_down_retries_then_exit_4(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd({"name": "down", "image": "127.0.0.1:9/airflow/down"})
    project = make_project(tmp_path / "p", testenv.airflow_image)
    proc, rec = deploy(d, project, "down")
    assert proc.returncode == 4, proc.stderr
    assert rec is not None and rec["state"] == "failed"
    assert "could not be reached after 4 attempts" in rec["error"]
    assert proc.stderr.count("retrying in") == 3


def test_wrong_registry_password_fails_at_once(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    (tmp_path / "wrong").write_text("not-the-password\n")
    d = make_deployd(
        {"name": "wrongpw", "image": repo_for(testenv, "wrongpw")},
        registry={
            "url": testenv.registry,
            "username": testenv.registry_user,
            "password_file": str(tmp_path / "wrong"),
        },
    )
    project = make_project(tmp_path / "p", testenv.airflow_image)
    proc, rec = deploy(d, project, "wrongpw")
    assert proc.returncode == 1
    assert rec is not None and rec["step"] == "push" and "refused the push" in rec["error"]
    assert "retrying" not in proc.stderr


def test_usage_errors_exit_2_and_record_nothing(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd({"name": "usage", "image": repo_for(testenv, "usage")})
    project = make_project(tmp_path / "p", testenv.airflow_image)
    proc = d.run("deploy", "nosuch", str(project))
    assert proc.returncode == 2 and "no deployment named 'nosuch'" in proc.stderr
    (project / "dags" / "example_dag.py").write_text("# half-edited\n")
    proc = d.run("deploy", "usage", str(project))
    assert proc.returncode == 2 and "uncommitted changes (dags/example_dag.py)" in proc.stderr
    assert d.run("deploys", "--json").stdout.strip() == "[]"
    # --allow-dirty deploys the HEAD commit, not the edit.
    proc, rec = deploy(d, project, "usage", "--allow-dirty")
    assert proc.returncode == 0, proc.stderr
    assert rec is not None and rec["options"]["allow_dirty"]
    assert rec["report"]["files"]["dags/example_dag.py"]["dags"] == ["example"]


def test_docker_unreachable_exit_4(tmp_path: Path, testenv: Infra, make_deployd: Any) -> None:
    d = make_deployd({"name": "nodocker", "image": repo_for(testenv, "nodocker")})
    text = d.config.read_text().replace(testenv.docker_host, f"unix://{tmp_path}/none.sock")
    d.config.write_text(text)
    project = make_project(tmp_path / "p", testenv.airflow_image)
    proc = d.run("deploy", "nodocker", str(project))
    assert proc.returncode == 4 and "Docker Engine" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_two_processes_deploy_one_after_the_other(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd({"name": "serial", "image": repo_for(testenv, "serial")})
    project = make_project(tmp_path / "p", testenv.airflow_image)
    results: list[subprocess.CompletedProcess[str]] = []

    def one() -> None:
        results.append(d.run("deploy", "serial", str(project), "--json"))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    # In the order they got the lock (the order they queued, not always their ids' order).
    recs = sorted((json.loads(r.stdout) for r in results), key=lambda r: r["started_at"])
    assert recs[0]["finished_at"] <= recs[1]["started_at"]
    waited = next(r for r in results if json.loads(r.stdout)["id"] == recs[1]["id"])
    assert f"queued behind deploy #{recs[0]['id']}" in waited.stderr
    assert recs[0]["tag"] != recs[1]["tag"]


def test_old_local_images_are_pruned(
    tmp_path: Path, testenv: Infra, make_deployd: Any, docker_api: Any
) -> None:
    # Local images outlive a test run; a fresh name keeps earlier runs' images out of the count.
    name = f"prune-{uuid.uuid4().hex[:8]}"
    d = make_deployd({"name": name, "image": repo_for(testenv, name), "keep_images": 2})
    project = make_project(tmp_path / "p", testenv.airflow_image)
    ids = []
    for i in range(3):
        commit_all(project, f"change {i}")
        proc, rec = deploy(d, project, name)
        assert proc.returncode == 0, proc.stderr
        assert rec is not None
        ids.append(rec["id"])
    images = docker_api.images(filters={"label": f"deployd.deployment={name}"})
    kept = sorted(int(i["Labels"]["deployd.deploy-id"]) for i in images)
    assert kept == ids[1:]


def test_whole_check_is_cut_off_at_check_timeout(
    tmp_path: Path, testenv: Infra, make_deployd: Any, docker_api: Any
) -> None:
    d = make_deployd(
        {
            "name": "slowcheck",
            "image": repo_for(testenv, "slowcheck"),
            "import_timeout_seconds": 120,
            "check_timeout_seconds": 6,
        }
    )
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dags={"slow.py": "# airflow dag\nimport time\ntime.sleep(120)\n"},
    )
    started = time.monotonic()
    proc, rec = deploy(d, project, "slowcheck")
    assert time.monotonic() - started < 60
    assert proc.returncode == 1
    assert rec is not None and rec["step"] == "parse"
    assert "did not finish within 6 s (check_timeout_seconds)" in rec["error"]
    assert leftovers(docker_api, d.state_dir, rec["id"]) == []


def test_logs_follow_streams_until_the_deploy_ends(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    d = make_deployd({"name": "follow", "image": repo_for(testenv, "follow")})
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dags={
            "slowish.py": "# airflow dag\nimport time\ntime.sleep(4)\n"
            + GOOD_DAG.format(dag_id="slowish")
        },
    )
    deployer = d.start("deploy", "follow", str(project))
    db = d.state_dir / "deployd.db"
    deadline = time.monotonic() + 60
    while not db.exists() or "follow" not in d.run("deploys").stdout:
        assert time.monotonic() < deadline and deployer.poll() is None
        time.sleep(0.05)
    follower = d.run("logs", "1", "--follow", timeout=120)
    _, err = deployer.communicate(timeout=120)
    assert deployer.returncode == 0, err
    assert follower.returncode == 0
    assert "-----> parse" in follower.stdout
    assert follower.stdout.rstrip().splitlines()[-1].startswith("-----> deployed ")
    assert d.run("logs", "999").returncode == 2
    assert d.run("logs", "abc").returncode == 2


def test_state_is_private_whatever_the_umask_and_a_non_root_image_reads_the_project(
    tmp_path: Path, testenv: Infra, make_deployd: Any
) -> None:
    # Astro Runtime images run as the non-root `astro` user; this one runs as uid 50000.
    d = make_deployd({"name": "private", "image": repo_for(testenv, "private"), "pytest": True})
    project = make_project(
        tmp_path / "p",
        testenv.airflow_image,
        dockerfile=f"FROM {testenv.airflow_image}\nUSER 50000\n",
    )
    old = os.umask(0o022)  # as when run by hand from a shell
    try:
        proc, rec = deploy(d, project, "private")
        listed = d.run("deploys")
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    assert rec is not None and rec["state"] == "succeeded"
    assert listed.returncode == 0, listed.stderr
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(d.state_dir) == 0o700
    for name in ("deployd.db", "deployd.db-wal", "deployd.db-shm"):
        if (d.state_dir / name).exists():
            assert mode(d.state_dir / name) == 0o600, name
    repos = d.state_dir / "repos"
    assert mode(repos) == 0o700 and mode(repos / "private.git") == 0o700
    readable = [
        p for p in d.state_dir.rglob("*") if p.is_file() and not p.is_symlink() and mode(p) & 0o044
    ]
    assert readable == [] or all("hooks" in p.parts for p in readable), readable
