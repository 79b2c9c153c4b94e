"""The registry stopped, answering 500s, and answering slowly (issue 15, Faults).

deployd and the Engine reach the real registry through a proxy that plays the fault
(tests/support/tcpproxy.py). A push is retried with backoff (`retrying in … (attempt N of
4)` in the log); when the registry stays away the deploy fails with one line that names it,
no deploy tag is in the registry, the cluster and the server branch are as they were; once
the registry is back the same push deploys with no operator action. A slow registry makes a
slow push, nothing else: the daemon keeps answering meanwhile.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.world import World, make_world, started
from tests.support.projects import commit_all, git
from tests.support.tcpproxy import TcpProxy
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration

ATTEMPTS = 4  # daemon/adapters/images.py PUSH_ATTEMPTS


@pytest.fixture
def world(tmp_path: Path, testenv: Infra) -> Iterator[World]:
    def heal(registry: TcpProxy) -> None:
        registry.fail(None)
        registry.throttle(None)
        registry.accept()

    w = make_world(tmp_path / "w", testenv)
    with started(w, lambda: heal(w.registry)):
        yield w


def retries(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "registry error (" in ln and "retrying in" in ln]


def branch(w: World) -> str:
    """The server branch of `push` ('' while it has none)."""
    repo = w.srv.state_dir / "repos" / f"{w.names['push']}.git"
    return git(repo, "for-each-ref", "--format=%(objectname)", "refs/heads/main")


def unchanged(w: World, tags: list[str], template: tuple[str | None, str], head: str) -> None:
    """No deploy tag moved, the cluster runs what it ran, the branch did not move."""
    assert w.tags("push") == tags
    assert w.template("push") == template
    assert branch(w) == head


def change(w: World, message: str) -> None:
    (w.local / "dags" / "changed.py").write_text(f"# {message}\n")
    commit_all(w.local, message)


def failing_push(w: World) -> tuple[dict[str, object], str]:
    push = w.start_push()
    _, err = push.communicate(timeout=300)
    assert push.returncode != 0, err
    dead = w.newest("push")
    assert dead is not None and dead["state"] == "failed", (dead, err)
    return dead, err


def test_registry_faults(world: World) -> None:
    """One world for all the faults (its first deploy, which pushes the base layers, is
    the slow part)."""
    w = world
    # The faults come first, on the deployment's first pushes (a first deploy that worked
    # would upload the base layers: the slow part of this test).
    state = w.tags("push"), w.template("push"), branch(w)

    # 1. The registry stopped: every attempt is refused; the deploy fails naming it.
    w.registry.refuse()
    change(w, "Pushed while the registry is down")
    t0 = time.monotonic()
    dead, err = failing_push(w)
    took = time.monotonic() - t0
    error = str(dead["error"])
    print(f"\nregistry down: failed after {took:.1f} s: {error}")
    assert f"could not be reached after {ATTEMPTS} attempts" in error, error
    assert f"127.0.0.1:{w.registry.port}" in error, error
    assert "\n" not in error
    assert error in err  # the pusher is told the same line
    assert len(retries(w.log_of(int(str(dead["id"]))))) == ATTEMPTS - 1
    unchanged(w, *state)
    w.registry.accept()

    # 2. 500s that last: the Engine retries a layer upload itself (about 50 s); deployd
    # does not multiply that, and fails in one line with the registry's answer.
    w.registry.fail(500)
    change(w, "Pushed while the registry fails")
    t0 = time.monotonic()
    dead, err = failing_push(w)
    error = str(dead["error"])
    print(f"registry 500s: failed after {time.monotonic() - t0:.1f} s: {error}")
    assert f"the registry 127.0.0.1:{w.registry.port} kept failing for" in error, error
    assert "500" in error and "\n" not in error, error
    assert error in err
    assert w.registry.connections >= 2
    unchanged(w, *state)

    # 3. 500s that pass: the same push, whose upload meets them and is retried once the
    # registry recovers, deploys (and with it the two commits the registry refused:
    # nothing to do by hand).
    before, served = int(str(dead["id"])), w.registry.connections
    push = w.start_push()
    deadline = time.monotonic() + 240
    while w.registry.connections == served:  # this push met a 500
        assert push.poll() is None, push.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(3)
    w.registry.fail(None)
    _, err = push.communicate(timeout=300)
    assert push.returncode == 0, err
    rec = w.newest("push")
    assert rec is not None and int(str(rec["id"])) > before and rec["state"] == "succeeded", rec
    fast = step_seconds(w, int(str(rec["id"])), "push")  # all the layers, unthrottled
    assert str(rec["tag"]) in w.tags("push")
    assert w.template("push")[0] == str(rec["id"])

    # 4. A slow registry: a layer of 3 MiB through a link of 512 KiB/s (about 6 s of
    # upload) makes a slow push and nothing else; the daemon answers meanwhile.
    (w.local / "include" / "blob.bin").write_bytes(os.urandom(3 << 20))
    commit_all(w.local, "A bigger layer")
    w.registry.throttle(512 << 10)
    push = w.start_push()
    answers: list[float] = []
    while push.poll() is None:
        t0 = time.monotonic()
        assert w.http("GET", "/healthz", timeout=10)[0] == 200
        answers.append(time.monotonic() - t0)
        time.sleep(0.2)
    _, err = push.communicate()
    assert push.returncode == 0, err
    rec = w.newest("push")
    assert rec is not None and rec["state"] == "succeeded", rec
    answers.sort()
    print(
        f"slow registry: push step {step_seconds(w, int(str(rec['id'])), 'push'):.1f} s "
        f"(all the layers, unthrottled: {fast:.1f} s); /healthz during it: "
        f"{len(answers)} probes, slowest {answers[-1] * 1000:.0f} ms"
    )
    assert str(rec["tag"]) in w.tags("push")
    assert answers[-1] < 2.0


def step_seconds(w: World, deploy_id: int, step: str) -> float:
    [row] = w.rows(
        "SELECT finished_at - started_at AS s FROM steps WHERE deploy_id = ? AND name = ?",
        (deploy_id, step),
    )
    return float(row["s"])
