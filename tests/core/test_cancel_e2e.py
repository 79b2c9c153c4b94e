"""`deployd cancel`, `ssh ... cancel` and `POST /api/deploys/{id}/cancel` against the real
Engine, registry and Kubernetes simulator, with deploys run by `deployd deploy` in another
process and by `deployd serve`.

Each case makes one step slow through the project (a `RUN sleep`, a DAG sleeping at import,
a slow test, a large random layer, a slow Job or a rollout that never becomes ready in the
simulator), waits until the deploy is in it, cancels, and then looks at what is left: the
record and log, the Engine's containers, the registry's tags, manifests and uploads, and the
cluster. The pipeline's logic with fakes: tests/core/test_cancel.py.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.core.usecases import local_actor
from tests.steps.test_roll import SCENARIO, create, kubectl, pod_template, scheduler, wait_rolled
from tests.support.kubesim import Fault, KubeSim
from tests.support.projects import GOOD_DAG, make_project
from tests.support.sshserver import Server, make_server
from tests.support.testenv import ENV_FILE, Deployd, Infra

pytestmark = pytest.mark.integration

# How long after a cancel the Engine and the registry are looked at: "a few seconds later".
SETTLE_SECONDS = 2.0
ACK_SECONDS = 2.0  # a running deploy acknowledges a cancel within this
STOP_SECONDS = 5.0  # ... and a step that stops at once (not a roll) has stopped by then


# -- what the records, the Engine and the registry show --------------------------------


def row(state_dir: Path, ident: int) -> dict[str, Any] | None:
    db = state_dir / "deployd.db"
    if not db.exists():
        return None
    conn = sqlite3.connect(db, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute("SELECT * FROM deploys WHERE id = ?", [ident]).fetchone()
        if found is None:
            return None
        steps = conn.execute("SELECT name, state FROM steps WHERE deploy_id = ?", [ident])
        log = conn.execute("SELECT ts, line FROM log WHERE deploy_id = ? ORDER BY id", [ident])
        return {**dict(found), "steps": dict(steps.fetchall()), "log": log.fetchall()}
    except sqlite3.OperationalError:  # not migrated yet
        return None
    finally:
        conn.close()


def wait_for(
    what: str,
    condition: Callable[[], object],
    timeout: float = 180,
    facts: Callable[[], object] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; {facts()}"
        time.sleep(0.02)


def in_step(state_dir: Path, ident: int, step: str) -> bool:
    rec = row(state_dir, ident)
    return bool(rec) and rec["step"] == step and rec["steps"].get(step) == "running"  # type: ignore[index]


class RequestSeen(threading.Thread):
    """Watches (every 2 ms, one cheap read) for the moment a cancel request of deploy `ident`
    lands in the records; started before the command that asks for it."""

    def __init__(self, state_dir: Path, ident: int) -> None:
        super().__init__(daemon=True)
        self.db, self.deploy_id = state_dir / "deployd.db", ident
        self.at: float | None = None
        self.start()

    def run(self) -> None:
        conn = sqlite3.connect(self.db, timeout=5)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                got = conn.execute(
                    "SELECT cancelled_by FROM deploys WHERE id = ?", [self.deploy_id]
                ).fetchone()
                if got and got[0]:
                    self.at = time.time()
                    return
                time.sleep(0.002)
        finally:
            conn.close()


def acknowledged(state_dir: Path, ident: int, seen: RequestSeen) -> float:
    """Seconds from the cancel request landing in the records to the running process's
    acknowledgement in its log."""

    def ack() -> float | None:
        for ts, line in (row(state_dir, ident) or {}).get("log", []):
            if "-----> cancel asked by" in line:
                return float(ts)
        return None

    wait_for("the acknowledgement", ack, 30)
    seen.join(30)
    assert seen.at is not None, "the cancel request never reached the records"
    return (ack() or 0.0) - seen.at


def stopped_after(state_dir: Path, ident: int, asked: float) -> float:
    """Seconds from `asked` (the request) to the deploy's end (its record's finished_at)."""
    return float((row(state_dir, ident) or {})["finished_at"]) - asked


def registry_get(infra: Infra, path: str) -> Any:
    auth = base64.b64encode(f"{infra.registry_user}:{infra.registry_password}".encode()).decode()
    req = urllib.request.Request(
        f"http://{infra.registry}{path}", headers={"Authorization": f"Basic {auth}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def tags(infra: Infra, image: str) -> list[str]:
    """What /v2/<repo>/tags/list says (no repository: no tags)."""
    listed = registry_get(infra, f"/v2/{image.split('/', 1)[1]}/tags/list")
    return sorted((listed or {}).get("tags") or [])


def storage(infra: Infra, image: str) -> Path:
    """The registry's own files for `image` (scripts/testenv.sh keeps them under its run dir)."""
    root = ENV_FILE.parent / "registry-data" / "docker" / "registry" / "v2" / "repositories"
    return root / image.split("/", 1)[1]


