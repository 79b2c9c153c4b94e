#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian 12 machine as root: installs
# what it needs (apt, pip), starts dockerd and the registry, runs lint, types
# and every test (unit and integration), and stops what it started.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not integration"   # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv 2>/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        rm -rf .venv && python3 -m venv .venv
    }
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

PYTHON=$PWD/.venv/bin/python bash scripts/testenv.sh up
cleanup() {
    # Airflow containers a crashed test left (tests/support/airflow.py labels them).
    DOCKER_HOST=unix:///run/deployd-testenv/docker.sock docker ps -aq \
        --filter label=deployd.test=airflow-world \
        | DOCKER_HOST=unix:///run/deployd-testenv/docker.sock xargs -r docker rm -f >/dev/null 2>&1 || true
    # Images the tests built (base images stay cached for the next run).
    DOCKER_HOST=unix:///run/deployd-testenv/docker.sock docker images -q \
        --filter label=deployd.deployment | sort -u \
        | DOCKER_HOST=unix:///run/deployd-testenv/docker.sock xargs -r docker rmi -f >/dev/null 2>&1 || true
    bash scripts/testenv.sh down
}
trap cleanup EXIT

echo "-----> ruff" >&2
.venv/bin/ruff check daemon tests bench
.venv/bin/ruff format --check daemon tests bench
echo "-----> mypy --strict daemon/" >&2
.venv/bin/mypy
echo "-----> pytest" >&2
# The slowest tests are listed at the end: where to look when the suite grows slow.
if [ "$#" -gt 0 ]; then
    .venv/bin/pytest -q -p no:cacheprovider --durations=30 "$@"
    exit
fi
# Most tests wait on Docker, git and subprocesses: two workers (each test file on one, so
# a module's shared fixtures start once). Then the `serial` ones alone (tests/conftest.py
# SERIAL: they stop the Engine, or bound times a busy neighbour would stretch).
# Both phases run even if the first fails: CI shows every failure at once.
parallel=0
.venv/bin/pytest -q -p no:cacheprovider --durations=30 -n 2 --dist loadfile -m "not serial" \
    || parallel=$?
echo "-----> pytest (serial)" >&2
.venv/bin/pytest -q -p no:cacheprovider --durations=15 -m serial
exit "$parallel"
