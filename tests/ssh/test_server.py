"""`git push astro main` against a real `deployd serve`, with the real OpenSSH client and git."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.projects import GIT_ENV, GOOD_DAG, commit_all, make_project
from tests.support.sshserver import Server, make_server
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration

SLOW_DAG = "# airflow dag\nimport time\ntime.sleep(5)\n" + GOOD_DAG.format(dag_id="slow")


@pytest.fixture
def server(tmp_path: Path, testenv: Infra) -> Iterator[Server]:
    srv = make_server(tmp_path / "srv", testenv)
    srv.start()
    yield srv
    srv.stop()


def project(
    tmp_path: Path,
    testenv: Infra,
    srv: Server,
    name: str = "proj",
    dags: dict[str, str] | None = None,
) -> Path:
    repo = make_project(tmp_path / name, testenv.airflow_image, dags=dags)
    subprocess.run(["git", "-C", str(repo), "remote", "add", "astro", srv.url()], check=True)
    return repo


def deploys(srv: Server, key: str = "root") -> list[dict[str, object]]:
    db = srv.state_dir / "deployd.db"
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM deploys ORDER BY id")]
    finally:
        conn.close()


def remote_head(srv: Server, repo: Path, branch: str = "main") -> str:
    out = srv.git(repo, "ls-remote", "astro", f"refs/heads/{branch}")
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[0] if out.stdout.strip() else ""


def push_until_parsing(srv: Server, repo: Path, **popen: object) -> subprocess.Popen[str]:
    """Start `git push astro main` and return once its deploy is in the parse step."""
    push = subprocess.Popen(
        ["git", "-C", str(repo), "push", "astro", "main"],  # type: ignore[call-overload]
        stderr=subprocess.PIPE,
        text=True,
        env=srv.git_env(),
        **popen,
    )
    deadline = time.monotonic() + 60
    while not any(r["step"] == "parse" for r in deploys(srv)):
        assert time.monotonic() < deadline and push.poll() is None
        time.sleep(0.05)
    return push


def test_push_deploys_and_is_accepted(tmp_path: Path, testenv: Infra, server: Server) -> None:
    repo = project(tmp_path, testenv, server)
    push = server.git(repo, "push", "astro", "main")
    assert push.returncode == 0, push.stderr
    head = subprocess.check_output(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True)
    lines = [ln for ln in push.stderr.splitlines() if ln.startswith("remote:")]
    assert any("-----> build" in ln for ln in lines)
    assert any("parse done in" in ln for ln in lines)
    last = [ln for ln in lines if ln.strip() != "remote:"][-1]
    assert "-----> deployed" in last and "as deploy #1" in last
    assert remote_head(server, repo) == head.strip()
    rec = deploys(server)[0]
    assert (rec["state"], rec["trigger"], rec["actor"]) == ("succeeded", "ssh", "alice")
    listing = server.ssh("deploys", "prod")
    assert listing.returncode == 0 and "alice" in listing.stdout and "succeeded" in listing.stdout
    status = server.ssh("status", "prod")
    assert status.returncode == 0 and str(rec["tag"]) in status.stdout
    log = server.ssh("logs", "1")
    assert log.returncode == 0 and "-----> parse" in log.stdout
    # Nothing changed: git says so and deploys nothing.
    again = server.git(repo, "push", "astro", "main")
    assert again.returncode == 0 and "Everything up-to-date" in again.stderr
    assert len(deploys(server)) == 1


def test_broken_dag_is_rejected_and_force_accepts(
    tmp_path: Path, testenv: Infra, server: Server
) -> None:
    repo = project(
        tmp_path,
        testenv,
        server,
        dags={
            "good.py": GOOD_DAG.format(dag_id="good"),
            "broken.py": "from airflow.sdk import DAG\nimport not_installed_anywhere\n",
        },
    )
    push = server.git(repo, "push", "astro", "main")
    assert push.returncode != 0
    assert "dags/broken.py: ModuleNotFoundError at line 2" in push.stderr
    assert "pre-receive hook declined" in push.stderr
    assert remote_head(server, repo) == ""
    forced = server.git(
        repo, "push", "-o", "force", "-o", "description=Ship it anyway", "astro", "main"
    )
    assert forced.returncode == 0, forced.stderr
    recs = deploys(server)
    assert [r["state"] for r in recs] == ["failed", "succeeded"]
    assert json.loads(str(recs[1]["options"]))["force"] is True
    assert recs[1]["description"] == "Ship it anyway"
    commit_all(repo, "Another change")
    unknown = server.git(repo, "push", "-o", "yolo", "astro", "main")
    assert unknown.returncode != 0 and "unknown push option 'yolo'" in unknown.stderr


def test_wrong_refs_are_refused_with_what_to_push(
    tmp_path: Path, testenv: Infra, server: Server
) -> None:
    repo = project(tmp_path, testenv, server)
    assert server.git(repo, "push", "astro", "main").returncode == 0
    subprocess.run(["git", "-C", str(repo), "branch", "feature"], check=True)
    other = server.git(repo, "push", "astro", "feature")
    assert other.returncode != 0
    assert "deploys branch main, not feature" in other.stderr
    assert "git push astro feature:main" in other.stderr
    subprocess.run(["git", "-C", str(repo), "tag", "v1"], check=True)
    tag = server.git(repo, "push", "astro", "v1")
    assert tag.returncode != 0 and "tags are not deployed" in tag.stderr
    delete = server.git(repo, "push", "astro", ":main")
    assert delete.returncode != 0
    assert len(deploys(server)) == 1


def test_queued_push_waits_then_is_refused_when_main_moved(
    tmp_path: Path, testenv: Infra, server: Server
) -> None:
    first = project(tmp_path, testenv, server, "first")
    assert server.git(first, "push", "astro", "main").returncode == 0
    second = tmp_path / "second"
    assert server.git(tmp_path, "clone", "-q", server.url(), str(second)).returncode == 0
    subprocess.run(["git", "-C", str(second), "remote", "rename", "origin", "astro"], check=True)
    (first / "dags" / "slow.py").write_text(SLOW_DAG)
    commit_all(first, "Slow DAG")
    slow = subprocess.Popen(
        ["git", "-C", str(first), "push", "astro", "main"],
        stderr=subprocess.PIPE,
        text=True,
        env=server.git_env(),
    )
    deadline = time.monotonic() + 60
    while not any(r["state"] == "running" and r["id"] == 2 for r in deploys(server)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (second / "dags" / "other.py").write_text(GOOD_DAG.format(dag_id="other"))
    commit_all(second, "Other DAG")
    late = server.git(second, "push", "astro", "main")
    _, slow_err = slow.communicate(timeout=120)
    assert slow.returncode == 0, slow_err
    assert late.returncode != 0
    assert "queued behind deploy #2" in late.stderr
    moved_to = remote_head(server, first)[:12]
    assert (
        f"main moved to {moved_to} while you waited (deploy #2): pull, then push again"
        in late.stderr
    )
    recs = deploys(server)
    assert recs[2]["state"] == "cancelled" and recs[2]["started_at"] is None


def test_keys_only_reach_their_deployments(tmp_path: Path, testenv: Infra, server: Server) -> None:
    repo = project(tmp_path, testenv, server)
    denied = server.git(repo, "push", "astro", "main", key="bob")
    assert denied.returncode != 0 and "key bob may not use deployment prod" in denied.stderr
    assert server.git(repo, "push", "astro", "main").returncode == 0
    assert server.ssh("deploys", "prod", key="bob").returncode == 1
    # Unknown and forbidden deployments get the same answer: no names leak.
    forbidden, unknown = (
        server.ssh("status", "prod", key="bob"),
        server.ssh("status", "nosuch", key="bob"),
    )
    assert forbidden.returncode == unknown.returncode == 1
    assert forbidden.stderr.replace("prod", "X") == unknown.stderr.replace("nosuch", "X")
    assert "staging" not in unknown.stderr
    bob_logs = server.ssh("logs", "1", key="bob")
    assert bob_logs.returncode == 1 and "no deploy #1 that key bob may read" in bob_logs.stderr
    assert server.ssh("logs", "1", key="root").returncode == 0
    assert "prod" not in server.ssh("deploys", key="bob").stdout
    stranger = server.ssh("help", key="eve")
    assert stranger.returncode == 255 and "Permission denied (publickey)" in stranger.stderr
    password = server.ssh(
        "help",
        opts=(
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "PubkeyAuthentication=no",
        ),
    )
    assert password.returncode == 255 and "Permission denied" in password.stderr


def test_fetch_clone_and_ls_remote(tmp_path: Path, testenv: Infra, server: Server) -> None:
    repo = project(tmp_path, testenv, server)
    assert server.git(repo, "push", "astro", "main").returncode == 0
    scp_like = {**server.git_env()}
    scp_like["GIT_SSH_COMMAND"] += f" -p {server.ssh_port}"
    for url, env in (
        (server.url(), server.git_env()),
        (server.url() + ".git", server.git_env()),
        ("git@127.0.0.1:prod", scp_like),
        ("git@127.0.0.1:prod.git", scp_like),
    ):
        out = subprocess.run(
            ["git", "ls-remote", url], capture_output=True, text=True, env=env, check=False
        )
        assert out.returncode == 0 and "refs/heads/main" in out.stdout, (url, out.stderr)
    clone = server.git(tmp_path, "clone", "-q", server.url(), str(tmp_path / "clone"))
    assert clone.returncode == 0, clone.stderr
    assert (tmp_path / "clone" / "dags" / "example_dag.py").is_file()
    # protocol v0 as well as v2
    v0 = subprocess.run(
        ["git", "-c", "protocol.version=0", "ls-remote", server.url()],
        capture_output=True,
        text=True,
        env=server.git_env(),
        check=False,
    )
    assert v0.returncode == 0 and "refs/heads/main" in v0.stdout


REFUSED = [
    "sh -c id",
    "git config x y",
    "scp -t /",
    "git-receive-pack 'prod'; id",
    "git-upload-pack '--help'",
    "git-upload-pack '--upload-pack=touch /tmp/deployd-pwned'",
    "git-receive-pack '../../etc'",
    "git-receive-pack '/etc/passwd'",
    "git-receive-pack 'prod/../../x'",
    "git-upload-pack 'prod",
    "git-upload-pack 'pro\nd'",
    "deploys prod; id",
    "rollback prod; id",
    "rollback prod 1 2",
    "x" * 100_000,
]


@pytest.mark.parametrize("command", REFUSED, ids=lambda c: c[:30])
def test_hostile_commands_are_refused(server: Server, command: str) -> None:
    result = server.ssh(command, key="root")
    assert result.returncode == 1, result
    assert result.stderr.startswith("deployd: ") and result.stderr.count("\n") == 1
    assert not Path("/tmp/deployd-pwned").exists()
    assert server.ssh("help").returncode == 0


def test_shell_pty_subsystem_forwarding_and_env_are_refused(
    tmp_path: Path, testenv: Infra, server: Server
) -> None:
    shell = subprocess.run(
        server.ssh_argv("alice", "-T"),
        capture_output=True,
        text=True,
        input="id\n",
        timeout=30,
        check=False,
    )
    assert shell.returncode == 1 and "no shell" in shell.stderr
    pty = server.ssh("help", opts=("-tt",))
    assert "PTY allocation request failed" in pty.stderr
    sftp = server.ssh("sftp", opts=("-s",))
    assert sftp.returncode == 255 and "subsystem request failed" in sftp.stderr
    tunnel = server.ssh(opts=("-W", f"127.0.0.1:{server.http_port}"))
    assert tunnel.returncode == 255 and "forwarding failed" in tunnel.stderr
    remote = server.ssh("help", opts=("-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"))
    assert remote.returncode == 255 and "forwarding failed" in remote.stderr
    agent = server.ssh("help", opts=("-A",))
    assert agent.returncode == 0
    # Environment requests never reach git: these would break it if they did.
    repo = project(tmp_path, testenv, server)
    env = server.git_env()
    env["GIT_SSH_COMMAND"] += (
        " -o SetEnv=GIT_EXEC_PATH=/nonexistent"
        " -o SetEnv=LD_PRELOAD=/nonexistent.so"
        " -o SetEnv=GIT_CONFIG_PARAMETERS='core.hooksPath=/tmp'"
    )
    push = subprocess.run(
        ["git", "-C", str(repo), "push", "astro", "main"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert push.returncode == 0, push.stderr
    assert "-----> deployed" in push.stderr  # our hook ran, not /tmp's


def test_stalled_connections_do_not_starve_a_push(
    tmp_path: Path, testenv: Infra, server: Server
) -> None:
    import socket

    # 50 clients that authenticate and then sit there, and 20 that never say a word.
    authed = [
        subprocess.Popen(
            server.ssh_argv("alice", "-N"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(50)
    ]
    idle = [socket.create_connection(("127.0.0.1", server.ssh_port)) for _ in range(20)]
    time.sleep(2)
    assert all(p.poll() is None for p in authed)  # they did get in, and stay
    try:
        repo = project(tmp_path, testenv, server)
        started = time.monotonic()
        push = server.git(repo, "push", "astro", "main", timeout=120)
        assert push.returncode == 0, push.stderr
        assert time.monotonic() - started < 60
    finally:
        for s in idle:
            s.close()
        for p in authed:
            p.kill()
            p.wait()


def test_client_gone_mid_deploy_completes_and_keeps_commit(
    tmp_path: Path, testenv: Infra, server: Server
) -> None:
    repo = project(tmp_path, testenv, server, dags={"slow.py": SLOW_DAG})
    push = push_until_parsing(server, repo, start_new_session=True)
    os.killpg(push.pid, signal.SIGKILL)  # git and its ssh: the connection drops
    push.wait()
    deadline = time.monotonic() + 120
    while deploys(server)[0]["state"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    rec = deploys(server)[0]
    assert rec["state"] == "succeeded"
    head = subprocess.check_output(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True)
    deadline = time.monotonic() + 10
    while remote_head(server, repo) != head.strip():
        assert time.monotonic() < deadline, "the server branch never named the commit"
        time.sleep(0.2)


def test_sighup_reloads_keys_without_touching_a_running_deploy(
    tmp_path: Path, testenv: Infra, server: Server
) -> None:
    repo = project(tmp_path, testenv, server, dags={"slow.py": SLOW_DAG})
    push = push_until_parsing(server, repo)
    assert server.ssh("help", key="eve").returncode == 255
    eve = server.key("eve").with_name("eve.pub").read_text().strip()
    text = server.config.read_text() + f'\n[[key]]\nname = "eve"\npublic_key = "{eve}"\n'
    server.config.write_text(text + 'deployments = ["staging"]\n')
    server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while server.ssh("help", key="eve").returncode != 0:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    _, err = push.communicate(timeout=120)
    assert push.returncode == 0, err
    # A broken config on SIGHUP keeps the running one.
    server.config.write_text(text + "nonsense = 1\n")
    server.signal(signal.SIGHUP)
    time.sleep(0.5)
    assert server.ssh("help", key="eve").returncode == 0
    assert "reload refused" in server.log()


def test_sigterm_waits_for_grace_then_interrupts(tmp_path: Path, testenv: Infra) -> None:
    srv = make_server(tmp_path / "srv", testenv, grace=1)
    srv.start()
    try:
        repo = project(tmp_path, testenv, srv, dags={"slow.py": SLOW_DAG.replace("(5)", "(60)")})
        push = push_until_parsing(srv, repo)
        started = time.monotonic()
        srv.signal(signal.SIGTERM)
        srv.wait_note("STOPPING=1", 10)
        assert srv.stop() == 0
        assert time.monotonic() - started < 30
        push.communicate(timeout=30)
        assert push.returncode != 0
        rec = deploys(srv)[0]
        assert rec["state"] == "interrupted" and rec["step"] == "parse"
    finally:
        srv.stop()


def test_notify_ready_watchdog_and_healthz(tmp_path: Path, testenv: Infra) -> None:
    srv = make_server(tmp_path / "srv", testenv)
    srv.start(environ={"WATCHDOG_USEC": "400000"})
    try:
        srv.wait_note("WATCHDOG=1", 5)
        count = sum("WATCHDOG=1" in n for n in srv.notes)
        srv.notes.clear()
        time.sleep(1.2)
        with pytest.raises(AssertionError):
            srv.wait_note("never", 0.3)
        assert sum("WATCHDOG=1" in n for n in srv.notes) >= 3 or count >= 1
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.http_port}/healthz") as resp:
            assert json.loads(resp.read()) == {"status": "ok"}
        key = srv.state_dir / "ssh_host_ed25519_key"
        assert key.is_file() and oct(key.stat().st_mode)[-3:] == "600"
        fingerprint = subprocess.check_output(["ssh-keygen", "-lf", f"{key}.pub"], text=True)
        assert fingerprint.split()[1] in srv.log()
    finally:
        srv.stop()


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    from tests.support.testenv import ROOT

    unit = (ROOT / "systemd" / "deployd.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=deployd",
        "LoadCredential=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
    ):
        assert line in unit
    local = tmp_path / "deployd.service"
    local.write_text(unit.replace("/usr/local/bin/deployd", str(ROOT / ".venv/bin/deployd")))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


# -- what a push may store, and how a connection may be made -------------------------


def test_a_push_over_max_push_mb_is_refused_before_it_is_stored(
    tmp_path: Path, testenv: Infra
) -> None:
    srv = make_server(tmp_path / "srv", testenv, max_push_mb=1)
    srv.start()
    try:
        repo = project(tmp_path, testenv, srv)
        (repo / "include" / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024))
        commit = commit_all(repo, "A 3 MB file")
        push = srv.git(repo, "push", "astro", "main")
        assert push.returncode != 0
        assert "pack exceeds maximum allowed size" in push.stderr, push.stderr
        server_repo = srv.state_dir / "repos" / "prod.git"
        kept = subprocess.run(
            ["git", "-C", str(server_repo), "cat-file", "-e", commit], capture_output=True
        )
        assert kept.returncode != 0  # nothing of it was kept
        assert deploys(srv) == []  # and nothing was deployed
    finally:
        srv.stop()


def _bad_tree_commit(repo: Path, names: list[bytes]) -> str:
    """A commit whose root tree lists `names` (each a blob), written as git would not."""
    blob = subprocess.run(
        ["git", "-C", str(repo), "hash-object", "-w", "--stdin"],
        input=b"x = 1\n",
        capture_output=True,
        check=True,
    ).stdout.strip()
    raw = b"".join(b"100644 " + n + b"\0" + bytes.fromhex(blob.decode()) for n in names)
    tree = (
        subprocess.run(
            ["git", "-C", str(repo), "hash-object", "-t", "tree", "-w", "--literally", "--stdin"],
            input=raw,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .strip()
    )
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return subprocess.run(
        ["git", "-C", str(repo), "commit-tree", tree, "-p", head, "-m", "Malformed tree"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **GIT_ENV},
    ).stdout.strip()


@pytest.mark.parametrize(
    ("names", "fsck"),
    [
        ([b"Dockerfile", b"Dockerfile"], "duplicateEntries"),
        ([b"..", b"Dockerfile"], "hasDotdot"),
        ([b".git", b"Dockerfile"], "hasDotgit"),
    ],
)
def test_a_push_with_a_malformed_tree_is_refused(
    tmp_path: Path, testenv: Infra, server: Server, names: list[bytes], fsck: str
) -> None:
    repo = project(tmp_path, testenv, server)
    bad = _bad_tree_commit(repo, names)
    push = server.git(repo, "push", "astro", f"{bad}:refs/heads/main")
    assert push.returncode != 0
    assert fsck in push.stderr, push.stderr
    assert deploys(server) == []


@pytest.mark.parametrize(
    ("opts", "refusal"),
    [
        (("-o", "KexAlgorithms=diffie-hellman-group14-sha1"), "no matching key exchange"),
        (("-o", "KexAlgorithms=diffie-hellman-group-exchange-sha256"), "no matching key exchange"),
        (("-o", "KexAlgorithms=diffie-hellman-group18-sha512"), "no matching key exchange"),
        (("-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-sha1"), "no matching MAC"),
    ],
)
def test_weak_algorithms_are_not_offered(
    server: Server, opts: tuple[str, ...], refusal: str
) -> None:
    # ssh tells why it gave up at log level INFO (the first LogLevel given wins).
    argv = [o.replace("LogLevel=ERROR", "LogLevel=INFO") for o in server.ssh_argv("alice", *opts)]
    weak = subprocess.run(
        [*argv, "help"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert weak.returncode != 0 and refusal in weak.stderr, weak.stderr
    modern = server.ssh("help", opts=("-o", "Ciphers=aes128-ctr"))
    assert modern.returncode == 0, modern.stderr  # with an etm MAC


def test_an_ssh_audit_finds_nothing_to_fail(server: Server) -> None:
    audit = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "ssh-audit"),
            "-j",
            "-p",
            str(server.ssh_port),
            "127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    report = json.loads(audit.stdout)
    failing = [
        alg["algorithm"]
        for section in ("kex", "key", "enc", "mac")
        for alg in report.get(section, [])
        if alg.get("notes", {}).get("fail")
    ]
    assert failing == [], failing
