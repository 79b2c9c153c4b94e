"""The TOML configuration: every key, its type and default, and one clear error per problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon import config
from daemon.errors import ConfigError, UnknownDeployment

FULL = """
[server]
state_dir = "{tmp}/state"
ssh_listen = "0.0.0.0:2222"
http_listen = "127.0.0.1:8080"
public_url = "https://deploy.example.com"
api_token_file = "api-token"
shutdown_grace_seconds = 600

[docker]
host = "unix:///var/run/docker.sock"

[registry]
url = "registry.example.com/airflow"
username = "robot"
password_file = "registry-password"

[kubernetes]
kubeconfig = "~/.kube/config"

[github]
webhook_secret_file = "webhook-secrets"
token_file = "github-token"
api_url = "https://api.github.com"

[[deployment]]
name = "prod"
branch = "main"
github_repo = "acme/airflow-dags"
fetch_url = "git@github.com:acme/airflow-dags.git"
fetch_key_file = "deploy-key"
image = "registry.example.com/airflow/prod"
tag_template = "deploy-{{time}}-{{sha7}}-{{id}}"
namespace = "airflow"
workloads = ["deployment/airflow-scheduler", "statefulset/airflow-worker"]
worker_workloads = ["statefulset/airflow-worker"]
containers = []
worker_grace_seconds = 86400
rollout_timeout_seconds = 900
pytest = false
check_memory_mb = 2048
check_cpus = 2
check_timeout_seconds = 600
import_timeout_seconds = 30
integrity_test = "auto"
keep_images = 10

[[deployment]]
name = "staging"
image = "registry.example.com/airflow/staging"

[[key]]
name = "alice"
public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx alice@laptop"
deployments = ["prod", "staging"]

[[key]]
name = "root"
public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGy root@ci"
admin = true

