"""The TOML configuration file, loaded once into frozen settings dataclasses.

Every key of SPEC.md is known here with its type and default; an unknown key,
a wrong type or a bad value stops start-up with one message naming the key.
Secrets are never inline: `*_file` keys name files whose contents are read at
load time (relative paths are taken from the config file's folder).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from daemon import names
from daemon.config import table as v
from daemon.config.settings import (
    DAG_SOURCES,
    DEFAULT_NOTIFY_EVENTS,
    DEFAULT_TAG_TEMPLATE,
    KEY_ACCESS,
    NOTIFY_EVENTS,
    NOTIFY_TYPES,
    AirflowApi,
    Deployment,
    DockerSettings,
    FreezeWindow,
    GitHubSettings,
    Key,
    KubernetesSettings,
    NotifyTarget,
    RegistrySettings,
    ServerSettings,
    Settings,
    Workload,
)
from daemon.config.table import INTEGRITY_MODES, Table
from daemon.errors import ConfigError

__all__ = [
    "DEFAULT_TAG_TEMPLATE",
    "Deployment",
    "DockerSettings",
    "FreezeWindow",
    "GitHubSettings",
    "Key",
    "KubernetesSettings",
    "NotifyTarget",
    "RegistrySettings",
    "ServerSettings",
    "Settings",
    "Workload",
    "load",
    "parse",
    "resolve_path",
]

DEFAULT_PATH = Path("/etc/deployd/deployd.toml")
ENV_VAR = "DEPLOYD_CONFIG"


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
    top = Table(data, "", base)
    server = _server(top.table("server"))
    docker_t = top.table("docker")
    docker = DockerSettings(
        host=docker_t.get_str("host", DockerSettings.host),
        allow_remote_add=docker_t.get_bool("allow_remote_add", DockerSettings.allow_remote_add),
    )
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
    for i, dep in enumerate(deployments):
        if dep.promote_from is not None and (
            dep.promote_from == dep.name or dep.promote_from not in seen
        ):
            raise ConfigError(
                f"deployment[{i}].promote_from",
                f"must name another deployment, not {dep.promote_from!r}.",
            )
    keys = tuple(_key(t, seen) for t in top.tables("key"))
    key_names: set[str] = set()
    for i, key in enumerate(keys):
        if key.name in key_names:
            raise ConfigError(f"key[{i}].name", f"duplicate key name {key.name!r}.")
        key_names.add(key.name)
    notify = tuple(_notify(t, seen) for t in top.tables("notify"))
    target_names: set[str] = set()
    for i, target in enumerate(notify):
        if target.name in target_names:
            raise ConfigError(f"notify[{i}].name", f"duplicate notify name {target.name!r}.")
        target_names.add(target.name)
    top.done()
    return Settings(
        path,
        server,
        docker,
        registry,
        KubernetesSettings(kubeconfig),
        github,
        deployments,
        keys,
        notify,
    )


def _server(t: Table) -> ServerSettings:
    d = ServerSettings()
    state_dir = t.path("state_dir", must_exist=False) or d.state_dir
    ssh_listen = t.get_str("ssh_listen", d.ssh_listen, check=v.listen)
    http_listen = t.get_str("http_listen", d.http_listen, check=v.listen)
    public_url = t.get_str("public_url", d.public_url, check=v.url)
    api_token = t.secret("api_token_file")
    grace = t.seconds("shutdown_grace_seconds", d.shutdown_grace_seconds, minimum=0)
    max_push_mb = t.get_int("max_push_mb", d.max_push_mb)
    unauthenticated = t.get_int("ssh_max_unauthenticated", d.ssh_max_unauthenticated)
    per_source = t.get_int(
        "ssh_max_unauthenticated_per_source", d.ssh_max_unauthenticated_per_source
    )
    metrics_listen = t.get_str("metrics_listen", d.metrics_listen, check=v.listen_or_empty)
    metrics_token = t.secret("metrics_token_file")
    session_seconds = t.seconds("session_seconds", d.session_seconds, minimum=60)
    link_seconds = t.seconds("status_link_seconds", d.status_link_seconds, minimum=60)
    signed_links = t.get_bool("signed_status_links", d.signed_status_links)
    t.done()
    return ServerSettings(
        state_dir,
        ssh_listen,
        http_listen,
        public_url.rstrip("/"),
        api_token,
        grace,
        max_push_mb,
        unauthenticated,
        per_source,
        metrics_listen,
        metrics_token,
        session_seconds,
        link_seconds,
        signed_links,
    )


def _registry(t: Table) -> RegistrySettings:
    url = t.get_str("url", "")
    username = t.get_str("username", "")
    password = t.secret("password_file")
    t.done()
    if password is not None and not username:
        raise ConfigError(f"{t.where}.username", "is required when password_file is set.")
    return RegistrySettings(url.rstrip("/"), username, password)


def _github(t: Table) -> GitHubSettings:
    secrets_text = t.secret("webhook_secret_file")
    secrets = tuple(s.strip() for s in (secrets_text or "").splitlines() if s.strip())
    if secrets_text is not None and not secrets:
        raise ConfigError(f"{t.where}.webhook_secret_file", "the file holds no secret.")
    token = t.secret("token_file")
    api_url = t.get_str("api_url", GitHubSettings.api_url, check=v.url)
    t.done()
    return GitHubSettings(secrets, token, api_url.rstrip("/"))


def _deployment(t: Table) -> Deployment:
    name = t.get_str("name", None, check=names.deployment_name)
    image = t.get_str("image", None, check=v.image)
    branch = t.get_str("branch", "main", check=names.branch_name)
    github_repo = t.opt_str("github_repo", check=v.github_repo)
    fetch_url = t.opt_str("fetch_url")
    fetch_key_file = t.path("fetch_key_file", must_exist=True)
    fetch_token = t.secret("fetch_token_file")
    tag_template = t.get_str("tag_template", DEFAULT_TAG_TEMPLATE, check=v.tag_template)
    namespace = t.get_str("namespace", "airflow", check=v.dns_label)
    workloads = t.list_of_str("workloads", check=v.workload)
    worker_workloads = t.list_of_str("worker_workloads", check=v.workload)
    containers = t.list_of_str("containers", check=v.dns_label)
    parsed = tuple(v.to_workload(w) for w in workloads)
    workers = tuple(v.to_workload(w) for w in worker_workloads)
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
        integrity_test=t.get_str("integrity_test", "auto", check=v.one_of(INTEGRITY_MODES)),
        keep_images=t.get_int("keep_images", 10, minimum=1),
        promote_from=t.opt_str("promote_from", check=names.deployment_name),
        freeze_windows=tuple(_freeze_window(w) for w in t.tables("freeze_window")),
        dag_source=t.get_str("dag_source", "image", check=v.one_of(DAG_SOURCES)),
        airflow=_airflow_api(t, name),
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


def _airflow_api(t: Table, deployment: str) -> AirflowApi | None:
    """The deployment's airflow_* keys: the API its DAG deploys follow, if set."""
    url = t.opt_str("airflow_api_url", check=v.url)
    username = t.opt_str("airflow_username")
    password = t.secret("airflow_password_file")
    token = t.secret("airflow_api_token_file")
    bundle = t.get_str("airflow_dag_bundle", deployment, check=names.deployment_name)
    if url is None:
        for key, value in (
            ("airflow_username", username),
            ("airflow_password_file", password),
            ("airflow_api_token_file", token),
        ):
            if value is not None:
                raise ConfigError(f"{t.where}.{key}", "needs airflow_api_url.")
        return None
    if token is not None and (username is not None or password is not None):
        raise ConfigError(
            f"{t.where}.airflow_api_token_file",
            "set airflow_api_token_file, or airflow_username and airflow_password_file, not both.",
        )
    if token is None and (username is None or password is None):
        raise ConfigError(
            f"{t.where}.airflow_api_url",
            "needs airflow_username and airflow_password_file, or airflow_api_token_file.",
        )
    return AirflowApi(url.rstrip("/"), bundle, username, password, token)