def manifests(infra: Infra, image: str) -> list[str]:
    """Every manifest revision the registry stored for `image` (tagged or not)."""
    revisions = storage(infra, image) / "_manifests" / "revisions" / "sha256"
    return sorted(p.name for p in revisions.iterdir()) if revisions.is_dir() else []


def uploads(infra: Infra, image: str) -> dict[str, int]:
    """The blob uploads in progress for `image`: their bytes received so far."""
    root = storage(infra, image) / "_uploads"
    if not root.is_dir():
        return {}
    return {p.name: (p / "data").stat().st_size for p in root.iterdir() if (p / "data").exists()}


def settled_uploads(infra: Infra, image: str, within: float = 3.0) -> dict[str, int]:
    """The uploads for `image` once they have stopped growing: the bytes in flight on
    loopback sockets (and the registry's write buffer) when the Engine cut the upload
    still land for a moment. An upload still running moves megabytes in that time, so it
    never settles and this fails."""
    deadline = time.monotonic() + within
    sizes = uploads(infra, image)
    while True:
        time.sleep(0.5)
        again = uploads(infra, image)
        if again == sizes:
            return sizes
        assert time.monotonic() < deadline, f"uploads still growing after {within} s: {again}"
        sizes = again


def leftovers(docker_api: Any, commit: str, nonce: str) -> list[str]:
    """Containers of the deploy of `commit` (check containers carry its labels) and its
    build's step containers (the legacy builder's carry no labels before deployd's LABEL
    line: found by the nonce in the RUN). The Engine is shared with other tests."""
    out = []
    for c in docker_api.containers(all=True):
        labels = c.get("Labels") or {}
        if labels.get("deployd.commit") == commit or nonce in (c.get("Command") or ""):
            out.append(f"{c['Id'][:12]} {c.get('Command')} {c.get('State')}")
    return out


def connections_to_registry(infra: Infra, pid: int) -> list[str]:
    """TCP connections process `pid` holds to the registry."""
    out = subprocess.run(
        ["ss", "-Htnp", "dst", infra.registry], capture_output=True, text=True, check=True
    ).stdout
    return [ln for ln in out.splitlines() if f"pid={pid}," in ln]


def slow_project(root: Path, infra: Infra, step: str, nonce: str) -> Path:
    """A project that spends a minute in `step` (or long enough to upload, for push).

    The nonce in each slow RUN keeps the Engine's layer cache from making it instant,
    and names the build's containers.
    """
    base = infra.airflow_image
    if step == "build":
        return make_project(root, base, dockerfile=f"FROM {base}\nRUN echo {nonce} && sleep 60\n")
    if step == "parse":
        slow = "# airflow dag\nimport time\ntime.sleep(60)\n"
        return make_project(root, base, dags={"slow.py": slow}, files={"nonce.txt": nonce})
    if step == "pytest":
        slow_test = "import time\n\n\ndef test_slow():\n    time.sleep(60)\n"
        return make_project(
            root,
            base,
            files={"tests/dags/test_dag_example.py": slow_test, "nonce.txt": nonce},
        )
    if step == "push":
        big = f"RUN echo {nonce} && head -c 400000000 /dev/urandom > /opt/big.bin\n"
        return make_project(root, base, dockerfile=f"FROM {base}\n{big}")
    raise AssertionError(step)


