"""The TOML configuration file, loaded once into frozen settings dataclasses.

Every key of SPEC.md is known here with its type and default; an unknown key,
a wrong type or a bad value stops start-up with one message naming the key.
Secrets are never inline: `*_file` keys name files whose contents are read at
load time (relative paths are taken from the config file's folder).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from daemon import names
from daemon.errors import ConfigError, DeploydError, UnknownDeployment

DEFAULT_PATH = Path("/etc/deployd/deployd.toml")
ENV_VAR = "DEPLOYD_CONFIG"

DEFAULT_TAG_TEMPLATE = "deploy-{time}-{sha7}-{id}"
TAG_FIELDS = frozenset({"time", "sha7", "sha", "id"})
INTEGRITY_MODES = ("builtin", "project", "both", "auto")
WORKLOAD_KINDS = ("deployment", "statefulset")
_IMAGE = re.compile(r"[a-z0-9]+(?:[._:-][a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)+")
_IMAGE_LOCAL = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG_LITERAL = re.compile(r"[A-Za-z0-9_.-]*")
_LISTEN = re.compile(r"(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class ServerSettings:
    """[server]: where state lives and what the daemon listens on."""

    state_dir: Path = Path("/var/lib/deployd")
    ssh_listen: str = "0.0.0.0:2222"
    http_listen: str = "127.0.0.1:8080"
    public_url: str = ""
    api_token: str | None = field(default=None, repr=False)
    shutdown_grace_seconds: int = 600


@dataclass(frozen=True)
class DockerSettings:
    """[docker]: the Docker Engine to build and run checks on."""

    host: str = "unix:///var/run/docker.sock"


@dataclass(frozen=True)
class RegistrySettings:
    """[registry]: where images are pushed, and the credentials for it."""

    url: str = ""
    username: str = ""
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class KubernetesSettings:
    """[kubernetes]: the cluster the workloads run on."""

    kubeconfig: Path | None = None


@dataclass(frozen=True)
class GitHubSettings:
    """[github]: webhook secrets and the API token for commit statuses."""

    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    token: str | None = field(default=None, repr=False)
    api_url: str = "https://api.github.com"


@dataclass(frozen=True)
class Workload:
    """One Kubernetes workload: `deployment/NAME` or `statefulset/NAME`."""

    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class Deployment:
    """[[deployment]]: one deploy target (an SSH repository, an image, workloads)."""

    name: str
    image: str
    branch: str = "main"
    github_repo: str | None = None
    fetch_url: str | None = None
    fetch_key_file: Path | None = None
    fetch_token: str | None = field(default=None, repr=False)
    tag_template: str = DEFAULT_TAG_TEMPLATE
    namespace: str = "airflow"
    workloads: tuple[Workload, ...] = ()
    worker_workloads: tuple[Workload, ...] = ()
    containers: tuple[str, ...] = ()
    worker_grace_seconds: int = 86400
    rollout_timeout_seconds: int = 900
    pytest: bool = False
    check_memory_mb: int = 2048
    check_cpus: float = 2.0
    check_timeout_seconds: int = 600
    import_timeout_seconds: int = 30
    integrity_test: str = "auto"
    keep_images: int = 10


@dataclass(frozen=True)
class Key:
    """[[key]]: an SSH public key and the deployments it may use."""

    name: str
    public_key: str
    deployments: tuple[str, ...] = ()
    admin: bool = False


@dataclass(frozen=True)
class Settings:
    """The whole configuration, loaded once and passed down."""

    path: Path
    server: ServerSettings
    docker: DockerSettings
    registry: RegistrySettings
    kubernetes: KubernetesSettings
    github: GitHubSettings
    deployments: tuple[Deployment, ...]
    keys: tuple[Key, ...]

    def deployment(self, name: str) -> Deployment:
        """Return the deployment called `name`, or raise UnknownDeployment."""
        names.deployment_name(name)
        for dep in self.deployments:
            if dep.name == name:
                return dep
        known = ", ".join(d.name for d in self.deployments) or "none"
        raise UnknownDeployment(f"no deployment named {name!r} is configured (known: {known}).")


def resolve_path(explicit: str | os.PathLike[str] | None, environ: dict[str, str]) -> Path:
    """Pick the config file: `--config`, else $DEPLOYD_CONFIG, else the default path."""
    if explicit:
        return Path(explicit)
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR])
    return DEFAULT_PATH


def load(path: Path) -> Settings:
    """Read, validate and resolve the config file at `path`."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}.") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}.") from exc
    return parse(data, base=path.parent.resolve(), path=path)


