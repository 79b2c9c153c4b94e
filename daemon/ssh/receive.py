"""A push, as the pre-receive hook hands it over: validate, deploy, answer.

The deploy runs while the push waits, like Heroku; its progress goes back to
the pusher line by line. If the client goes away mid-deploy, the deploy runs
to its end: git's receive-pack is kept alive (its output drained) so that on
success the ref is still updated and the commit kept, and on failure nothing
is. A push is never left half-deployed.

A DAG deploy's verdict comes before its end: once its checks pass, git moves the
branch (which Airflow reads), and the `live` step follows Airflow; its lines are
held for the post-receive hook, which relays them while the pusher still watches.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.adapters import git, repos
from daemon.core import access, usecases
from daemon.core.context import DeployRequest
from daemon.core.pipeline import DeployOutcome, Pipeline
from daemon.errors import DeploydError
from daemon.ssh import pushrules
from daemon.ssh.hookline import Say
from daemon.ssh.server import SSHState

log = logging.getLogger(__name__)


class Relay:
    """A deploy's sink that can change hands: the pre-receive hook's, then held lines,
    then the post-receive hook's. Called from deploy threads as well as the loop."""

    def __init__(self, say: Say) -> None:
        self._say: Say | None = say
        self._held: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            if self._say is None:
                self._held.append(line)
                return
            say = self._say
        say(line)

    def hold(self) -> None:
        """Keep the lines from now on until `attach`."""
        with self._lock:
            self._say = None

    def attach(self, say: Say) -> None:
        """Send the held lines, then every later one, to `say`."""
        with self._lock:
            held, self._held = self._held, []
            for line in held:
                say(line)
            self._say = say


@dataclass
class After:
    """A deploy that goes on after its push's verdict: its lines and its end."""

    relay: Relay
    run: asyncio.Task[DeployOutcome]


class Receiver:
    """Handles hook requests for the SSH server's push sessions."""

    def __init__(self, state: SSHState, pipeline: Pipeline) -> None:
        self.state = state
        self.pipeline = pipeline
        # The hook connections deploying right now (serve waits for them on SIGTERM).
        self.running: set[asyncio.Task[Any]] = set()

    async def __call__(self, request: dict[str, Any], say: Say) -> int:
        """Deploy the pushed commit; return the hook's exit status (0 accepts the push)."""
        task = asyncio.current_task()
        assert task is not None
        self.running.add(task)
        try:
            if request.get("hook") == "post-receive":
                return await self._after(request, say)
            return await self._receive(request, say)
        except DeploydError as exc:
            say(f"deployd: {exc.message}")
            return 1
        except Exception:
            log.exception("push handling failed")
            say("deployd: internal error; nothing was deployed. The daemon's log has details.")
            return 1
        finally:
            self.running.discard(task)

    async def _receive(self, request: dict[str, Any], say: Say) -> int:
        session = self.state.sessions.get(str(request.get("session", "")))
        if session is None:
            raise pushrules.Refused("this push did not come through deployd's SSH server.")
        session.hooked = True
        dep = self.state.settings.deployment(session.deployment)
        # Asked again of the settings as they are now: a SIGHUP while git stored the push
        # may have removed the key or made it read-only.
        key = next((k for k in self.state.settings.keys if k.name == session.key), None)
        if key is None:
            raise pushrules.Refused(f"key {session.key} is no longer configured.")
        access.require(key, dep.name, access.DEPLOY)
        repo = repos.repo_path(self.state.settings.server.state_dir, dep.name)
        updates = pushrules.parse_updates(list(request.get("updates") or []))
        options = [str(o) for o in request.get("options") or []]
        plan = pushrules.decide(updates, dep.branch, options)
        if plan.options.override_freeze and not access.may_override_freeze(key):
            raise pushrules.Refused(
                "only an admin key may push through a freeze (-o override-freeze)."
            )
        await asyncio.to_thread(
            usecases.admit,
            self.state.records,
            dep,
            plan.options,
            hint="; an admin key may push through it: git push -o override-freeze",
        )
        object_env = _object_env(repo, request.get("env"))
        subject = await asyncio.to_thread(git.subject, repo, plan.commit, object_env)
        deploy = DeployRequest(
            deployment=dep,
            repo=repo,
            commit=plan.commit,
            ref=plan.ref,
            subject=subject,
            trigger="ssh",
            actor=session.key,
            options=plan.options,
            object_env=object_env,
            expect=(plan.ref, plan.old),
            hold_lock=session.done,
            answer=asyncio.get_running_loop().create_future(),
        )
        relay = Relay(say)
        run = asyncio.create_task(self.pipeline.run(deploy, sink=relay))
        self.running.add(run)
        run.add_done_callback(self.running.discard)
        assert deploy.answer is not None
        either: set[asyncio.Future[Any]] = {run, deploy.answer}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if run.done():
            return 0 if run.result().exit_code == 0 else 1
        # Accepted before the end: git moves the branch now, the post-receive hook
        # relays the rest.
        relay.hold()
        session.after = After(relay, run)
        return 0

    async def _after(self, request: dict[str, Any], say: Say) -> int:
        """The post-receive hook: relay what the deploy says after its verdict, to its end."""
        session = self.state.sessions.get(str(request.get("session", "")))
        after = session.after if session is not None else None
        if not isinstance(after, After):
            return 0  # nothing runs on after the verdict (an image deploy has ended)
        after.relay.attach(say)
        outcome = await asyncio.shield(after.run)
        return outcome.exit_code


def _object_env(repo: Path, env: object) -> dict[str, str]:
    """git's quarantine variables, accepted only if they point inside the repository."""
    if not isinstance(env, dict):
        return {}
    out = {}
    root = repo.resolve()
    for name in git.QUARANTINE_VARS:
        value = env.get(name)
        if not isinstance(value, str) or not value:
            continue
        for part in value.split(":"):
            path = Path(part).resolve()
            if path != root and root not in path.parents:
                raise pushrules.Refused(f"{name} points outside the repository.")
        out[name] = value
    return out
