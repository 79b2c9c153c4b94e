"""`deployd serve`: builds the adapters once, wires the servers, runs until SIGTERM.

One event loop runs the SSH server, the HTTP server and the hook socket.
READY=1 goes to systemd once both listeners are bound; WATCHDOG=1 follows
from the loop at half of WATCHDOG_USEC. SIGHUP reloads keys and deployments
(running deploys keep what they started with). SIGTERM stops accepting, lets
running deploys finish for up to shutdown_grace_seconds, then records the
rest `interrupted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import logging
import os
import resource
import signal
from pathlib import Path
from typing import Any

from aiohttp import web

from daemon import config as config_mod
from daemon import memory, threads
from daemon.adapters import repos
from daemon.adapters.github import StatusReporter
from daemon.adapters.images import Images
from daemon.adapters.kubernetes.watch import ClusterWatch
from daemon.adapters.locks import DeploymentLock
from daemon.adapters.records import Records
from daemon.core.context import Services
from daemon.core.deploys import Deploy
from daemon.core.pipeline import HOLD_LOCK_SECONDS, Pipeline
from daemon.core.policy import Lifecycle
from daemon.core.recovery import finish_rollbacks, reconcile_roll, recover, unfinished_rollbacks
from daemon.errors import DeploydError
from daemon.http import app as web_mod
from daemon.http.api import Api
from daemon.http.metrics import MetricsEndpoint, serve_alone
from daemon.http.webhooks import Webhooks
from daemon.metrics import Metrics
from daemon.notify.outbox import Deliverer
from daemon.ssh import server as sshd
from daemon.ssh.hookline import HookServer
from daemon.ssh.receive import Receiver
from daemon.systemd import Notifier
from daemon.web.identity import SECRET_FILE, Identity, ensure_secret
from daemon.web.pages import Dashboard

log = logging.getLogger(__name__)


# How often the daemon looks for rollbacks that gave up (the API away too long), to finish
# them once the cluster answers again.
FINISH_ROLLBACKS_SECONDS = 10.0


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class Daemon:
    """The running daemon: its servers, its deploys, its configuration."""

    def __init__(self, config_path: Path, settings: config_mod.Settings) -> None:
        self.config_path = config_path
        state_dir = settings.server.state_dir
        self.records = Records(  # which makes state_dir private first
            state_dir / "deployd.db"
        )
        self.images = Images(settings.docker, settings.registry)
        self.services = Services(settings, self.records, self.images)
        self.pipeline = Pipeline(self.services)
        self.ssh = sshd.SSHState(settings, self.records, state_dir / "hook.sock")
        self.ssh.load_keys(settings)
        self.receiver = Receiver(self.ssh, self.pipeline)
        self.ssh.pipeline = self.pipeline
        self.hooks = HookServer(state_dir / "hook.sock", self.receiver)
        # Its own connection to the records: scrapes never wait on the daemon's writes.
        self.metrics = Metrics(
            lambda: self.services.settings,
            Records(state_dir / "deployd.db"),
            lambda: self.ssh.authenticated,
        )
        self.webhooks = Webhooks(
            lambda: self.services.settings,
            self.records,
            self.pipeline,
            self.metrics.webhook_delivery,
        )
        self.api = Api(
            lambda: self.services.settings, self.records, self.pipeline.live.get, self.pipeline
        )
        # Sign-in links, sessions, signed status links: one key in state_dir, made once.
        self.identity = Identity(
            lambda: self.services.settings, self.records, ensure_secret(state_dir / SECRET_FILE)
        )
        self.ssh.login = self.identity.login_url
        self.statuses = StatusReporter(lambda: self.services.settings, self.identity.deploy_url)
        self.pipeline.observers.append(self.statuses.observe)
        self.deliverer = Deliverer(
            lambda: self.services.settings,
            self.records,
            link=self.identity.deploy_url,
            on_outcome=self.metrics.notification,
        )
        # A deploy of this process started or ended: its event is in the outbox now.
        self.pipeline.observers.append(lambda event, record: self.deliverer.wake())
        self.pipeline.observers.append(self._trim_after)
        self.notifier = Notifier(dict(os.environ))
        # What the clusters run, kept current by watches: the dashboard reads it per request.
        self.cluster_watch = ClusterWatch(settings)
        self.dashboard = Dashboard(
            lambda: self.services.settings,
            self.records,
            self.pipeline.live.get,
            self.pipeline,
            self.cluster_watch.status,
        )
        self.stop_requested = asyncio.Event()
        self.refreshing: set[asyncio.Task[None]] = set()
        self.trims: set[asyncio.Task[bool]] = set()

    @property
    def settings(self) -> config_mod.Settings:
        return self.ssh.settings

    async def run(self) -> None:
        """Serve until SIGTERM (or SIGINT)."""
        settings = self.settings
        state_dir = settings.server.state_dir
        # Every pool's threads, before anything is submitted to them: started now, not on
        # the event loop under load (daemon/threads.py).
        threads.prestart_all()
        self.metrics.start()  # counts the recorded deploys in a thread meanwhile
        self.deliverer.start()  # its targets follow the outbox from here on
        self.cluster_watch.start()  # lists and watches while the rest starts
        for name, gone in await asyncio.to_thread(self._recover_all):
            await reconcile_roll(self.services, name, gone)
        fingerprint = sshd.ensure_host_key(state_dir / "ssh_host_ed25519_key")
        log.info("SSH host key %s", fingerprint)
        for dep in settings.deployments:
            await asyncio.to_thread(repos.ensure, state_dir, dep.name, dep.branch, True)
        resumed = self.webhooks.resume()
        if resumed:
            log.info("resuming webhook deploys %s", ", ".join(f"#{i}" for i in resumed))
        await self.hooks.start()
        # Before the first connection: what start-up made (a long-lived daemon makes most
        # of its objects here), kept out of the garbage collector's full passes (27 ms
        # each of CPU on the loop, longer on a busy machine); its garbage collected first.
        gc.collect()
        gc.freeze()
        host, port = _split(settings.server.ssh_listen)
        acceptor = await sshd.start(self.ssh, host, port, state_dir / "ssh_host_ed25519_key")
        metrics = MetricsEndpoint(lambda: self.services.settings, self.metrics)
        own_metrics = settings.server.metrics_listen
        runner = web.AppRunner(
            web_mod.make_app(
                self.webhooks,
                self.api,
                None if own_metrics else metrics,
                identity=self.identity,
                dashboard=self.dashboard,
            ),
            access_log=None,
        )
        await runner.setup()
        http_host, http_port = _split(settings.server.http_listen)
        site = web.TCPSite(runner, http_host, http_port)
        await site.start()
        metrics_runner = await serve_alone(metrics, *_split(own_metrics)) if own_metrics else None
        log.info(
            "listening: ssh %s, http %s", settings.server.ssh_listen, settings.server.http_listen
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGINT, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.notifier.send("READY=1", "STATUS=serving")
        watchdog = asyncio.create_task(self._watchdog())
        rollbacks = asyncio.create_task(self._finish_rollbacks())
        try:
            await self.stop_requested.wait()
        finally:
            log.info("stopping: no new connections; waiting for %d deploy(s)", len(self.running))
            self.notifier.send("STOPPING=1", "STATUS=stopping")
            acceptor.close()
            self.pipeline.lifecycle = Lifecycle.DRAINING
            await self.drain(settings.server.shutdown_grace_seconds)
            await self.deliverer.close(flush_seconds=5)  # the drained deploys' final events
            await self.hooks.close()
            await self.statuses.close(timeout=10)
            await runner.cleanup()
            await self.cluster_watch.stop()  # cancels the watches: no open stream is waited on
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            watchdog.cancel()
            rollbacks.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    @property
    def running(self) -> set[asyncio.Task[Any]]:
        """The deploys under way: pushes over SSH and webhook deliveries."""
        return self.receiver.running | self.webhooks.running | self.pipeline.commands

    async def drain(self, grace: int) -> None:
        """Let running deploys finish for `grace` seconds, then interrupt the rest.

        Pushes that started over connections already open count too; after the
        deploys, git gets its moment to update the refs of accepted pushes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.running and loop.time() < deadline:
            await asyncio.wait(self.running, timeout=deadline - loop.time())
        if self.running:
            log.warning("interrupting %d deploy(s) after %d s", len(self.running), grace)
            self.pipeline.lifecycle = Lifecycle.INTERRUPTING
            pending = self.running
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=30)
        self.pipeline.lifecycle = Lifecycle.INTERRUPTING
        if self.pipeline.releases:
            await asyncio.wait(set(self.pipeline.releases), timeout=HOLD_LOCK_SECONDS)

    def reload(self) -> None:
        """SIGHUP: reload keys and deployments; running deploys are not touched."""
        try:
            settings = config_mod.load(self.config_path)
        except DeploydError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if settings.server != self.settings.server:
            log.warning("reload: [server] changes need a restart; they are ignored")
            # (every other table is taken: [[notify]] too)
            settings = dataclasses.replace(settings, server=self.settings.server)
        self.ssh.load_keys(settings)
        self.services.settings = settings
        self.deliverer.reload()
        self.cluster_watch.update(settings)  # new or changed deployments are listed again
        # The repositories' hooks and HEADs are refreshed off the event loop.
        task = asyncio.get_running_loop().create_task(self._refresh_repos(settings))
        self.refreshing.add(task)
        task.add_done_callback(self.refreshing.discard)
        log.info("reloaded: %d deployments, %d keys", len(settings.deployments), len(self.ssh.keys))

    async def _refresh_repos(self, settings: config_mod.Settings) -> None:
        for dep in settings.deployments:
            try:
                await asyncio.to_thread(
                    repos.ensure, settings.server.state_dir, dep.name, dep.branch, True
                )
            except DeploydError as exc:
                log.error("reload: repository of %s: %s", dep.name, exc.message)

    def _trim_after(self, event: str, record: Deploy) -> None:
        """Pipeline observer: a deploy ended; hand the heap's free pages back, in a thread."""
        if record.final:
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(memory.trim))
            self.trims.add(task)
            task.add_done_callback(self.trims.discard)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_seconds / 2
        if interval <= 0:
            return
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _finish_rollbacks(self) -> None:
        """Every FINISH_ROLLBACKS_SECONDS: finish the rollbacks that gave up, for each
        deployment whose lock is free (a deploy that holds it does this at its start)."""
        state_dir = self.settings.server.state_dir
        while True:
            await asyncio.sleep(FINISH_ROLLBACKS_SECONDS)
            try:
                pending = await asyncio.to_thread(unfinished_rollbacks, self.records)
                names = {deployment for _, deployment in pending}
                for dep in self.settings.deployments:
                    if dep.name not in names or not dep.workloads:
                        continue
                    lock = DeploymentLock(state_dir, dep.name)
                    if not lock.try_acquire():
                        continue
                    try:
                        await finish_rollbacks(self.services, dep.name)
                    finally:
                        lock.release()
            except Exception:
                log.exception("finishing rollbacks failed; trying again later")

    def _recover_all(self) -> list[tuple[str, int]]:
        """Recover every deployment not locked by a live deploy; the deploys marked dead."""
        gone: list[tuple[str, int]] = []
        for dep in self.settings.deployments:
            lock = DeploymentLock(self.settings.server.state_dir, dep.name)
            if lock.try_acquire():
                try:
                    for deploy_id in recover(
                        self.records, self.images, self.settings.server.state_dir, dep.name, lock
                    ):
                        gone.append((dep.name, deploy_id))
                except DeploydError as exc:
                    log.warning("recovery of %s: %s", dep.name, exc)
                finally:
                    lock.release()
        return gone


