"""`state_dir` on a disk that fills up (a 64 MB loop-mounted ext4 made by the test) (issue 15,
Faults).

A deploy that fills the disk, and deploys that arrive while it is full, fail with one line
that says the disk is full; the records stay consistent (nothing left running, the database
passes `PRAGMA integrity_check`); SSH and HTTP keep answering; and once there is space again
deploys work with no operator action.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.world import FINAL, World, make_world
from tests.support.projects import commit_all, git
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration

DISK_MB = 64
# What the one-line message must say: ENOSPC's own words (git's receive-pack says only
# that when it cannot store a push at all), and deployd's "the disk holding ... is full".
NO_SPACE = "no space left on device"
DEPLOYDS = "is full (No space left on device"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MB ext4 filesystem, loop-mounted (we are root); unmounted at the end."""
    image, mount = tmp_path / "state.img", tmp_path / "disk"
    subprocess.run(["truncate", "-s", f"{DISK_MB}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mount.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def world(tmp_path: Path, testenv: Infra, small_disk: Path) -> Iterator[World]:
    w = make_world(tmp_path / "w", testenv, state_dir=small_disk / "state")
    try:
        w.start()
        yield w
    finally:
        w.stop()


def fill(disk: Path, leave: int = 0) -> Path:
    """Write a file that leaves `leave` bytes free on `disk`; with 0, write until the disk
    refuses even us (root may use the blocks ext4 reserves for it)."""
    filler = disk / f"filler-{uuid.uuid4().hex[:6]}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    chunk = b"\0" * (1 << 20)
    try:
        while True:
            room = shutil.disk_usage(disk).free - leave if leave else len(chunk)
            if room <= 0:
                break
            try:
                os.write(fd, chunk[: min(len(chunk), room)])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if leave or len(chunk) == 4096:
                    break
                chunk = chunk[: len(chunk) // 2]
        os.fsync(fd)
    finally:
        os.close(fd)
    return filler


def one_line_naming_the_full_disk(text: str) -> str:
    lines = [ln for ln in text.splitlines() if NO_SPACE in ln.lower()]
    assert lines, text
    return lines[0]


def consistent(w: World) -> None:
    """Nothing left running; every deploy final or queued; the database is sound."""
    for row in w.rows():
        assert row["state"] in (*FINAL, "queued"), row
    conn = sqlite3.connect(f"file:{w.db}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def serving(w: World) -> None:
    """SSH and HTTP still answer."""
    assert w.http("GET", "/healthz", timeout=10)[0] == 200
    listing = w.srv.ssh("deploys", key="root", timeout=30)
    assert listing.returncode == 0, listing.stderr


def test_a_full_state_dir(world: World, small_disk: Path) -> None:
    w = world
    push = w.start_push()
    _, err = push.communicate(timeout=300)
    assert push.returncode == 0, err
    status, answer, _ = w.deliver(git(w.source, "rev-parse", "HEAD"))
    assert status == 202, answer
    assert w.wait_state(answer["deploys"][0]["id"])["state"] == "succeeded"

    # 1. A push whose checkout fills the disk: the pack fits, its files do not.
    free = shutil.disk_usage(small_disk).free
    big = 12 * 2**20
    fillers = [fill(small_disk, leave=big + big // 2)]
    with open(w.local / "include" / "data.bin", "wb") as fh:
        fh.write(os.urandom(big))
    (w.local / ".dockerignore").write_text("include/data.bin\n")
    commit_all(w.local, "Data that does not fit twice")
    push = w.start_push()
    _, err = push.communicate(timeout=300)
    assert push.returncode != 0, err
    print(f"\nfree {free >> 20} MB, then {shutil.disk_usage(small_disk).free >> 10} KB")
    line = one_line_naming_the_full_disk(err)
    print("push while filling:", line)
    assert DEPLOYDS in line
    dead = w.newest("push")
    assert dead is not None and dead["state"] == "failed", dead
    assert DEPLOYDS in str(dead["error"]) and "\n" not in str(dead["error"]), dead["error"]
    consistent(w)
    serving(w)

    # 2. The disk is full: a push and a webhook delivery fail saying so; nothing is stuck.
    fillers.append(fill(small_disk))
    git(w.local, "reset", "-q", "--hard", "HEAD~1")
    (w.local / "README.md").write_text("small change\n")
    commit_all(w.local, "A small change")
    push = w.start_push()
    _, err = push.communicate(timeout=300)
    assert push.returncode != 0, err
    print("push while full:", one_line_naming_the_full_disk(err))
    (w.source / "README.md").write_text("small change\n")
    hook_commit = commit_all(w.source, "A small change on GitHub")
    delivery = str(uuid.uuid4())
    status, answer, _ = w.deliver(hook_commit, delivery)
    print("delivery while full:", status, answer)
    assert status == 503, answer  # not recorded: GitHub shows it failed; redeliver it later
    assert DEPLOYDS in one_line_naming_the_full_disk(str(answer.get("error")))
    consistent(w)
    serving(w)

    # 3. Space again: the same push and the redelivered delivery deploy.
    for f in fillers:
        f.unlink()
    push = w.start_push()
    _, err = push.communicate(timeout=300)
    assert push.returncode == 0, err
    status, answer, _ = w.deliver(hook_commit, delivery)  # GitHub's "Redeliver"
    assert status == 202, answer
    assert w.wait_state(answer["deploys"][0]["id"])["state"] == "succeeded", w.srv.log()
    consistent(w)
