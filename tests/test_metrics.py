"""The metrics collector over real SQLite records: the rebuild at start, the outbox tail at
each scrape, restarts, and labels that stay bounded.

Deploys are made the way the pipeline makes them (Records.create_deploy, plan_steps,
transition, step_started/finished), some by a second Records on the same file as a
`deployd deploy` in another process would; the collector reads through a Records of its own.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import config
from daemon.adapters.records import Records
from daemon.config import NotifyTarget, Settings
from daemon.core import deploys
from daemon.core.deploys import Options
from daemon.metrics import BUCKETS, Metrics
from tests.support.testenv import ROOT

RULES = ROOT / "deploy" / "prometheus" / "deployd-alerts.yml"
# The families that come from the records (the rest are this process's).
RECORDED = (
    "deployd_deploys_total",
    "deployd_rollbacks_total",
    "deployd_deploy_duration_seconds",
    "deployd_step_duration_seconds",
    "deployd_deploy_info",
    "deployd_last_success_timestamp_seconds",
)
T0 = 1_700_000_000.0


def make_settings(tmp_path: Path, *names: str) -> Settings:
    return config.parse(
        {
            "server": {"state_dir": str(tmp_path / "state")},
            "deployment": [{"name": n, "image": f"r.example/a/{n}"} for n in names],
        },
        base=tmp_path,
        path=tmp_path / "deployd.toml",
    )


class World:
    """Records in tmp_path, a collector on a Records of its own, deploys made through Records."""

    def __init__(self, tmp_path: Path, *names: str) -> None:
        self.settings = make_settings(tmp_path, *(names or ("prod", "staging")))
        self.db = tmp_path / "state" / "deployd.db"
        self.records = Records(self.db)
        self.metrics = self.new_metrics()

    def new_metrics(self) -> Metrics:
        """A collector as a freshly started daemon has it."""
        return Metrics(lambda: self.settings, Records(self.db), lambda: 0)

    def deploy(
        self,
        state: str,
        deployment: str = "prod",
        *,
        trigger: str = "ssh",
        action: str = "deploy",
        commit: str = "c" * 40,
        took: float = 45.0,
        steps: dict[str, tuple[str, float | None]] | None = None,
        records: Records | None = None,
        start: float = T0,
        kind: str = deploys.IMAGE,
    ) -> int:
        """A deploy run to `state`; `steps` maps a step to (its end state, seconds or None)."""
        rec = records or self.records
        did = rec.create_deploy(
            deployment=deployment,
            trigger=trigger,
            actor="ada",
            ref="refs/heads/main",
            options=Options(),
            pid=1,
            action=action,
            commit=commit,
            kind=kind,
        )
        if state in (deploys.SUPERSEDED, deploys.CANCELLED) and steps is None:
            assert rec.transition(did, deploys.QUEUED, state)  # ended while queued
            return did
        plan = steps if steps is not None else {"checkout": ("succeeded", 2.0)}
        rec.plan_steps(did, [(name, "") for name in plan])
        assert rec.transition(did, deploys.QUEUED, deploys.RUNNING, started_at=start)
        for name, (step_state, seconds) in plan.items():
            if seconds is None:
                continue
            rec.step_started(did, name)
            rec.step_finished(did, name, step_state, "done")
            rec.db.execute(
                "UPDATE steps SET started_at = ?, finished_at = ? WHERE deploy_id = ? AND name = ?",
                [start, start + seconds, did, name],
            )
        rec.update(did, digest=f"sha256:{did:064x}")
        assert rec.transition(did, deploys.RUNNING, state, finished_at=start + took)
        return did

    def scrape(
        self, metrics: Metrics | None = None
    ) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of one scrape: (name, labels) → value."""
        text = (metrics or self.metrics).exposition().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def sample(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def recorded(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[object, float]:
    return {k: v for k, v in scraped.items() if k[0].startswith(RECORDED)}


def total(deployment: str, state: str, trigger: str = "ssh", action: str = "deploy") -> object:
    return sample(
        "deployd_deploys_total",
        deployment=deployment,
        trigger=trigger,
        action=action,
        kind="image",
        state=state,
    )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_each_final_state_is_counted_once_with_its_labels(world: World) -> None:
    assert recorded(world.scrape()) == {}  # nothing finished yet: no series
    world.deploy("succeeded")
    world.deploy("succeeded", trigger="webhook")
    world.deploy("failed")
    first = world.scrape()
    world.deploy("rolled_back")
    world.deploy("succeeded", action="rollback")
    world.deploy("cancelled", "staging", trigger="cli")
    world.deploy("superseded", "staging", trigger="webhook")
    world.deploy("interrupted", "staging", trigger="cli")
    again = world.scrape()
    assert first[total("prod", "succeeded")] == 1 and first[total("prod", "failed")] == 1
    assert {k: v for k, v in again.items() if k[0] == "deployd_deploys_total"} == {
        total("prod", "succeeded"): 1,
        total("prod", "succeeded", trigger="webhook"): 1,
        total("prod", "failed"): 1,
        total("prod", "rolled_back"): 1,
        total("prod", "succeeded", action="rollback"): 1,
        total("staging", "cancelled", trigger="cli"): 1,
        total("staging", "superseded", trigger="webhook"): 1,
        total("staging", "interrupted", trigger="cli"): 1,
    }
    rollbacks = {k: v for k, v in again.items() if k[0] == "deployd_rollbacks_total"}
    assert rollbacks == {
        sample("deployd_rollbacks_total", deployment="prod", automatic="true"): 1,
        sample("deployd_rollbacks_total", deployment="prod", automatic="false"): 1,
    }
    assert recorded(world.scrape()) == recorded(again)  # nothing new: the same counts


def test_a_restart_rebuilds_exactly_what_the_scrapes_counted(world: World) -> None:
    world.metrics.rebuild()  # at start, before any deploy
    for i, state in enumerate(["succeeded", "failed", "succeeded", "rolled_back", "interrupted"]):
        world.deploy(state, "prod" if i % 2 else "staging", commit=f"{i:040x}", took=10.0 * i)
        world.scrape()
    # A deploy running while the daemon restarts, and ending afterwards.
    running = world.records.create_deploy(
        deployment="prod", trigger="ssh", actor="a", ref="r", options=Options(), pid=1
    )
    world.records.transition(running, deploys.QUEUED, deploys.RUNNING)
    tailed = world.scrape()
    restarted = world.new_metrics()
    assert recorded(world.scrape(restarted)) == recorded(tailed)
    world.records.transition(running, deploys.RUNNING, deploys.SUCCEEDED)
    after = world.scrape(restarted)
    assert after[total("prod", "succeeded")] == tailed.get(total("prod", "succeeded"), 0) + 1
    assert recorded(world.scrape(world.new_metrics())) == recorded(after)
    assert recorded(world.scrape()) == recorded(after)  # the first collector tails it too


def test_a_deploy_that_ends_during_the_rebuild_is_counted_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    did = world.records.create_deploy(
        deployment="prod", trigger="ssh", actor="a", ref="r", options=Options(), pid=1
    )
    world.records.transition(did, deploys.QUEUED, deploys.RUNNING, started_at=T0)
    original = Records._rows
    ended = []

    def finish_then_read(self: Records, sql: str, args: Any = ()) -> list[dict[str, Any]]:
        if not ended and self is world.metrics.records:
            # The rebuild has read where the outbox ends; another connection ends the
            # deploy before the rebuild reads the deploys.
            ended.append(
                world.records.transition(did, deploys.RUNNING, deploys.FAILED, finished_at=T0 + 5)
            )
        return original(self, sql, args)

    monkeypatch.setattr(Records, "_rows", finish_then_read)
    world.metrics.rebuild()
    monkeypatch.undo()
    assert ended == [True]
    # The rebuild's one read did not see it end; the scrape counts it from its event, once.
    for _ in range(2):
        scraped = world.scrape()
        assert scraped[total("prod", "failed", trigger="ssh")] == 1
        durations = sample("deployd_deploy_duration_seconds_count", deployment="prod", kind="image")
        assert scraped[durations] == 1


def test_deploys_of_another_process_and_from_before_the_outbox_count(world: World) -> None:
    other = Records(world.db)  # a `deployd deploy` in another process
    world.deploy("succeeded", records=other)
    # A deploy recorded before the outbox existed (schema 4) has no events.
    old = world.deploy("failed", records=other)
    other.db.execute("DELETE FROM events WHERE deploy_id = ?", [old])
    scraped = world.scrape()
    assert scraped[total("prod", "succeeded")] == 1
    assert scraped[total("prod", "failed")] == 1  # from the rebuild's read of `deploys`
    world.deploy("failed", records=other)
    assert world.scrape()[total("prod", "failed")] == 2


def test_deploys_are_counted_and_timed_by_their_recorded_kind(world: World) -> None:
    world.deploy("succeeded", took=600.0)
    world.deploy("failed", kind=deploys.DAGS, took=3.0)
    world.metrics = world.new_metrics()  # these two come from the rebuild at start
    world.scrape()
    world.deploy("succeeded", kind=deploys.DAGS, took=4.0)  # this one from the outbox
    scraped = world.scrape()

    def count(kind: str, state: str) -> float:
        labels = {"trigger": "ssh", "action": "deploy", "kind": kind, "state": state}
        return scraped.get(sample("deployd_deploys_total", deployment="prod", **labels), 0)

    assert (count("image", "succeeded"), count("image", "failed")) == (1, 0)
    assert (count("dags", "succeeded"), count("dags", "failed")) == (1, 1)
    took = "deployd_deploy_duration_seconds_sum"
    assert scraped[sample(took, deployment="prod", kind="image")] == 600.0
    assert scraped[sample(took, deployment="prod", kind="dags")] == 7.0


def test_durations_fall_in_their_buckets(world: World) -> None:
    world.deploy(
        "succeeded",
        took=45.0,
        steps={
            "checkout": ("succeeded", 0.4),
            "build": ("succeeded", 100.0),
            "parse": ("failed", 7.0),
            "pytest": ("skipped", None),
            "push": ("cancelled", 3.0),
        },
    )
    world.deploy("failed", took=4000.0, steps={"build": ("succeeded", 2.5)})
    world.deploy("interrupted", took=90000.0, steps={"build": ("interrupted", 80000.0)})
    scraped = world.scrape()

    def buckets(name: str, **labels: str) -> list[float]:
        return [scraped[sample(f"{name}_bucket", le=repr(le), **labels)] for le in BUCKETS] + [
            scraped[sample(f"{name}_bucket", le="+Inf", **labels)]
        ]

    deploy = {"deployment": "prod", "kind": "image"}
    # 45 s from 30 s up; 4000 s only in +Inf; the interrupted deploy is not timed.
    assert buckets("deployd_deploy_duration_seconds", **deploy) == [0, 0, 0, 0, 0] + [1] * 7 + [2]
    assert scraped[sample("deployd_deploy_duration_seconds_count", **deploy)] == 2
    assert scraped[sample("deployd_deploy_duration_seconds_sum", **deploy)] == 4045.0
    step = "deployd_step_duration_seconds"
    assert buckets(step, step="checkout") == [1] * 13
    assert buckets(step, step="parse") == [0, 0, 0] + [1] * 10  # a failed step is timed
    assert buckets(step, step="build") == [0, 1, 1, 1, 1, 1] + [2] * 7
    assert scraped[sample(f"{step}_sum", step="build")] == 102.5
    # Skipped, cancelled and interrupted steps have no duration of their own.
    assert not [k for k in scraped if k[0].startswith(step) and ("step", "push") in k[1]]
    assert not [k for k in scraped if k[0].startswith(step) and ("step", "pytest") in k[1]]


def test_deploy_info_is_the_newest_success_of_each_configured_deployment(world: World) -> None:
    first = world.deploy("succeeded", commit="1" * 40, start=T0)
    newest = world.deploy("succeeded", commit="2" * 40, start=T0 + 100)
    world.deploy("failed", commit="3" * 40, start=T0 + 200)
    world.deploy("succeeded", "gone", commit="4" * 40)  # no longer configured
    scraped = world.scrape()
    info = {k: v for k, v in scraped.items() if k[0] == "deployd_deploy_info"}
    assert info == {
        sample(
            "deployd_deploy_info",
            deployment="prod",
            commit="2" * 40,
            image_digest=f"sha256:{newest:064x}",
        ): 1
    }
    last = sample("deployd_last_success_timestamp_seconds", deployment="prod")
    assert scraped[last] == T0 + 100 + 45
    assert sample("deployd_last_success_timestamp_seconds", deployment="staging") not in scraped
    # A rollback to the first deploy's image is what runs now.
    world.deploy("succeeded", action="rollback", commit="1" * 40, start=T0 + 300)
    info = [k for k in world.scrape() if k[0] == "deployd_deploy_info"]
    assert [dict(k[1])["commit"] for k in info] == ["1" * 40]
    assert first < newest


def test_in_flight_and_queue_depth_cover_every_configured_deployment(world: World) -> None:
    def gauges() -> dict[tuple[str, str], float]:
        return {
            (k[0], dict(k[1])["deployment"]): v
            for k, v in world.scrape().items()
            if k[0] in ("deployd_deploys_in_flight", "deployd_queue_depth")
        }

    assert gauges() == {
        ("deployd_deploys_in_flight", "prod"): 0,
        ("deployd_deploys_in_flight", "staging"): 0,
        ("deployd_queue_depth", "prod"): 0,
        ("deployd_queue_depth", "staging"): 0,
    }
    ids = [
        world.records.create_deploy(
            deployment="prod", trigger="ssh", actor="a", ref="r", options=Options(), pid=1
        )
        for _ in range(3)
    ]
    world.records.transition(ids[0], deploys.QUEUED, deploys.RUNNING)
    assert gauges()[("deployd_deploys_in_flight", "prod")] == 1
    assert gauges()[("deployd_queue_depth", "prod")] == 2
    world.settings = make_settings(world.db.parent.parent, "prod", "staging", "new")  # a reload
    assert gauges()[("deployd_queue_depth", "new")] == 0


def test_labels_stay_bounded(world: World) -> None:
    commits = [f"{i:040x}" for i in range(1, 40)]
    for commit in commits:
        world.deploy("succeeded", commit=commit)
        world.deploy("failed", "staging", commit=commit)
    m = world.metrics
    for event in ("push", "ping", "x" * 60, "push\n", "../../etc", "zen_" + "a" * 40):
        m.webhook_delivery(event, "ignored")
    with pytest.raises(ValueError, match="outcome"):
        m.webhook_delivery("push", "teapot")
    with pytest.raises(ValueError, match="outcome"):
        m.notification("slack", "sent")
    scraped = world.scrape()
    hooks = {dict(k[1])["event"]: v for k, v in scraped.items() if "webhook" in k[0]}
    assert hooks == {"push": 1, "ping": 1, "other": 4}
    for (name, labels), _value in scraped.items():
        values = {v for _, v in labels}
        if name == "deployd_deploy_info":
            assert values & set(commits) == {commits[-1]}
        else:
            assert not values & set(commits), name
    assert len([k for k in scraped if k[0] == "deployd_deploy_info"]) == 1
    series = {k for k in scraped if k[0].startswith("deployd_")}
    world.deploy("succeeded", commit="f" * 40)
    assert len({k for k in world.scrape() if k[0].startswith("deployd_")}) == len(series)


def test_process_counters_start_at_zero_and_notification_targets_are_listed(
    world: World,
) -> None:
    world.settings = dataclasses.replace(
        world.settings, notify=(NotifyTarget("slack", "slack", "https://hooks.example/x"),)
    )
    sessions = [2]
    m = Metrics(lambda: world.settings, Records(world.db), lambda: sessions[0])
    m.notification("slack", "failed")
    m.notification("slack", "failed")
    m.notification("slack", "delivered")
    m.webhook_delivery("push", "deployed")
    scraped = world.scrape(m)
    notified = {
        dict(k[1])["outcome"]: v
        for k, v in scraped.items()
        if k[0] == "deployd_notifications_total"
    }
    assert notified == {"delivered": 1, "failed": 2, "dropped": 0}
    assert (
        scraped[sample("deployd_webhook_deliveries_total", event="push", outcome="deployed")] == 1
    )
    assert scraped[sample("deployd_ssh_sessions")] == 2
    sessions[0] = 0
    assert world.scrape(m)[sample("deployd_ssh_sessions")] == 0
    assert scraped[sample("process_open_fds")] > 0
    assert scraped[sample("process_resident_memory_bytes")] > 0
    # A new process (a restart) starts its own counts from zero.
    fresh = world.scrape(Metrics(lambda: world.settings, Records(world.db)))
    assert fresh[sample("deployd_notifications_total", target="slack", outcome="failed")] == 0
    assert not [k for k in fresh if k[0] == "deployd_webhook_deliveries_total"]


def test_the_rebuild_runs_in_a_thread_and_a_scrape_waits_for_it(world: World) -> None:
    for _ in range(3):
        world.deploy("succeeded")
    thread = world.metrics.start()
    scraped = world.scrape()  # whether the rebuild is done yet or not
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert scraped[total("prod", "succeeded")] == 3
    assert world.scrape()[total("prod", "succeeded")] == 3


def _alert(name: str, severity: str, summary: str, description: str, **labels: str) -> object:
    return {
        "exp_labels": {"severity": severity, **labels},
        "exp_annotations": {"summary": summary, "description": description},
    }


def _failed(deployment: str) -> str:
    return (
        f'deployd_deploys_total{{deployment="{deployment}",trigger="ssh",action="deploy",'
        'kind="image",state="failed"}'
    )


@pytest.mark.integration
def test_the_example_alert_rules_pass_promtool_and_fire_when_they_should(tmp_path: Path) -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout

    def failed(deployment: str) -> object:
        return _alert(
            "DeploydDeployFailed",
            "warning",
            f"A deploy of {deployment} failed.",
            f"deployd recorded a failed deploy of {deployment} in the last 15 minutes. "
            f"`deployd deploys {deployment}` lists it; `deployd logs ID` shows the step that "
            "failed and why.",
            deployment=deployment,
        )

    rolled_back = _alert(
        "DeploydRolledBack",
        "critical",
        "A rollout of prod failed and was rolled back.",
        "A deploy of prod rolled out, did not become ready and was rolled back to the previous "
        "image in the last 15 minutes. What runs now is in `deployd status prod`.",
        deployment="prod",
    )
    notify = _alert(
        "DeploydNotificationsFailing",
        "warning",
        "Notifications to slack keep failing.",
        "deployd has failed to deliver deploy notifications to the [[notify]] target slack for "
        "at least 10 minutes; its log says why.",
        target="slack",
    )
    down = _alert(
        "DeploydDown",
        "critical",
        "Prometheus cannot scrape deployd on build:8080.",
        "/metrics has not answered for 5 minutes: `deployd serve` may be down (`systemctl "
        "status deployd`), or the metrics token may have changed.",
        job="deployd",
        instance="build:8080",
    )
    stale = _alert(
        "DeploydNoRecentSuccess",
        "info",
        "prod has not been deployed for over 7 days.",
        "The newest successful deploy of prod ended 8d 0h 0m 0s ago.",
        deployment="prod",
    )

    def expect(at: str, alert: str, *alerts: object) -> object:
        return {"eval_time": at, "alertname": alert, "exp_alerts": list(alerts)}

    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # prod's first failure ever at 30m (a new series); staging's second at 40m.
                    {"series": _failed("prod"), "values": "_x30 1x60"},
                    {"series": _failed("staging"), "values": "1x40 2x50"},
                    {
                        "series": 'deployd_rollbacks_total{deployment="prod",automatic="true"}',
                        "values": "_x30 1x60",
                    },
                    # slack fails from 20m on; teams never does.
                    {
                        "series": 'deployd_notifications_total{target="slack",outcome="failed"}',
                        "values": "0x20 1+1x60",
                    },
                    {
                        "series": 'deployd_notifications_total{target="teams",outcome="failed"}',
                        "values": "0x80",
                    },
                    {
                        "series": 'up{job="deployd",instance="build:8080"}',
                        "values": "1x20 0x40",
                    },
                ],
                "alert_rule_test": [
                    expect("20m", "DeploydDeployFailed"),
                    expect("35m", "DeploydDeployFailed", failed("prod")),
                    expect("45m", "DeploydDeployFailed", failed("staging")),
                    expect("80m", "DeploydDeployFailed"),
                    expect("20m", "DeploydRolledBack"),
                    expect("35m", "DeploydRolledBack", rolled_back),
                    expect("55m", "DeploydRolledBack"),
                    expect("25m", "DeploydNotificationsFailing"),  # pending
                    expect("40m", "DeploydNotificationsFailing", notify),
                    expect("22m", "DeploydDown"),
                    expect("30m", "DeploydDown", down),
                ],
            },
            {
                "interval": "5m",
                "input_series": [
                    {  # its last success at time 0
                        "series": 'deployd_last_success_timestamp_seconds{deployment="prod"}',
                        "values": "0x2400",
                    },
                    {  # a success every 5 minutes
                        "series": 'deployd_last_success_timestamp_seconds{deployment="staging"}',
                        "values": "0+300x2400",
                    },
                ],
                "alert_rule_test": [
                    expect("6d", "DeploydNoRecentSuccess"),
                    expect("8d", "DeploydNoRecentSuccess", stale),
                ],
            },
        ],
    }
    (tmp_path / "tests.yml").write_text(json.dumps(tests, indent=1))  # JSON is YAML
    ran = subprocess.run(
        ["promtool", "test", "rules", str(tmp_path / "tests.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "SUCCESS" in ran.stdout
