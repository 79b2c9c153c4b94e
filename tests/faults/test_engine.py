"""The Docker Engine restarted in the middle of a build, and stopped entirely (issue 15, Faults).

This test stops and starts the test environment's own dockerd (scripts/testenv.sh
stop-engine / start-engine): every container on it dies, so it must not run beside other
tests that use the Engine (the suite runs one test at a time). A build cut by a restart
fails with one line; while the Engine is down a deploy fails at once with exit 4 ("not
reachable") and a push is refused saying why; the daemon keeps answering; once the Engine
is back the next push deploys with no operator action.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.world import World, make_world, started
from tests.support.projects import commit_all, git
from tests.support.testenv import ROOT, Infra

pytestmark = pytest.mark.integration

DEPLOYD = [sys.executable, "-m", "daemon.cli"]
UNREACHABLE = 4  # the exit status of "a dependency is not reachable" (SPEC)


def engine(action: str) -> None:
    """Stop or start the test environment's dockerd."""
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "testenv.sh"), f"{action}-engine"],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
def world(tmp_path: Path, testenv: Infra) -> Iterator[World]:
    # Whatever happened, the Engine runs for the next test.
    with started(make_world(tmp_path / "w", testenv), lambda: engine("start")) as w:
        yield w


def branch(w: World) -> str:
    """The server branch of `push` ('' while it has none)."""
    repo = w.srv.state_dir / "repos" / f"{w.names['push']}.git"
    return git(repo, "for-each-ref", "--format=%(objectname)", "refs/heads/main")


def slow_build(w: World, message: str) -> None:
    """A Dockerfile step that prints a line every 0.3 s for 30 s."""
    dockerfile = w.local / "Dockerfile"
    lines = [ln for ln in dockerfile.read_text().splitlines() if "tick-" not in ln]
    lines.append(f"RUN echo {message!r} && for i in $(seq 1 100); do echo tick-$i; sleep 0.3; done")
    dockerfile.write_text("\n".join(lines) + "\n")
    commit_all(w.local, message)


def test_the_engine_restarted_mid_build_then_stopped(world: World) -> None:
    w = world

    # 1. Restarted in the middle of a build: the build fails in one line; nothing moved.
    slow_build(w, "A build the Engine's restart cuts")
    head = branch(w)  # none yet: this is the deployment's first push
    push = w.start_push()
    deadline = time.monotonic() + 240
    building = None
    while building is None or not any("tick-3" in ln for ln in w.log_of(building["id"])):
        assert push.poll() is None, push.communicate()
        assert time.monotonic() < deadline, building
        building = w.newest("push")
        time.sleep(0.1)
    t0 = time.monotonic()
    engine("stop")
    engine("start")
    print(f"\nEngine restarted in {time.monotonic() - t0:.1f} s")
    _, err = push.communicate(timeout=300)
    dead = w.deploy(building["id"])
    error = str(dead["error"])
    print(f"restart mid-build: {dead['state']} at {dead['step']}: {error}")
    assert push.returncode != 0, err
    assert dead["state"] == "failed" and dead["step"] == "build", dead
    assert "Docker Engine" in error and "\n" not in error, error
    assert error in err
    assert branch(w) == head
    assert w.template("push")[0] is None  # the cluster runs what it was created with

    # 2. Stopped: `deployd deploy` fails at once with exit 4; a push is refused saying
    # why; the daemon answers meanwhile.
    engine("stop")
    checkout = w.root / "checkout"
    git(w.root, "clone", "-q", str(w.local), str(checkout))
    t0 = time.monotonic()
    cli = subprocess.run(
        [*DEPLOYD, "--config", str(w.srv.config), "deploy", w.names["push"], str(checkout)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    took = time.monotonic() - t0
    print(f"Engine stopped: deployd deploy exit {cli.returncode} after {took:.1f} s: {cli.stderr}")
    assert cli.returncode == UNREACHABLE, (cli.stdout, cli.stderr)
    assert "the Docker Engine at" in cli.stderr and "could not be reached" in cli.stderr
    push = w.start_push()
    _, err = push.communicate(timeout=300)
    assert push.returncode != 0, err
    print("push while stopped:", [ln for ln in err.splitlines() if "Docker Engine" in ln])
    assert "the Docker Engine at" in err, err
    assert w.http("GET", "/healthz", timeout=10)[0] == 200
    assert w.srv.ssh("deploys", key="root", timeout=30).returncode == 0
    for row in w.rows():
        assert row["state"] not in ("running",), row

    # 3. Back: the same push deploys, nothing done by hand.
    engine("start")
    dockerfile = w.local / "Dockerfile"
    dockerfile.write_text(
        "\n".join(ln for ln in dockerfile.read_text().splitlines() if "tick-" not in ln) + "\n"
    )
    commit_all(w.local, "The build without the slow step")
    push = w.start_push()
    _, err = push.communicate(timeout=300)
    assert push.returncode == 0, err
    rec = w.newest("push")
    assert rec is not None and rec["state"] == "succeeded", (rec, w.srv.log())
    assert w.template("push")[0] == str(rec["id"])
