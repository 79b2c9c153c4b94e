"""GitHub webhooks: verify, decide, record once, queue the deploy, answer in milliseconds.

    POST /webhooks/github
      size ≤ 25 MiB ─► JSON content type ─► HMAC-SHA256 of the raw body ─►
      headers ─► record the delivery (once) and queue its deploys ─► 202 / 2xx

The delivery row and the deploys it asks for are written in one transaction
before the answer, so a redelivery (same hook and delivery id) finds them and
deploys nothing. Only the deployment's configured `fetch_url` is ever fetched;
nothing in the payload names a path or a URL deployd uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from daemon import threads
from daemon.adapters import freezes, git, repos
from daemon.adapters.records import Records
from daemon.config import Settings
from daemon.core import deploys
from daemon.core.context import DeployRequest
from daemon.core.deploys import Options
from daemon.core.freezes import describe
from daemon.core.pipeline import Pipeline, queued_fields
from daemon.core.policy import Lifecycle, policy
from daemon.errors import DeploydError, DiskFull

log = logging.getLogger(__name__)

MAX_BODY = 25 * 1024 * 1024
# Bodies over LARGE_BODY are read LARGE_READS at a time (the others wait, unread,
# under TCP's backpressure): what a flood of big bodies can hold is bounded.
LARGE_BODY = 1024 * 1024
LARGE_READS = 4
CHUNK = 64 * 1024
_SIGNATURE = re.compile(r"sha256=([0-9a-fA-F]{64})")
_DELIVERY = re.compile(r"[A-Za-z0-9-]{1,100}")
_HOOK_ID = re.compile(r"[0-9]{1,20}")
_EVENT = re.compile(r"[a-z_]{1,64}")
_SHA = re.compile(r"[0-9a-f]{40}")


class Signature:
    """X-Hub-Signature-256 checked as the body arrives (HMAC is incremental).

    Every secret is tried (no early exit on a match), each comparison in
    constant time.
    """

    def __init__(self, secrets: Sequence[str], header: str | None) -> None:
        match = _SIGNATURE.fullmatch(header or "")
        self.given = match.group(1).lower().encode() if match else None
        self._macs = [hmac.new(s.encode(), digestmod=hashlib.sha256) for s in secrets]

    @property
    def well_formed(self) -> bool:
        """Whether the header is `sha256=<64 hex digits>` (else nothing need be read)."""
        return self.given is not None

    def update(self, chunk: bytes) -> None:
        for mac in self._macs:
            mac.update(chunk)

    def matches(self) -> bool:
        """Whether the body fed so far is signed by one of the secrets."""
        ok = False
        for mac in self._macs:
            ok |= self.given is not None and hmac.compare_digest(
                mac.hexdigest().encode(), self.given
            )
        return ok


def signature_ok(secrets: Sequence[str], body: bytes, header: str | None) -> bool:
    """Whether `header` is `sha256=<HMAC-SHA256 of body>` under one of `secrets`."""
    signature = Signature(secrets, header)
    signature.update(body)
    return signature.matches()


@dataclass
class Decision:
    """What a delivery asks for: the answer, and the deploys to queue."""

    status: int
    answer: dict[str, Any]
    requests: list[DeployRequest] = field(default_factory=list)


def _ignored(reason: str) -> Decision:
    return Decision(200, {"deployed": False, "reason": reason})


def _text(value: object, limit: int) -> str:
    """A short printable string from a payload field (anything else gives '')."""
    if not isinstance(value, str):
        return ""
    first = value.strip().splitlines()[0] if value.strip() else ""
    return "".join(c for c in first if c.isprintable())[:limit]


def decide(event: str, payload: object, settings: Settings) -> Decision:
    """Decide what a verified delivery asks for. Pure: no I/O, no records."""
    if event == "ping":
        return Decision(200, {"deployed": False, "reason": "pong"})
    if event != "push":
        return _ignored(f"{event} events do not deploy; only push does.")
    if not isinstance(payload, dict):
        return Decision(400, {"error": "the push payload is not a JSON object."})
    ref, repo, after = payload.get("ref"), payload.get("repository"), payload.get("after")
    if not isinstance(ref, str) or not ref:
        return Decision(400, {"error": "the push payload has no ref."})
    if not isinstance(repo, dict) or not isinstance(repo.get("full_name"), str):
        return Decision(400, {"error": "the push payload has no repository.full_name."})
    full_name = repo["full_name"]
    following = [
        d
        for d in settings.deployments
        if d.github_repo is not None and d.github_repo.lower() == full_name.lower()
    ]
    if not following:
        return _ignored(f"no deployment follows {full_name[:100]}.")
    if not ref.startswith("refs/heads/"):
        return _ignored(f"{ref[:100]} is not a branch; tags are not deployed.")
    branch = ref.removeprefix("refs/heads/")
    if payload.get("deleted") is True or after == "0" * 40:
        return _ignored(f"branch {branch[:100]} was deleted; nothing to deploy.")
    if not isinstance(after, str) or _SHA.fullmatch(after) is None:
        return Decision(400, {"error": "the push payload's `after` is not a commit id."})
    on_branch = [d for d in following if d.branch == branch]
    if not on_branch:
        wanted = ", ".join(f"{d.name} deploys {d.branch}" for d in following)
        return _ignored(f"{branch[:100]} is not a deployed branch ({wanted}).")
    # A deployment that takes only promotions is not deployed by a push.
    closed = [d for d in on_branch if d.promote_from is not None]
    on_branch = [d for d in on_branch if d.promote_from is None]
    if not on_branch:
        return _ignored(
            " ".join(
                f"{d.name} takes promotions from {d.promote_from}: "
                f"deployd promote {d.promote_from} {d.name}."
                for d in closed
            )
        )
    head = payload.get("head_commit")
    subject = _text(head.get("message"), 200) if isinstance(head, dict) else ""
    pusher = payload.get("pusher")
    sender = payload.get("sender")
    actor = (_text(pusher.get("name"), 64) if isinstance(pusher, dict) else "") or (
        _text(sender.get("login"), 64) if isinstance(sender, dict) else ""
    )
    requests = [
        DeployRequest(
            deployment=dep,
            repo=repos.repo_path(settings.server.state_dir, dep.name),
            commit=after,
            ref=ref,
            subject=subject,
            trigger="webhook",
            actor=f"github:{actor or 'unknown'}",
            options=Options(),
            fetch=True,
        )
        for dep in on_branch
    ]
    return Decision(202, {"deployed": True}, requests)


class Webhooks:
    """The `/webhooks/github` handler and the deploys it started."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        records: Records,
        pipeline: Pipeline,
        count: Callable[[str, str], None] = lambda _event, _outcome: None,
    ) -> None:
        self._settings = settings
        self.records = records
        self.pipeline = pipeline
        self._count = count  # (X-GitHub-Event, outcome) of each answer: metrics
        self.running: set[asyncio.Task[Any]] = set()
        self._large = asyncio.Semaphore(LARGE_READS)
        self._db = threads.pool(4, "deployd-webhooks")

    async def _verified_body(
        self, request: web.Request, settings: Settings
    ) -> bytes | bytearray | web.Response:
        """The body if it is JSON, within MAX_BODY and signed; else the refusal to answer."""
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _answer(413, error=f"the body is over {MAX_BODY // (1024 * 1024)} MiB.")
        if request.content_type != "application/json":
            return _answer(
                415,
                error="only JSON deliveries: set the webhook's content type to application/json.",
            )
        secrets = settings.github.webhook_secrets
        if not secrets:
            return _answer(403, error="webhooks are off: [github] webhook_secret_file is not set.")
        signature = Signature(secrets, request.headers.get("X-Hub-Signature-256"))
        unsigned = _answer(401, error="X-Hub-Signature-256 is missing or does not match the body.")
        if not signature.well_formed:
            return unsigned  # nothing read: an unsigned body costs no memory
        body: bytes | bytearray | None
        if request.content_length is not None and request.content_length <= LARGE_BODY:
            body = await request.read()  # small and announced: one read, then the HMAC
            signature.update(body)
        else:
            async with self._large:
                body = await _read(request, signature)
        if body is None:
            return _answer(413, error=f"the body is over {MAX_BODY // (1024 * 1024)} MiB.")
        return body if signature.matches() else unsigned

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one delivery."""
        settings = self._settings()
        body = await self._verified_body(request, settings)
        if isinstance(body, web.Response):
            return self._counted(request, body)
        event = request.headers.get("X-GitHub-Event", "")
        delivery = request.headers.get("X-GitHub-Delivery", "")
        hook_id = request.headers.get("X-GitHub-Hook-ID", "0")
        for header, value, pattern in (
            ("X-GitHub-Event", event, _EVENT),
            ("X-GitHub-Delivery", delivery, _DELIVERY),
            ("X-GitHub-Hook-ID", hook_id, _HOOK_ID),
        ):
            if pattern.fullmatch(value) is None:
                return self._counted(
                    request, _answer(400, error=f"{header} is missing or malformed.")
                )
        # Deciding is pure and cheap, so it runs before the insert; on a
        # redelivery its result is dropped for what the first arrival recorded.
        decision = self._decide(event, body, settings)
        # One trip to a thread of the webhooks' own for every read and write of the
        # delivery: another writer may hold the database for seconds, and the event
        # loop answers everyone else meanwhile; the loop's default threads may all be
        # busy with deploys' git and Docker calls.
        try:
            (
                decision,
                (new, status, answer, ids),
                held,
            ) = await asyncio.get_running_loop().run_in_executor(
                self._db, self._record, hook_id, delivery, event, decision
            )
        except DiskFull as exc:  # not recorded: GitHub shows it failed, to be redelivered
            log.error("delivery %s not recorded: %s", delivery, exc.message)
            return self._counted(request, _answer(503, error=exc.message))
        if not new:
            return self._counted(request, self._redelivery(status, answer, ids), "duplicate")
        for req, deploy_id in zip(decision.requests, ids, strict=True):
            self.start(req, deploy_id)
        if ids:
            answer = {
                **answer,
                "deploys": [
                    {"id": i, "deployment": r.deployment.name, "commit": r.commit}
                    for i, r in zip(ids, decision.requests, strict=True)
                ],
                "message": "queued " + ", ".join(f"deploy #{i}" for i in ids),
            }
            if held:
                answer["frozen"] = held
                answer["message"] += f" ({' '.join(held)}; it runs when the freeze ends)"
            log.info("delivery %s: %s", delivery, answer["message"])
        return self._counted(request, web.json_response(answer, status=status))

    def _record(
        self, hook_id: str, delivery: str, event: str, decision: Decision
    ) -> tuple[Decision, tuple[bool, int, dict[str, Any], list[int]], list[str]]:
        """In a thread: drop what would move backwards, record the delivery (and its
        deploys), and say which of those wait for a freeze."""
        if decision.requests:
            decision = self._forward_only(decision)
        recorded = self.records.record_delivery(
            hook_id,
            delivery,
            event,
            decision.status,
            decision.answer,
            [queued_fields(r) for r in decision.requests],
        )
        new, _, _, ids = recorded
        held = self._frozen(decision.requests) if new and ids else []
        return decision, recorded, held

    def _frozen(self, requests: list[DeployRequest]) -> list[str]:
        """Why each frozen deployment among `requests` waits (its deploy stays queued)."""
        out = []
        for req in requests:
            freeze = freezes.current(self.records, req.deployment)
            if freeze is not None:
                out.append(describe(freeze))
        return out

    def _counted(
        self, request: web.Request, response: web.Response, outcome: str | None = None
    ) -> web.Response:
        """Count the answer (metrics' deployd_webhook_deliveries_total) and return it."""
        self._count(
            request.headers.get("X-GitHub-Event", ""), outcome or outcome_of(response.status)
        )
        return response

    def _decide(self, event: str, body: bytes | bytearray, settings: Settings) -> Decision:
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return Decision(400, {"error": "the body is not valid JSON."})
        return decide(event, payload, settings)

    def _forward_only(self, decision: Decision) -> Decision:
        """Drop the deploys whose commit a deployment already runs or has moved past.

        A signed delivery can be replayed by anyone who saw it (GitHub's delivery
        log, a proxy's): re-sent, an old push must not roll the deployment back.
        Commits not known here yet are checked against fetch_url's tip when fetched.
        """
        kept, reasons = [], []
        for req in decision.requests:
            why = behind(self.records, req)
            if why:
                reasons.append(why)
            else:
                kept.append(req)
        if not reasons:
            return decision
        if not kept:
            return _ignored(" ".join(reasons))
        return Decision(decision.status, decision.answer, kept)

    def _redelivery(self, status: int, answer: dict[str, Any], ids: list[int]) -> web.Response:
        shown = []
        for deploy_id in ids:
            rec = self.records.get(deploy_id)
            if rec is not None:
                shown.append(
                    {
                        "id": deploy_id,
                        "deployment": rec.deployment,
                        "commit": rec.commit,
                        "state": rec.state,
                        "error": rec.error,
                    }
                )
        out = {**answer, "redelivery": True}
        if ids:
            out["deploys"] = shown
            out["message"] = "already delivered: " + ", ".join(
                f"deploy #{d['id']} {d['state']}" for d in shown
            )
        return web.json_response(out, status=200 if status == 202 else status)

    def start(self, request: DeployRequest, deploy_id: int) -> None:
        """Run a queued webhook deploy in the background (unless the daemon is stopping)."""
        if (
            self.pipeline.lifecycle is not Lifecycle.SERVING
        ):  # stays queued: the next daemon runs it
            return
        task = asyncio.create_task(self._deploy(request, deploy_id))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    def resume(self) -> list[int]:
        """At start: run the webhook deploys a previous daemon accepted but did not run."""
        settings = self._settings()
        resumed = []
        for dep in settings.deployments:
            for rec in self.records.in_flight(dep.name):
                if (
                    rec.state != deploys.QUEUED
                    or not policy(rec.trigger, rec.action).resumes_after_restart
                ):
                    continue
                # Only the daemon queues webhook deploys, and it is starting: every one
                # still queued is its own (whatever process now has the old pid).
                self.records.update(rec.id, pid=os.getpid())
                request = DeployRequest(
                    deployment=dep,
                    repo=repos.repo_path(settings.server.state_dir, dep.name),
                    commit=rec.commit or "",
                    ref=rec.ref,
                    # Webhook deploys carry no description of their own: the
                    # recorded one is the commit subject the delivery named.
                    subject=rec.description,
                    trigger="webhook",
                    actor=rec.actor,
                    options=Options(),
                    fetch=True,
                )
                self.start(request, rec.id)
                resumed.append(rec.id)
        return resumed

    async def _deploy(self, request: DeployRequest, deploy_id: int) -> None:
        try:
            await self.pipeline.run(request, deploy_id=deploy_id)
        except DeploydError as exc:
            log.warning("webhook deploy #%s: %s", deploy_id, exc.message)
        except Exception:
            log.exception("webhook deploy #%s failed with an internal error", deploy_id)


def behind(records: Records, request: DeployRequest) -> str:
    """Why `request`'s commit would move its deployment backwards, or ''."""
    dep = request.deployment
    last = records.last_succeeded(dep.name)
    if last is None or not last.commit:
        return ""
    sha = request.commit
    if sha == last.commit:
        return f"{dep.name} runs {sha[:12]} already (deploy #{last.id}); nothing to deploy."
    if git.ancestry(request.repo, sha, last.commit):  # None: a commit not known here yet
        return (
            f"{sha[:12]} is older than what {dep.name} runs ({last.commit[:12]}, deploy "
            f"#{last.id}): a webhook deploy only moves forward (to go back: deployd rollback)."
        )
    return ""


async def _read(request: web.Request, signature: Signature) -> bytearray | None:
    """The body, fed to `signature` as it arrives; None once it passes MAX_BODY.

    It grows with what was really sent (a declared Content-Length reserves nothing).
    """
    body = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        if len(body) + len(chunk) > MAX_BODY:
            return None
        signature.update(chunk)
        body += chunk
    return body


def outcome_of(status: int) -> str:
    """What an answer to a new delivery means: deployed (202: deploys queued), ignored
    (other 2xx), unauthorized (401: unsigned or wrongly signed), rejected (other 4xx)."""
    if status == 202:
        return "deployed"
    if 200 <= status < 300:
        return "ignored"
    return "unauthorized" if status == 401 else "rejected"


def _answer(status: int, *, error: str) -> web.Response:
    return web.json_response({"error": error}, status=status)
