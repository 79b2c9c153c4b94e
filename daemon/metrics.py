"""Prometheus metrics: a custom collector over the records, plus what this process sees.

From the records: they count the deploys of every process (`deployd deploy` from CI
too) and survive a restart. At start, one consistent read of `deploys` and `steps`
sums every finished deploy; each scrape then adds the deploys that finished since,
found in the `events` outbox (ids above the last one read), so a scrape reads a few
rows, not the history:

    deployd_deploys_total{deployment,trigger,action,kind,state}     counter
    deployd_rollbacks_total{deployment,automatic}                   counter
    deployd_deploy_duration_seconds{deployment,kind}                histogram
    deployd_step_duration_seconds{step}                             histogram
    deployd_deploy_info{deployment,commit,image_digest}             gauge, always 1
    deployd_last_success_timestamp_seconds{deployment}              gauge
    deployd_deploys_in_flight{deployment}, deployd_queue_depth{deployment}
                                                                    gauges, counted per scrape

Of this process only, so they start again from zero when `deployd serve` restarts
(Prometheus's rate() and increase() take that as a counter reset):

    deployd_webhook_deliveries_total{event,outcome}, deployd_notifications_total{target,outcome},
    deployd_ssh_sessions, and process_* (prometheus_client's ProcessCollector).

Cardinality stays bounded: labels take configured or recorded deployment names, the
fixed vocabularies below and notification target names; only deploy_info carries a
commit, one series per deployment.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from daemon.adapters.records import Records
from daemon.config import Settings
from daemon.core.deploys import ROLLBACK
from daemon.core.states import (
    FAILED,
    FINAL_STATES,
    INTERRUPTED,
    QUEUED,
    ROLLED_BACK,
    RUNNING,
    STARTED,
    SUCCEEDED,
)

log = logging.getLogger(__name__)

# Seconds-to-minutes work: a DAG parse takes seconds, a build or a rollout minutes.
BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)

# deployd_webhook_deliveries_total: what /webhooks/github answered (http/webhooks.py).
WEBHOOK_OUTCOMES = ("deployed", "ignored", "duplicate", "unauthorized", "rejected")
# The event label takes GitHub's event names from this list, anything else is "other":
# the header arrives before the signature is checked, so a sender cannot make series.
WEBHOOK_EVENTS = frozenset(
    {
        "push",
        "ping",
        "create",
        "delete",
        "pull_request",
        "pull_request_review",
        "release",
        "status",
        "check_run",
        "check_suite",
        "workflow_run",
        "workflow_job",
        "issues",
        "issue_comment",
        "deployment",
        "deployment_status",
        "repository",
        "installation",
    }
)
# deployd_notifications_total: one per attempt to tell a [[notify]] target.
NOTIFY_OUTCOMES = ("delivered", "failed", "dropped")

# Steps that came to an outcome of their own; cancelled or interrupted ones were
# stopped from outside, and their end says when, not how long the work takes.
_TIMED_STEP_STATES = (SUCCEEDED, FAILED)
# An interrupted deploy's end is when a later process noticed it had died.
_UNTIMED_DEPLOY_STATES = (INTERRUPTED,)
_EVENT_BATCH = 1000


@dataclass
class Histogram:
    """Cumulative counts at each of BUCKETS, the count and the sum, as Prometheus has them."""

    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    count: int = 0
    total: float = 0.0

    def add(self, other: Histogram) -> None:
        """Add another histogram's observations to this one."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.total += other.total

    def buckets(self) -> list[tuple[str, float]]:
        """The `le` buckets in exposition form (BUCKETS print as Go does: "60.0"), +Inf last."""
        return [
            *((repr(le), float(n)) for le, n in zip(BUCKETS, self.counts, strict=True)),
            ("+Inf", float(self.count)),
        ]


@dataclass(frozen=True)
class Running:
    """What a deployment runs now: its newest succeeded deploy."""

    deploy_id: int
    commit: str
    digest: str
    finished_at: float


@dataclass
class DeploymentTally:
    """What the records say about one deployment's finished deploys, summed."""

    deploys: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    durations: defaultdict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))
    running: Running | None = None

    def add(self, other: DeploymentTally) -> None:
        """Count `other`'s deploys too."""
        self.deploys.update(other.deploys)
        for kind, hist in other.durations.items():
            self.durations[kind].add(hist)
        if other.running and (not self.running or other.running.deploy_id > self.running.deploy_id):
            self.running = other.running

    def rollbacks(self) -> Counter[str]:
        """automatic → rollbacks: "true" rolled_back deploys, "false" rollback deploys that
        succeeded."""
        out: Counter[str] = Counter()
        for (_trigger, action, _kind, state), n in self.deploys.items():
            if state == ROLLED_BACK:
                out["true"] += n
            elif action == ROLLBACK and state == SUCCEEDED:
                out["false"] += n
        return out


