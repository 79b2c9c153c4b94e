"""Who may do what to which deployment (pure).

A key reads and deploys the deployments in its list; an admin key all of
them; the HTTP API's token acts as admin. There is no read-only kind of key
yet (SPEC's `access = "read"`), so today read access and deploy access are
the same list: a promotion asks for deploy access on its target and read
access on its source, and will mean more once read keys exist.
"""

from __future__ import annotations

from daemon.config import Key
from daemon.errors import UsageError

READ = "read"
DEPLOY = "deploy"  # push, deploy, roll back, promote into, freeze and unfreeze


class Forbidden(UsageError):
    """The key may not do that to that deployment (exit 2)."""


def allowed(key: Key, deployment: str, access: str) -> bool:
    """Whether `key` has `access` (READ or DEPLOY) on `deployment`."""
    if access not in (READ, DEPLOY):
        raise ValueError(f"unknown access {access!r}")
    return key.admin or deployment in key.deployments


def require(key: Key | None, deployment: str, access: str) -> None:
    """Raise Forbidden unless `key` (None: the API's token, an admin) has `access`.

    The refusal is the same for a deployment that does not exist, so that a
    key learns nothing about deployments that are not its own.
    """
    if key is not None and not allowed(key, deployment, access):
        raise forbidden(key, deployment, access)


def forbidden(key: Key, deployment: str, access: str) -> Forbidden:
    """The refusal of `access` on `deployment` to `key` (for unknown deployments too)."""
    verb = "read" if access == READ else "deploy to"
    return Forbidden(f"key {key.name} may not {verb} deployment {deployment}.")


def require_promotion(key: Key | None, source: str, target: str) -> None:
    """A promotion needs deploy access on its target and read access on its source."""
    require(key, target, DEPLOY)
    require(key, source, READ)


def may_override_freeze(key: Key | None) -> bool:
    """Only an admin key (or the API's token) may push through a freeze."""
    return key is None or key.admin