# -- a `deployd deploy` in another process, cancelled from the CLI -------------------------


@pytest.mark.parametrize("step", ["build", "parse", "pytest", "push"])
def test_deployd_cancel_stops_a_deploy_run_by_another_process(
    step: str, tmp_path: Path, testenv: Infra, make_deployd: Any, docker_api: Any
) -> None:
    nonce = uuid.uuid4().hex[:12]
    name = f"cancel-{step}"
    image = f"{testenv.registry}/airflow/cancel-{step}-{nonce}"  # a repository of its own
    d = make_deployd(
        {"name": name, "image": image, "import_timeout_seconds": 120, "check_timeout_seconds": 300}
    )
    project = slow_project(tmp_path / "p", testenv, step, nonce)
    deploy = d.start("deploy", name, str(project), *(["--pytest"] if step == "pytest" else []))
    try:
        state = d.state_dir

        def busy() -> bool:
            if not in_step(state, 1, step):
                return False
            if step == "build":  # the RUN's container is up
                running = docker_api.containers(filters={"status": "running"})
                return any(nonce in (c.get("Command") or "") for c in running)
            if step in ("parse", "pytest"):  # the check container is up
                labels = [f"deployd.deployment={name}", "deployd.role=check"]
                return bool(docker_api.containers(filters={"label": labels}))
            return sum(uploads(testenv, image).values()) > 0  # layers are on their way

        wait_for(f"deploy #1 in {step}", lambda: busy() or deploy.poll() is not None)
        assert deploy.poll() is None, deploy.communicate()
        time.sleep(0.5)  # under way: output streaming, bytes moving
        seen = RequestSeen(state, 1)
        canceller = d.start("cancel", "1")
        try:
            ack = acknowledged(state, 1, seen)
            out, err = canceller.communicate(timeout=60)
        finally:
            if canceller.poll() is None:
                canceller.kill()
        dout, derr = deploy.communicate(timeout=60)
    finally:
        if deploy.poll() is None:
            deploy.kill()
    rec = d.record(1)
    who = local_actor()  # the canceller runs as this user on this host
    assert rec["cancelled_by"] == who
    # The canceller says how it ended; the deploy it stopped exits 1 saying the same.
    assert canceller.returncode == 0, err
    assert out == f"deploy #1 cancelled by {who} during {step}\n"
    assert f"deploy #1 of {name} (in {step}): cancel asked; waiting for it to stop" in err
    assert deploy.returncode == 1, derr
    assert dout == f"deploy #1 cancelled: cancelled by {who} during {step}\n"
    assert f"-----> cancel asked by {who} during {step}: stopping" in derr
    # The record: cancelled, by whom, in which step.
    assert (rec["state"], rec["step"], rec["error"]) == (
        "cancelled",
        step,
        f"cancelled by {who} during {step}",
    )
    steps = {s["name"]: s["state"] for s in rec["steps"]}  # type: ignore[attr-defined]
    assert steps[step] == "cancelled"
    assert ack < ACK_SECONDS, f"acknowledged after {ack:.2f} s"
    # Stopped, not walked away from: the build's stream cut (the Engine cancels it), the
    # check container killed, the upload's stream cut, each waited for; in seconds.
    assert seen.at is not None
    stopped = stopped_after(state, 1, seen.at)
    assert stopped < STOP_SECONDS, f"stopped after {stopped:.2f} s"
    sizes = settled_uploads(testenv, image)
    time.sleep(SETTLE_SECONDS)
    assert leftovers(docker_api, str(rec["commit"]), nonce) == []
    if step in ("build", "push"):
        # Nothing was uploaded to the end: no tag, not even the staging one, and no manifest.
        assert tags(testenv, image) == []
        assert manifests(testenv, image) == []
    else:
        # The upload beside the checks may have finished (staging tag), never the deploy tag.
        assert set(tags(testenv, image)) <= {"deployd-staging"}
        assert len(manifests(testenv, image)) <= 1
    # No upload is held open: what the registry had received stopped growing.
    assert uploads(testenv, image) == sizes
    if step == "push":
        assert sizes, "the cancel came after the upload had finished; nothing was tested"
        assert sum(sizes.values()) < 400_000_000  # it was stopped midway
    if step == "build":  # the refusals, once: exit 2 with one line
        again = d.run("cancel", "1")
        assert (again.returncode, again.stdout, again.stderr) == (
            2,
            "",
            f"deployd: deploy #1 has already ended (cancelled by {who}); "
            "there is nothing to cancel.\n",
        )
        missing = d.run("cancel", "2")
        assert (missing.returncode, missing.stderr) == (2, "deployd: there is no deploy #2.\n")
    print(f"{step}: acknowledged in {ack:.2f} s, stopped in {stopped:.2f} s")  # shown with -s


