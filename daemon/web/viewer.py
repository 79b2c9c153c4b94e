"""Who is looking at the dashboard, and what they may see and do (pure).

A viewer is either a signed-in SSH key (its permissions, as over SSH) or a
signed status link, which shows one deploy and allows nothing else. The
middleware in identity.py puts one in `request[VIEWER]` (None: nobody).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import web

from daemon.config import Key
from daemon.core import access


@dataclass(frozen=True)
class Viewer:
    """A key's browser session, or a signed link to one deploy."""

    key: Key | None  # the signed-in key; None for a signed status link
    session: str = ""  # the session's id ('' for a link)
    csrf: str = ""  # what a form of this session must send back ('' for a link)
    link_deploy: int | None = None  # a signed status link: the one deploy it shows
    link_deployment: str = ""  # ... and that deploy's deployment
    link_query: str = ""  # the link's own query ("exp=…&sig=…"), for its event stream's URL

    @property
    def name(self) -> str:
        """Who, for the page header and the records' actor."""
        return self.key.name if self.key is not None else "status link"

    def may_read(self, deployment: str, deploy_id: int | None = None) -> bool:
        """Whether this viewer may see `deployment` (or, for a link, that one deploy)."""
        if self.key is None:
            return deploy_id is not None and deploy_id == self.link_deploy
        return access.allowed(self.key, deployment, access.READ)

    def may_rollback(self, deployment: str) -> bool:
        """Whether this viewer may change what `deployment` runs: roll back, cancel, freeze,
        unfreeze, promote into it (deploy access; never through a link)."""
        return self.key is not None and access.allowed(self.key, deployment, access.DEPLOY)

    def csrf_ok(self, sent: str) -> bool:
        """Whether a form's CSRF token is this session's (constant time; links have none)."""
        return bool(self.session and self.csrf) and hmac.compare_digest(
            sent.encode(), self.csrf.encode()
        )


VIEWER: web.RequestKey[Viewer | None] = web.RequestKey("viewer")  # request[VIEWER]
