"""What a deploy's origin and action decide, in one place (pure).

The pipeline, recovery and the daemon's start ask these questions instead of
testing `trigger == "webhook"` where they happen to need the answer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from daemon.core import deploys


class Branch(enum.Enum):
    """Who moves the server repository's branch after a successful deploy."""

    GIT = "git"  # a push over SSH: git's receive-pack, once the hook says yes
    DEPLOYD = "deployd"  # the pipeline, under the deployment's lock
    NOBODY = "nobody"  # rollbacks: `deployd status` tells what runs


class Frozen(enum.Enum):
    """What a deploy does when its deployment is frozen at its turn."""

    WAITS = "waits"  # webhook deploys: queued until the freeze ends, then run
    REFUSED = "refused"  # pushes, CLI and API deploys, promotions: ended `cancelled`
    RUNS = "runs"  # rollbacks: a freeze is what you do during an incident


@dataclass(frozen=True)
class Policy:
    """The rules one deploy follows because of where it came from and what it does."""

    # A newer deploy of the same origin waiting behind it makes it pointless.
    superseded_by_newer: bool
    # Accepted without anyone waiting on it: a stop of the daemon leaves it queued,
    # the next daemon runs it.
    resumes_after_restart: bool
    branch: Branch
    frozen: Frozen = Frozen.REFUSED


def policy(trigger: str, action: str) -> Policy:
    """The policy of a deploy by `trigger` doing `action`."""
    webhook = trigger == "webhook"
    if action == deploys.ROLLBACK:
        branch = Branch.NOBODY
    elif trigger == "ssh" and action == deploys.DEPLOY:
        branch = Branch.GIT
    else:  # promotions too: the target's branch moves to the promoted commit
        branch = Branch.DEPLOYD
    if action == deploys.ROLLBACK:
        frozen = Frozen.RUNS
    elif webhook and action == deploys.DEPLOY:
        frozen = Frozen.WAITS
    else:
        frozen = Frozen.REFUSED
    return Policy(
        superseded_by_newer=webhook,
        resumes_after_restart=webhook,
        branch=branch,
        frozen=frozen,
    )


class Lifecycle(enum.Enum):
    """Where the process running deploys is in its life."""

    SERVING = "serving"
    # SIGTERM: nothing new starts; deploys under way may finish; deploys that
    # resume after a restart stay queued.
    DRAINING = "draining"
    # The grace period is over: deploys still running are stopped and recorded
    # `interrupted` (not `cancelled`: nobody asked for it).
    INTERRUPTING = "interrupting"