# -- `deployd serve`: pushes waiting on their deploys, SSH and the API ------------------


@pytest.fixture
def served(tmp_path: Path, testenv: Infra) -> Iterator[Server]:
    # The server's image repositories are named after its folder's last 8 characters.
    srv = make_server(tmp_path / f"srv-{uuid.uuid4().hex[:8]}", testenv)
    token = tmp_path / "api-token"
    token.write_text("api-t0ken\n")
    srv.config.write_text(
        srv.config.read_text().replace("[docker]", f'api_token_file = "{token}"\n\n[docker]', 1)
    )
    srv.start()
    yield srv
    srv.stop()


def api_cancel(srv: Server, ident: int, token: str = "api-t0ken") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{srv.http_port}/api/deploys/{ident}/cancel",
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def pushing(srv: Server, repo: Path, key: str = "alice") -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["git", "-C", str(repo), "push", "astro", "main"],
        stderr=subprocess.PIPE,
        text=True,
        env=srv.git_env(key),
    )


def remote_head(srv: Server, repo: Path) -> str:
    out = srv.git(repo, "ls-remote", "astro", "refs/heads/main")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[0] if out.stdout.strip() else ""


def test_pushers_see_who_cancelled_queued_and_running_deploys(
    tmp_path: Path, testenv: Infra, served: Server, docker_api: Any
) -> None:
    srv = served
    nonce = uuid.uuid4().hex[:12]
    first = slow_project(tmp_path / "first", testenv, "build", nonce)
    subprocess.run(["git", "-C", str(first), "remote", "add", "astro", srv.url()], check=True)
    second = make_project(
        tmp_path / "second", testenv.airflow_image, dags={"b.py": GOOD_DAG.format(dag_id="b")}
    )
    subprocess.run(["git", "-C", str(second), "remote", "add", "astro", srv.url()], check=True)
    running = pushing(srv, first)
    queued: subprocess.Popen[str] | None = None
    try:
        wait_for("deploy #1 in build", lambda: in_step(srv.state_dir, 1, "build"))
        # A second push waits behind it (a force-push: another history, the same branch).
        queued = subprocess.Popen(
            ["git", "-C", str(second), "push", "-f", "astro", "main"],
            stderr=subprocess.PIPE,
            text=True,
            env=srv.git_env("root"),
        )
        wait_for("deploy #2 queued", lambda: (row(srv.state_dir, 2) or {}).get("state") == "queued")
        # The API cancels the queued one at once; its pusher is told and refused.
        status, body = api_cancel(srv, 2)
        assert status == 200, body
        assert (body["state"], body["cancelled_by"], body["error"]) == (
            "cancelled",
            "api",
            "cancelled by api while queued",
        )
        _, qerr = queued.communicate(timeout=30)
        assert queued.returncode != 0
        assert "remote: -----> cancelled: cancelled by api while queued" in qerr
        assert "pre-receive hook declined" in qerr
        assert running.poll() is None  # the running one goes on
        # Refusals: another deployment's key, an id that does not exist, a bad token.
        other = srv.ssh("cancel", "1", key="bob")
        assert (other.returncode, other.stdout) == (2, "")
        assert other.stderr == "deployd: there is no deploy #1 that key bob may cancel.\n"
        missing = srv.ssh("cancel", "99")
        assert (missing.returncode, missing.stderr) == (
            2,
            "deployd: there is no deploy #99 that key alice may cancel.\n",
        )
        assert api_cancel(srv, 99)[0] == 404
        assert api_cancel(srv, 1, token="wrong")[0] == 401
        # alice cancels the running one over SSH; her command follows it to its end.
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        thread = threading.Thread(target=lambda: result.update(r=srv.ssh("cancel", "1")))
        seen = RequestSeen(srv.state_dir, 1)
        thread.start()
        ack = acknowledged(srv.state_dir, 1, seen)
        thread.join(60)
        _, perr = running.communicate(timeout=60)
    finally:
        for proc in (running, queued):
            if proc is not None and proc.poll() is None:
                proc.kill()
    mine = result["r"]
    assert mine.returncode == 0, mine.stderr
    assert mine.stdout == "deploy #1 cancelled by alice during build\n"
    assert "-----> cancel asked by alice during build: stopping" in mine.stderr
    assert ack < ACK_SECONDS, f"acknowledged after {ack:.2f} s"
    assert seen.at is not None
    stopped = stopped_after(srv.state_dir, 1, seen.at)
    assert stopped < STOP_SECONDS, f"stopped after {stopped:.2f} s"
    print(f"ssh, build: acknowledged in {ack:.2f} s, stopped in {stopped:.2f} s")  # with -s
    # The pusher saw who cancelled it in which step, and the push was rejected.
    assert running.returncode != 0
    assert "remote: -----> deploy #1 cancelled: cancelled by alice during build" in perr
    assert "pre-receive hook declined" in perr
    assert remote_head(srv, first) == ""  # the branch did not move
    rec = row(srv.state_dir, 1)
    assert rec is not None
    assert (rec["state"], rec["step"], rec["cancelled_by"]) == ("cancelled", "build", "alice")
    assert rec["steps"]["build"] == "cancelled"
    time.sleep(SETTLE_SECONDS)
    assert leftovers(docker_api, str(rec["commit_sha"]), nonce) == []
    image = next(ln.split('"')[1] for ln in srv.config.read_text().splitlines() if "ssh-prod" in ln)
    assert tags(testenv, image) == []
    assert srv.proc is not None and connections_to_registry(testenv, srv.proc.pid) == []
    # Ended now: refused, saying how it ended.
    again = srv.ssh("cancel", "1")
    assert (again.returncode, again.stderr) == (
        2,
        "deployd: deploy #1 has already ended (cancelled by alice); there is nothing to cancel.\n",
    )
    status, body = api_cancel(srv, 1)
    assert status == 409 and "has already ended (cancelled by alice)" in body["error"]


