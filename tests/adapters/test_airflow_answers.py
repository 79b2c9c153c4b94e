"""The Airflow API adapter without Airflow: parsing answers of the shape Airflow 3.3.2 sends
(recorded from a real api-server, tests/adapters/test_airflow.py runs the real one), its
bounds, and hostile servers on loopback (garbage, huge, slow, lying, refusing)."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from daemon.adapters import airflow
from daemon.adapters.airflow import AirflowAPI, Malformed
from daemon.errors import DependencyUnreachable, DeploydError

SHA = "346ff1ee155f0384663a0dcbea59bdf638e57ca7"
PASSWORD = "s3cret-pässword"
TOKEN = "eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJkZXBsb3lkIn0.c2lnbmF0dXJl"

# GET /api/v2/dags/dag1 of Airflow 3.3.2 over a GitDagBundle "dags" (trimmed of nothing).
RECORDED_DAG: dict[str, Any] = {
    "dag_id": "dag1",
    "dag_display_name": "dag1",
    "is_paused": True,
    "is_stale": False,
    "last_parsed_time": "2026-12-02T02:54:24.381018Z",
    "last_parse_duration": 0.07979472399892984,
    "last_expired": None,
    "bundle_name": "dags",
    "bundle_version": SHA,
    "relative_fileloc": "dags/dag1.py",
    "fileloc": "/tmp/aw/state/bundles/dags/tracking_repo/dags/dag1.py",
    "description": None,
    "timetable_summary": None,
    "timetable_description": "Never, external triggers only",
    "timetable_partitioned": False,
    "timetable_periodic": False,
    "tags": [],
    "max_active_tasks": 16,
    "max_active_runs": 16,
    "max_consecutive_failed_dag_runs": 0,
    "has_task_concurrency_limits": False,
    "has_import_errors": False,
    "next_dagrun_logical_date": None,
    "next_dagrun_data_interval_start": None,
    "next_dagrun_data_interval_end": None,
    "next_dagrun_run_after": None,
    "allowed_run_types": None,
    "owners": ["airflow"],
    "is_backfillable": False,
    "file_token": "eyJidW5kbGVfbmFtZSI6ImRhZ3MifQ.CAAcfLdIwQrndHQQb",
}
# GET /api/v2/importErrors after a commit added dags/broken.py (import nosuchmodule).
RECORDED_IMPORT_ERRORS: dict[str, Any] = {
    "import_errors": [
        {
            "import_error_id": 1,
            "timestamp": "2026-12-02T02:54:25.482894Z",
            "filename": "dags/broken.py",
            "bundle_name": "dags",
            "stack_trace": 'Traceback (most recent call last):\n  File "<frozen importlib.'
            '_bootstrap>", line 241, in _call_with_frames_removed\n  File "/tmp/aw/state/'
            'bundles/dags/tracking_repo/dags/broken.py", line 2, in <module>\n    import '
            "nosuchmodule\nModuleNotFoundError: No module named 'nosuchmodule'\n",
        }
    ],
    "total_entries": 1,
}


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


def dags_page(*dags: dict[str, Any], total: int | None = None) -> dict[str, Any]:
    return {"dags": list(dags), "total_entries": len(dags) if total is None else total}


def a_dag(dag_id: str, **fields: Any) -> dict[str, Any]:
    dag = copy.deepcopy(RECORDED_DAG)
    dag.update({"dag_id": dag_id, "relative_fileloc": f"dags/{dag_id}.py", **fields})
    return dag


# -- parsing ----------------------------------------------------------------------------------


def test_a_recorded_dags_page_parses_to_the_bundles_dags() -> None:
    other = a_dag("elsewhere", bundle_name="other-bundle")
    page = airflow.parse_dags_page(dags_page(RECORDED_DAG, other), "dags")
    assert page.count == 2 and page.total == 2
    (dag,) = page.items
    assert dag == airflow.BundleDag(
        "dag1", "dags/dag1.py", SHA, utc(2026, 12, 2, 2, 54, 24, 381018)
    )


def test_a_never_parsed_dag_has_no_time_or_version() -> None:
    dag = a_dag("new", last_parsed_time=None, bundle_version=None)
    (parsed,) = airflow.parse_dags_page(dags_page(dag), "dags").items
    assert parsed.last_parsed_time is None and parsed.bundle_version is None


def test_a_recorded_import_error_parses_to_its_file_and_line() -> None:
    page = airflow.parse_import_errors_page(RECORDED_IMPORT_ERRORS, "dags")
    (err,) = page.items
    assert err.filename == "dags/broken.py"
    assert err.message == "ModuleNotFoundError: No module named 'nosuchmodule'"
    assert "import nosuchmodule" in err.traceback
    assert err.timestamp == utc(2026, 12, 2, 2, 54, 25, 482894)


def test_a_long_traceback_keeps_its_end_and_a_one_line_message() -> None:
    stack = "Traceback\n" + "  frame\n" * 5000 + "ValueError: " + "x\x1b[31m" * 200 + "\n"
    body = copy.deepcopy(RECORDED_IMPORT_ERRORS)
    body["import_errors"][0]["stack_trace"] = stack
    (err,) = airflow.parse_import_errors_page(body, "dags").items
    assert len(err.traceback) == airflow.MAX_TRACEBACK_CHARS and err.traceback.endswith("m\n")
    assert len(err.message) <= airflow.MAX_MESSAGE_CHARS and err.message.startswith("ValueError")
    assert "\x1b" not in err.message and "\n" not in err.message


@pytest.mark.parametrize(
    "payload",
    [
        [],
        {"dags": {}, "total_entries": 1},
        {"dags": [], "total_entries": "1"},
        {"dags": [], "total_entries": -1},
        {"dags": [], "total_entries": True},
        {"dags": ["dag1"], "total_entries": 1},
        {"dags": [{**a_dag("x"), "dag_id": 7}], "total_entries": 1},
        {"dags": [a_dag("x", bundle_version=["a"])], "total_entries": 1},
        {"dags": [a_dag("x", last_parsed_time="yesterday")], "total_entries": 1},
        {"dags": [a_dag("x", relative_fileloc="d/" * 5000)], "total_entries": 1},
    ],
)
def test_a_malformed_dags_page_is_refused(payload: Any) -> None:
    with pytest.raises(Malformed):
        airflow.parse_dags_page(payload, "dags")


def test_an_import_error_without_a_timestamp_is_malformed() -> None:
    body = copy.deepcopy(RECORDED_IMPORT_ERRORS)
    body["import_errors"][0]["timestamp"] = None
    with pytest.raises(Malformed):
        airflow.parse_import_errors_page(body, "dags")


def test_bundle_state_versions_and_errors_of_files() -> None:
    state = airflow.BundleState(
        "dags",
        (
            airflow.BundleDag("a", "dags/a.py", SHA, 1.0),
            airflow.BundleDag("b", "dags/b.py", "old", 1.0),
        ),
        (airflow.ImportFailure("dags/c.py", "E", "E", 1.0),),
    )
    assert state.versions() == {SHA, "old"}
    assert state.errors_in({"dags/c.py", "dags/a.py"}) == state.import_errors
    assert state.errors_in({"dags/a.py"}) == ()


def test_it_needs_credentials() -> None:
    with pytest.raises(ValueError, match="token"):
        AirflowAPI("http://127.0.0.1:1", "dags", username="deployd")


# -- a fake Airflow on loopback ---------------------------------------------------------------


class FakeAirflow:
    """An aiohttp server answering like Airflow's API, or however a test tells it to."""

    def __init__(self) -> None:
        self.dags: list[dict[str, Any]] = [a_dag(f"dag{i}") for i in range(3)]
        self.errors: dict[str, Any] = RECORDED_IMPORT_ERRORS
        self.tokens_issued = 0
        self.valid_tokens: set[str] = set()
        self.requests: list[str] = []
        self.override: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/auth/token", self.token)
        app.router.add_get("/api/v2/dags", self.list_dags)
        app.router.add_get("/api/v2/importErrors", self.list_errors)
        return app

    async def token(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body != {"username": "deployd", "password": PASSWORD}:
            return web.json_response({"detail": "Invalid credentials"}, status=401)
        self.tokens_issued += 1
        token = f"{TOKEN}{self.tokens_issued}"
        self.valid_tokens.add(token)
        return web.json_response({"access_token": token}, status=201)

    def authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "").removeprefix("Bearer ") in (
            self.valid_tokens
        )

    async def list_dags(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path_qs)
        if self.override is not None:
            return await self.override(request)
        if not self.authorised(request):
            return web.json_response({"detail": "Not authenticated"}, status=401)
        offset, limit = int(request.query["offset"]), int(request.query["limit"])
        return web.json_response(
            dags_page(*self.dags[offset : offset + limit], total=len(self.dags))
        )

    async def list_errors(self, request: web.Request) -> web.StreamResponse:
        if not self.authorised(request):
            return web.json_response({"detail": "Not authenticated"}, status=401)
        return web.json_response(self.errors)