@dataclass
class Tally:
    """What the records say about a set of finished deploys, summed."""

    deployments: defaultdict[str, DeploymentTally] = field(
        default_factory=lambda: defaultdict(DeploymentTally)
    )
    steps: defaultdict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))

    def add(self, other: Tally) -> None:
        """Count `other`'s deploys too (deploys finished later than this tally's)."""
        for name, counted in other.deployments.items():
            self.deployments[name].add(counted)
        for step, hist in other.steps.items():
            self.steps[step].add(hist)

    def total(self) -> int:
        """How many finished deploys it counts."""
        return sum(sum(d.deploys.values()) for d in self.deployments.values())


def _marks(params: list[Any]) -> str:
    return ", ".join("?" * len(params))


def _bucket_sums(column: str) -> str:
    return ", ".join(f"SUM({column} <= {le!r}) AS le{i}" for i, le in enumerate(BUCKETS))


def _histogram(row: dict[str, Any]) -> Histogram:
    return Histogram(
        [int(row[f"le{i}"] or 0) for i in range(len(BUCKETS))],
        int(row["n"]),
        float(row["total"] or 0.0),
    )


def _read_finished(records: Records, where: str, args: list[Any]) -> Tally:
    """Sum the finished deploys that `where` (an SQL condition on `deploys`) picks.

    The same read serves the rebuild at start (every finished deploy) and each
    scrape (the deploys the new events name): one way of counting.
    """
    final = sorted(FINAL_STATES)
    scope = f"deploys.state IN ({_marks(final)}) AND ({where})"
    scope_args = [*final, *args]
    tally = Tally()
    for row in records.read(
        "SELECT deployment, trigger, action, kind, state, COUNT(*) AS n "  # noqa: S608
        f"FROM deploys WHERE {scope} GROUP BY deployment, trigger, action, kind, state",
        scope_args,
    ):
        key = (row["trigger"], row["action"], row["kind"], row["state"])
        tally.deployments[row["deployment"]].deploys[key] += int(row["n"])
    untimed = list(_UNTIMED_DEPLOY_STATES)
    for row in records.read(
        "WITH x AS MATERIALIZED (SELECT deployment, kind, "  # noqa: S608
        f"MAX(finished_at - started_at, 0) AS d FROM deploys WHERE {scope} "
        "AND started_at IS NOT NULL AND finished_at IS NOT NULL "
        f"AND state NOT IN ({_marks(untimed)})) "
        f"SELECT deployment, kind, COUNT(*) AS n, SUM(d) AS total, {_bucket_sums('d')} "
        "FROM x GROUP BY deployment, kind",
        [*scope_args, *untimed],
    ):
        tally.deployments[row["deployment"]].durations[row["kind"]] = _histogram(row)
    timed = list(_TIMED_STEP_STATES)
    for row in records.read(
        "WITH x AS MATERIALIZED (SELECT steps.name AS name, "  # noqa: S608
        "MAX(steps.finished_at - steps.started_at, 0) AS d "
        f"FROM deploys JOIN steps ON steps.deploy_id = deploys.id WHERE {scope} "
        "AND steps.started_at IS NOT NULL AND steps.finished_at IS NOT NULL "
        f"AND steps.state IN ({_marks(timed)})) "
        f"SELECT name, COUNT(*) AS n, SUM(d) AS total, {_bucket_sums('d')} FROM x GROUP BY name",
        [*scope_args, *timed],
    ):
        tally.steps[row["name"]] = _histogram(row)
    for row in records.read(
        "SELECT deployment, id, commit_sha, digest, finished_at FROM deploys WHERE id IN "  # noqa: S608
        f"(SELECT MAX(id) FROM deploys WHERE {scope} AND state = ? GROUP BY deployment)",
        [*scope_args, SUCCEEDED],
    ):
        tally.deployments[row["deployment"]].running = Running(
            int(row["id"]), row["commit_sha"] or "", row["digest"] or "", row["finished_at"] or 0.0
        )
    return tally


