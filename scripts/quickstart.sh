#!/usr/bin/env bash
# Sets up deployd on local defaults and runs its main job once: on a fresh
# Debian 12 machine as root, it starts a local Docker Engine and registry
# (scripts/testenv.sh), installs deployd in .venv, writes a config and an Astro
# project with real Airflow DAGs, and deploys it: build, DAG check, push, record.
#
# Afterwards: .venv/bin/deployd --config $QS/deployd.toml deploys
# Stop the Engine and registry with: bash scripts/testenv.sh down
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
cat >"$QS/deployd.toml" <<TOML
[server]
state_dir = "$QS/state"

[docker]
host = "$DOCKER_HOST"

[registry]
url = "$DEPLOYD_TEST_REGISTRY"
username = "$DEPLOYD_TEST_REGISTRY_USER"
password_file = "$DEPLOYD_TEST_REGISTRY_PASSWORD_FILE"

[[deployment]]
name = "example"
image = "$DEPLOYD_TEST_REGISTRY/airflow/example"
TOML

PROJECT=$QS/project
if [ ! -d "$PROJECT/.git" ]; then
    .venv/bin/python - "$PROJECT" "$DEPLOYD_TEST_AIRFLOW_IMAGE" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from tests.projects import make_project, GOOD_DAG
dags = {f"example_{i}.py": GOOD_DAG.format(dag_id=f"example_{i}") for i in range(3)}
make_project(Path(sys.argv[1]), sys.argv[2], dags=dags, message="Quickstart project")
PY
fi

echo "-----> deployd deploy example $PROJECT" >&2
.venv/bin/deployd --config "$QS/deployd.toml" deploy example "$PROJECT"
.venv/bin/deployd --config "$QS/deployd.toml" deploys
echo "-----> done; config in $QS/deployd.toml, project in $PROJECT ($ROOT/.venv/bin/deployd)" >&2
