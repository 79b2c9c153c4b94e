"""A `deployd serve` wired to everything real for fault tests: SSH pushes, GitHub webhooks,
the Engine, the registry and the Kubernetes simulator, with the records read from outside.

Two deployments: `push` (alice pushes to it over SSH) and `hook` (GitHub deliveries for
acme/dags deploy it, fetched from a local "GitHub" repository). Each rolls one Deployment
on the simulator (`push-scheduler`, `hook-scheduler`). Deploy tags are
`deploy-{sha7}-{id}`, so a test knows a deploy's tag before it is pushed.

Their real names carry a random suffix (`names`): deployd removes leftover containers
by deployment name, and other test runs may share the Engine.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.fakegithub import FakeGitHub
from tests.support.kubesim import KubeSim
from tests.support.kubesim.controllers import SCENARIO
from tests.support.projects import git, make_project
from tests.support.sshserver import Server, free_port, make_key
from tests.support.tcpproxy import TcpProxy
from tests.support.testenv import Infra, write_config

SECRET = "fault-hook-s3cret"
FINAL = ("succeeded", "failed", "rolled_back", "cancelled", "superseded", "interrupted")
STAGING_TAG = "deployd-staging"


def scheduler(name: str, image: str, replicas: int = 2) -> dict[str, Any]:
    """A scheduler Deployment on `image` for the simulator (instant rollouts)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "airflow", "annotations": {SCENARIO: "instant"}},
        "spec": {
            "replicas": replicas,
            "progressDeadlineSeconds": 600,
            "selector": {"matchLabels": {"component": name}},
            "template": {
                "metadata": {"labels": {"component": name}},
                "spec": {"containers": [{"name": "scheduler", "image": image}]},
            },
        },
    }


