"""The Airflow API adapter against a real Airflow 3.3: `airflow dag-processor` and `airflow
api-server` in containers (tests/support/airflow.py) reading a GitDagBundle from a real git
repository, whose branch the tests move the way deployd's publish step does (`git update-ref`
on a served bare repository, with the commit made elsewhere)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.adapters.airflow import AirflowAPI, BundleState
from daemon.errors import DependencyUnreachable, DeploydError
from tests.support.airflow import USERNAME, AirflowWorld, free_port
from tests.support.projects import git
from tests.support.testenv import Infra

pytestmark = pytest.mark.integration

BUNDLE = "dags"
PICKUP_LIMIT = 5.0  # issue 11: a pushed one-file DAG change is live within 5 s
TOKEN_SECONDS = 4  # the world's [api_auth] jwt_expiration_time: renewals happen in these tests

DAG_FILE = """\
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG

with DAG({dag_id!r}, schedule=None, tags=[{tag!r}]):
    EmptyOperator(task_id="only")
"""


class Repo:
    """A served bare repository (what Airflow reads) and a work clone that commits to it."""

    def __init__(self, root: Path) -> None:
        self.served = root / "served.git"
        self.work = root / "work"
        self.served.mkdir(parents=True)
        git(self.served, "init", "-q", "--bare", "-b", "main")
        self.work.mkdir()
        git(self.work, "init", "-q", "-b", "main")
        git(self.work, "remote", "add", "served", str(self.served))
        self.commit({"dags/alpha.py": dag("alpha"), "dags/beta.py": dag("beta")}, "two DAGs")
        self.publish(git(self.work, "rev-parse", "HEAD"))

    def commit(self, files: dict[str, str | None], message: str) -> str:
        """Commit the files (None deletes one) and send the commit, without moving main."""
        for name, text in files.items():
            path = self.work / name
            if text is None:
                path.unlink()
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", message)
        sha = git(self.work, "rev-parse", "HEAD")
        git(self.work, "push", "-q", "served", f"HEAD:refs/candidates/{sha}")
        return sha

    def publish(self, sha: str) -> float:
        """Move the served main to the commit (deployd's publish step); when it moved."""
        git(self.served, "update-ref", "refs/heads/main", sha)
        return time.monotonic()


def dag(dag_id: str, tag: str = "v1") -> str:
    return DAG_FILE.format(dag_id=dag_id, tag=tag)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    return Repo(tmp_path_factory.mktemp("airflow-repo"))


@pytest.fixture(scope="module")
def world(
    testenv: Infra, repo: Repo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowWorld]:
    with AirflowWorld(
        testenv,
        tmp_path_factory.mktemp("airflow-world"),
        bundle=BUNDLE,
        repo_url=f"file://{repo.served}",
        ref="main",
        jwt_expiration_seconds=TOKEN_SECONDS,
    ) as started:
        print(f"Airflow world up in {started.startup_seconds:.1f} s")
        yield started
        print(f"memory (MB): {started.memory_mb()}")


def api_for(world: AirflowWorld, **kwargs: object) -> AirflowAPI:
    creds: dict[str, object] = {"username": USERNAME, "password": world.password}
    return AirflowAPI(world.base_url, BUNDLE, **(creds | kwargs))  # type: ignore[arg-type]


async def wait_for_state(
    api: AirflowAPI, world: AirflowWorld, pred: object, timeout: float, what: str
) -> tuple[BundleState, float]:
    """Poll the adapter until pred(state) holds; the state and when it first held."""
    deadline = time.monotonic() + timeout
    while True:
        state = await api.bundle_state()
        if pred(state):  # type: ignore[operator]
            return state, time.monotonic()
        if time.monotonic() > deadline:
            message = f"waited {timeout:.0f} s for {what}; last state {state}\n{world.logs()}"
            print(message)
            raise AssertionError(message)
        await asyncio.sleep(0.1)  # the poll's interval, not a stand-in for a condition


def at(state: BundleState, sha: str, *dag_ids: str) -> bool:
    by_id = {d.dag_id: d for d in state.dags}
    return all(i in by_id and by_id[i].bundle_version == sha for i in dag_ids)


async def test_the_bundles_dags_at_the_first_commit(world: AirflowWorld, repo: Repo) -> None:
    head = git(repo.served, "rev-parse", "main")
    api = api_for(world)
    try:
        state, _ = await wait_for_state(
            api, world, lambda s: at(s, head, "alpha", "beta"), 120, "both DAGs parsed"
        )
    finally:
        await api.close()
    by_id = {d.dag_id: d for d in state.dags}
    assert by_id["alpha"].relative_fileloc == "dags/alpha.py"
    assert by_id["beta"].relative_fileloc == "dags/beta.py"
    assert all(
        d.last_parsed_time and abs(d.last_parsed_time - time.time()) < 600 for d in state.dags
    )
    assert state.import_errors == ()
    # The REST JSON the helpers give agrees (what deployd's e2e tests look at).
    assert (world.dag("alpha") or {})["bundle_version"] == head


async def test_a_changed_dag_file_is_live_at_the_new_commit_in_seconds(
    world: AirflowWorld, repo: Repo
) -> None:
    api = api_for(world)
    try:
        first = git(repo.served, "rev-parse", "main")
        await wait_for_state(api, world, lambda s: at(s, first, "alpha"), 120, "alpha parsed")
        times = []
        for n in range(3):
            sha = repo.commit({"dags/alpha.py": dag("alpha", tag=f"v{n + 2}")}, f"alpha v{n + 2}")
            moved = repo.publish(sha)
            _, seen = await wait_for_state(
                api, world, lambda s, sha=sha: at(s, sha, "alpha"), 60, f"alpha at {sha[:7]}"
            )
            times.append(seen - moved)
    finally:
        await api.close()
    print("branch moved → the API reports the changed DAG at the new commit (s):", times)
    assert max(times) <= PICKUP_LIMIT
    # The DAG's own JSON is of the new file: its tag is the last commit's.
    assert [t["name"] for t in (world.dag("alpha") or {})["tags"]] == ["v4"]
    # A DAG that never ran keeps one DAG version, rewritten in place (Airflow makes a new one
    # only over task instances): dagVersions cannot tell deployd what is live; bundle_version can.
    assert len(world.dag_versions("alpha")) == 1


async def test_an_import_error_names_the_file_relative_to_the_bundle(
    world: AirflowWorld, repo: Repo
) -> None:
    api = api_for(world)
    broken = "from airflow.sdk import DAG\nimport no_such_module_anywhere\n"
    try:
        sha = repo.commit({"dags/broken.py": broken}, "a broken DAG")
        repo.publish(sha)
        state, _ = await wait_for_state(
            api, world, lambda s: s.errors_in({"dags/broken.py"}), 60, "the import error"
        )
        (err,) = state.errors_in({"dags/broken.py"})
        assert err.message == "ModuleNotFoundError: No module named 'no_such_module_anywhere'"
        assert "import no_such_module_anywhere" in err.traceback
        assert abs(err.timestamp - time.time()) < 600
        assert any(e["filename"] == "dags/broken.py" for e in world.import_errors())
        # Moving the branch back (what deployd does then) clears it.
        repo.publish(repo.commit({"dags/broken.py": None}, "remove the broken DAG"))
        await wait_for_state(
            api, world, lambda s: not s.import_errors, 60, "the import error to go"
        )
    finally:
        await api.close()


async def test_a_password_gets_a_token_and_a_new_one_when_it_expires(
    world: AirflowWorld,
) -> None:
    api = api_for(world)
    try:
        await api.bundle_state()
        assert api.token_requests == 1
        # A token made after the adapter's expires after it: once this one is refused,
        # the adapter's is too.
        later = world.token()
        world.wait_for(lambda: world.status_of("dags", later) == 401, TOKEN_SECONDS + 30, "expiry")
        state = await api.bundle_state()
        assert api.token_requests == 2
        assert {"alpha", "beta"} <= {d.dag_id for d in state.dags}
    finally:
        await api.close()


async def test_a_given_token_is_used_and_an_expired_one_named(world: AirflowWorld) -> None:
    token = world.token()
    api = AirflowAPI(world.base_url, BUNDLE, token=token)
    try:
        assert (await api.bundle_state()).dags
        world.wait_for(lambda: world.status_of("dags", token) == 401, TOKEN_SECONDS + 30, "expiry")
        with pytest.raises(DeploydError) as exc:
            await api.bundle_state()
    finally:
        await api.close()
    text = str(exc.value)
    assert "refused deployd's token (HTTP 401" in text and "airflow_api_token_file" in text
    assert token not in text and "\n" not in text


async def test_a_wrong_password_is_one_line_without_the_password(world: AirflowWorld) -> None:
    wrong = world.password + "-wrong"
    api = api_for(world, password=wrong)
    try:
        with pytest.raises(DeploydError) as exc:
            await api.bundle_state()
    finally:
        await api.close()
    text = str(exc.value)
    assert text == (
        f"Airflow's API at {world.base_url} refused deployd's user 'deployd' (HTTP 401): "
        "check airflow_username and airflow_password_file."
    )
    assert wrong not in text


async def test_an_unreachable_api_is_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    api = AirflowAPI(url, BUNDLE, username=USERNAME, password="irrelevant")
    began = time.monotonic()
    try:
        with pytest.raises(DependencyUnreachable) as exc:
            await api.bundle_state()
    finally:
        await api.close()
    assert time.monotonic() - began < 2
    assert str(exc.value) == (
        f"Airflow's API at {url} is not answering: connection refused; "
        "check airflow_api_url and that the api-server runs."
    )
