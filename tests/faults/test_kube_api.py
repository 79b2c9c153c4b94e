"""The Kubernetes API unreachable in the middle of a rollout's wait (issue 15, Faults).

deployd reaches the simulator through a proxy that can refuse connections (the API server
gone); the test's own kubectl goes straight to it. A short outage: the wait goes on from a
fresh read once the API answers, and the deploy succeeds. An outage longer than the
rollout timeout: the rollout fails, and the rollback is tried again until the API is back,
so the cluster runs what ran before and the deploy is `rolled_back` (not `failed` with the
new image left running). An outage past the rollback's retries too: the deploy is `failed`,
and the daemon finishes the rollback by itself once the API answers again.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.world import World, make_world, set_rollout, started
from tests.support.projects import commit_all
from tests.support.tcpproxy import TcpProxy
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration

TIMEOUT = 10  # the `push` deployment's rollout_timeout_seconds here


@pytest.fixture
def world(tmp_path: Path, testenv: Infra) -> Iterator[tuple[World, TcpProxy]]:
    w = make_world(tmp_path / "w", testenv)
    api = TcpProxy("127.0.0.1", w.sim.port).start()
    proxied = w.root / "kubeconfig-proxied"
    proxied.write_text(
        w.sim.kubeconfig.read_text().replace(f"127.0.0.1:{w.sim.port}", f"127.0.0.1:{api.port}")
    )
    config = w.root / "deployd.toml"
    text = config.read_text().replace(str(w.sim.kubeconfig), str(proxied))
    # The first deployment ([[deployment]] `push`) gets a short rollout timeout.
    first = text.index("rollout_timeout_seconds = 120")
    text = text[:first] + f"rollout_timeout_seconds = {TIMEOUT}" + text[first + 29 :]
    config.write_text(text)

    def heal() -> None:
        api.accept()
        api.stop()

    with started(w, heal):
        yield w, api


def push_until_patched(
    w: World, text: str, message: str, *, after: int
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Push a commit changing a DAG file and return once its roll has patched the workload."""
    (w.local / "dags" / "changed.py").write_text(text)
    commit_all(w.local, message)
    push = w.start_push()
    rolling = w.wait_deploy("push", after, step="roll", while_alive=push)
    while not any("patched 1 of 1" in ln for ln in w.log_of(rolling["id"])):
        assert push.poll() is None, push.communicate()
        time.sleep(0.02)
    return push, rolling


def test_api_away_mid_rollout(world: tuple[World, TcpProxy]) -> None:
    w, api = world
    assert w.rows("SELECT 1")  # the records are there
    push = w.start_push()
    _, err = push.communicate(timeout=300)
    assert push.returncode == 0, err
    first = w.newest("push")
    assert first is not None and first["state"] == "succeeded", err
    running = w.template("push")

    # 1. A short outage in the middle of a slow rollout: the wait resumes; it succeeds.
    set_rollout(w, "push", "slow", 6)  # about 0.4 s a replica step
    push, rolling = push_until_patched(
        w, "# during an API outage\n", "Rolled while the API goes away", after=first["id"]
    )
    api.refuse()
    time.sleep(2.5)
    api.accept()
    _, err = push.communicate(timeout=300)
    lines = w.log_of(rolling["id"])
    print("\n" + "\n".join(ln for ln in lines if "cannot" in ln or "rolled out" in ln))
    assert push.returncode == 0, err
    assert w.deploy(rolling["id"])["state"] == "succeeded"
    assert any("cannot read it" in ln and "still waiting" in ln for ln in lines), lines
    assert w.template("push")[0] == str(rolling["id"])
    w.kubectl("rollout", "status", "deployment/push-scheduler", "-n", "airflow", "--timeout=60s")

    # 2. An outage past the rollout timeout: the rollout fails, the rollback waits for the
    # API and then puts back what ran: `rolled_back`, and the cluster runs the last deploy.
    good = w.template("push")
    push, rolling = push_until_patched(
        w, "# during a long API outage\n", "Rolled while the API stays away", after=rolling["id"]
    )
    api.refuse()
    t0 = time.monotonic()
    while not any("trying again" in ln for ln in w.log_of(rolling["id"])):
        assert push.poll() is None, push.communicate()
        assert time.monotonic() - t0 < TIMEOUT + 60, w.log_of(rolling["id"])
        time.sleep(0.1)
    print(f"rollback waiting for the API after {time.monotonic() - t0:.1f} s")
    api.accept()
    _, err = push.communicate(timeout=300)
    rec = w.deploy(rolling["id"])
    print(f"after the long outage: {rec['state']}: {rec['error']}")
    assert push.returncode != 0, err
    assert rec["state"] == "rolled_back", (rec, w.log_of(rolling["id"]))
    assert "cannot read it" in str(rec["error"]), rec["error"]
    assert w.template("push") == good
    assert good != running
    w.kubectl("rollout", "status", "deployment/push-scheduler", "-n", "airflow", "--timeout=60s")

    # 3. An outage past the rollback's own retries too: the deploy ends `failed`, saying the
    # rollback did not finish; once the API answers again the daemon finishes it by itself
    # (its loop; no deploy needs to come along), and the record says so.
    push, rolling = push_until_patched(
        w,
        "# during an even longer API outage\n",
        "Rolled while the API stays away past the rollback",
        after=rolling["id"],
    )
    api.refuse()
    _, err = push.communicate(timeout=TIMEOUT * 2 + 120)
    rec = w.deploy(rolling["id"])
    print(f"after the longest outage: {rec['state']}: {rec['error']}")
    assert push.returncode != 0, err
    assert rec["state"] == "failed", rec
    assert "the rollback did not finish either" in str(rec["error"])
    assert "deployd tries again until the cluster answers" in str(rec["error"])
    assert w.template("push")[0] == str(rolling["id"])  # the failed image still runs
    api.accept()
    t0 = time.monotonic()
    while w.template("push") != good:
        assert time.monotonic() - t0 < 60, w.log_of(rolling["id"])
        time.sleep(0.5)
    print(f"the rollback finished {time.monotonic() - t0:.1f} s after the API came back")
    rec = w.deploy(rolling["id"])
    assert rec["state"] == "failed"  # what happened to it; its error says how it ended
    assert "Later the rollback finished: deployment/push-scheduler rolled back to what ran" in str(
        rec["error"]
    )
    assert any("-----> later: the rollback finished" in ln for ln in w.log_of(rolling["id"]))
    w.kubectl("rollout", "status", "deployment/push-scheduler", "-n", "airflow", "--timeout=60s")