def _freeze_window(t: Table) -> FreezeWindow:
    if "duration_seconds" not in t.data:
        raise ConfigError(f"{t.where}.duration_seconds", "is required but missing.")
    window = FreezeWindow(
        cron=t.get_str("cron", None, check=v.cron),
        duration_seconds=t.seconds("duration_seconds", 1),
        timezone=t.get_str("timezone", "UTC", check=v.timezone),
    )
    t.done()
    return window


def _key(t: Table, deployments: set[str]) -> Key:
    name = t.get_str("name", None, check=names.key_name)
    public_key = t.get_str("public_key", None, check=v.public_key)
    allowed = t.list_of_str("deployments", check=names.deployment_name)
    for dep in allowed:
        if dep not in deployments:
            raise ConfigError(f"{t.where}.deployments", f"no deployment named {dep!r}.")
    admin = t.get_bool("admin", False)
    level = t.get_str("access", "deploy", check=v.one_of(KEY_ACCESS))
    if admin and level == "read":
        # An admin key deploys everywhere and pushes through freezes: "read" would
        # be a promise that the key cannot keep.
        raise ConfigError(
            f"{t.where}.access",
            '"read" cannot be combined with admin = true (an admin key may deploy anywhere); '
            "drop one of them.",
        )
    t.done()
    return Key(name, public_key, tuple(allowed), admin, level)


def _notify(t: Table, deployments: set[str]) -> NotifyTarget:
    name = t.get_str("name", None, check=names.key_name)
    kind = t.get_str("type", None, check=v.one_of(NOTIFY_TYPES))
    url = t.secret("url_file")
    if url is None:
        raise ConfigError(f"{t.where}.url_file", "is required (a file holding the URL to post to).")
    if not v.is_url(url):
        # Never the URL itself in the message: it is the secret.
        raise ConfigError(f"{t.where}.url_file", "the file does not hold one http(s) URL.")
    secret = t.secret("secret_file")
    if kind == "webhook" and secret is None:
        raise ConfigError(
            f"{t.where}.secret_file", 'is required for type = "webhook" (the HMAC key).'
        )
    if kind != "webhook" and secret is not None:
        raise ConfigError(f"{t.where}.secret_file", f"only a webhook is signed, not {kind}.")
    events = t.list_of_str("events", check=v.one_of(NOTIFY_EVENTS)) if "events" in t.data else None
    wanted = t.list_of_str("deployments", check=names.deployment_name)
    for dep in wanted:
        if dep not in deployments:
            raise ConfigError(f"{t.where}.deployments", f"no deployment named {dep!r}.")
    t.done()
    return NotifyTarget(
        name,
        kind,
        url,
        secret,
        tuple(events) if events is not None else DEFAULT_NOTIFY_EVENTS,
        tuple(wanted),
    )
