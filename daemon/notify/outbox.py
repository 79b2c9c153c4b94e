"""The outbox's deliverer: each notification target told every event it wants, in order.

Every state change of a deploy adds a row to the `events` table in the same
transaction, whichever process runs the deploy (adapters/records.py). Each
`[[notify]]` target has a cursor there: the last event it has dealt with.

- **One task per target**, so a failing target never slows the others. A task
  holds its target's lease in the records (renewed while it runs), reads the
  events after its cursor in order, skips those the target does not want and
  sends the others one at a time. The cursor moves past an event only once
  the target answered 2xx (or the event was given up), so each target gets
  its events in order.
- **Retries**: a failed attempt (no answer, a timeout, any non-2xx answer,
  redirects included: they are not followed) is retried after
  `backoff_base` doubling up to `backoff_cap` (1 s, 2 s, ... 5 min), or after
  what a 429 or 503 answer's Retry-After says (seconds or an HTTP-date, up to
  an hour). The attempt count, the time of the next try and the last error are
  recorded, so a restart goes on where it was.
- **Giving up**: an event is dropped (logged at error level, reported
  "dropped", the cursor moves on) when an attempt fails, at least
  `min_attempts` attempts have been made, and the event happened more than
  `give_up_seconds` (24 h) ago: a day-old deploy notice is no longer news, and
  the target's later events must not wait behind it for ever.
- **Delivered once**: a target receives an event once, unless deployd dies
  between the receiver's 2xx and the commit of the cursor (milliseconds);
  then it is sent again, with the same `X-Deployd-Delivery` id. A SIGTERM
  lets the send in flight finish and records it first.
- **Who sends**: `deployd serve` holds the leases of its targets; a `deployd
  deploy` or `rollback` run while no daemon holds them sends its own
  notifications before it exits (`deliver_pending`), within a bound, and lets
  the leases go. What it could not send stays for the daemon (or the next run).
- **Never in the way of a deploy**: nothing here raises into the pipeline;
  errors are logged with the target's name only, never its URL (the secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from daemon import threads
from daemon.adapters.records import Records
from daemon.config import NotifyTarget, Settings
from daemon.core.deploys import DeployEvent
from daemon.notify import messages, send
from daemon.retry import backoff
from daemon.web.identity import SECRET_FILE, SecretError, deploy_url, ensure_secret, page_url

log = logging.getLogger(__name__)

T = TypeVar("T")
# Told of every attempt's outcome: (target name, DELIVERED | FAILED | DROPPED).
Outcome = Callable[[str, str], None]
DELIVERED = "delivered"
FAILED = "failed"  # one failed attempt (it is retried)
DROPPED = "dropped"  # an event given up

BATCH = 100
# After an unexpected error (the database locked for 30 s, a bug): the pause.
ERROR_PAUSE_SECONDS = 5.0
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True)
class Timing:
    """How fast the deliverer polls, retries, reports and gives up (tests shorten these)."""

    poll_seconds: float = 0.5  # events written by other processes
    lease_seconds: float = 30.0
    claim_retry_seconds: float = 1.0  # while another process holds a target's lease
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    give_up_seconds: float = 86400.0
    min_attempts: int = 5
    report_seconds: float = 300.0  # a failing target is logged at most this often
    request_timeout: float = send.REQUEST_TIMEOUT


def give_up(event_at: float, attempts: int, now: float, timing: Timing) -> bool:
    """Whether an event whose latest attempt failed is dropped (see the module's doc)."""
    return attempts >= timing.min_attempts and now - event_at >= timing.give_up_seconds


def holder_name(role: str) -> str:
    """Who holds a lease: `serve:HOST:PID` or `cli:HOST:PID`."""
    return f"{role}:{socket.gethostname()}:{os.getpid()}"


def _no_outcome(target: str, outcome: str) -> None:
    return None


class Deliverer:
    """Delivers the outbox to the configured targets: `start` for `deployd serve`,
    `deliver_pending` for a CLI run."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        records: Records,
        *,
        link: Callable[[int], str] | None = None,
        on_outcome: Outcome = _no_outcome,
        timing: Timing | None = None,
        holder: str | None = None,
    ) -> None:
        self._settings = settings
        self.records = records
        # A deploy id's page for people, signed read-only: Identity.deploy_url.
        self.link = link or (lambda deploy_id: page_url(settings().server.public_url, deploy_id))
        self.on_outcome = on_outcome
        self.timing = timing or Timing()
        self.holder = holder or holder_name("serve")
        self.stopping = False
        self.deadline: float | None = None  # loop time; set by deliver_pending
        self._workers: dict[str, _Worker] = {}
        self._retired: set[_Worker] = set()
        # Records calls run on threads of our own: the loop's default pool may be
        # busy with builds, and a write may wait for another process's transaction.
        self._db = threads.pool(2, "deployd-notify")
        self._client: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task[None] | None = None

    # -- for the workers ---------------------------------------------------

    def target(self, name: str) -> NotifyTarget | None:
        """The target's configuration now (None once it left the config)."""
        return next((t for t in self._settings().notify if t.name == name), None)

    @property
    def client(self) -> aiohttp.ClientSession:
        assert self._client is not None
        return self._client

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a Records call on the deliverer's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    def outcome(self, target: str, outcome: str) -> None:
        try:
            self.on_outcome(target, outcome)
        except Exception:
            log.exception("the notification outcome callback failed")

    def remaining(self) -> float:
        """Seconds left of a CLI run's budget (infinite for the daemon)."""
        if self.deadline is None or self._loop is None:
            return float("inf")
        return self.deadline - self._loop.time()

    # -- the daemon --------------------------------------------------------

    def start(self) -> None:
        """Follow the configured targets and deliver until `close` (on the running loop)."""
        self._loop = asyncio.get_running_loop()
        self._client = send.session()
        self.reload()
        self._poller = self._loop.create_task(self._poll())

    def reload(self) -> None:
        """Follow the targets configured now: new ones from the outbox's end, removed ones
        forgotten. Call after the settings changed (SIGHUP)."""
        if self.stopping:
            return
        names = [t.name for t in self._settings().notify]
        try:
            self.records.add_targets(names)
            self.records.forget_targets(names)
        except sqlite3.Error as exc:
            log.error("notifications: the targets could not be recorded: %s", exc)
        assert self._loop is not None
        for name in names:
            if name not in self._workers:
                worker = self._workers[name] = _Worker(self, name)
                worker.task = self._loop.create_task(worker.run())
        for name in [n for n in self._workers if n not in names]:
            worker = self._workers.pop(name)
            worker.retired = True
            self._retired.add(worker)
            assert worker.task is not None
            worker.task.add_done_callback(functools.partial(self._retire, worker))
        self.wake()

    def wake(self) -> None:
        """Look at the outbox now (a deploy of this process started or ended)."""
        if self._loop is None:
            return
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            self._wake()
        else:
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        for worker in (*self._workers.values(), *self._retired):
            worker.wakeup.set()

    async def _poll(self) -> None:
        """Wake the workers when another process adds events (a CLI deploy, a webhook)."""
        last = -1
        while True:
            try:
                newest = await self.db(self.records.last_event_id)
            except sqlite3.Error as exc:
                log.warning("notifications: reading the outbox failed: %s", exc)
            else:
                if newest != last:
                    last = newest
                    self._wake()
            await asyncio.sleep(self.timing.poll_seconds)

    async def close(self, flush_seconds: float = 5.0) -> None:
        """Deliver what is pending for up to `flush_seconds`, then stop and let the leases go.

        A send in flight is let finish (it is bounded by the request timeout),
        so that what a receiver got is recorded.
        """
        if self._loop is None or self.stopping:
            return
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        try:
            end = await self.db(self.records.last_event_id)
        except sqlite3.Error:
            end = 0
        deadline = self._loop.time() + flush_seconds
        self._wake()
        while self._loop.time() < deadline and any(w.behind(end) for w in self._workers.values()):
            await asyncio.sleep(0.02)
        await self._stop(list(self._workers.values()) + list(self._retired))

    async def _stop(self, workers: list[_Worker]) -> None:
        self.stopping = True
        self._wake()
        tasks = {w.task for w in workers if w.task is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.timing.request_timeout + 2)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2)
        for worker in workers:
            self._let_go(worker)
        if self._client is not None:
            await self._client.close()
        self._db.shutdown(wait=False)

    def _retire(self, worker: _Worker, _task: asyncio.Task[None]) -> None:
        self._let_go(worker)

    def _let_go(self, worker: _Worker) -> None:
        """Release a worker's lease (at once: another process may take the target)."""
        self._retired.discard(worker)
        if worker.held:
            worker.held = False
            try:
                self.records.release_target(worker.name, self.holder)
            except sqlite3.Error as exc:
                log.warning("notifications to %s: the lease was not released: %s", worker.name, exc)

    # -- a CLI run ---------------------------------------------------------

    async def deliver_pending(self, budget: float) -> dict[str, int]:
        """Deliver the pending events of every target this process can claim, for up to
        `budget` seconds in all; let the leases go. Returns, per target claimed, how many
        wanted events are still pending."""
        self._loop = asyncio.get_running_loop()
        self.deadline = self._loop.time() + budget
        self._client = send.session()
        workers = [_Worker(self, t.name) for t in self._settings().notify]
        claimed: dict[str, int] = {}
        try:
            await asyncio.gather(*(w.run(once=True) for w in workers))
            for w in workers:
                if w.held:
                    claimed[w.name] = await self._pending(w)
        finally:
            await self._stop(workers)
        return claimed

    async def _pending(self, worker: _Worker) -> int:
        target = self.target(worker.name)
        if target is None:
            return 0
        events = await self.db(self.records.events_after, worker.cursor, 10_000)
        return sum(1 for e in events if target.wants(e.deployment, e.event))