def test_a_failed_check_leaves_no_upload_running(
    tmp_path: Path, testenv: Infra, served: Server, docker_api: Any
) -> None:
    """Not only a cancel: when the DAG check fails while the image uploads beside it, the
    upload is stopped on the Engine, though `deployd serve` (whose connection to the
    Engine would otherwise carry it on) keeps running."""
    srv = served
    nonce = uuid.uuid4().hex[:12]
    base = testenv.airflow_image
    big = f"RUN echo {nonce} && head -c 400000000 /dev/urandom > /opt/big.bin\n"
    repo = make_project(
        tmp_path / "p",
        base,
        dockerfile=f"FROM {base}\n{big}",
        dags={"broken.py": "from airflow.sdk import DAG\nimport nope_nope\n"},
    )
    subprocess.run(["git", "-C", str(repo), "remote", "add", "astro", srv.url()], check=True)
    push = srv.git(repo, "push", "astro", "main", timeout=300)
    assert push.returncode != 0
    assert "dags/broken.py: ModuleNotFoundError" in push.stderr
    rec = row(srv.state_dir, 1)
    assert rec is not None and (rec["state"], rec["step"]) == ("failed", "parse")
    assert rec["steps"]["push"] == "cancelled"
    image = next(ln.split('"')[1] for ln in srv.config.read_text().splitlines() if "ssh-prod" in ln)
    sizes = settled_uploads(testenv, image)
    time.sleep(SETTLE_SECONDS)
    assert sizes and sum(sizes.values()) < 400_000_000  # it had started, and was stopped
    assert uploads(testenv, image) == sizes  # nothing is held open: no byte more arrived
    assert tags(testenv, image) == [] and manifests(testenv, image) == []
    assert leftovers(docker_api, str(rec["commit_sha"]), nonce) == []
    assert srv.proc is not None and connections_to_registry(testenv, srv.proc.pid) == []


