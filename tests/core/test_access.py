"""Who may do what, pure: deploy access, read access, promotions, the freeze override."""

from __future__ import annotations

import pytest

from daemon.config import Key
from daemon.core import access
from daemon.core.access import DEPLOY, READ, Forbidden
from daemon.errors import EXIT_USAGE

ALICE = Key("alice", "ssh-ed25519 AAAA", ("prod",))
BOB = Key("bob", "ssh-ed25519 BBBB", ("staging",))
BOTH = Key("carol", "ssh-ed25519 CCCC", ("prod", "staging"))
ROOT = Key("root", "ssh-ed25519 DDDD", (), admin=True)
AIRFLOW = Key("airflow", "ssh-ed25519 EEEE", ("prod",), access="read")


@pytest.mark.parametrize(
    ("key", "deployment", "ok"),
    [(ALICE, "prod", True), (ALICE, "staging", False), (BOB, "prod", False), (ROOT, "any", True)],
)
def test_a_deploy_key_reads_and_deploys_the_deployments_in_its_list(
    key: Key, deployment: str, ok: bool
) -> None:
    assert access.allowed(key, deployment, READ) is ok
    assert access.allowed(key, deployment, DEPLOY) is ok


def test_a_read_key_reads_its_deployments_and_deploys_none() -> None:
    assert access.allowed(AIRFLOW, "prod", READ)
    assert not access.allowed(AIRFLOW, "staging", READ)
    assert not access.allowed(AIRFLOW, "prod", DEPLOY)
    assert access.read_only(AIRFLOW) and not access.read_only(ALICE)
    access.require(AIRFLOW, "prod", READ)


@pytest.mark.parametrize("deployment", ["prod", "staging", "nowhere"])
def test_a_read_key_is_told_it_is_read_only_alike_for_every_deployment(deployment: str) -> None:
    with pytest.raises(Forbidden) as refused:
        access.require(AIRFLOW, deployment, DEPLOY)
    assert refused.value.message == (
        f"key airflow is read-only: it may fetch and read, not change deployment {deployment}."
    )
    assert refused.value.exit_code == EXIT_USAGE


def test_a_read_key_promotes_nothing_even_between_its_own() -> None:
    both = Key("airflow", "ssh-ed25519 EEEE", ("prod", "staging"), access="read")
    with pytest.raises(Forbidden, match=r"^key airflow is read-only: "):
        access.require_promotion(both, "staging", "prod")
    assert not access.may_override_freeze(both)


def test_a_promotion_needs_deploy_on_the_target_and_read_on_the_source() -> None:
    access.require_promotion(BOTH, "staging", "prod")
    access.require_promotion(ROOT, "staging", "prod")
    access.require_promotion(None, "staging", "prod")  # the API's token acts as admin
    with pytest.raises(Forbidden) as refused:
        access.require_promotion(ALICE, "staging", "prod")
    assert refused.value.message == "key alice may not read deployment staging."
    assert refused.value.exit_code == EXIT_USAGE
    with pytest.raises(Forbidden, match=r"^key bob may not deploy to deployment prod\.$"):
        access.require_promotion(BOB, "staging", "prod")


def test_only_admins_push_through_a_freeze() -> None:
    assert access.may_override_freeze(ROOT) and access.may_override_freeze(None)
    assert not access.may_override_freeze(BOTH)


def test_an_unknown_kind_of_access_is_a_bug() -> None:
    with pytest.raises(ValueError, match="unknown access"):
        access.allowed(ALICE, "prod", "write")
