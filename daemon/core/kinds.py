"""What a deploy ships, decided from the paths it changes: pure, no I/O.

An image deploy builds the project's image and rolls it out; a DAG deploy (issue 11)
checks the new DAGs in the image that runs now and moves the branch Airflow reads,
restarting nothing. The kind is decided once, when the deploy is created, and
recorded with it, so the log, `deploys`, the API and the metrics all say the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

Kind = Literal["image", "dags"]

IMAGE: Kind = "image"
DAGS: Kind = "dags"
KINDS: tuple[Kind, ...] = (IMAGE, DAGS)

# The one directory whose changes Airflow can take without a new image. Exactly this
# prefix, case and all: `dags2/`, `Dags/` or a file named `dags` are image changes.
DAGS_DIR = "dags/"


def kind_of(changed_paths: Iterable[str], *, first_deploy: bool, forced_image: bool) -> Kind:
    """The kind of a deploy that changes `changed_paths` (repository paths, as git names them).

    `changed_paths` must cover everything between the commit that runs and the new one
    (git.changed_paths: every commit in between, both sides of a rename), so a push of
    several commits cannot hide an image change behind a last commit that only touches
    DAGs. The first deploy of a deployment, or one forced (`-o image`), is an image
    deploy: there is no image yet to check DAGs in, or the pusher wants one built.

    An empty change is an image deploy too: pushing a commit that changes nothing (an
    empty commit, a revert of a revert) is README's way to deploy again, and whoever does
    it wants the image rebuilt and the pods restarted, not a no-op reported as done.
    """
    if first_deploy or forced_image:
        return IMAGE
    paths = list(changed_paths)
    if paths and all(p.startswith(DAGS_DIR) for p in paths):
        return DAGS
    return IMAGE