def parse(data: dict[str, Any], *, base: Path, path: Path) -> Settings:
    """Turn a decoded TOML document into Settings, or raise ConfigError."""
    top = _Table(data, "", base)
    server = _server(top.table("server"))
    docker_t = top.table("docker")
    docker = DockerSettings(host=docker_t.get_str("host", DockerSettings.host))
    docker_t.done()
    registry = _registry(top.table("registry"))
    kube_t = top.table("kubernetes")
    kubeconfig = kube_t.path("kubeconfig", must_exist=False)
    kube_t.done()
    github = _github(top.table("github"))
    deployments = tuple(_deployment(t) for t in top.tables("deployment"))
    seen: set[str] = set()
    for i, dep in enumerate(deployments):
        if dep.name in seen:
            raise ConfigError(f"deployment[{i}].name", f"duplicate deployment name {dep.name!r}.")
        seen.add(dep.name)
    keys = tuple(_key(t, seen) for t in top.tables("key"))
    key_names: set[str] = set()
    for i, key in enumerate(keys):
        if key.name in key_names:
            raise ConfigError(f"key[{i}].name", f"duplicate key name {key.name!r}.")
        key_names.add(key.name)
    top.done()
    return Settings(
        path, server, docker, registry, KubernetesSettings(kubeconfig), github, deployments, keys
    )


def _server(t: _Table) -> ServerSettings:
    d = ServerSettings()
    state_dir = t.path("state_dir", must_exist=False) or d.state_dir
    ssh_listen = t.get_str("ssh_listen", d.ssh_listen, check=_listen)
    http_listen = t.get_str("http_listen", d.http_listen, check=_listen)
    public_url = t.get_str("public_url", d.public_url, check=_url)
    api_token = t.secret("api_token_file")
    grace = t.seconds("shutdown_grace_seconds", d.shutdown_grace_seconds, minimum=0)
    t.done()
    return ServerSettings(
        state_dir, ssh_listen, http_listen, public_url.rstrip("/"), api_token, grace
    )


def _registry(t: _Table) -> RegistrySettings:
    url = t.get_str("url", "")
    username = t.get_str("username", "")
    password = t.secret("password_file")
    t.done()
    if password is not None and not username:
        raise ConfigError(f"{t.where}.username", "is required when password_file is set.")
    return RegistrySettings(url.rstrip("/"), username, password)


def _github(t: _Table) -> GitHubSettings:
    secrets_text = t.secret("webhook_secret_file")
    secrets = tuple(s.strip() for s in (secrets_text or "").splitlines() if s.strip())
    if secrets_text is not None and not secrets:
        raise ConfigError(f"{t.where}.webhook_secret_file", "the file holds no secret.")
    token = t.secret("token_file")
    api_url = t.get_str("api_url", GitHubSettings.api_url, check=_url)
    t.done()
    return GitHubSettings(secrets, token, api_url.rstrip("/"))


def _deployment(t: _Table) -> Deployment:
    name = t.get_str("name", None, check=names.deployment_name)
    image = t.get_str("image", None, check=_image)
    branch = t.get_str("branch", "main", check=names.branch_name)
    github_repo = t.opt_str("github_repo", check=_github_repo)
    fetch_url = t.opt_str("fetch_url")
    fetch_key_file = t.path("fetch_key_file", must_exist=True)
    fetch_token = t.secret("fetch_token_file")
    tag_template = t.get_str("tag_template", DEFAULT_TAG_TEMPLATE, check=_tag_template)
    namespace = t.get_str("namespace", "airflow", check=_dns_label)
    workloads = t.list_of_str("workloads", check=_workload)
    worker_workloads = t.list_of_str("worker_workloads", check=_workload)
    containers = t.list_of_str("containers", check=_dns_label)
    parsed = tuple(_to_workload(w) for w in workloads)
    workers = tuple(_to_workload(w) for w in worker_workloads)
    for w in workers:
        if w not in parsed:
            raise ConfigError(f"{t.where}.worker_workloads", f"{w} is not in workloads.")
    dep = Deployment(
        name=name,
        image=image,
        branch=branch,
        github_repo=github_repo,
        fetch_url=fetch_url,
        fetch_key_file=fetch_key_file,
        fetch_token=fetch_token,
        tag_template=tag_template,
        namespace=namespace,
        workloads=parsed,
        worker_workloads=workers,
        containers=tuple(containers),
        worker_grace_seconds=t.seconds("worker_grace_seconds", 86400, minimum=0),
        rollout_timeout_seconds=t.seconds("rollout_timeout_seconds", 900),
        pytest=t.get_bool("pytest", False),
        check_memory_mb=t.get_int("check_memory_mb", 2048, minimum=64),
        check_cpus=t.number("check_cpus", 2.0, minimum=0.1),
        check_timeout_seconds=t.seconds("check_timeout_seconds", 600),
        import_timeout_seconds=t.seconds("import_timeout_seconds", 30),
        integrity_test=t.get_str("integrity_test", "auto", check=_one_of(INTEGRITY_MODES)),
        keep_images=t.get_int("keep_images", 10, minimum=1),
    )
    t.done()
    if fetch_key_file is not None and fetch_token is not None:
        raise ConfigError(
            f"{t.where}.fetch_key_file", "set fetch_key_file or fetch_token_file, not both."
        )
    if github_repo is not None and fetch_url is None:
        raise ConfigError(
            f"{t.where}.fetch_url",
            "github_repo is set, so webhook deploys need fetch_url to fetch their commit from.",
        )
    return dep


