"""The deliverer against real SQLite records and real HTTP receivers on loopback.

Deploys are made through Records (create_deploy + transition), which writes
the outbox events as the pipeline does; the timings are shortened so that
retries and give-ups take milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from daemon.adapters.records import Records
from daemon.config import Settings
from daemon.notify.outbox import Deliverer, Timing, _signed_link, deliver_pending
from daemon.notify.send import scrub
from daemon.web.identity import SECRET_FILE, check_link, ensure_secret
from tests.notify.conftest import Served, deploy, settings, target
from tests.support.receivers import Answer, Got

FAST = Timing(
    poll_seconds=0.05,
    claim_retry_seconds=0.05,
    backoff_base=0.02,
    backoff_cap=0.1,
    request_timeout=2.0,
)


async def until(cond: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def seen(got: Got) -> tuple[int, str]:
    """(deploy id, event) of a request, whatever kind of target got it."""
    event = got.headers["X-Deployd-Event"]
    if "X-Signature" in got.headers:
        return int(got.json["deploy_id"]), event
    found = re.search(r"#(\d+)", got.body.decode())
    assert found, got.body
    return int(found.group(1)), event


@contextlib.asynccontextmanager
async def running(
    config: Callable[[], Settings], records: Records, **kw: object
) -> AsyncIterator[Deliverer]:
    kw.setdefault("timing", FAST)
    deliverer = Deliverer(config, records, **kw)  # type: ignore[arg-type]
    deliverer.start()
    try:
        yield deliverer
    finally:
        await deliverer.close(flush_seconds=0)


async def test_each_target_gets_the_events_it_wants_in_order(
    tmp_path: Path, records: Records, served: Served
) -> None:
    config = settings(
        tmp_path,
        target("chat", served.url("chat"), "slack"),  # default: finals but superseded
        target("ops", served.url("ops"), "msteams", events=("failed",)),
        target(
            "audit",
            served.url("audit"),
            events=("started", "succeeded", "failed", "cancelled"),
            deployments=("staging",),
        ),
    )
    outcomes: list[tuple[str, str]] = []
    async with running(lambda: config, records, on_outcome=lambda t, o: outcomes.append((t, o))):
        a = deploy(records, "running", "succeeded")
        b = deploy(records, "running", "failed", deployment="staging", step="parse", error="x")
        c = deploy(records, "cancelled")
        d = deploy(records, "running", "succeeded", deployment="staging")
        e = deploy(records, "superseded")
        r = served.receiver
        await until(lambda: len(r.delivered("chat")) == 4, "chat")
        await until(lambda: len(r.delivered("ops")) == 1, "ops")
        await until(lambda: len(r.delivered("audit")) == 4, "audit")
        await asyncio.sleep(0.2)  # and nothing more comes
    assert [seen(g) for g in r.requests("chat")] == [
        (a, "succeeded"),
        (b, "failed"),
        (c, "cancelled"),
        (d, "succeeded"),
    ]
    assert [seen(g) for g in r.requests("ops")] == [(b, "failed")]
    assert [seen(g) for g in r.requests("audit")] == [
        (b, "started"),
        (b, "failed"),
        (d, "started"),
        (d, "succeeded"),
    ]
    assert e not in {seen(g)[0] for g in r.got}
    assert sorted(outcomes) == sorted(
        [("chat", "delivered")] * 4 + [("ops", "delivered")] + [("audit", "delivered")] * 4
    )
    # Every target has dealt with the whole outbox, and the leases are let go.
    end = records.last_event_id()
    assert {t.target: t.cursor for t in records.targets()} == {
        "chat": end,
        "ops": end,
        "audit": end,
    }
    assert records.claim_target("chat", "someone-else", 30) is not None


async def test_a_target_that_hangs_does_not_slow_the_others(
    tmp_path: Path, records: Records, served: Served
) -> None:
    served.receiver.always["slow"] = Answer(delay=30)
    config = settings(
        tmp_path, target("slow", served.url("slow")), target("fast", served.url("fast"))
    )
    timing = replace(FAST, request_timeout=1.0)
    async with running(lambda: config, records, timing=timing):
        ids = [deploy(records, "running", "succeeded") for _ in range(3)]
        # (held up behind the other, the first would come after its 1 s timeout)
        await until(lambda: len(served.receiver.delivered("fast")) == 3, "fast", timeout=0.8)
        assert [seen(g)[0] for g in served.receiver.delivered("fast")] == ids
        assert len(served.receiver.requests("slow")) == 1  # its first event, still unanswered


async def test_retries_back_off_and_then_deliver_once(
    tmp_path: Path, records: Records, served: Served
) -> None:
    served.receiver.script["hook"] = [Answer(500), Answer(500), Answer(502), Answer(200)]
    config = settings(tmp_path, target("hook", served.url("hook")))
    outcomes: list[str] = []
    async with running(lambda: config, records, on_outcome=lambda t, o: outcomes.append(o)):
        did = deploy(records, "running", "failed", error="boom")
        await until(lambda: served.receiver.delivered("hook"), "delivery")
    got = served.receiver.requests("hook")
    assert [g.status for g in got] == [500, 500, 502, 200]
    assert outcomes == ["failed", "failed", "failed", "delivered"]
    # 20 ms doubling: each wait at least the backoff of its attempt.
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.08
    # One delivery id for every attempt; the receiver de-duplicates on it.
    assert len({g.headers["X-Deployd-Delivery"] for g in got}) == 1
    assert {seen(g) for g in got} == {(did, "failed")}
    (state,) = records.targets()
    assert (state.attempts, state.next_at, state.last_error) == (0, None, None)


async def test_retry_after_is_honoured(tmp_path: Path, records: Records, served: Served) -> None:
    # A minute of backoff: only honouring Retry-After gets it delivered in time.
    served.receiver.script["hook"] = [
        Answer(429, {"Retry-After": "0"}),
        Answer(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),  # in the past
        Answer(200),
    ]
    timing = replace(FAST, backoff_base=60.0, backoff_cap=60.0)
    config = settings(tmp_path, target("hook", served.url("hook")))
    async with running(lambda: config, records, timing=timing):
        deploy(records, "running", "succeeded")
        await until(lambda: served.receiver.delivered("hook"), "delivery", timeout=3)
    assert [g.status for g in served.receiver.requests("hook")] == [429, 503, 200]


async def test_a_long_retry_after_is_recorded_for_whoever_delivers_next(
    tmp_path: Path, records: Records, served: Served
) -> None:
    served.receiver.script["hook"] = [Answer(429, {"Retry-After": "120"}, "slow down")]
    config = settings(tmp_path, target("hook", served.url("hook")))
    async with running(lambda: config, records):
        deploy(records, "running", "succeeded")
        await until(lambda: records.targets()[0].attempts == 1, "the failure recorded")
        await asyncio.sleep(0.2)
        assert len(served.receiver.requests("hook")) == 1  # waiting, not hammering
    (state,) = records.targets()
    assert state.last_error == "HTTP 429: slow down"
    assert state.next_at is not None and 118 < state.next_at - time.time() <= 120


async def test_a_restart_goes_on_with_the_recorded_retry(
    tmp_path: Path, records: Records, served: Served
) -> None:
    served.receiver.script["hook"] = [Answer(500), Answer(500), Answer(200)]
    config = settings(tmp_path, target("hook", served.url("hook")))
    timing = replace(FAST, backoff_base=0.2, backoff_cap=0.2)
    async with running(lambda: config, records, timing=timing, holder="serve-1"):
        did = deploy(records, "running", "succeeded")
        await until(lambda: records.targets()[0].attempts == 1, "the first failure")
    stopped_at = time.time()
    (state,) = records.targets()
    assert state.attempts == 1 and state.next_at is not None
    # A new process (its own connection, another holder) takes over.
    again = Records(tmp_path / "state" / "deployd.db")
    async with running(lambda: config, again, timing=timing, holder="serve-2"):
        await until(lambda: served.receiver.delivered("hook"), "delivery")
        assert again.targets()[0].attempts == 0
    got = served.receiver.requests("hook")
    assert [g.status for g in got] == [500, 500, 200]
    assert got[1].at >= state.next_at - 0.01  # the recorded backoff was waited out
    # Taken over at once, not after the 30 s a crashed holder's lease would take to expire
    # (a margin for a loaded machine: the whole fast tier runs beside it).
    assert got[1].at - stopped_at < 5.0
    assert len({g.headers["X-Deployd-Delivery"] for g in got}) == 1
    assert [seen(g) for g in served.receiver.delivered("hook")] == [(did, "succeeded")]


async def test_an_event_is_given_up_and_the_next_goes_out(
    tmp_path: Path, records: Records, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.receiver.script["hook"] = [Answer(500), Answer(500), Answer(500), Answer(200)]
    timing = replace(FAST, give_up_seconds=0.0, min_attempts=3, backoff_base=0.01)
    config = settings(tmp_path, target("hook", served.url("hook")))
    outcomes: list[str] = []
    with caplog.at_level(logging.INFO, logger="daemon.notify.outbox"):
        async with running(
            lambda: config, records, timing=timing, on_outcome=lambda t, o: outcomes.append(o)
        ):
            first = deploy(records, "running", "failed", error="x")
            second = deploy(records, "running", "succeeded")
            await until(lambda: served.receiver.delivered("hook"), "the next event")
    assert outcomes == ["failed", "failed", "failed", "dropped", "delivered"]
    assert [seen(g) for g in served.receiver.requests("hook")] == [(first, "failed")] * 3 + [
        (second, "succeeded")
    ]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    (error,) = errors
    assert re.fullmatch(
        rf"notifications to hook: gave up deploy #{first} failed after 3 attempts over "
        r"\d+\.\d s: HTTP 500: ok",
        error,
    ), error
    assert records.targets()[0].cursor == records.last_event_id()


async def test_two_deliverers_on_one_database_never_both_send(
    tmp_path: Path, records: Records, served: Served
) -> None:
    config = settings(tmp_path, target("hook", served.url("hook")))
    other = Records(tmp_path / "state" / "deployd.db")
    records.add_targets(["hook"])
    first = Deliverer(lambda: config, records, timing=FAST, holder="serve-1")
    second = Deliverer(lambda: config, other, timing=FAST, holder="serve-2")
    first.start()
    await until(lambda: first._workers["hook"].held, "the first to hold the lease")
    second.start()
    try:
        ids = [deploy(records, "running", "succeeded") for _ in range(5)]
        ids += [deploy(other, "running", "failed", error="x") for _ in range(5)]
        await until(lambda: len(served.receiver.got) == 10, "ten deliveries")
        assert not second._workers["hook"].held
        await first.close(flush_seconds=1)  # lets the lease go: the second takes over
        more = [deploy(other, "running", "succeeded") for _ in range(3)]
        await until(lambda: len(served.receiver.got) == 13, "three more")
        await asyncio.sleep(0.2)
    finally:
        await second.close(flush_seconds=0)
    assert [seen(g)[0] for g in served.receiver.got] == ids + more
    assert len({g.headers["X-Deployd-Delivery"] for g in served.receiver.got}) == 13


async def test_wake_sends_at_once_and_the_poll_finds_other_processes_events(
    tmp_path: Path, records: Records, served: Served
) -> None:
    config = settings(tmp_path, target("hook", served.url("hook")))
    sleepy = replace(FAST, poll_seconds=3600.0)
    async with running(lambda: config, records, timing=sleepy) as deliverer:
        await until(lambda: records.targets() and deliverer._workers["hook"].held, "the lease")
        deploy(records, "running", "succeeded")
        await asyncio.sleep(0.3)
        assert served.receiver.got == []  # no poll, no wake: not looked at yet
        deliverer.wake()
        # (unwoken, the worker would look again when it renews its lease: in 10 s)
        await until(lambda: served.receiver.got, "a delivery after wake()", timeout=2)
    other = Records(tmp_path / "state" / "deployd.db")
    async with running(lambda: config, records, timing=FAST):
        deploy(other, "running", "succeeded")  # another process's deploy
        await until(lambda: len(served.receiver.got) == 2, "the polled event", timeout=1)


async def test_close_delivers_what_is_pending_first(
    tmp_path: Path, records: Records, served: Served
) -> None:
    config = settings(tmp_path, target("hook", served.url("hook")))
    deliverer = Deliverer(lambda: config, records, timing=replace(FAST, poll_seconds=3600))
    deliverer.start()
    await until(lambda: deliverer._workers["hook"].held, "the lease")
    ids = [deploy(records, "running", "succeeded") for _ in range(3)]
    await deliverer.close(flush_seconds=2)
    assert [seen(g)[0] for g in served.receiver.got] == ids


async def test_reload_follows_added_and_removed_targets(
    tmp_path: Path, records: Records, served: Served
) -> None:
    box = [settings(tmp_path, target("old", served.url("old")))]
    async with running(lambda: box[0], records) as deliverer:
        first = deploy(records, "running", "succeeded")
        await until(lambda: served.receiver.delivered("old"), "old")
        box[0] = settings(tmp_path, target("new", served.url("new")))
        deliverer.reload()
        second = deploy(records, "running", "succeeded")
        await until(lambda: served.receiver.delivered("new"), "new")
        await asyncio.sleep(0.2)
        assert [t.target for t in records.targets()] == ["new"]
    assert [seen(g)[0] for g in served.receiver.requests("old")] == [first]
    assert [seen(g)[0] for g in served.receiver.requests("new")] == [second]  # from the end


async def test_the_url_is_never_logged_nor_recorded(
    tmp_path: Path, records: Records, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    closed = "http://127.0.0.1:9/services/T0001/B0002/XyzzySecretToken"
    echo = served.url("services/T9/B9/EchoedSecret?sig=AlsoSecret")
    served.receiver.always["services/T9/B9/EchoedSecret"] = Answer(400, body=f"bad URL {echo}")
    config = settings(tmp_path, target("down", closed, "slack"), target("echo", echo, "msteams"))
    with caplog.at_level(logging.DEBUG):
        async with running(lambda: config, records):
            deploy(records, "running", "failed", error="x")
            await until(
                lambda: (
                    all(t.attempts >= 2 for t in records.targets()) and len(records.targets()) == 2
                ),
                "two failures each",
            )
    errors = {t.target: t.last_error or "" for t in records.targets()}
    assert errors["down"] == "cannot connect: Connect call failed ('127.0.0.1', 9)"
    assert errors["echo"] == "HTTP 400: bad URL <url>"
    # (the receiver's own access log names its path; deployd's loggers never do)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("daemon")]
    text = " ".join(ours + list(errors.values()))
    for secret in ("XyzzySecretToken", "T0001", "EchoedSecret", "AlsoSecret", "services/"):
        assert secret not in text
    assert any(m.startswith("notifications to down failing") for m in ours)


def test_scrub_removes_every_part_of_the_url() -> None:
    url = "https://prod-12.westeurope.logic.azure.com:443/workflows/abc/triggers/manual/paths/invoke?api-version=2016-06-01&sig=SECRET"
    assert scrub(f"failed for {url}", url) == "failed for <url>"
    assert "SECRET" not in scrub("query api-version=2016-06-01&sig=SECRET", url)
    assert "workflows" not in scrub("path /workflows/abc/triggers/manual/paths/invoke", url)
    assert scrub("see http://other.example/x?token=1 now", url) == "see <url> now"
    assert scrub("bell \x07", url) == "bell ^G"


async def test_redirects_are_not_followed(tmp_path: Path, records: Records, served: Served) -> None:
    served.receiver.always["moved"] = Answer(302, {"Location": served.url("elsewhere")})
    config = settings(tmp_path, target("moved", served.url("moved")))
    async with running(lambda: config, records):
        deploy(records, "running", "succeeded")
        await until(lambda: records.targets()[0].attempts >= 1, "a failure")
    assert served.receiver.requests("elsewhere") == []
    assert records.targets()[0].last_error == (
        "HTTP 302 (a redirect: deployd does not follow them; fix the URL): ok"
    )


async def test_a_huge_answer_is_not_read_whole(
    tmp_path: Path, records: Records, served: Served
) -> None:
    served.receiver.always["big"] = Answer(500, body="e" * 5_000_000)
    config = settings(tmp_path, target("big", served.url("big")))
    async with running(lambda: config, records):
        deploy(records, "running", "succeeded")
        await until(lambda: records.targets()[0].attempts >= 1, "a failure")
    assert records.targets()[0].last_error == "HTTP 500: " + "e" * 200


async def test_a_failing_target_is_logged_at_its_first_failure_then_rarely(
    tmp_path: Path, records: Records, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.receiver.always["down"] = Answer(503, body="maintenance")
    timing = replace(FAST, backoff_base=0.001, backoff_cap=0.005, report_seconds=60)
    config = settings(tmp_path, target("down", served.url("down")))
    with caplog.at_level(logging.WARNING, logger="daemon.notify.outbox"):
        async with running(lambda: config, records, timing=timing):
            deploy(records, "running", "succeeded")
            await until(lambda: len(served.receiver.got) >= 20, "twenty attempts")
    warnings = [r.getMessage() for r in caplog.records if "failing" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("notifications to down failing for 0.0 s: HTTP 503: maintenance")


async def test_a_broken_outcome_callback_changes_nothing(
    tmp_path: Path, records: Records, served: Served
) -> None:
    def broken(target: str, outcome: str) -> None:
        raise RuntimeError("metrics bug")

    config = settings(tmp_path, target("hook", served.url("hook")))
    async with running(lambda: config, records, on_outcome=broken):
        deploy(records, "running", "succeeded")
        deploy(records, "running", "succeeded")
        await until(lambda: len(served.receiver.delivered("hook")) == 2, "both")


async def test_the_cli_sends_only_for_targets_no_daemon_holds(
    tmp_path: Path, records: Records, served: Served
) -> None:
    config = settings(
        tmp_path, target("hook", served.url("hook")), target("chat", served.url("chat"), "slack")
    )
    records.add_targets(["hook", "chat"])
    ids = [deploy(records, "running", "failed", error="x") for _ in range(2)]
    assert records.claim_target("hook", "serve:elsewhere:1", 30) is not None  # a daemon holds it
    left = await deliver_pending(config, records, budget=5, timing=FAST)
    assert left == {"chat": 0}
    assert served.receiver.requests("hook") == []
    assert [seen(g)[0] for g in served.receiver.requests("chat")] == ids
    # Its lease is let go at once.
    assert records.claim_target("chat", "serve:elsewhere:1", 30) is not None


async def test_a_cli_run_links_to_the_page_signed_with_the_daemons_key(
    tmp_path: Path, records: Records, served: Served
) -> None:
    config = settings(
        tmp_path, target("hook", served.url("hook")), public_url="https://deployd.example.com/"
    )
    records.add_targets(["hook"])
    did = deploy(records, "running", "failed", error="x")
    assert await deliver_pending(config, records, budget=5, timing=FAST) == {"hook": 0}
    (got,) = served.receiver.requests("hook")
    page = rf"https://deployd\.example\.com/deploys/{did}\?exp=(\d+)&sig=(\w+)"
    url = re.fullmatch(page, got.json["url"])
    assert url is not None, got.json["url"]
    # The key is the one `deployd serve` signs and checks links with.
    key = ensure_secret(config.server.state_dir / SECRET_FILE)
    assert check_link(key, did, url[1], url[2], time.time()) is None
    assert check_link(key, did + 1, url[1], url[2], time.time()) is not None
    unsigned = replace(config, server=replace(config.server, signed_status_links=False))
    assert _signed_link(unsigned, did) == f"https://deployd.example.com/deploys/{did}"
    assert _signed_link(settings(tmp_path), did) == ""  # no public_url: no link


async def test_the_cli_delivery_is_bounded_and_leaves_the_rest(
    tmp_path: Path, records: Records, served: Served
) -> None:
    served.receiver.always["slow"] = Answer(delay=30)
    config = settings(tmp_path, target("slow", served.url("slow")))
    records.add_targets(["slow"])
    deploy(records, "running", "succeeded")
    deploy(records, "running", "succeeded")
    started = records.events_after(0)[0]  # not for this target: passed over
    t0 = time.monotonic()
    left = await deliver_pending(config, records, budget=0.5, timing=FAST)
    assert time.monotonic() - t0 < 1.5
    assert left == {"slow": 2}
    (state,) = records.targets()
    assert (state.cursor, state.attempts) == (started.id, 1)
    assert state.last_error == "no answer within 0.5 s"
    assert records.claim_target("slow", "serve:x:1", 30) is not None  # released


async def test_a_target_not_recorded_at_start_is_added_when_it_can_be(
    tmp_path: Path,
    records: Records,
    served: Served,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real = records.add_targets
    calls: list[list[str]] = []

    def locked_once(names: list[str]) -> None:
        calls.append(names)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        real(names)

    monkeypatch.setattr(records, "add_targets", locked_once)
    config = settings(tmp_path, target("hook", served.url("hook")))
    async with running(lambda: config, records) as deliverer:
        await until(lambda: deliverer._workers["hook"].held, "the lease, once the row is there")
        did = deploy(records, "running", "succeeded")
        await until(lambda: served.receiver.delivered("hook"), "the delivery")
    assert calls == [["hook"], ["hook"]]
    assert [seen(g) for g in served.receiver.requests("hook")] == [(did, "succeeded")]
    assert "the targets could not be recorded: database is locked" in caplog.text