[[key]]
name = "airflow"
public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGz airflow@dag-processor"
deployments = ["prod"]
access = "read"
"""


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    (tmp_path / "api-token").write_text("t0ken\n")
    (tmp_path / "registry-password").write_text("s3cret\n")
    (tmp_path / "webhook-secrets").write_text("new-secret\nold-secret\n")
    (tmp_path / "github-token").write_text("ghp_x\n")
    (tmp_path / "deploy-key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    return tmp_path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deployd.toml"
    path.write_text(
        text.replace("{tmp}", str(tmp_path)) if "{{" not in text else text.format(tmp=tmp_path)
    )
    return path


def test_full_config_loads_every_key(secrets: Path) -> None:
    settings = config.load(write(secrets, FULL))
    assert settings.server.state_dir == secrets / "state"
    assert settings.server.api_token == "t0ken"
    assert settings.registry.password == "s3cret"
    assert settings.github.webhook_secrets == ("new-secret", "old-secret")
    assert settings.kubernetes.kubeconfig == Path("~/.kube/config").expanduser()
    prod = settings.deployment("prod")
    assert [str(w) for w in prod.workloads] == [
        "deployment/airflow-scheduler",
        "statefulset/airflow-worker",
    ]
    assert prod.fetch_key_file == secrets / "deploy-key"
    assert prod.check_cpus == 2.0
    staging = settings.deployment("staging")
    assert staging.branch == "main" and staging.tag_template == config.DEFAULT_TAG_TEMPLATE
    assert staging.keep_images == 10 and staging.integrity_test == "auto"
    assert settings.keys[1].admin and settings.keys[0].deployments == ("prod", "staging")
    assert settings.keys[0].access == "deploy"  # the default: today's rights
    assert settings.keys[2].access == "read" and settings.keys[2].deployments == ("prod",)


def test_secrets_are_not_in_repr(secrets: Path) -> None:
    settings = config.load(write(secrets, FULL))
    assert "s3cret" not in repr(settings) and "t0ken" not in repr(settings)


def test_minimal_config_takes_defaults(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, '[[deployment]]\nname = "dev"\nimage = "reg.io/a/b"\n'))
    assert settings.server.state_dir == Path("/var/lib/deployd")
    assert settings.docker.host == "unix:///var/run/docker.sock"
    assert settings.deployment("dev").workloads == ()


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[[deployment]]\nimage = "reg.io/a/b"\n', "deployment[0].name", "required but missing"),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\nkeep_images = "ten"\n',
            "deployment[0].keep_images",
            "must be an integer, not a string",
        ),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\npytest = 1\n',
            "deployment[0].pytest",
            "must be true or false",
        ),
        ('[server]\nstate_dir = "/x"\nflavour = "vanilla"\n', "server.flavour", "unknown key"),
        ('colour = "blue"\n', "colour", "unknown key"),
        ('[docker]\nhots = "unix:///x"\n', "docker.hots", "unknown key"),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\n[[deployment]]\nname = "p"\n'
            'image = "reg.io/a/c"\n',
            "deployment[1].name",
            "duplicate deployment name",
        ),
        (
            '[[deployment]]\nname = "Prod_1"\nimage = "reg.io/a/b"\n',
            "deployment[0].name",
            "not a valid deployment name",
        ),
        ('[[deployment]]\nname = "p"\nimage = "reg.io/a/b:latest"\n', "deployment[0].image", "tag"),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\ntag_template = "v-{sha7}"\n',
            "deployment[0].tag_template",
            "must contain {id}",
        ),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\ntag_template = "{id}-{branch}"\n',
            "deployment[0].tag_template",
            "unknown placeholder {branch}",
        ),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\nworkloads = ["deployment/a"]\n'
            'worker_workloads = ["statefulset/w"]\n',
            "deployment[0].worker_workloads",
            "not in workloads",
        ),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\n'
            'tag_template = "release-{sha}-{sha}-{sha}-{id}"\n',
            "deployment[0].tag_template",
            "image tags end at 128",
        ),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\nworkloads = ["pod/a"]\n',
            "deployment[0].workloads[0]",
            "not deployment/NAME",
        ),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\nimport_timeout_seconds = 0\n',
            "deployment[0].import_timeout_seconds",
            "at least 1",
        ),
        (
            '[registry]\nusername = "u"\npassword_file = "/nonexistent/pw"\n',
            "registry.password_file",
            "cannot read secret file /nonexistent/pw",
        ),
        ('[server]\nhttp_listen = "8080"\n', "server.http_listen", "not HOST:PORT"),
        (
            '[[key]]\nname = "bob"\npublic_key = "ssh-ed25519 AAAA"\ndeployments = ["nope"]\n',
            "key[0].deployments",
            "no deployment named 'nope'",
        ),
        (
            '[[key]]\nname = "bob"\npublic_key = "ssh-ed25519 AAAA"\naccess = "write"\n',
            "key[0].access",
            "'write' is not one of deploy, read",
        ),
        (
            '[[key]]\nname = "bob"\npublic_key = "ssh-ed25519 AAAA"\nadmin = true\n'
            'access = "read"\n',
            "key[0].access",
            '"read" cannot be combined with admin = true',
        ),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\ndag_source = "s3"\n',
            "deployment[0].dag_source",
            "'s3' is not one of image, git",
        ),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\nairflow_username = "d"\n',
            "deployment[0].airflow_username",
            "needs airflow_api_url",
        ),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\n'
            'airflow_api_url = "http://airflow:8080"\n',
            "deployment[0].airflow_api_url",
            "needs airflow_username and airflow_password_file, or airflow_api_token_file",
        ),
        (
            '[[deployment]]\nname = "p"\nimage = "reg.io/a/b"\nairflow_api_url = "airflow"\n',
            "deployment[0].airflow_api_url",
            "not an http(s) URL",
        ),
        ("[server\n", "", "not valid TOML"),
    ],
)
def test_bad_config_names_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = tmp_path / "deployd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.key == key
    assert problem in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_secret_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("\n")
    path = write(tmp_path, '[registry]\nusername = "u"\npassword_file = "pw"\n')
    with pytest.raises(ConfigError, match=r"registry\.password_file: secret file .* is empty"):
        config.load(path)


def test_unknown_deployment(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, '[[deployment]]\nname = "dev"\nimage = "r.io/a/b"\n'))
    with pytest.raises(UnknownDeployment, match="known: dev"):
        settings.deployment("prod")


def test_config_path_precedence(tmp_path: Path) -> None:
    assert config.resolve_path("/a.toml", {"DEPLOYD_CONFIG": "/b.toml"}) == Path("/a.toml")
    assert config.resolve_path(None, {"DEPLOYD_CONFIG": "/b.toml"}) == Path("/b.toml")
    assert config.resolve_path(None, {}) == Path("/etc/deployd/deployd.toml")


def _check_config(
    *args: str,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )


def test_check_config_prints_deployments(secrets: Path) -> None:
    path = write(secrets, FULL)
    proc = _check_config("check-config", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "deployment prod: branch main -> registry.example.com/airflow/prod" in proc.stdout
    assert "deployment staging" in proc.stdout and "key root: admin" in proc.stdout
    assert "key airflow: prod (read-only)" in proc.stdout


def test_check_config_error_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write(tmp_path, '[[deployment]]\nname = "p"\nimage = "r.io/a/b"\nwat = 1\n')
    proc = _check_config("--config", str(path), "check-config")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "deployd: config: deployment[0].wat: unknown key."


def test_check_config_reads_deployd_config_env(tmp_path: Path) -> None:
    path = write(tmp_path, '[[deployment]]\nname = "envdep"\nimage = "r.io/a/b"\n')
    import os

    proc = _check_config("check-config", env={**os.environ, "DEPLOYD_CONFIG": str(path)})
    assert proc.returncode == 0 and "deployment envdep" in proc.stdout


def test_missing_config_file_exit_2(tmp_path: Path) -> None:
    proc = _check_config("check-config", "--config", str(tmp_path / "nope.toml"))
    assert proc.returncode == 2 and "cannot read" in proc.stderr


NOTIFY = """
[[deployment]]
name = "prod"
image = "reg.io/a/prod"