@pytest.fixture
async def fake(aiohttp_server: Callable[..., Awaitable[Any]]) -> tuple[FakeAirflow, str]:
    fake = FakeAirflow()
    server = await aiohttp_server(fake.app())
    return fake, f"http://127.0.0.1:{server.port}"


async def state_of(url: str, **kwargs: Any) -> airflow.BundleState:
    api = AirflowAPI(url, "dags", **({"username": "deployd", "password": PASSWORD} | kwargs))
    try:
        return await api.bundle_state()
    finally:
        await api.close()


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    assert PASSWORD not in text and TOKEN not in text
    return text


async def test_it_reads_every_page_of_the_bundle(fake: tuple[FakeAirflow, str]) -> None:
    server, url = fake
    server.dags = [a_dag(f"dag{i}") for i in range(250)]
    state = await state_of(url)
    assert [d.dag_id for d in state.dags] == [f"dag{i}" for i in range(250)]
    assert [e.filename for e in state.import_errors] == ["dags/broken.py"]
    assert len(server.requests) == 3 and "bundle_name=dags" in server.requests[0]
    assert server.tokens_issued == 1


async def test_an_expired_token_is_renewed_once_per_call(fake: tuple[FakeAirflow, str]) -> None:
    server, url = fake
    api = AirflowAPI(url, "dags", username="deployd", password=PASSWORD)
    try:
        await api.bundle_state()
        server.valid_tokens.clear()  # Airflow's tokens expire
        assert len((await api.bundle_state()).dags) == 3
        assert server.tokens_issued == 2 == api.token_requests

        async def always_401(_request: web.Request) -> web.StreamResponse:
            return web.json_response({"detail": "Invalid token"}, status=401)

        server.override = always_401
        with pytest.raises(DeploydError) as exc:
            await api.bundle_state()
        assert server.tokens_issued == 3  # one renewal, then the error
        assert "check airflow_username and airflow_password_file" in one_line(exc)
    finally:
        await api.close()