class _Worker:
    """Delivers one target: holds its lease, follows its cursor, retries its next event."""

    def __init__(self, owner: Deliverer, name: str) -> None:
        self.owner, self.name = owner, name
        self.task: asyncio.Task[None] | None = None
        self.wakeup = asyncio.Event()
        self.retired = False
        self.held = False
        self.lease_until = 0.0  # monotonic
        self.cursor = 0
        self.attempts = 0
        self.next_at: float | None = None  # wall clock, as recorded
        self.failing_since: float | None = None  # monotonic, for the reports
        self.reported_at = 0.0

    @property
    def finished(self) -> bool:
        return self.owner.stopping or self.retired or self.owner.remaining() <= 0

    def behind(self, end: int) -> bool:
        """Whether it has events up to `end` still to deal with now (not waiting to retry)."""
        waiting = self.next_at is not None and self.next_at > time.time()
        return self.held and self.cursor < end and not waiting

    async def run(self, once: bool = False) -> None:
        """Deliver until stopped (or, `once`, until nothing is pending or the budget is spent)."""
        while not self.finished:
            try:
                if not await self._step(once):
                    return
            except Exception:
                log.exception("notifications to %s: unexpected error", self.name)
                if once:
                    return
                self.held = False  # claim again: read the recorded state afresh
                await self._sleep(ERROR_PAUSE_SECONDS)

    async def _step(self, once: bool) -> bool:
        """One turn: claim or renew the lease, wait out a backoff, or deal with events.

        False: nothing more to do in a CLI run.
        """
        owner = self.owner
        if not self.held and not await self._claim():
            if once:
                return False
            known = await owner.db(owner.records.targets)
            if not self.finished and all(t.target != self.name for t in known):
                # (its row could not be written at start): from the outbox's end, then
                await owner.db(owner.records.add_targets, [self.name])
            self.wakeup.clear()
            await self._sleep(owner.timing.claim_retry_seconds)
            return True
        if not await self._renew():
            return not once
        wait = (self.next_at or 0) - time.time()
        if wait > 0:
            if once and wait > owner.remaining():
                return False
            self.wakeup.clear()  # new events do not cut a backoff short
            await self._sleep(min(wait, self._until_renewal()))
            return True
        self.wakeup.clear()  # before reading: a wake from now on is not lost
        events = await owner.db(owner.records.events_after, self.cursor, BATCH)
        if not events:
            if once:
                return False
            await self._sleep(self._until_renewal())
            return True
        await self._handle(events)
        return True

    async def _claim(self) -> bool:
        owner = self.owner
        state = await owner.db(
            owner.records.claim_target, self.name, owner.holder, owner.timing.lease_seconds
        )
        if state is None:
            return False
        self.held = True
        self.lease_until = time.monotonic() + owner.timing.lease_seconds
        self.cursor, self.attempts, self.next_at = state.cursor, state.attempts, state.next_at
        return True

    def _until_renewal(self) -> float:
        """Seconds until the lease is renewed (when a third of it has passed)."""
        lease = self.owner.timing.lease_seconds
        return max(0.05, self.lease_until - lease * 2 / 3 - time.monotonic())

    async def _renew(self) -> bool:
        if time.monotonic() < self.lease_until - self.owner.timing.lease_seconds * 2 / 3:
            return True
        if await self._claim():
            return True
        self.held = False
        log.warning("notifications to %s: another process took the target over", self.name)
        return False

    async def _sleep(self, seconds: float) -> None:
        seconds = min(seconds, self.owner.remaining())
        if seconds <= 0 or self.finished:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wakeup.wait(), seconds)

    async def _handle(self, events: list[DeployEvent]) -> None:
        """Skip what the target does not want, send the rest in order; stop at a failure."""
        skip_to: int | None = None
        for event in events:
            target = self.owner.target(self.name)
            if target is None or self.finished:
                break
            if not target.wants(event.deployment, event.event):
                skip_to = event.id
                continue
            if skip_to is not None:
                if not await self._advance(skip_to):
                    return
                skip_to = None
            if not await self._deliver(target, event):
                return
        if skip_to is not None:
            await self._advance(skip_to)

    async def _advance(self, cursor: int) -> bool:
        """Record that the target is done with every event up to `cursor`."""
        if not await self.owner.db(
            self.owner.records.target_done, self.name, self.owner.holder, cursor
        ):
            self.held = False
            log.warning("notifications to %s: another process took the target over", self.name)
            return False
        self.cursor, self.attempts, self.next_at = cursor, 0, None
        return True

    async def _deliver(self, target: NotifyTarget, event: DeployEvent) -> bool:
        """Send one event; True when the cursor moved past it (sent, or given up)."""
        owner = self.owner
        record = await owner.db(owner.records.get, event.deploy_id)
        if record is None:
            log.warning("notifications to %s: no deploy #%s", self.name, event.deploy_id)
            return await self._advance(event.id)
        request = messages.render(target, event, record, owner.link(record.id))
        timeout = max(0.1, min(owner.timing.request_timeout, owner.remaining()))
        answer = await send.post(owner.client, target.url, request.body, request.headers, timeout)
        if answer.ok:
            if not await self._advance(event.id):
                return False
            owner.outcome(self.name, DELIVERED)
            if self.failing_since is not None:
                failed_for = _seconds(time.monotonic() - self.failing_since)
                log.info("notifications to %s delivered again after %s", self.name, failed_for)
                self.failing_since = None
            log.info("notified %s: deploy #%s %s", self.name, event.deploy_id, event.event)
            return True
        attempts = self.attempts + 1
        owner.outcome(self.name, FAILED)
        now = time.time()
        if give_up(event.at, attempts, now, owner.timing):
            log.error(
                "notifications to %s: gave up deploy #%s %s after %d attempts over %s: %s",
                self.name,
                event.deploy_id,
                event.event,
                attempts,
                _seconds(now - event.at),
                answer.error,
            )
            if not await self._advance(event.id):
                return False
            owner.outcome(self.name, DROPPED)
            return True
        delay = (
            min(answer.retry_after, MAX_RETRY_AFTER)
            if answer.retry_after is not None
            else backoff(attempts, owner.timing.backoff_base, owner.timing.backoff_cap)
        )
        self.attempts, self.next_at = attempts, now + delay
        records = owner.records
        await owner.db(
            records.target_failed, self.name, owner.holder, attempts, self.next_at, answer.error
        )
        self._report(event, attempts, answer.error, delay)
        return False

    def _report(self, event: DeployEvent, attempts: int, error: str, delay: float) -> None:
        """Log a failing target: at its first failure, then at most every report_seconds."""
        mono = time.monotonic()
        if self.failing_since is None:
            self.failing_since = mono
        elif mono - self.reported_at < self.owner.timing.report_seconds:
            return
        self.reported_at = mono
        log.warning(
            "notifications to %s failing for %s: %s (attempt %d at deploy #%s %s; next try in %s)",
            self.name,
            _seconds(mono - self.failing_since),
            error,
            attempts,
            event.deploy_id,
            event.event,
            _seconds(delay),
        )


def _seconds(value: float) -> str:
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


async def deliver_pending(
    settings: Settings, records: Records, budget: float = 15.0, timing: Timing | None = None
) -> dict[str, int]:
    """For a CLI run: send what is pending to each target no daemon holds, within `budget`
    seconds. Per target claimed, the wanted events still pending. Never raises."""
    if not settings.notify:
        return {}
    deliverer = Deliverer(
        lambda: settings,
        records,
        link=functools.partial(_signed_link, settings),
        timing=timing,
        holder=holder_name("cli"),
    )
    try:
        return await deliverer.deliver_pending(budget)
    except Exception:
        log.exception("notifications were not sent")
        return {}


def _signed_link(settings: Settings, deploy_id: int) -> str:
    """A CLI run's link to a deploy's page, signed with the daemon's key as serve signs it."""
    server = settings.server
    if not server.public_url:
        return ""
    try:
        secret = ensure_secret(server.state_dir / SECRET_FILE)
    except SecretError as exc:  # the page still opens after a sign-in
        log.warning("notification links are not signed: %s", exc.message)
        return page_url(server.public_url, deploy_id)
    return deploy_url(server, secret, deploy_id, time.time())