class Metrics:
    """deployd's metrics; `exposition()` is what /metrics answers.

    Give it a Records of its own (its own SQLite connection): its reads then never
    wait on the daemon's writes, nor the daemon's on them. The text of each
    deployment's samples from the records is kept until one of its deploys finishes:
    rendering a few thousand samples would be most of a scrape's cost.
    """

    def __init__(
        self,
        settings: Callable[[], Settings],
        records: Records,
        ssh_sessions: Callable[[], int] = lambda: 0,
    ) -> None:
        self._settings = settings
        self.records = records
        self._ssh_sessions = ssh_sessions
        self._lock = threading.Lock()  # the tally, the outbox cursor, the rendered text
        self._tally: Tally | None = None
        self._cursor = 0
        # Rendered sample lines, each with the version of the tally they show.
        self._changes: Counter[str] = Counter()  # deployment → its version; "" the steps'
        self._lines: dict[str, tuple[tuple[int, bool], list[bytes]]] = {}
        self._step_lines: tuple[int, bytes] | None = None
        # Counted on the event loop: a lock of their own, never held during a read.
        self._local_lock = threading.Lock()
        self._webhooks: Counter[tuple[str, str]] = Counter()
        self._notifications: Counter[tuple[str, str]] = Counter()
        # What is read afresh at every scrape, with the process's memory and descriptors.
        self.registry = CollectorRegistry()
        self.registry.register(_Families(self._live))
        ProcessCollector(registry=self.registry)

    # -- what the records say -------------------------------------------------

    def rebuild(self) -> None:
        """Sum every finished deploy in the records (once; later calls do nothing)."""
        with self._lock:
            self._rebuilt()

    def start(self) -> threading.Thread:
        """Rebuild in a thread of its own; a scrape meanwhile waits for it."""
        thread = threading.Thread(target=self._rebuild_logged, name="metrics-rebuild", daemon=True)
        thread.start()
        return thread

    def _rebuild_logged(self) -> None:
        try:
            self.rebuild()
            self.exposition()  # renders the records' part: the first scrape finds it ready
        except Exception:
            log.exception("metrics: reading the records failed; the next scrape tries again")

    def _rebuilt(self) -> Tally:
        if self._tally is None:
            with self.records.snapshot():
                cursor = self.records.last_event_id()
                tally = _read_finished(self.records, "1", [])
            self._tally, self._cursor = tally, cursor
            log.info("metrics: %d finished deploys counted", tally.total())
        return self._tally

    def _caught_up(self) -> Tally:
        """The tally, with the deploys that finished since the last read added."""
        tally = self._rebuilt()
        while events := self.records.events_after(self._cursor, _EVENT_BATCH):
            ended = [e for e in events if e.event != STARTED]
            if ended:
                tally.add(
                    _read_finished(
                        self.records,
                        "deploys.id IN (SELECT value FROM json_each(?))",
                        [json.dumps([e.deploy_id for e in ended])],
                    )
                )
                self._changes.update({e.deployment for e in ended} | {""})
            self._cursor = events[-1].id
        return tally

    def _recorded_text(self, configured: tuple[str, ...]) -> bytes:
        """The exposition of the families from the records; only what changed is rendered."""
        shown = set(configured)
        with self._lock:
            tally = self._caught_up()
            parts = []
            for name in sorted(set(tally.deployments) | shown):
                key = (self._changes[name], name in shown)
                cached = self._lines.get(name)
                if cached is None or cached[0] != key:
                    counted = tally.deployments.get(name, DeploymentTally())
                    families = _deployment_families(name, counted, name in shown)
                    cached = self._lines[name] = (key, [_sample_lines(f) for f in families])
                parts.append(cached[1])
            if self._step_lines is None or self._step_lines[0] != self._changes[""]:
                self._step_lines = (self._changes[""], _sample_lines(_step_family(tally)))
            step_lines = self._step_lines[1]
        empty = _deployment_families("", DeploymentTally(), False)
        return b"".join(
            [_header(f) + b"".join(p[i] for p in parts) for i, f in enumerate(empty)]
            + [_header(_step_family(Tally())), step_lines]
        )

    def _unfinished(self) -> Counter[tuple[str, str]]:
        """(deployment, state) → deploys queued or running now (the state index: cheap)."""
        return Counter(
            {
                (r["deployment"], r["state"]): int(r["n"])
                for r in self.records.read(
                    "SELECT deployment, state, COUNT(*) AS n FROM deploys "
                    "WHERE state IN (?, ?) GROUP BY deployment, state",
                    [QUEUED, RUNNING],
                )
            }
        )

    # -- what this process sees -----------------------------------------------

    def webhook_delivery(self, event: str, outcome: str) -> None:
        """Count one answered webhook delivery (process-local: resets on restart).

        `event` is the X-GitHub-Event header as sent: names off WEBHOOK_EVENTS count as "other".
        """
        if outcome not in WEBHOOK_OUTCOMES:
            raise ValueError(f"unknown webhook outcome {outcome!r}")
        key = (event if event in WEBHOOK_EVENTS else "other", outcome)
        with self._local_lock:
            self._webhooks[key] += 1

    def notification(self, target: str, outcome: str) -> None:
        """Count one attempt to tell [[notify]] `target` (process-local: resets on restart).

        outcome: "delivered" (the receiver took it), "failed" (an attempt failed and will be
        retried), "dropped" (given up on).
        """
        if outcome not in NOTIFY_OUTCOMES:
            raise ValueError(f"unknown notification outcome {outcome!r}")
        with self._local_lock:
            self._notifications[(target, outcome)] += 1

    # -- the exposition --------------------------------------------------------

    def exposition(self) -> bytes:
        """The text exposition of every metric (blocking: call it off the event loop)."""
        configured = tuple(d.name for d in self._settings().deployments)
        return self._recorded_text(configured) + generate_latest(self.registry)

    def _live(self) -> list[Metric]:
        """The families read afresh at every scrape."""
        settings = self._settings()
        unfinished = self._unfinished()
        in_flight = GaugeMetricFamily(
            "deployd_deploys_in_flight", "Deploys running now.", labels=["deployment"]
        )
        queued = GaugeMetricFamily(
            "deployd_queue_depth", "Deploys queued, waiting for their turn.", labels=["deployment"]
        )
        for dep in settings.deployments:
            in_flight.add_metric([dep.name], unfinished[(dep.name, RUNNING)])
            queued.add_metric([dep.name], unfinished[(dep.name, QUEUED)])
        with self._local_lock:
            webhooks = dict(self._webhooks)
            notifications = dict(self._notifications)
        deliveries = CounterMetricFamily(
            "deployd_webhook_deliveries",
            "GitHub webhook deliveries answered by this process, by event and outcome.",
            labels=["event", "outcome"],
        )
        for (event, outcome), n in sorted(webhooks.items()):
            deliveries.add_metric([event, outcome], n)
        notified = CounterMetricFamily(
            "deployd_notifications",
            "Attempts by this process to tell a notification target, by outcome.",
            labels=["target", "outcome"],
        )
        for target in sorted({t.name for t in settings.notify} | {t for t, _ in notifications}):
            for outcome in NOTIFY_OUTCOMES:
                notified.add_metric([target, outcome], notifications.get((target, outcome), 0))
        sessions = GaugeMetricFamily(
            "deployd_ssh_sessions", "Authenticated SSH connections open now."
        )
        sessions.add_metric([], self._ssh_sessions())
        return [in_flight, queued, deliveries, notified, sessions]


