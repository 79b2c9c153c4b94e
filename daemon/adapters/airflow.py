"""Airflow 3's REST API (/api/v2), as far as deployd asks it whether a DAG deploy is live.

A DAG deploy moves the server branch that Airflow's GitDagBundle tracks; the `live` step then
asks this adapter what Airflow has parsed of that bundle: each DAG with the bundle version (the
commit) its file was last parsed at, and the bundle's import errors with their files relative
to the bundle.

Airflow's answers come from outside and are treated as hostile: every request has a deadline,
every body a size cap, every page count a bound, every field a type check; anything else ends
in one line (DeploydError, DependencyUnreachable for a silent or failing server), never in a
traceback. Response bodies are never quoted in errors (FastAPI's validation errors echo what
was sent, and that may be a password), and neither the token nor the password is ever logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from daemon.errors import DependencyUnreachable, DeploydError

log = logging.getLogger(__name__)

PAGE_SIZE = 100  # Airflow's default [api] maximum_page_limit: a larger limit is cut to it
MAX_DAGS = 5000
MAX_IMPORT_ERRORS = 5000
MAX_RESPONSE_BYTES = 8 * 2**20  # all the pages of one call together
MAX_TRACEBACK_CHARS = 4000
MAX_MESSAGE_CHARS = 300
MAX_TOKEN_CHARS = 16384


@dataclass(frozen=True)
class BundleDag:
    """One DAG of the bundle as Airflow last parsed it."""

    dag_id: str
    relative_fileloc: str | None  # the file, relative to the bundle's root
    bundle_version: str | None  # the commit the file was last parsed at
    last_parsed_time: float | None  # Unix time


@dataclass(frozen=True)
class ImportFailure:
    """An import error Airflow recorded for a file of the bundle."""

    filename: str  # relative to the bundle's root
    message: str  # the exception's line, e.g. "NameError: name 'x' is not defined"
    traceback: str  # the end of Airflow's stack trace text, at most MAX_TRACEBACK_CHARS
    timestamp: float  # Unix time of the parse that failed


@dataclass(frozen=True)
class BundleState:
    """What Airflow reports of one bundle: its DAGs and its import errors."""

    bundle: str
    dags: tuple[BundleDag, ...] = ()
    import_errors: tuple[ImportFailure, ...] = field(default=())

    def versions(self) -> frozenset[str | None]:
        """The bundle versions the bundle's DAGs were last parsed at."""
        return frozenset(dag.bundle_version for dag in self.dags)

    def errors_in(self, paths: set[str]) -> tuple[ImportFailure, ...]:
        """The import errors of the given files (relative to the bundle)."""
        return tuple(err for err in self.import_errors if err.filename in paths)


@dataclass(frozen=True)
class Page:
    """One page of a collection: the bundle's entries on it, how many entries it held, the total."""

    items: list[Any]
    count: int
    total: int


class Malformed(ValueError):
    """An answer that is not what Airflow's API sends (the reason, for one line)."""


# -- parsing (pure) ---------------------------------------------------------------------------


def parse_dags_page(payload: Any, bundle: str) -> Page:
    """The bundle's DAGs on one page of GET /api/v2/dags, and the total Airflow reports."""
    items, total = _collection(payload, "dags")
    dags: list[BundleDag] = []
    for item in items:
        if _optional_str(item, "bundle_name") != bundle:
            continue  # an Airflow that ignores the bundle_name filter
        dags.append(
            BundleDag(
                dag_id=_str(item, "dag_id"),
                relative_fileloc=_optional_str(item, "relative_fileloc"),
                bundle_version=_optional_str(item, "bundle_version"),
                last_parsed_time=_optional_time(item, "last_parsed_time"),
            )
        )
    return Page(dags, len(items), total)


def parse_import_errors_page(payload: Any, bundle: str) -> Page:
    """The bundle's import errors on one page of GET /api/v2/importErrors, and the total."""
    items, total = _collection(payload, "import_errors")
    errors: list[ImportFailure] = []
    for item in items:
        if _optional_str(item, "bundle_name") != bundle:
            continue
        stack = _str(item, "stack_trace", limit=None)
        timestamp = _optional_time(item, "timestamp")
        if timestamp is None:
            raise Malformed("an import error has no timestamp")
        errors.append(
            ImportFailure(
                filename=_str(item, "filename"),
                message=error_line(stack),
                traceback=stack[-MAX_TRACEBACK_CHARS:],
                timestamp=timestamp,
            )
        )
    return Page(errors, len(items), total)