async def test_a_token_that_keeps_expiring_is_renewed_once_per_call(
    fake: tuple[FakeAirflow, str],
) -> None:
    server, url = fake
    server.dags = [a_dag(f"dag{i}") for i in range(250)]

    async def each_token_once(request: web.Request) -> web.StreamResponse:
        if not server.authorised(request):
            return web.json_response({"detail": "Invalid token"}, status=401)
        server.valid_tokens.clear()  # good for one page only
        offset = int(request.query["offset"])
        return web.json_response(dags_page(*server.dags[offset : offset + 100], total=250))

    server.override = each_token_once
    with pytest.raises(DeploydError) as exc:
        await state_of(url)
    assert "refused deployd's token (HTTP 401 to GET /api/v2/dags)" in one_line(exc)
    assert server.tokens_issued == 2  # the first token, and one renewal


async def test_a_wrong_password_names_the_settings(fake: tuple[FakeAirflow, str]) -> None:
    _server, url = fake
    with pytest.raises(DeploydError) as exc:
        await state_of(url, password=PASSWORD + "x")
    assert "refused deployd's user 'deployd' (HTTP 401)" in one_line(exc)
    assert "airflow_password_file" in str(exc.value)


async def test_a_refused_fixed_token_names_its_file(fake: tuple[FakeAirflow, str]) -> None:
    server, url = fake
    with pytest.raises(DeploydError) as exc:
        await state_of(url, username=None, password=None, token=TOKEN)
    assert "check airflow_api_token_file" in one_line(exc)
    assert server.tokens_issued == 0  # a given token is never swapped for one of its own


async def test_nothing_listening_is_unreachable() -> None:
    from tests.support.airflow import free_port

    with pytest.raises(DependencyUnreachable) as exc:
        await state_of(f"http://deployd:{PASSWORD}@127.0.0.1:{free_port()}")
    assert "is not answering: connection refused" in one_line(exc)
    assert "http://127.0.0.1:" in str(exc.value)  # the URL without its user:password@


