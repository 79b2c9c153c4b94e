"""The records held by another writer for 5 s (an operator's `sqlite3` session with
`BEGIN IMMEDIATE`) while a deploy runs and GitHub delivers (issue 15, Faults).

Deliveries sent during the hold are answered within GitHub's 10 s, none with a 5xx, and
each is recorded exactly once; the deploy under way waits and then succeeds. /healthz and
SSH keep answering meanwhile: they do not wait for the hold.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faults.world import World, make_world
from tests.support.projects import commit_all, git
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration

HOLD = 5.0
GITHUB_TIMEOUT = 10.0


@pytest.fixture
def world(tmp_path: Path, testenv: Infra) -> Iterator[World]:
    w = make_world(tmp_path, testenv)
    try:
        w.start()
        yield w
    finally:
        w.stop()


def hold_records(db: Path, seconds: float, held: threading.Event) -> None:
    """What an operator's `sqlite3 deployd.db` with `BEGIN IMMEDIATE;` does for `seconds`."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def test_records_held_by_another_writer(world: World, testenv: Infra) -> None:
    w = world
    # A push whose build prints while it runs: its log lines are written during the hold.
    nonce = uuid.uuid4().hex
    (w.local / "Dockerfile").write_text(
        f"FROM {testenv.airflow_image}\n"
        f"RUN for i in $(seq 1 40); do echo {nonce} $i; sleep 0.2; done\n"
    )
    commit_all(w.local, "A build that prints for 8 s")
    push = w.start_push()
    w.wait_deploy("push", 0, step="build", while_alive=push)
    time.sleep(1)  # it is printing

    # GitHub's deliveries during the hold: a deploy of the hook deployment, and pushes to a
    # branch nobody deploys (recorded, answered 200, nothing deployed).
    deploy_commit = git(w.source, "rev-parse", "HEAD")
    deliveries = [str(uuid.uuid4()) for _ in range(6)]
    answers: list[tuple[int, dict[str, object], float]] = []
    health: list[float] = []
    ssh_times: list[float] = []
    held = threading.Event()
    holder = threading.Thread(target=hold_records, args=(w.db, HOLD, held))
    holder.start()
    assert held.wait(10)
    t_hold = time.monotonic()

    def deliver(i: int) -> tuple[int, dict[str, object], float]:
        time.sleep(i * 0.5)  # spread over the hold
        if i == 0:
            return w.deliver(deploy_commit, deliveries[i], timeout=30)
        return w.deliver("1" * 40, deliveries[i], timeout=30, branch=f"feature-{i}")

    def probe() -> None:
        while time.monotonic() - t_hold < HOLD + 0.5:
            t0 = time.monotonic()
            status, _ = w.http("GET", "/healthz", timeout=30)
            assert status == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.1)

    def ssh_probe() -> None:
        time.sleep(1)
        t0 = time.monotonic()
        out = w.srv.ssh("deploys", key="root", timeout=30)
        ssh_times.append(time.monotonic() - t0)
        assert out.returncode == 0, out.stderr
        assert "running" in out.stdout

    with ThreadPoolExecutor(len(deliveries) + 2) as pool:
        probes = [pool.submit(probe), pool.submit(ssh_probe)]
        answers = list(pool.map(deliver, range(len(deliveries))))
        for p in probes:
            p.result()
    holder.join()
    took = [round(a[2], 2) for a in answers]
    print(
        f"\nhold {HOLD} s: webhook answers {took} s; /healthz max {max(health):.3f} s "
        f"({len(health)} probes); ssh deploys {ssh_times[0]:.2f} s"
    )
    assert all(a[0] < 500 for a in answers), answers
    assert [a[0] for a in answers] == [202] + [200] * (len(deliveries) - 1), answers
    assert max(took) < GITHUB_TIMEOUT, took
    # The loop did not wait for the hold: /healthz and SSH were answered meanwhile.
    assert max(health) < HOLD / 2, health
    assert ssh_times[0] < HOLD / 2 + 2, ssh_times

    # Every delivery recorded once; the deploy under way and the new one both succeed.
    recorded = w.rows("SELECT delivery_id FROM deliveries")
    assert sorted(r["delivery_id"] for r in recorded) == sorted(deliveries)
    _, err = push.communicate(timeout=300)
    assert push.returncode == 0, err
    hook_deploy = int(answers[0][1]["deploys"][0]["id"])  # type: ignore[index]
    assert w.wait_state(hook_deploy)["state"] == "succeeded", w.srv.log()
    pushed = w.newest("push")
    assert pushed is not None and pushed["state"] == "succeeded"
    # Its build printed during the hold: every line waited and was stored, none lost.
    printed = w.rows(
        "SELECT line FROM log WHERE deploy_id = ? AND step = 'build' AND line LIKE ?",
        (pushed["id"], f"{nonce} %"),
    )
    assert len(printed) == 40, printed