def error_line(stack: str) -> str:
    """The exception's own line of a stack trace (its last non-blank line), made printable."""
    lines = [line.strip() for line in stack.splitlines() if line.strip()]
    line = lines[-1] if lines else "(no message)"
    line = "".join(ch if ch.isprintable() else "?" for ch in line)
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"


def _collection(payload: Any, key: str) -> tuple[list[dict[str, Any]], int]:
    if not isinstance(payload, dict):
        raise Malformed(f"the answer is not a JSON object with {key!r}")
    items = payload.get(key)
    total = payload.get("total_entries")
    if not isinstance(items, list):
        raise Malformed(f"{key!r} is not a list")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise Malformed("'total_entries' is not a count")
    if not all(isinstance(item, dict) for item in items):
        raise Malformed(f"an entry of {key!r} is not an object")
    return items, total


def _str(item: dict[str, Any], key: str, limit: int | None = 4096) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise Malformed(f"{key!r} is not a string")
    if limit is not None and len(value) > limit:
        raise Malformed(f"{key!r} is longer than {limit} characters")
    return value


def _optional_str(item: dict[str, Any], key: str) -> str | None:
    return None if item.get(key) is None else _str(item, key)


def _optional_time(item: dict[str, Any], key: str) -> float | None:
    text = _optional_str(item, key)
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise Malformed(f"{key!r} is not an ISO 8601 time") from exc


# -- the client -------------------------------------------------------------------------------