def _key(t: _Table, deployments: set[str]) -> Key:
    name = t.get_str("name", None, check=names.key_name)
    public_key = t.get_str("public_key", None, check=_public_key)
    allowed = t.list_of_str("deployments", check=names.deployment_name)
    for dep in allowed:
        if dep not in deployments:
            raise ConfigError(f"{t.where}.deployments", f"no deployment named {dep!r}.")
    admin = t.get_bool("admin", False)
    t.done()
    return Key(name, public_key, tuple(allowed), admin)


T = TypeVar("T")
_MISSING: Any = object()


class _Table:
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
            raise ConfigError(self._key(key), f"must be {what}, not {_type_name(value)}.")
        return value

    def _check(self, key: str, value: T, check: Callable[[T], object] | None) -> T:
        if check is not None:
            try:
                check(value)
            except DeploydError as exc:
                problem = exc.problem if isinstance(exc, ConfigError) else exc.message
                raise ConfigError(self._key(key), problem) from exc
        return value

    def table(self, key: str) -> _Table:
        value = self._get(key, (dict,), {}, "a table")
        return _Table(value, self._key(key), self.base)

    def tables(self, key: str) -> list[_Table]:
        value = self._get(key, (list,), [], "an array of tables ([[" + key + "]])")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{self._key(key)}[{i}]", "must be a table.")
            out.append(_Table(item, f"{self._key(key)}[{i}]", self.base))
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
                    f"{self._key(key)}[{i}]", f"must be a string, not {_type_name(item)}."
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


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _listen(value: str) -> None:
    m = _LISTEN.fullmatch(value)
    if not m or not 0 <= int(m["port"]) <= 65535:
        raise ConfigError("", f"{value!r} is not HOST:PORT.")


def _url(value: str) -> None:
    if value and not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", value):
        raise ConfigError("", f"{value!r} is not an http(s) URL.")


def _image(value: str) -> None:
    if not (_IMAGE.fullmatch(value) or _IMAGE_LOCAL.fullmatch(value)) or "@" in value:
        raise ConfigError(
            "",
            f"{value!r} is not an image repository (no tag or digest): "
            "e.g. registry.example.com/airflow/prod.",
        )
    last = value.rsplit("/", 1)[-1]
    if ":" in last:
        raise ConfigError("", f"{value!r} names a tag; give the repository only.")


def _github_repo(value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+", value):
        raise ConfigError("", f"{value!r} is not OWNER/REPO.")


def _dns_label(value: str) -> None:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", value):
        raise ConfigError("", f"{value!r} is not a Kubernetes name.")


def _workload(value: str) -> None:
    kind, _, name = value.partition("/")
    if kind not in WORKLOAD_KINDS or not re.fullmatch(
        r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", name
    ):
        raise ConfigError("", f"{value!r} is not deployment/NAME or statefulset/NAME.")


def _to_workload(value: str) -> Workload:
    kind, _, name = value.partition("/")
    return Workload(kind, name)


def _tag_template(value: str) -> None:
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


def _public_key(value: str) -> None:
    parts = value.split()
    if len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise ConfigError("", "is not an OpenSSH public key line (e.g. 'ssh-ed25519 AAAA...').")


def _one_of(choices: tuple[str, ...]) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ConfigError("", f"{value!r} is not one of {', '.join(choices)}.")

    return check