def serve(config_path: Path) -> None:
    """Load the config and run the daemon until it is told to stop."""
    logging.basicConfig(level=logging.INFO, format="deployd %(levelname)s %(name)s: %(message)s")
    settings = config_mod.load(config_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # every connection is a descriptor: take what we are allowed
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    memory.limit_arenas()  # before the first thread: see daemon/memory.py
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(config_path, settings))


class LoopErrors:
    """The event loop's error handler: out-of-descriptor errors once per interval, not per try.

    When accept() fails with EMFILE, asyncio retries every second per listener
    and reports every failure; a flood of connections would fill the log.
    """

    INTERVAL = 60.0

    def __init__(self) -> None:
        self._last = -self.INTERVAL
        self._hidden = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            now = loop.time()
            if now - self._last < self.INTERVAL:
                self._hidden += 1
                return
            log.error(
                "out of file descriptors (%s)%s; new connections wait",
                exc.strerror,
                f", {self._hidden} more like it in the last interval" if self._hidden else "",
            )
            self._last, self._hidden = now, 0
            return
        loop.default_exception_handler(context)


async def _main(config_path: Path, settings: config_mod.Settings) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrors())
    # asyncio.to_thread's pool, of asyncio's default size, but started with the rest.
    loop.set_default_executor(threads.pool(min(32, (os.cpu_count() or 1) + 4), "deployd-worker"))
    await Daemon(config_path, settings).run()