class _Budget:
    """What one call may still spend: response bytes, and its one token renewal."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self.renewed = False


class AirflowAPI:
    """A client of one Airflow's API, for one bundle."""

    def __init__(
        self,
        base_url: str,
        bundle: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        if token is None and (username is None or password is None):
            raise ValueError("AirflowAPI needs a token, or a username and a password")
        self.base_url = base_url.rstrip("/")
        self.bundle = bundle
        self.timeout = timeout
        self._username = username
        self._password = password
        self._token = token
        self._fixed_token = token is not None
        self._session: aiohttp.ClientSession | None = None
        self.token_requests = 0  # how many tokens it asked Airflow for (tests, metrics)

    @property
    def shown_url(self) -> str:
        """The base URL without any user:password@ part, for messages."""
        parts = urlsplit(self.base_url)
        host = parts.netloc.rpartition("@")[2]
        return f"{parts.scheme}://{host}{parts.path}"

    @property
    def _credential_setting(self) -> str:
        if self._fixed_token:
            return "airflow_api_token_file"
        return "airflow_username and airflow_password_file"

    async def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def bundle_state(self) -> BundleState:
        """The bundle's DAGs and import errors, all pages, within `timeout` in all."""
        budget = _Budget(MAX_RESPONSE_BYTES)
        try:
            async with asyncio.timeout(self.timeout):
                dags = await self._all_pages(
                    "/api/v2/dags", "DAGs", MAX_DAGS, budget, parse_dags_page
                )
                errors = await self._all_pages(
                    "/api/v2/importErrors",
                    "import errors",
                    MAX_IMPORT_ERRORS,
                    budget,
                    parse_import_errors_page,
                )
        except TimeoutError:
            raise self._unreachable(f"no whole answer within {self.timeout:g} s") from None
        return BundleState(self.bundle, tuple(dags), tuple(errors))

    # -- paging -----------------------------------------------------------------------------

    async def _all_pages(
        self,
        path: str,
        what: str,
        most: int,
        budget: _Budget,
        parse: Callable[[Any, str], Page],
    ) -> list[Any]:
        found: list[Any] = []
        offset = 0
        while True:
            params = {"bundle_name": self.bundle, "limit": str(PAGE_SIZE), "offset": str(offset)}
            if path.endswith("/dags"):
                params["exclude_stale"] = "true"  # DAGs whose file is gone are not live
            payload = await self._get_json(path, params, budget)
            try:
                page = parse(payload, self.bundle)
            except Malformed as exc:
                raise self._malformed(path, str(exc)) from None
            found += page.items
            if page.total > most or len(found) > most:
                raise DeploydError(
                    f"Airflow's API at {self.shown_url} reports more than {most} {what} "
                    f"(bundle {self.bundle}): deployd reads at most {most}."
                )
            offset += page.count
            if page.count == 0 or offset >= page.total:
                return found

    # -- HTTP -------------------------------------------------------------------------------

    async def _get_json(self, path: str, params: dict[str, str], budget: _Budget) -> Any:
        """GET with the token; a 401 gets one new token per call (they expire) and one more try."""
        if self._token is None:
            await self._renew_token(budget)
        status, body = await self._request("GET", path, params=params, budget=budget)
        if status == 401 and not self._fixed_token and not budget.renewed:
            budget.renewed = True
            await self._renew_token(budget)
            status, body = await self._request("GET", path, params=params, budget=budget)
        self._check_status(status, f"GET {path}")
        return self._decode(body, path)

    async def _renew_token(self, budget: _Budget) -> None:
        self.token_requests += 1
        self._token = None
        status, body = await self._request(
            "POST",
            "/auth/token",
            json_body={"username": self._username, "password": self._password},
            budget=budget,
        )
        if status in (400, 401, 403):
            raise DeploydError(
                f"Airflow's API at {self.shown_url} refused deployd's user "
                f"{self._username!r} (HTTP {status}): check {self._credential_setting}."
            )
        self._check_status(status, "POST /auth/token")
        payload = self._decode(body, "/auth/token")
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if (
            not isinstance(token, str)
            or not token
            or len(token) > MAX_TOKEN_CHARS
            or not token.isascii()
            or not token.isprintable()
            or " " in token
        ):
            raise self._malformed("/auth/token", "it holds no usable 'access_token'")
        self._token = token

    def _check_status(self, status: int, what: str) -> None:
        if 200 <= status < 300:
            return
        if status in (401, 403):
            reason = "refused deployd's token" if status == 401 else "forbids what deployd reads"
            hint = (
                f"check {self._credential_setting}"
                if status == 401
                else "give the user at least Airflow's viewer role"
            )
            raise DeploydError(
                f"Airflow's API at {self.shown_url} {reason} (HTTP {status} to {what}): {hint}."
            )
        if status >= 500:
            raise DependencyUnreachable(
                f"Airflow's API at {self.shown_url} is failing: HTTP {status} to {what}."
            )
        raise DeploydError(
            f"Airflow's API at {self.shown_url} answered HTTP {status} to {what}: "
            "is airflow_api_url the base URL of an Airflow 3 api-server?"
        )

    def _decode(self, body: bytes, path: str) -> Any:
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise self._malformed(path, "it is not JSON") from None

    def _malformed(self, path: str, reason: str) -> DeploydError:
        return DeploydError(
            f"Airflow's API at {self.shown_url} sent a malformed answer to {path}: {reason}."
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        budget: _Budget,
        params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> tuple[int, bytes]:
        session = self._client()
        headers = {"Accept": "application/json"}
        if self._token is not None and path != "/auth/token":
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            async with session.request(
                method,
                self.base_url + path,
                params=params,
                json=json_body,
                headers=headers,
                allow_redirects=False,  # never carry the token or password elsewhere
            ) as resp:
                return resp.status, await self._read_capped(resp, budget, path)
        except TimeoutError:
            raise self._unreachable(f"no answer within {self.timeout:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(_connect_reason(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise self._unreachable(type(exc).__name__) from None

    async def _read_capped(self, resp: aiohttp.ClientResponse, budget: _Budget, path: str) -> bytes:
        declared = resp.content_length
        if declared is not None and declared > budget.left:
            raise self._too_big(path)
        chunks: list[bytes] = []
        async for chunk in resp.content.iter_chunked(65536):
            budget.left -= len(chunk)
            if budget.left < 0:
                raise self._too_big(path)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_big(self, path: str) -> DeploydError:
        return DeploydError(
            f"Airflow's API at {self.shown_url} sent more than "
            f"{MAX_RESPONSE_BYTES // 2**20} MB in answer to {path}: deployd reads no more."
        )

    def _unreachable(self, reason: str) -> DependencyUnreachable:
        return DependencyUnreachable(
            f"Airflow's API at {self.shown_url} is not answering: {reason}; "
            "check airflow_api_url and that the api-server runs."
        )

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=self.timeout),
                raise_for_status=False,
            )
        return self._session


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    """'connection refused' and the like, without aiohttp's repr of the request."""
    os_error = exc.os_error
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    text = os_error.strerror if os_error.strerror else type(os_error).__name__
    return str(text).lower()