# -- Kubernetes: preflight, the migration Job, the rollout -------------------------------


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[KubeSim]:
    s = KubeSim(tmp_path / "kubesim").start()
    yield s
    s.stop()


def test_cancel_in_preflight_during_a_migration_and_during_the_rollout(
    tmp_path: Path,
    testenv: Infra,
    sim: KubeSim,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One daemon and cluster, three pushes: each cancelled in another place of the
    Kubernetes half, by another surface."""
    srv = make_server(
        tmp_path / f"srv-{uuid.uuid4().hex[:8]}",
        testenv,
        extra={
            "namespace": "airflow",
            "workloads": ["deployment/airflow-scheduler"],
            "rollout_timeout_seconds": 300,
        },
    )
    token = tmp_path / "api-token"
    token.write_text("api-t0ken\n")
    text = srv.config.read_text().replace("[docker]", f'api_token_file = "{token}"\n\n[docker]', 1)
    srv.config.write_text(text + f'\n[kubernetes]\nkubeconfig = "{sim.kubeconfig}"\n')
    image = next(ln.split('"')[1] for ln in text.splitlines() if "ssh-prod" in ln)
    create(sim, tmp_path, scheduler(f"{image}:before", deadline=600))
    wait_rolled(sim, "deployment/airflow-scheduler")
    before = pod_template(sim, "deployment/airflow-scheduler")
    repo = make_project(tmp_path / "p", testenv.airflow_image)
    subprocess.run(["git", "-C", str(repo), "remote", "add", "astro", srv.url()], check=True)
    d = Deployd(srv.config, srv.state_dir)

    def facts(ident: int) -> str:
        rec = row(srv.state_dir, ident) or {}
        log = "\n".join(line for _, line in rec.pop("log", []))
        return f"deploy #{ident}: {rec}\n{log}\nserve: {srv.log()[-2000:]}"

    srv.start()
    try:
        # 1. preflight (its access reviews answer slowly), cancelled from the CLI.
        sim.sim.faults.append(Fault(status=0, delay=10, path="selfsubjectaccessreviews", count=99))
        push = pushing(srv, repo)
        wait_for("deploy #1 in preflight", lambda: in_step(srv.state_dir, 1, "preflight"))
        stopped = d.run("cancel", "1", timeout=60)
        _, perr = push.communicate(timeout=60)
        assert stopped.returncode == 0, stopped.stderr
        who = local_actor()
        assert stopped.stdout == f"deploy #1 cancelled by {who} during preflight\n"
        assert f"remote: -----> deploy #1 cancelled: cancelled by {who} during preflight" in perr
        assert (row(srv.state_dir, 1) or {})["steps"]["build"] == "pending"  # nothing built
        sim.sim.faults.clear()

        # 2. The migration Job (the first deploy migrates), cancelled through the API: the
        # Job runs to its end, then the deploy stops before any workload changed.
        from tests.support.kubesim.controllers import job as job_controller

        monkeypatch.setattr(job_controller, "RUN_TIME", 6.0)
        push = pushing(srv, repo)

        def migrating() -> bool:
            lines = [line for _, line in (row(srv.state_dir, 2) or {}).get("log", [])]
            return any("job/prod-migrate-2 created" in line for line in lines)

        wait_for("the migration Job of deploy #2", migrating, 120, lambda: facts(2))
        seen = RequestSeen(srv.state_dir, 2)
        status, body = api_cancel(srv, 2)
        assert status == 202 and (body["state"], body["cancelled_by"]) == ("running", "api")
        job = json.loads(kubectl(sim, "get", "job", "prod-migrate-2", "-o", "json").stdout)
        assert job["status"].get("active") == 1 and not job["status"].get("succeeded")
        ack = acknowledged(srv.state_dir, 2, seen)
        _, perr = push.communicate(timeout=60)
        rec = row(srv.state_dir, 2)
        assert rec is not None
        assert (rec["state"], rec["step"], rec["cancelled_by"]) == ("cancelled", "roll", "api")
        assert rec["error"] == (
            "cancelled by api during roll: job/prod-migrate-2 (airflow db migrate) "
            "finished first; no workload was changed"
        )
        assert rec["steps"]["roll"] == "cancelled"
        job = json.loads(kubectl(sim, "get", "job", "prod-migrate-2", "-o", "json").stdout)
        assert job["status"]["succeeded"] == 1  # not killed midway: it completed
        assert pod_template(sim, "deployment/airflow-scheduler") == before
        assert f"remote: -----> deploy #2 cancelled: {rec['error']}" in perr
        assert ack < ACK_SECONDS, f"acknowledged after {ack:.2f} s"
        print(f"api, migration: acknowledged in {ack:.2f} s")  # with -s
        monkeypatch.setattr(job_controller, "RUN_TIME", 0.3)

        # 3. The rollout (the new pods never become ready), cancelled over SSH: what it
        # patched is rolled back, and that is waited for.
        kubectl(
            sim,
            "annotate",
            "--overwrite",
            "deployment/airflow-scheduler",
            f"{SCENARIO}=never-ready",
        )
        push = pushing(srv, repo)

        def rolling() -> bool:
            template = pod_template(sim, "deployment/airflow-scheduler")
            return (template["metadata"].get("annotations") or {}).get(
                "deployd.dev/deploy-id"
            ) == "3"

        wait_for("deploy #3 to patch the scheduler", rolling, 120, lambda: facts(3))
        time.sleep(0.5)  # its new pods are failing to become ready
        mine = srv.ssh("cancel", "3", timeout=120)
        _, perr = push.communicate(timeout=60)
        assert mine.returncode == 0, mine.stderr
        done = "cancelled by alice during roll: 1 workload rolled back to what ran before"
        assert mine.stdout == f"deploy #3 {done}\n"
        assert "-----> cancelled by alice during roll: rolling back 1 workload" in mine.stderr
        assert f"remote: -----> deploy #3 cancelled: {done}" in perr
        assert "pre-receive hook declined" in perr
        after = pod_template(sim, "deployment/airflow-scheduler")
        assert after["spec"]["containers"] == before["spec"]["containers"]
        assert after["metadata"].get("annotations") == before["metadata"].get("annotations")
        wait_rolled(sim, "deployment/airflow-scheduler")  # kubectl agrees it is back
        rec = row(srv.state_dir, 3)
        assert rec is not None and rec["steps"]["roll"] == "cancelled"
        assert remote_head(srv, repo) == ""
    finally:
        srv.stop()