@dataclass
class World:
    """The server, its simulator and fake GitHub, and the repositories that feed it."""

    root: Path
    infra: Infra
    srv: Server
    sim: KubeSim
    github: FakeGitHub
    source: Path  # what `hook`'s fetch_url names (GitHub's copy of acme/dags)
    local: Path  # alice's work tree; remote `astro` is the `push` deployment
    images: dict[str, str]
    names: dict[str, str]  # "push" / "hook" -> the deployment's name
    registry: TcpProxy  # deployd and the Engine reach the registry through it

    # -- the daemon ----------------------------------------------------------

    @property
    def db(self) -> Path:
        return self.srv.state_dir / "deployd.db"

    def running(self) -> bool:
        return self.srv.proc is not None and self.srv.proc.poll() is None

    def start(self) -> None:
        """Start `deployd serve` (again) and wait for READY=1."""
        if self.srv.notify is not None:
            self.srv.notify.close()
        self.srv.notes.clear()
        self.srv.start()

    def kill(self) -> None:
        """SIGKILL `deployd serve` and reap it."""
        assert self.srv.proc is not None
        self.srv.proc.kill()
        self.srv.proc.wait()

    # -- records, read as an operator would (read-only) ------------------------

    def rows(self, sql: str = "SELECT * FROM deploys ORDER BY id", args: tuple[Any, ...] = ()):  # type: ignore[no-untyped-def]
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, args)]
        finally:
            conn.close()

    def log_of(self, deploy_id: object) -> list[str]:
        """A deploy's stored log lines, in order."""
        rows = self.rows("SELECT line FROM log WHERE deploy_id = ? ORDER BY id", (deploy_id,))
        return [str(r["line"]) for r in rows]

    def deploy(self, deploy_id: int) -> dict[str, Any]:
        [row] = self.rows("SELECT * FROM deploys WHERE id = ?", (deploy_id,))
        row["steps"] = {
            s["name"]: s["state"]
            for s in self.rows(
                "SELECT name, state FROM steps WHERE deploy_id = ? ORDER BY position",
                (deploy_id,),
            )
        }
        return dict(row)

    def newest(self, deployment: str) -> dict[str, Any] | None:
        found = self.rows(
            "SELECT id FROM deploys WHERE deployment = ? ORDER BY id DESC LIMIT 1",
            (self.names[deployment],),
        )
        return self.deploy(found[0]["id"]) if found else None

    def wait_deploy(
        self,
        deployment: str,
        after: int,
        *,
        step: str | None = None,
        states: tuple[str, ...] | None = None,
        timeout: float = 240,
        poll: float = 0.02,
        while_alive: Any = None,
    ) -> dict[str, Any]:
        """The newest deploy of `deployment` with id > `after` once it is in `step` (running)
        or in one of `states`."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            last = self.newest(deployment)
            if last is not None and last["id"] > after:
                in_step = last["state"] == "running" and last["step"] == step
                # push: the deploy tag's turn (after the checks), not the staging upload
                if in_step and (step != "push" or last["steps"].get("parse") == "succeeded"):
                    return last
                if states is not None and last["state"] in states:
                    return last
                assert last["state"] not in FINAL or states, (last, self.srv.log())
            if while_alive is not None:
                assert while_alive.poll() is None, (while_alive.communicate(), last)
            time.sleep(poll)
        raise AssertionError(
            f"{deployment} never reached {step or states}: {last}\n{self.srv.log()}"
        )

    def wait_state(self, deploy_id: int, states: tuple[str, ...] = FINAL, timeout: float = 240):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.deploy(deploy_id)
            if rec["state"] in states:
                return rec
            time.sleep(0.1)
        raise AssertionError(f"deploy #{deploy_id} never reached {states}: {rec}\n{self.srv.log()}")

    def last_succeeded(self, deployment: str) -> dict[str, Any]:
        [row] = self.rows(
            "SELECT * FROM deploys WHERE deployment = ? AND state = 'succeeded' "
            "ORDER BY id DESC LIMIT 1",
            (self.names[deployment],),
        )
        return dict(row)

    # -- git -------------------------------------------------------------------

    def server_head(self, deployment: str) -> str:
        repo = self.srv.state_dir / "repos" / f"{self.names[deployment]}.git"
        return git(repo, "rev-parse", "refs/heads/main")

    def start_push(self, *options: str) -> subprocess.Popen[str]:
        argv = ["git", "-C", str(self.local), "push"]
        for o in options:
            argv += ["-o", o]
        return subprocess.Popen(
            [*argv, "astro", "main"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.srv.git_env(),
            start_new_session=True,
        )

    # -- webhooks -------------------------------------------------------------

    def deliver(  # type: ignore[no-untyped-def]
        self, commit: str, delivery: str | None = None, timeout: float = 60, branch: str = "main"
    ):
        """POST a signed push delivery for `commit`: (status, answer, seconds taken)."""
        body = json.dumps(
            {
                "ref": f"refs/heads/{branch}",
                "before": "0" * 40,
                "after": commit,
                "deleted": False,
                "repository": {"full_name": "acme/dags"},
                "head_commit": {"id": commit, "message": "Change the DAGs"},
                "pusher": {"name": "ada"},
            }
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-GitHub-Hook-ID": "4242",
            "X-Hub-Signature-256": "sha256="
            + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
        }
        t0 = time.monotonic()
        status, answer = self.http("POST", "/webhooks/github", body, headers, timeout)
        return status, answer, time.monotonic() - t0

    def http(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.http_port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            try:
                return resp.status, json.loads(data)
            except ValueError:
                return resp.status, {"raw": data.decode(errors="replace")}
        finally:
            conn.close()

    # -- registry and cluster ----------------------------------------------------

    def tags(self, deployment: str) -> list[str]:
        """The tags the registry has for the deployment's image."""
        name = self.images[deployment].split("/", 1)[1]
        auth = base64.b64encode(
            f"{self.infra.registry_user}:{self.infra.registry_password}".encode()
        ).decode()
        req = urllib.request.Request(
            f"http://{self.infra.registry}/v2/{name}/tags/list",
            headers={"Authorization": f"Basic {auth}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return sorted(json.loads(resp.read()).get("tags") or [])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise

    def workload(self, deployment: str) -> dict[str, Any]:
        return dict(self.sim.call(self._read, f"{deployment}-scheduler"))

    def _read(self, name: str) -> dict[str, Any]:
        from tests.support.kubesim.store import BY_PATH

        return json.loads(
            json.dumps(
                self.sim.sim.store.get(BY_PATH[("apps", "v1", "deployments")], "airflow", name)
            )
        )

    def template(self, deployment: str) -> tuple[str | None, str]:
        """(deploy id on the pod template, the scheduler container's image)."""
        template = self.workload(deployment)["spec"]["template"]
        annotations = template["metadata"].get("annotations") or {}
        return annotations.get("deployd.dev/deploy-id"), template["spec"]["containers"][0]["image"]

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.sim.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    def stop(self) -> None:
        self.srv.stop()
        self.github.stop()
        self.sim.stop()
        self.registry.stop()


@contextlib.contextmanager
def started(w: World, undo: Callable[[], None] = lambda: None) -> Iterator[World]:
    """Run `w` for a test; at the end, whatever happened, `undo` the test's faults (the
    Engine stopped, a proxy refusing), then stop the world."""
    try:
        w.start()
        yield w
    finally:
        undo()
        w.stop()


def make_world(root: Path, infra: Infra, *, state_dir: Path | None = None, **hook: object) -> World:
    """Write the config, the keys and both repositories, start the simulator and fake GitHub
    (not the daemon). `hook` adds keys to the `hook` deployment."""
    sim = KubeSim(root / "kubesim").start()
    github = FakeGitHub().start()
    host, _, port = infra.registry.rpartition(":")
    proxy = TcpProxy(host, int(port)).start()
    registry = f"127.0.0.1:{proxy.port}"
    suffix = uuid.uuid4().hex[:8]
    names = {d: f"{d}-{suffix}" for d in ("push", "hook")}
    images = {d: f"{registry}/airflow/faults-{names[d]}" for d in ("push", "hook")}
    source = make_project(root / "github-repo", infra.airflow_image)
    local = make_project(root / "alice", infra.airflow_image)
    common = {
        "namespace": "airflow",
        "rollout_timeout_seconds": 120,
        "tag_template": "deploy-{sha7}-{id}",
        "import_timeout_seconds": 120,
        "check_timeout_seconds": 300,
    }
    deployments: list[dict[str, object]] = [
        {
            "name": names["push"],
            "image": images["push"],
            "workloads": ["deployment/push-scheduler"],
            **common,
        },
        {
            "name": names["hook"],
            "image": images["hook"],
            "workloads": ["deployment/hook-scheduler"],
            "github_repo": "acme/dags",
            "fetch_url": str(source),
            **common,
            **hook,
        },
    ]
    (root / "keys").mkdir(parents=True)
    pubs = {name: make_key(root / "keys" / name) for name in ("alice", "root")}
    ssh_port, http_port = free_port(), free_port()
    state = state_dir or root / "state"
    config = write_config(
        root / "deployd.toml",
        infra,
        state,
        deployments=deployments,
        registry={
            "url": registry,
            "username": infra.registry_user,
            "password_file": str(infra.registry_password_file),
        },
    )
    (root / "secrets").mkdir()
    (root / "secrets" / "webhook").write_text(SECRET + "\n")
    (root / "secrets" / "github-token").write_text(github.token + "\n")
    text = config.read_text().replace(
        "[docker]",
        f'ssh_listen = "127.0.0.1:{ssh_port}"\nhttp_listen = "127.0.0.1:{http_port}"\n'
        'public_url = "https://deployd.example.com"\n\n'
        f'[github]\nwebhook_secret_file = "{root}/secrets/webhook"\n'
        f'token_file = "{root}/secrets/github-token"\napi_url = "{github.url}"\n\n'
        f'[kubernetes]\nkubeconfig = "{sim.kubeconfig}"\n\n[docker]',
        1,
    )
    for name, deps, admin in (("alice", [names["push"]], False), ("root", [], True)):
        text += f'\n[[key]]\nname = "{name}"\npublic_key = "{pubs[name]}"\n'
        text += f"deployments = {json.dumps(deps)}\n" + ("admin = true\n" if admin else "")
    config.write_text(text)
    srv = Server(root, ssh_port, http_port, config, state)
    world = World(root, infra, srv, sim, github, source, local, images, names, proxy)
    for dep in ("push", "hook"):
        path = root / f"{dep}-scheduler.json"
        path.write_text(json.dumps(scheduler(f"{dep}-scheduler", f"{images[dep]}:before")))
        world.kubectl("create", "-f", str(path), "--validate=false")
    git(local, "remote", "add", "astro", srv.url(names["push"]))
    return world


def set_rollout(world: World, deployment: str, scenario: str, replicas: int) -> None:
    """Make the deployment's workload roll `scenario` (instant, slow, ...) with `replicas`."""
    from tests.support.kubesim.store import BY_PATH

    res = BY_PATH[("apps", "v1", "deployments")]
    name = f"{deployment}-scheduler"

    def change() -> None:
        store = world.sim.sim.store
        obj = store.get(res, "airflow", name)
        obj["metadata"].setdefault("annotations", {})[SCENARIO] = scenario
        obj["spec"]["replicas"] = replicas
        store.replace(res, "airflow", name, obj, check_rv=False)

    world.sim.call(change)