[[deployment]]
name = "staging"
image = "reg.io/a/staging"

[[notify]]
name = "team-slack"
type = "slack"
url_file = "slack-url"

[[notify]]
name = "audit"
type = "webhook"
url_file = "hook-url"
secret_file = "hook-secret"
events = ["started", "succeeded", "failed"]
deployments = ["prod"]
"""


def test_notify_targets_read_their_url_and_secret_from_files(tmp_path: Path) -> None:
    (tmp_path / "slack-url").write_text("https://hooks.slack.com/services/T0/B0/XYZ\n")
    (tmp_path / "hook-url").write_text("http://127.0.0.1:9000/deploys\n")
    (tmp_path / "hook-secret").write_text("hmac-key\n")
    slack, audit = config.load(write(tmp_path, NOTIFY)).notify
    assert (slack.name, slack.type, slack.secret, slack.deployments) == (
        "team-slack",
        "slack",
        None,
        (),
    )
    assert slack.url == "https://hooks.slack.com/services/T0/B0/XYZ"
    assert slack.events == ("succeeded", "failed", "rolled_back", "cancelled", "interrupted")
    assert slack.wants("staging", "failed") and not slack.wants("prod", "started")
    assert audit.secret == "hmac-key" and audit.events == ("started", "succeeded", "failed")
    assert audit.wants("prod", "started") and not audit.wants("staging", "started")
    assert "XYZ" not in repr(slack) and "hmac-key" not in repr(audit)


@pytest.mark.parametrize(
    ("change", "key", "problem"),
    [
        (('type = "slack"', 'type = "discord"'), "notify[0].type", "not one of slack"),
        (('url_file = "slack-url"', 'url_file = "bad-url"'), "notify[0].url_file", "http(s) URL"),
        (('secret_file = "hook-secret"\n', ""), "notify[1].secret_file", "required for type"),
        (('events = ["started"', 'events = ["deployed"'), "notify[1].events[0]", "not one of"),
        (('deployments = ["prod"]', 'deployments = ["qa"]'), "notify[1].deployments", "'qa'"),
        (('name = "audit"', 'name = "team-slack"'), "notify[1].name", "duplicate notify name"),
        (('name = "audit"', 'name = "audit"\ncolour = "red"'), "notify[1].colour", "unknown key"),
    ],
)
def test_bad_notify_targets_are_refused_without_showing_the_url(
    tmp_path: Path, change: tuple[str, str], key: str, problem: str
) -> None:
    (tmp_path / "slack-url").write_text("https://hooks.slack.com/services/T0/B0/XYZ\n")
    (tmp_path / "bad-url").write_text("hooks.slack.com/services/SECRET-PART\n")
    (tmp_path / "hook-url").write_text("http://127.0.0.1:9000/deploys\n")
    (tmp_path / "hook-secret").write_text("hmac-key\n")
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, NOTIFY.replace(*change)))
    assert info.value.key == key
    assert problem in str(info.value)
    assert "SECRET-PART" not in str(info.value)


def test_dag_source_and_the_airflow_api(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "tok").write_text("t0ken\n")
    base = '[[deployment]]\nname = "prod"\nimage = "reg.io/a/b"\n'
    plain = config.load(write(tmp_path, base)).deployment("prod")
    assert (plain.dag_source, plain.airflow) == ("image", None)
    signed_in = config.load(
        write(
            tmp_path,
            base + 'dag_source = "git"\nairflow_api_url = "https://af.example.com/"\n'
            'airflow_username = "deployd"\nairflow_password_file = "pw"\n',
        )
    ).deployment("prod")
    assert signed_in.dag_source == "git" and signed_in.airflow is not None
    api = signed_in.airflow
    assert (api.url, api.bundle, api.username, api.password, api.token) == (
        "https://af.example.com",
        "prod",
        "deployd",
        "s3cret",
        None,
    )
    assert "s3cret" not in repr(signed_in)
    token = config.load(
        write(
            tmp_path,
            base + 'airflow_api_url = "http://af:8080"\nairflow_api_token_file = "tok"\n'
            'airflow_dag_bundle = "lake"\n',
        )
    ).deployment("prod")
    assert token.airflow is not None and (token.airflow.token, token.airflow.bundle) == (
        "t0ken",
        "lake",
    )
    with pytest.raises(ConfigError, match="not both"):
        config.load(
            write(
                tmp_path,
                base + 'airflow_api_url = "http://af:8080"\nairflow_api_token_file = "tok"\n'
                'airflow_username = "d"\nairflow_password_file = "pw"\n',
            )
        )


def test_metrics_keys(tmp_path: Path) -> None:
    (tmp_path / "metrics-token").write_text("scrape-me\n")
    settings = config.load(
        write(
            tmp_path,
            '[server]\nmetrics_listen = "127.0.0.1:9108"\nmetrics_token_file = "metrics-token"\n',
        )
    )
    assert settings.server.metrics_listen == "127.0.0.1:9108"
    assert settings.server.metrics_token == "scrape-me"
    assert config.load(write(tmp_path, "")).server.metrics_listen == ""


RELEASE = """
[[deployment]]
name = "staging"
image = "reg.io/airflow/staging"