def _deployment_families(name: str, counted: DeploymentTally, configured: bool) -> list[Metric]:
    """The families from the records, with one deployment's samples (in exposition order).

    What a deployment runs now is shown only while it is configured.
    """
    total = CounterMetricFamily(
        "deployd_deploys",
        "Deploys that reached a final state (every process's, from the records).",
        labels=["deployment", "trigger", "action", "kind", "state"],
    )
    for key, n in sorted(counted.deploys.items()):
        total.add_metric([name, *key], n)
    rollbacks = CounterMetricFamily(
        "deployd_rollbacks",
        'Rollbacks: automatic="true" for deploys that ended rolled_back, '
        'automatic="false" for rollback deploys that succeeded.',
        labels=["deployment", "automatic"],
    )
    for automatic, n in sorted(counted.rollbacks().items()):
        rollbacks.add_metric([name, automatic], n)
    durations = HistogramMetricFamily(
        "deployd_deploy_duration_seconds",
        "From start to end of finished deploys that ran (not interrupted ones).",
        labels=["deployment", "kind"],
    )
    for kind, hist in sorted(counted.durations.items()):
        durations.add_metric([name, kind], hist.buckets(), hist.total)
    info = GaugeMetricFamily(
        "deployd_deploy_info",
        "What each deployment runs now (its newest succeeded deploy): always 1.",
        labels=["deployment", "commit", "image_digest"],
    )
    last = GaugeMetricFamily(
        "deployd_last_success_timestamp_seconds",
        "When each deployment's newest succeeded deploy ended (Unix time).",
        labels=["deployment"],
    )
    now = counted.running
    if configured and now is not None:
        info.add_metric([name, now.commit, now.digest], 1)
        last.add_metric([name], now.finished_at)
    return [total, rollbacks, durations, info, last]


def _step_family(tally: Tally) -> Metric:
    """deployd_step_duration_seconds: the steps of every deployment, by name."""
    steps = HistogramMetricFamily(
        "deployd_step_duration_seconds",
        "Duration of the steps of finished deploys that succeeded or failed.",
        labels=["step"],
    )
    for step, hist in sorted(tally.steps.items()):
        steps.add_metric([step], hist.buckets(), hist.total)
    return steps


def _header(family: Metric) -> bytes:
    """The family's # HELP and # TYPE lines, as generate_latest prints them."""
    return generate_latest(
        _Families(lambda: [Metric(family.name, family.documentation, family.type)])
    )


def _sample_lines(family: Metric) -> bytes:
    """The family's sample lines, as generate_latest prints them (without the header)."""
    text = generate_latest(_Families(lambda: [family]))
    header = _header(family)
    assert text.startswith(header)
    return text[len(header) :]


class _Families:
    """A collector that yields what a function returns (what generate_latest reads)."""

    def __init__(self, families: Callable[[], list[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        """The families, as of now."""
        return self._families()
