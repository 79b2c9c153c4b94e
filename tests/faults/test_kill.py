"""`kill -9` of `deployd serve` in each step of a push deploy and of a webhook deploy, then a
restart (issue 15, Faults).

After the restart every killed deploy is `interrupted` with the step it died in; the push was
rejected and the server branch did not move; no deploy tag names an image whose checks did
not pass; a cluster the deploy had started to roll is rolled back to what ran before (the
records say so); and a delivery GitHub was told is accepted still runs.

One daemon, simulator and fake GitHub serve the whole module: each case kills the daemon and
starts it again, which is the fault under test.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.faults.world import STAGING_TAG, World, make_world, set_rollout
from tests.support.kubesim import Fault
from tests.support.projects import commit_all, git
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration

STEPS = ["preflight", "checkout", "build", "parse", "pytest", "push", "roll"]
CHECKED = {"push", "roll"}  # steps after the checks: the deploy tag may exist
BIG_FILE = 60 * 2**20  # the checkout exports it (it is .dockerignored)
BIG_LAYER = 50_000_000  # random: a layer the registry does not have


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, testenv: Infra) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("kill"), testenv, pytest=False)
    try:
        w.start()
        # A first deploy of each deployment: every case has something to stay on.
        push = w.start_push()
        _, err = push.communicate(timeout=300)
        assert push.returncode == 0, err
        status, answer, _ = w.deliver(git(w.source, "rev-parse", "HEAD"))
        assert status == 202, answer
        assert w.wait_state(answer["deploys"][0]["id"])["state"] == "succeeded", w.srv.log()
        yield w
    finally:
        w.stop()


def settle(w: World) -> int:
    """A daemon with nothing under way (after a case that failed half-way); the newest id."""
    if w.running() and w.rows("SELECT id FROM deploys WHERE state IN ('queued', 'running')"):
        w.kill()
    if not w.running():
        w.start()
    return max(r["id"] for r in w.rows())


def slow_commit(repo: Path, infra: Infra, step: str) -> str:
    """Commit a change that makes `step` take long enough to be killed in."""
    base = infra.airflow_image
    nonce = uuid.uuid4().hex  # the Engine's layer cache must not make a slow RUN instant
    (repo / "README.md").write_text(f"slow {step} {nonce}\n")
    if step == "checkout":
        with open(repo / "include" / "big.bin", "wb") as fh:
            fh.write(os.urandom(BIG_FILE))
        with open(repo / ".dockerignore", "a") as fh:
            fh.write("include/big.bin\n")
    elif step == "build":
        (repo / "Dockerfile").write_text(f"FROM {base}\nRUN echo {nonce} && sleep 60\n")
    elif step == "parse":
        (repo / "dags" / "slow.py").write_text("# airflow dag\nimport time\ntime.sleep(60)\n")
    elif step == "pytest":
        (repo / "tests" / "dags" / "test_slow.py").write_text(
            "import time\n\n\ndef test_slow():\n    time.sleep(60)\n"
        )
    elif step == "push":
        (repo / "Dockerfile").write_text(
            f"FROM {base}\nRUN echo {nonce} && head -c {BIG_LAYER} /dev/urandom > /opt/big.bin\n"
        )
    return commit_all(repo, f"Slow {step}")


def quick_commit(repo: Path, infra: Infra) -> str:
    """Commit the project back to its quick form (on top of whatever is there)."""
    (repo / "Dockerfile").write_text(f"FROM {infra.airflow_image}\n")
    (repo / ".dockerignore").write_text("astro\n.git\n.env\nairflow_settings.yaml\nlogs/\n")
    for path in ("dags/slow.py", "tests/dags/test_slow.py", "include/big.bin"):
        (repo / path).unlink(missing_ok=True)
    (repo / "README.md").write_text(f"quick {uuid.uuid4().hex}\n")
    return commit_all(repo, "Quick again")


@contextmanager
def slowed(w: World, deployment: str, step: str) -> Iterator[None]:
    """For this block: preflight's access reviews answered late, the registry link stalled
    (the upload outlasts the checks, however long they take), or a slow rollout."""
    if step == "push":
        w.registry.hold()
    if step == "preflight":
        w.sim.sim.faults.append(
            Fault(status=0, delay=60, count=1000, path="selfsubjectaccessreviews")
        )
    if step == "roll":
        set_rollout(w, deployment, "slow", 6)
    try:
        yield
    finally:
        w.registry.release()
        w.sim.sim.faults.clear()
        if step == "roll":
            set_rollout(w, deployment, "instant", 2)


def kill_in(w: World, deployment: str, rec: dict[str, object], step: str) -> None:
    """SIGKILL the daemon now that deploy `rec` is in `step` (a roll: once it is patched)."""
    if step == "roll":
        deadline = time.monotonic() + 60
        while True:
            obj = w.workload(deployment)
            annotations = obj["spec"]["template"]["metadata"].get("annotations") or {}
            observed = obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
            if observed and annotations.get("deployd.dev/deploy-id") == str(rec["id"]):
                break
            assert time.monotonic() < deadline, w.srv.log()
            time.sleep(0.02)
        assert obj["status"].get("updatedReplicas", 0) < 6, obj["status"]  # half-rolled
    elif step != "checkout":
        time.sleep(0.3)  # let the step get going (containers started, layers moving)
    w.kill()


def check_registry(w: World, deployment: str, dead: dict[str, object], step: str) -> None:
    """No deploy tag names an image whose checks did not pass; the killed one's only if its
    checks had passed."""
    tag = f"deploy-{str(dead['commit_sha'])[:7]}-{dead['id']}"
    tags = w.tags(deployment)
    if step not in CHECKED:
        assert tag not in tags, tags
    for other in tags:
        if other == STAGING_TAG:
            continue
        match = re.fullmatch(r"deploy-[0-9a-f]{7}-([0-9]+)", other)
        assert match, other
        steps = w.deploy(int(match.group(1)))["steps"]
        assert steps["parse"] == "succeeded", (other, steps)
        assert steps["pytest"] in ("succeeded", "skipped"), (other, steps)


def check_cluster(
    w: World, deployment: str, dead: dict[str, object], before: dict[str, object], step: str
) -> None:
    """The workload runs what ran before the killed deploy (rolled back if it had been rolled)."""
    ran_before = (str(before["id"]), f"{before['image']}:{before['tag']}@{before['digest']}")
    assert w.template(deployment) == ran_before, (w.template(deployment), dead)
    if step == "roll":
        assert "rolled back" in str(dead["error"]), dead["error"]
        assert f"deployment/{deployment}-scheduler" in str(dead["error"])
        w.kubectl("rollout", "status", f"deployment/{deployment}-scheduler", "--timeout=60s")


def check_interrupted(w: World, deploy_id: int, step: str) -> dict[str, object]:
    dead = w.deploy(deploy_id)
    assert dead["state"] == "interrupted", dead
    assert step in str(dead["step"]).split("+"), dead
    assert dead["steps"][step] == "interrupted", dead
    assert "stopped during" in str(dead["error"]), dead
    assert dead["finished_at"], dead
    return dead


@pytest.mark.parametrize("step", STEPS)
def test_kill_during_a_push_deploy(world: World, testenv: Infra, step: str) -> None:
    w = world
    newest = settle(w)
    before = w.last_succeeded("push")
    head = w.server_head("push")
    git(w.local, "reset", "-q", "--hard", head)
    slow_commit(w.local, testenv, step)
    with slowed(w, "push", step):
        push = w.start_push(*(["pytest"] if step == "pytest" else []))
        rec = w.wait_deploy("push", newest, step=step, while_alive=push, poll=0.005)
        kill_in(w, "push", rec, step)
    _, err = push.communicate(timeout=60)
    assert push.returncode != 0, err  # the pusher is told it did not go through
    assert w.server_head("push") == head
    w.start()
    dead = check_interrupted(w, rec["id"], step)
    check_registry(w, "push", dead, step)
    check_cluster(w, "push", dead, before, step)
    assert w.server_head("push") == head


@pytest.mark.parametrize("step", STEPS)
def test_kill_during_a_webhook_deploy(world: World, testenv: Infra, step: str) -> None:
    w = world
    newest = settle(w)
    if step == "pytest":
        reconfigure(w, pytest=True)
    try:
        before = w.last_succeeded("hook")
        head = w.server_head("hook")
        git(w.source, "reset", "-q", "--hard", head)
        slow = slow_commit(w.source, testenv, step)
        with slowed(w, "hook", step):
            status, answer, _ = w.deliver(slow)
            assert status == 202, answer
            rec = w.wait_deploy("hook", newest, step=step, poll=0.005)
            assert rec["id"] == answer["deploys"][0]["id"]
            # GitHub got the next push meanwhile: accepted, it waits behind the slow one.
            quick = quick_commit(w.source, testenv)
            status, answer, _ = w.deliver(quick)
            assert status == 202, answer
            waiting = answer["deploys"][0]["id"]
            kill_in(w, "hook", rec, step)
        assert w.deploy(waiting)["state"] == "queued"
        assert w.server_head("hook") == head
        w.start()
        dead = check_interrupted(w, rec["id"], step)
        check_registry(w, "hook", dead, step)
        check_cluster(w, "hook", dead, before, step)
        # The accepted delivery runs after the restart, and deploys.
        done = w.wait_state(waiting)
        assert done["state"] == "succeeded", (done, w.srv.log())
        # Recorded `succeeded` the moment it is true; the server branch follows.
        deadline = time.monotonic() + 10
        while w.server_head("hook") != quick:
            assert time.monotonic() < deadline, w.server_head("hook")
            time.sleep(0.05)
        assert w.template("hook")[0] == str(waiting)
    finally:
        if step == "pytest":
            reconfigure(w, pytest=False)


def reconfigure(w: World, *, pytest: bool) -> None:
    """Switch `pytest` of the hook deployment and reload the daemon (SIGHUP)."""
    text = w.srv.config.read_text()
    new = re.sub(r"pytest = (true|false)", f"pytest = {'true' if pytest else 'false'}", text)
    assert new.count("pytest = ") == 1
    w.srv.config.write_text(new)
    log = w.srv.root / "serve.log"
    reloads = log.read_text().count("reloaded:")
    w.srv.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while log.read_text().count("reloaded:") == reloads:
        assert time.monotonic() < deadline, w.srv.log()
        time.sleep(0.05)
