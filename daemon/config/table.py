"""Reading one TOML table: typed getters that remember the keys taken, and value checks.

Every error names the key (`deployment[0].image`) and says what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from daemon.config.settings import Workload
from daemon.errors import ConfigError, DeploydError

TAG_FIELDS = frozenset({"time", "sha7", "sha", "id"})
INTEGRITY_MODES = ("builtin", "project", "both", "auto")
WORKLOAD_KINDS = ("deployment", "statefulset")
_IMAGE = re.compile(r"[a-z0-9]+(?:[._:-][a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)+")
_IMAGE_LOCAL = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_LITERAL = re.compile(r"[A-Za-z0-9_.-]*")
_LISTEN = re.compile(r"(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")

T = TypeVar("T")
_MISSING: Any = object()


class Table:
    """One TOML table being read: remembers which keys were taken."""

    def __init__(self, data: dict[str, Any], where: str, base: Path) -> None:
        self.data = data
        self.where = where
        self.base = base
        self.taken: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, types: tuple[type, ...], default: Any, what: str) -> Any:
        self.taken.add(key)
        if key not in self.data:
            if default is _MISSING:
                raise ConfigError(self._key(key), "is required but missing.")
            return default
        value = self.data[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(self._key(key), f"must be {what}, not {type_name(value)}.")
        return value

    def _check(self, key: str, value: T, check: Callable[[T], object] | None) -> T:
        if check is not None:
            try:
                check(value)
            except DeploydError as exc:
                problem = exc.problem if isinstance(exc, ConfigError) else exc.message
                raise ConfigError(self._key(key), problem) from exc
        return value

    def table(self, key: str) -> Table:
        value = self._get(key, (dict,), {}, "a table")
        return Table(value, self._key(key), self.base)

    def tables(self, key: str) -> list[Table]:
        value = self._get(key, (list,), [], "an array of tables ([[" + key + "]])")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{self._key(key)}[{i}]", "must be a table.")
            out.append(Table(item, f"{self._key(key)}[{i}]", self.base))
        return out

    def get_str(
        self, key: str, default: str | None, check: Callable[[str], object] | None = None
    ) -> str:
        value: str = self._get(key, (str,), _MISSING if default is None else default, "a string")
        return self._check(key, value, check)

    def opt_str(self, key: str, check: Callable[[str], object] | None = None) -> str | None:
        value = self._get(key, (str,), None, "a string")
        return None if value is None else self._check(key, value, check)

    def get_bool(self, key: str, default: bool) -> bool:
        return bool(self._get(key, (bool,), default, "true or false"))

    def get_int(self, key: str, default: int, minimum: int = 1) -> int:
        value = int(self._get(key, (int,), default, "an integer"))
        if value < minimum:
            raise ConfigError(self._key(key), f"must be at least {minimum}, not {value}.")
        return value

    def seconds(self, key: str, default: int, minimum: int = 1) -> int:
        return self.get_int(key, default, minimum)

    def number(self, key: str, default: float, minimum: float) -> float:
        value = float(self._get(key, (int, float), default, "a number"))
        if value < minimum:
            raise ConfigError(self._key(key), f"must be at least {minimum}, not {value}.")
        return value

    def list_of_str(self, key: str, check: Callable[[str], object] | None = None) -> list[str]:
        value = self._get(key, (list,), [], "an array of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(
                    f"{self._key(key)}[{i}]", f"must be a string, not {type_name(item)}."
                )
            self._check(f"{key}[{i}]", item, check)
        if len(set(value)) != len(value):
            raise ConfigError(self._key(key), "has duplicate entries.")
        return list(value)

    def path(self, key: str, *, must_exist: bool) -> Path | None:
        value = self._get(key, (str,), None, "a path")
        if value is None:
            return None
        p = Path(value).expanduser()
        p = p if p.is_absolute() else self.base / p
        if must_exist and not p.is_file():
            raise ConfigError(self._key(key), f"{p} is not a readable file.")
        return p

    def secret(self, key: str) -> str | None:
        p = self.path(key, must_exist=False)
        if p is None:
            return None
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(self._key(key), f"cannot read secret file {p}: {reason}.") from exc
        text = text.strip()
        if not text:
            raise ConfigError(self._key(key), f"secret file {p} is empty.")
        return text

    def done(self) -> None:
        """Refuse keys that no reader took: an unknown key is an error, not ignored."""
        unknown = sorted(set(self.data) - self.taken)
        if unknown:
            raise ConfigError(self._key(unknown[0]), "unknown key.")


def type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def listen(value: str) -> None:
    m = _LISTEN.fullmatch(value)
    if not m or not 0 <= int(m["port"]) <= 65535:
        raise ConfigError("", f"{value!r} is not HOST:PORT.")


def listen_or_empty(value: str) -> None:
    if value:
        listen(value)


def is_url(value: str) -> bool:
    return bool(re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", value))


def url(value: str) -> None:
    if value and not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", value):
        raise ConfigError("", f"{value!r} is not an http(s) URL.")


def image(value: str) -> None:
    if not (_IMAGE.fullmatch(value) or _IMAGE_LOCAL.fullmatch(value)) or "@" in value:
        raise ConfigError(
            "",
            f"{value!r} is not an image repository (no tag or digest): "
            "e.g. registry.example.com/airflow/prod.",
        )
    last = value.rsplit("/", 1)[-1]
    if ":" in last:
        raise ConfigError("", f"{value!r} names a tag; give the repository only.")


def github_repo(value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", value):
        raise ConfigError("", f"{value!r} is not OWNER/REPO.")


def dns_label(value: str) -> None:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", value):
        raise ConfigError("", f"{value!r} is not a Kubernetes name.")


def workload(value: str) -> None:
    kind, _, name = value.partition("/")
    if kind not in WORKLOAD_KINDS or not re.fullmatch(
        r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", name
    ):
        raise ConfigError("", f"{value!r} is not deployment/NAME or statefulset/NAME.")


def to_workload(value: str) -> Workload:
    kind, _, name = value.partition("/")
    return Workload(kind, name)


def tag_template(value: str) -> None:
    fields = re.findall(r"\{([^{}]*)\}", value)
    bad = [f for f in fields if f not in TAG_FIELDS]
    if bad:
        raise ConfigError(
            "", f"unknown placeholder {{{bad[0]}}}; use {{time}}, {{sha7}}, {{sha}} and {{id}}."
        )
    if "id" not in fields:
        raise ConfigError("", "must contain {id} so that every deploy gets its own tag.")
    longest = len(re.sub(r"\{[^{}]*\}", "", value)) + sum(
        {"time": 19, "sha7": 7, "sha": 40, "id": 18}[f] for f in fields
    )
    if longest > 128:
        raise ConfigError("", f"renders up to {longest} characters; image tags end at 128.")
    literal = re.sub(r"\{[^{}]*\}", "", value)
    if not _TAG_LITERAL.fullmatch(literal) or value.startswith((".", "-")):
        raise ConfigError("", f"{value!r} would not make a valid image tag.")


def public_key(value: str) -> None:
    parts = value.split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise ConfigError("", "is not an OpenSSH public key line (e.g. 'ssh-ed25519 AAAA...').")


def cron(value: str) -> None:
    """A 5-field cron expression (minute hour day-of-month month day-of-week)."""
    from croniter import croniter

    if len(value.split()) != 5 or not croniter.is_valid(value):
        raise ConfigError(
            "", f'{value!r} is not a 5-field cron expression (e.g. "0 16 * * 5": Fridays 16:00).'
        )


def timezone(value: str) -> None:
    """An IANA time zone name that this host knows (zoneinfo)."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(
            "", f"{value!r} is not a time zone this host knows (an IANA name: Europe/Berlin)."
        ) from exc


def one_of(choices: tuple[str, ...]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ConfigError("", f"{value!r} is not one of {', '.join(choices)}.")

    return check