[[deployment]]
name = "prod"
image = "reg.io/airflow/prod"
promote_from = "staging"

[[deployment.freeze_window]]
cron = "0 16 * * 5"
duration_seconds = 230400
timezone = "Europe/Berlin"

[[deployment.freeze_window]]
cron = "0 0 24 12 *"
duration_seconds = 86400
"""


def test_promote_from_and_freeze_windows(tmp_path: Path) -> None:
    path = write(tmp_path, RELEASE)
    shown = _check_config("check-config", "--config", str(path))
    assert shown.returncode == 0, shown.stderr
    assert "  takes promotions from staging only\n" in shown.stdout
    assert '  freeze window "0 16 * * 5" (Europe/Berlin, 230400 s)\n' in shown.stdout
    settings = config.load(path)
    prod, staging = settings.deployment("prod"), settings.deployment("staging")
    assert prod.promote_from == "staging" and staging.promote_from is None
    assert prod.freeze_windows == (
        config.FreezeWindow("0 16 * * 5", 230400, "Europe/Berlin"),
        config.FreezeWindow("0 0 24 12 *", 86400, "UTC"),
    )
    assert staging.freeze_windows == ()


@pytest.mark.parametrize(
    ("old", "new", "key", "problem"),
    [
        ('promote_from = "staging"', 'promote_from = "qa"', "deployment[1].promote_from", "'qa'"),
        (
            'promote_from = "staging"',
            'promote_from = "prod"',
            "deployment[1].promote_from",
            "another",
        ),
        (
            'promote_from = "staging"',
            'promote_from = "Prod!"',
            "deployment[1].promote_from",
            "valid",
        ),
        ('"0 16 * * 5"', '"0 16 * *"', "deployment[1].freeze_window[0].cron", "5-field cron"),
        ('"0 16 * * 5"', '"0 16 * * 5 0"', "deployment[1].freeze_window[0].cron", "5-field"),
        ('"0 16 * * 5"', '"61 16 * * 5"', "deployment[1].freeze_window[0].cron", "5-field"),
        (
            '"Europe/Berlin"',
            '"Europe/Gotham"',
            "deployment[1].freeze_window[0].timezone",
            "not a time zone",
        ),
        (
            "duration_seconds = 230400\n",
            "",
            "deployment[1].freeze_window[0].duration_seconds",
            "required",
        ),
        (
            "duration_seconds = 230400",
            "duration_seconds = 0",
            "deployment[1].freeze_window[0].duration_seconds",
            "at least 1",
        ),
        (
            "duration_seconds = 230400",
            "duration_seconds = 230400\nend = 1",
            "deployment[1].freeze_window[0].end",
            "unknown key",
        ),
    ],
)
def test_bad_release_keys_name_the_key(
    tmp_path: Path, old: str, new: str, key: str, problem: str
) -> None:
    assert old in RELEASE
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, RELEASE.replace(old, new, 1)))
    assert info.value.key == key, info.value
    assert problem in info.value.problem