def answer(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, status=status, headers=headers)

    return handler


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (
            answer(b"<html>proxy error</html>"),
            "sent a malformed answer to /api/v2/dags: it is not JSON",
        ),
        (answer(b"[" * 100_000 + b"]" * 100_000), "it is not JSON"),
        (answer(json.dumps({"dags": 3}).encode()), "'dags' is not a list"),
        (answer(json.dumps(dags_page(total=10**9)).encode()), "reports more than 5000 DAGs"),
        (answer(b"{}", status=500), "is failing: HTTP 500 to GET /api/v2/dags"),
        (answer(b"{}", status=404), "answered HTTP 404 to GET /api/v2/dags: is airflow_api_url"),
        (answer(b"", status=403), "forbids what deployd reads (HTTP 403"),
        (
            answer(b"", status=307, headers={"Location": "http://169.254.169.254/"}),
            "answered HTTP 307",
        ),
        (answer(b" " * (9 * 2**20)), "sent more than 8 MB in answer to /api/v2/dags"),
    ],
)
async def test_hostile_answers_are_one_line_errors(
    fake: tuple[FakeAirflow, str],
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    expected: str,
) -> None:
    server, url = fake
    server.override = handler
    with pytest.raises(DeploydError) as exc:
        await state_of(url)
    assert expected in one_line(exc)


async def test_a_huge_body_without_a_length_is_cut_off(fake: tuple[FakeAirflow, str]) -> None:
    server, url = fake

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = b"x" * 2**20
        for _ in range(100):
            await resp.write(chunk)
        return resp

    server.override = endless
    with pytest.raises(DeploydError) as exc:
        await state_of(url)
    assert "sent more than 8 MB" in one_line(exc)


async def test_pages_that_always_say_more_stop_at_the_byte_budget(
    fake: tuple[FakeAirflow, str],
) -> None:
    server, url = fake
    fat = a_dag("fat", description="d" * 4000)

    async def always_more(_request: web.Request) -> web.StreamResponse:
        return web.json_response(dags_page(*[fat] * 100, total=4999))

    server.override = always_more
    with pytest.raises(DeploydError) as exc:
        await state_of(url)
    assert "sent more than 8 MB" in one_line(exc)  # ~500 kB a page: 16 pages, not 50


async def test_an_empty_page_ends_the_listing(fake: tuple[FakeAirflow, str]) -> None:
    server, url = fake

    async def lying(_request: web.Request) -> web.StreamResponse:
        return web.json_response(dags_page(total=40))

    server.override = lying
    assert (await state_of(url)).dags == ()
    assert len(server.requests) == 1


@pytest.mark.parametrize("token", ["", "a b", "x" * 20000, None, "tok\u00e9n"])
async def test_an_unusable_token_is_malformed(
    aiohttp_server: Callable[..., Awaitable[Any]], token: object
) -> None:
    app = web.Application()

    async def issue(_request: web.Request) -> web.StreamResponse:
        return web.json_response({"access_token": token}, status=201)

    app.router.add_post("/auth/token", issue)
    server = await aiohttp_server(app)
    with pytest.raises(DeploydError) as exc:
        await state_of(f"http://127.0.0.1:{server.port}")
    assert "malformed answer to /auth/token" in one_line(exc)


@pytest.mark.parametrize("mode", ["silent", "drip", "slow-pages"])
async def test_a_slow_api_fails_within_the_timeout(
    fake: tuple[FakeAirflow, str], mode: str
) -> None:
    server, url = fake
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        if mode == "silent":
            await release.wait()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        if mode == "drip":
            while not release.is_set():
                await resp.write(b" ")
                await asyncio.sleep(0.05)
        else:  # each page in time, but never the last one
            await asyncio.sleep(0.3)
            await resp.write(json.dumps(dags_page(a_dag("x"), total=4000)).encode())
        return resp

    server.override = slow
    began = time.monotonic()
    try:
        with pytest.raises(DependencyUnreachable) as exc:
            await state_of(url, timeout=1.0)
    finally:
        release.set()
    assert time.monotonic() - began < 2.0
    assert "is not answering: no" in one_line(exc) and "within 1 s" in str(exc.value)
