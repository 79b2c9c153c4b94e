"""The settings dataclasses: the whole configuration as frozen values, passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from daemon import names
from daemon.core import states
from daemon.errors import UnknownDeployment

DEFAULT_TAG_TEMPLATE = "deploy-{time}-{sha7}-{id}"


@dataclass(frozen=True)
class ServerSettings:
    """[server]: where state lives and what the daemon listens on."""

    state_dir: Path = Path("/var/lib/deployd")
    ssh_listen: str = "0.0.0.0:2222"
    http_listen: str = "127.0.0.1:8080"
    public_url: str = ""
    api_token: str | None = field(default=None, repr=False)
    shutdown_grace_seconds: int = 600
    # The largest pack a push may send; git refuses more before storing it.
    max_push_mb: int = 500
    # Connections still authenticating, in all, and stalled ones (silent for 2 s) from
    # one address (OpenSSH's MaxStartups / PerSourceMaxStartups); authenticated
    # connections never count.
    ssh_max_unauthenticated: int = 100
    ssh_max_unauthenticated_per_source: int = 32
    # /metrics on its own HOST:PORT ('' = on http_listen), behind a bearer token if set.
    metrics_listen: str = ""
    metrics_token: str | None = field(default=None, repr=False)
    # The dashboard: how long a browser session lasts, how long a commit status's
    # signed link to its deploy stays valid, and whether statuses carry such links.
    session_seconds: int = 43200
    status_link_seconds: int = 30 * 86400
    signed_status_links: bool = True


@dataclass(frozen=True)
class DockerSettings:
    """[docker]: the Docker Engine to build and run checks on."""

    host: str = "unix:///var/run/docker.sock"
    # ADD of a URL makes the Engine download it from the build host's network
    # (loopback, cloud metadata): refused unless allowed.
    allow_remote_add: bool = False


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
class FreezeWindow:
    """[[deployment.freeze_window]]: a scheduled freeze, from each `cron` start for
    `duration_seconds`, the cron read in `timezone` (IANA name)."""

    cron: str
    duration_seconds: int
    timezone: str = "UTC"

    def __str__(self) -> str:
        return f'freeze window "{self.cron}" ({self.timezone}, {self.duration_seconds} s)'


DAG_SOURCES = ("image", "git")


@dataclass(frozen=True)
class AirflowApi:
    """A deployment's Airflow REST API, which DAG deploys follow until their DAGs are live.

    deployd signs in with `username` + `password` (and renews its token: Airflow 3's
    expire) or sends a fixed `token`; `bundle` is the name of the GitDagBundle that
    reads this deployment's repository.
    """

    url: str
    bundle: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)


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
    # Promotion is the only way in: from this deployment (`deployd promote NAME this`).
    promote_from: str | None = None
    freeze_windows: tuple[FreezeWindow, ...] = ()
    # Where Airflow reads the DAGs (DAG_SOURCES): from the image (every deploy builds
    # one) or from deployd's repository, so that a change to dags/ only is a DAG
    # deploy (checked, then the branch moves; nothing is built or restarted).
    dag_source: str = "image"
    airflow: AirflowApi | None = None


@dataclass(frozen=True)
class Key:
    """[[key]]: an SSH public key, the deployments it may use and how (`access`).

    `access = "read"` makes a key that fetches and reads only: what Airflow's
    GitDagBundle or git-sync is given to read DAGs from deployd's repositories,
    so that a leaked copy of it cannot deploy anything.
    """

    name: str
    public_key: str
    deployments: tuple[str, ...] = ()
    admin: bool = False
    access: str = "deploy"  # KEY_ACCESS: "deploy" (push, roll back, ...) or "read"


KEY_ACCESS = ("deploy", "read")


NOTIFY_TYPES = ("slack", "msteams", "webhook")
NOTIFY_EVENTS = states.EVENTS
DEFAULT_NOTIFY_EVENTS = tuple(
    e for e in states.EVENTS if e not in (states.STARTED, states.SUPERSEDED)
)


@dataclass(frozen=True)
class NotifyTarget:
    """[[notify]]: where deploy events are announced (Slack, Teams, a signed webhook)."""

    name: str
    type: str
    url: str = field(repr=False)
    secret: str | None = field(default=None, repr=False)
    events: tuple[str, ...] = DEFAULT_NOTIFY_EVENTS
    deployments: tuple[str, ...] = ()  # () = every deployment

    def wants(self, deployment: str, event: str) -> bool:
        """Whether this target is told that a deploy of `deployment` had `event`."""
        return event in self.events and (not self.deployments or deployment in self.deployments)


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
    notify: tuple[NotifyTarget, ...] = ()

    def deployment(self, name: str) -> Deployment:
        """Return the deployment called `name`, or raise UnknownDeployment."""
        names.deployment_name(name)
        for dep in self.deployments:
            if dep.name == name:
                return dep
        known = ", ".join(d.name for d in self.deployments) or "none"
        raise UnknownDeployment(f"no deployment named {name!r} is configured (known: {known}).")
