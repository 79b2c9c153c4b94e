#!/usr/bin/env bash
# Sets up deployd on local defaults and runs its main job: on a fresh Debian 12
# machine as root, it starts a local Docker Engine and registry
# (scripts/testenv.sh), installs deployd in .venv, writes a config, a key and an
# Astro project with real Airflow DAGs, deploys it once from the checkout
# (`deployd deploy`), then starts `deployd serve` and deploys a change with
# `git push astro main`.
#
# Afterwards: .venv/bin/deployd --config $QS/deployd.toml deploys
# Stop: kill "$(cat $QS/serve.pid)"; bash scripts/testenv.sh down
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
QS=${DEPLOYD_QUICKSTART:-/var/tmp/deployd-quickstart}

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv 2>/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        rm -rf .venv && python3 -m venv .venv
    }
fi
.venv/bin/pip install -q --disable-pip-version-check -e .

PYTHON=$ROOT/.venv/bin/python bash scripts/testenv.sh up
# shellcheck disable=SC1091
. /run/deployd-testenv/env
mkdir -p "$QS"
[ -f "$QS/serve.pid" ] && kill "$(cat "$QS/serve.pid")" 2>/dev/null && sleep 1
[ -f "$QS/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -C quickstart -f "$QS/id_ed25519"
cat >"$QS/deployd.toml" <<TOML
[server]
state_dir = "$QS/state"
ssh_listen = "127.0.0.1:2222"
http_listen = "127.0.0.1:8080"

[docker]
host = "$DOCKER_HOST"

[registry]
url = "$DEPLOYD_TEST_REGISTRY"
username = "$DEPLOYD_TEST_REGISTRY_USER"
password_file = "$DEPLOYD_TEST_REGISTRY_PASSWORD_FILE"

[[deployment]]
name = "example"
image = "$DEPLOYD_TEST_REGISTRY/airflow/example"

[[key]]
name = "quickstart"
public_key = "$(cat "$QS/id_ed25519.pub")"
deployments = ["example"]
TOML

PROJECT=$QS/project
if [ ! -d "$PROJECT/.git" ]; then
    .venv/bin/python - "$PROJECT" "$DEPLOYD_TEST_AIRFLOW_IMAGE" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.support.projects import make_project, GOOD_DAG
dags = {f"example_{i}.py": GOOD_DAG.format(dag_id=f"example_{i}") for i in range(3)}
make_project(Path(sys.argv[1]), sys.argv[2], dags=dags, message="Quickstart project")
PY
fi

echo "-----> deployd deploy example $PROJECT" >&2
.venv/bin/deployd --config "$QS/deployd.toml" deploy example "$PROJECT"

echo "-----> deployd serve (log: $QS/serve.log), then git push astro main" >&2
nohup .venv/bin/deployd --config "$QS/deployd.toml" serve >"$QS/serve.log" 2>&1 &
echo $! >"$QS/serve.pid"
for _ in $(seq 1 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', 2222), 1)" 2>/dev/null && break
    sleep 0.1
done
export GIT_SSH_COMMAND="ssh -i $QS/id_ed25519 -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
git -C "$PROJECT" remote get-url astro >/dev/null 2>&1 \
    || git -C "$PROJECT" remote add astro ssh://git@127.0.0.1:2222/example
printf '\n# changed by quickstart at %s\n' "$(date -u +%FT%TZ)" >>"$PROJECT/dags/example_0.py"
git -C "$PROJECT" -c user.name=Quickstart -c user.email=qs@example.com commit -qam "Quickstart change"
git -C "$PROJECT" push astro main
.venv/bin/deployd --config "$QS/deployd.toml" deploys
echo "-----> done: deployd serve runs on 127.0.0.1:2222 (pid $(cat "$QS/serve.pid")); config" \
     "$QS/deployd.toml, project $PROJECT" >&2
# The dashboard, and a one-time sign-in link for the quick-start's key (valid 5 minutes;
# `ssh -p 2222 git@127.0.0.1 login` makes another).
echo "-----> dashboard: http://127.0.0.1:8080/  sign in (once, within 5 minutes):" >&2
$GIT_SSH_COMMAND -p 2222 git@127.0.0.1 login
