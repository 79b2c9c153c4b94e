"""A real Prometheus scrapes a real `deployd serve` during real deploys.

Debian's `prometheus` runs on a loopback port with a config of the test's own
(scrape_interval 1s, the example alert rules loaded); deploys are pushed over SSH
to the daemon and run by `deployd deploy` in another process; the test asks
Prometheus's HTTP API what it scraped and compares with the records.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.projects import GOOD_DAG, commit_all, git, make_project
from tests.support.sshserver import Server, free_port, make_server
from tests.support.testenv import ROOT, Deployd, Infra

pytestmark = pytest.mark.integration

TOKEN = "scrape-t0ken"
RULES = ROOT / "deploy" / "prometheus" / "deployd-alerts.yml"
BROKEN_DAG = "from airflow.sdk import DAG\nimport not_installed_anywhere\n"


@dataclass
class Prometheus:
    """Debian's prometheus on loopback, scraping one target every second."""

    proc: subprocess.Popen[bytes]
    port: int
    root: Path

    def api(self, path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer = json.loads(resp.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def series(self, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        """The instant vector of `expr` as {(label values...): value}."""
        return {
            tuple(r["metric"].get(k, "") for k in labels): float(r["value"][1])
            for r in self.query(expr)
        }

    def log(self) -> str:
        return (self.root / "prometheus.log").read_text()[-3000:]


def start_prometheus(root: Path, target: str, token_file: Path | None) -> Prometheus:
    root.mkdir(parents=True)
    port = free_port()
    job: dict[str, Any] = {
        "job_name": "deployd",
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "static_configs": [{"targets": [target]}],
    }
    if token_file is not None:
        job["authorization"] = {"credentials_file": str(token_file)}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [job],
    }
    (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    with open(root / "prometheus.log", "ab") as log:
        proc = subprocess.Popen(
            [
                "/usr/bin/prometheus",
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
    prom = Prometheus(proc, port, root)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, prom.log()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return prom
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"prometheus never got ready:\n{prom.log()}")


@pytest.fixture
def prometheus_factory() -> Iterator[Callable[..., Prometheus]]:
    started: list[Prometheus] = []

    def factory(root: Path, target: str, token_file: Path | None = None) -> Prometheus:
        prom = start_prometheus(root, target, token_file)
        started.append(prom)
        return prom

    yield factory
    for prom in started:
        prom.proc.send_signal(signal.SIGTERM)
        try:
            prom.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prom.proc.kill()
            prom.proc.wait()


def server_with(root: Path, infra: Infra, server_lines: str) -> Server:
    srv = make_server(root, infra)
    text = srv.config.read_text().replace("[docker]", f"{server_lines}\n[docker]", 1)
    srv.config.write_text(text)
    return srv


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def records(srv: Server, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(srv.state_dir / "deployd.db")
    try:
        return [tuple(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def recorded_totals(srv: Server) -> dict[tuple[str, ...], float]:
    """What deployd_deploys_total must say: the records' final deploys, grouped."""
    rows = records(
        srv,
        "SELECT deployment, trigger, action, kind, state, COUNT(*) FROM deploys "
        "WHERE state NOT IN ('queued', 'running') GROUP BY 1, 2, 3, 4, 5",
    )
    return {tuple(r[:5]): float(r[5]) for r in rows}


def recorded_info(srv: Server) -> dict[tuple[str, ...], float]:
    """What deployd_deploy_info must say: each deployment's newest succeeded deploy."""
    rows = records(
        srv,
        "SELECT deployment, commit_sha, digest FROM deploys WHERE id IN "
        "(SELECT MAX(id) FROM deploys WHERE state = 'succeeded' GROUP BY deployment)",
    )
    return {tuple(r): 1.0 for r in rows}


TOTAL_LABELS = ("deployment", "trigger", "action", "kind", "state")
INFO_LABELS = ("deployment", "commit", "image_digest")


def scraped_equals(
    prom: Prometheus, expr: str, labels: tuple[str, ...], want: dict[tuple[str, ...], float]
) -> dict[tuple[str, ...], float]:
    """What Prometheus has for `expr` once it equals `want` (or at a 30 s deadline)."""
    deadline = time.monotonic() + 30
    while (got := prom.series(expr, *labels)) != want and time.monotonic() < deadline:
        time.sleep(0.25)
    return got


def test_prometheus_scrapes_what_the_records_say_during_real_deploys(
    tmp_path: Path, testenv: Infra, prometheus_factory: Callable[..., Prometheus]
) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text(TOKEN + "\n")
    srv = server_with(tmp_path / "srv", testenv, f'metrics_token_file = "{token_file}"')
    srv.start()
    try:
        port = srv.http_port
        # The token guards /metrics (and only it).
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, text = get(port, "/metrics", headers)
            assert status == 401 and "metrics_token_file" in text and TOKEN not in text
        status, exposition = get(port, "/metrics", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and "deployd_queue_depth" in exposition
        prom = prometheus_factory(tmp_path / "prom", f"127.0.0.1:{port}", token_file)

        # Real deploys: two pushes to prod over SSH (one with a broken DAG, refused), a
        # `deployd deploy` of staging in a process of its own, then a fixed push.
        repo = make_project(tmp_path / "proj", testenv.airflow_image)
        git(repo, "remote", "add", "astro", srv.url("prod"))
        assert srv.git(repo, "push", "astro", "main").returncode == 0
        (repo / "dags" / "broken.py").write_text(BROKEN_DAG)
        commit_all(repo, "A broken DAG")
        refused = srv.git(repo, "push", "astro", "main")
        assert refused.returncode != 0 and "ModuleNotFoundError" in refused.stderr
        other = make_project(
            tmp_path / "other", testenv.airflow_image, dags={"a.py": GOOD_DAG.format(dag_id="a")}
        )
        cli = Deployd(srv.config, srv.state_dir).run("deploy", "staging", str(other))
        assert cli.returncode == 0, cli.stderr
        (repo / "dags" / "broken.py").unlink()
        fixed = commit_all(repo, "Fix the DAG")
        assert srv.git(repo, "push", "astro", "main").returncode == 0

        want = recorded_totals(srv)
        assert want == {
            ("prod", "ssh", "deploy", "image", "succeeded"): 2.0,
            ("prod", "ssh", "deploy", "image", "failed"): 1.0,
            ("staging", "cli", "deploy", "image", "succeeded"): 1.0,
        }
        totals = scraped_equals(prom, "deployd_deploys_total", TOTAL_LABELS, want)
        assert totals == want, prom.log()
        info = recorded_info(srv)
        assert [k[1] for k in info if k[0] == "prod"] == [fixed]
        scraped = scraped_equals(prom, "deployd_deploy_info", INFO_LABELS, info)
        assert scraped == info, prom.log()
        durations = prom.series("deployd_deploy_duration_seconds_count", "deployment")
        assert durations == {("prod",): 3.0, ("staging",): 1.0}
        builds = prom.series('deployd_step_duration_seconds_count{step="build"}', "step")
        assert builds == {("build",): 4.0}

        # Prometheus evaluates the example rules on these very series.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            alerts = prom.api("alerts")["alerts"]
            firing = {
                (a["labels"]["alertname"], a["labels"].get("deployment"))
                for a in alerts
                if a["state"] == "firing"
            }
            if ("DeploydDeployFailed", "prod") in firing:
                break
            time.sleep(0.25)
        assert ("DeploydDeployFailed", "prod") in firing, alerts
        assert ("DeploydDeployFailed", "staging") not in firing

        # promtool lints the real exposition.
        _, exposition = get(port, "/metrics", {"Authorization": f"Bearer {TOKEN}"})
        lint = subprocess.run(
            ["promtool", "check", "metrics"],
            input=exposition,
            capture_output=True,
            text=True,
            check=False,
        )
        assert (lint.returncode, lint.stdout, lint.stderr) == (0, "", ""), lint

        # A restart: the counters come back from the records, no reset for Prometheus.
        started = prom.series("process_start_time_seconds", "job")
        assert srv.stop() == 0
        srv.start()
        deadline = time.monotonic() + 30
        while prom.series("process_start_time_seconds", "job") in (started, {}):
            assert time.monotonic() < deadline, prom.log()  # down, then the new process
            time.sleep(0.25)
        assert prom.series("deployd_deploys_total", *TOTAL_LABELS) == want
        assert prom.series("deployd_deploy_info", *INFO_LABELS) == info
        resets = prom.series("resets(deployd_deploys_total[5m])", *TOTAL_LABELS)
        assert resets == dict.fromkeys(want, 0.0)
    finally:
        srv.stop()


def test_metrics_listen_serves_metrics_alone_and_prometheus_scrapes_it(
    tmp_path: Path, testenv: Infra, prometheus_factory: Callable[..., Prometheus]
) -> None:
    metrics_port = free_port()
    srv = server_with(tmp_path / "srv", testenv, f'metrics_listen = "127.0.0.1:{metrics_port}"')
    srv.start()
    try:
        assert get(srv.http_port, "/metrics")[0] == 404  # not on http_listen
        assert get(srv.http_port, "/healthz")[0] == 200
        status, text = get(metrics_port, "/metrics")  # open: no metrics_token_file
        assert status == 200 and "deployd_deploys_in_flight" in text
        assert get(metrics_port, "/healthz")[0] == 404
        prom = prometheus_factory(tmp_path / "prom", f"127.0.0.1:{metrics_port}")
        deadline = time.monotonic() + 30
        while (queued := prom.series("deployd_queue_depth", "deployment")) == {}:
            assert time.monotonic() < deadline, prom.log()
            time.sleep(0.25)
        assert queued == {("prod",): 0.0, ("staging",): 0.0}
        assert prom.series("up", "job") == {("deployd",): 1.0}
        assert prom.series("deployd_ssh_sessions", "job") == {("deployd",): 0.0}
        # A signed-in SSH connection (-N: no command) counts while it is open.
        held = subprocess.Popen(
            srv.ssh_argv("alice", "-N"), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            sessions = scraped_equals(prom, "deployd_ssh_sessions", ("job",), {("deployd",): 1.0})
            assert sessions == {("deployd",): 1.0}, prom.log()
        finally:
            held.terminate()
            held.wait(timeout=10)
        sessions = scraped_equals(prom, "deployd_ssh_sessions", ("job",), {("deployd",): 0.0})
        assert sessions == {("deployd",): 0.0}, prom.log()
    finally:
        assert srv.stop() == 0
    with pytest.raises(OSError):  # the metrics listener stopped with the daemon
        get(metrics_port, "/metrics")
