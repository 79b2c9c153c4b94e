"""Who may do what to which deployment (pure).

A key reads the deployments in its list; an admin key all of them; the HTTP
API's token acts as admin. A key with `access = "deploy"` (the default) also
deploys them; one with `access = "read"` only reads them (fetch, ls-remote,
`deploys`, `status`, `logs`): it is the key handed to Airflow's GitDagBundle or
git-sync, which must never be able to change what runs. A promotion asks for
deploy access on its target and read access on its source.

Every surface that acts for a key asks here (SSH commands and git, the
dashboard), so that there is one answer to "may this key do that".
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
    if access == DEPLOY and read_only(key):
        return False
    return key.admin or deployment in key.deployments


def read_only(key: Key) -> bool:
    """Whether `key` was given `access = "read"` (config refuses it with admin)."""
    return key.access == READ


def require(key: Key | None, deployment: str, access: str) -> None:
    """Raise Forbidden unless `key` (None: the API's token, an admin) has `access`.

    The refusal is the same for a deployment that does not exist, so that a
    key learns nothing about deployments that are not its own.
    """
    if key is not None and not allowed(key, deployment, access):
        raise forbidden(key, deployment, access)


def forbidden(key: Key, deployment: str, access: str) -> Forbidden:
    """The refusal of `access` on `deployment` to `key` (for unknown deployments too).

    A read key asking to deploy is told it is read-only, whatever the deployment:
    the words are the same for its own, another and an unknown one.
    """
    if access == DEPLOY and read_only(key):
        return Forbidden(
            f"key {key.name} is read-only: it may fetch and read, not change "
            f"deployment {deployment}."
        )
    verb = "read" if access == READ else "deploy to"
    return Forbidden(f"key {key.name} may not {verb} deployment {deployment}.")


def require_promotion(key: Key | None, source: str, target: str) -> None:
    """A promotion needs deploy access on its target and read access on its source."""
    require(key, target, DEPLOY)
    require(key, source, READ)


def may_override_freeze(key: Key | None) -> bool:
    """Only an admin key (or the API's token) may push through a freeze."""
    return key is None or key.admin
