#!/usr/bin/env bash
# Brings up (or down) what deployd's tests, benchmarks and quickstart need on a
# fresh Debian 12 machine as root: Docker Engine, a local registry with
# htpasswd auth, and local base images (busybox; Python + real Apache Airflow
# that behaves like Astro's runtime image; the Airflow 3.3 one also has git,
# ssh and apache-airflow-providers-git, so tests can run a dag-processor over a
# GitDagBundle). Nothing is pulled: there is no
# reachable container registry here, so the base images are made locally and
# cached per machine in $CACHE.
#
#   scripts/testenv.sh up     # idempotent; writes $RUN/env for the tests
#   scripts/testenv.sh down   # stops dockerd and the registry it started
set -euo pipefail

CACHE=${DEPLOYD_TESTENV_CACHE:-/var/cache/deployd-testenv}
RUN=${DEPLOYD_TESTENV_RUN:-/run/deployd-testenv}
# Airflow 3 is the main test image; Airflow 2 checks that the DAG checker
# works on both (DagBag and discovery moved between them).
AIRFLOW_VERSIONS=${AIRFLOW_VERSIONS:-"3.3.2 2.10.5"}
REGISTRY_PORT=${REGISTRY_PORT:-5959}
DOCKER_SOCK=$RUN/docker.sock
# The Python whose pip installs Airflow for the image: it must be 3.11, like
# bookworm's (scripts/test.sh passes the project's venv).
PYTHON=${PYTHON:-python3}
export DOCKER_HOST=unix://$DOCKER_SOCK

log() { printf -- '-----> %s\n' "$*" >&2; }

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    command -v htpasswd >/dev/null || missing+=(apache2-utils)
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" \
        || missing+=(busybox-static)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)   # the benchmarks' baseline
    command -v git >/dev/null || missing+=(git)
    command -v kubectl >/dev/null || missing+=(kubernetes-client)   # tests hold the API simulator to kubectl
    command -v prometheus >/dev/null || missing+=(prometheus)   # tests scrape /metrics with it; promtool checks the rules
    [ -x /usr/bin/chromium ] || missing+=(chromium)   # the dashboard's browser tests (Playwright drives it; no browser download)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

start_dockerd() {
    mkdir -p "$RUN" "$CACHE/docker"
    if docker version >/dev/null 2>&1; then return; fi
    log "starting dockerd on $DOCKER_SOCK"
    nohup dockerd --bridge=none --iptables=false --ip-masq=false \
        --data-root "$CACHE/docker" --exec-root "$RUN/exec" --pidfile "$RUN/dockerd.pid" \
        -H "$DOCKER_HOST" >"$RUN/dockerd.log" 2>&1 &
    for _ in $(seq 1 100); do
        docker version >/dev/null 2>&1 && return
        sleep 0.2
    done
    echo "dockerd did not start; see $RUN/dockerd.log" >&2
    tail -n 20 "$RUN/dockerd.log" >&2
    exit 1
}

start_registry() {
    mkdir -p "$RUN/registry-data"
    if [ -f "$RUN/registry.pid" ] && kill -0 "$(cat "$RUN/registry.pid")" 2>/dev/null; then return; fi
    log "starting registry on 127.0.0.1:$REGISTRY_PORT (htpasswd auth)"
    printf 'deployd-test-password\n' >"$RUN/registry-password"
    htpasswd -Bbn deployd deployd-test-password >"$RUN/htpasswd"
    cat >"$RUN/registry.yml" <<YML
version: 0.1
log: {level: error}
storage:
  filesystem: {rootdirectory: $RUN/registry-data}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$REGISTRY_PORT}
auth:
  htpasswd: {realm: deployd-test, path: $RUN/htpasswd}
YML
    nohup docker-registry serve "$RUN/registry.yml" >"$RUN/registry.log" 2>&1 &
    echo $! >"$RUN/registry.pid"
    for _ in $(seq 1 100); do
        code=$(python3 -c "import urllib.request,sys
try: urllib.request.urlopen('http://127.0.0.1:$REGISTRY_PORT/v2/')
except urllib.error.HTTPError as e: print(e.code)
except Exception: print(0)
else: print(200)")
        [ "$code" = 401 ] && return
        sleep 0.2
    done
    echo "registry did not start; see $RUN/registry.log" >&2
    exit 1
}

build_busybox_image() {
    docker image inspect deployd-test/busybox:1 >/dev/null 2>&1 && return
    log "making deployd-test/busybox:1 from busybox-static"
    local dir; dir=$(mktemp -d)
    mkdir -p "$dir/bin"
    cp /bin/busybox "$dir/bin/busybox"
    for app in sh echo cat ls sleep true false mkdir rm cp env printf head tail seq dd yes; do
        ln -s busybox "$dir/bin/$app"
    done
    tar -C "$dir" -c . | docker import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' - deployd-test/busybox:1 >/dev/null
    rm -rf "$dir"
}

# What each Airflow image carries beyond Python and Airflow. The 3.3 image also
# runs Airflow itself in tests (tests/support/airflow.py: dag-processor and
# api-server reading a GitDagBundle from deployd's repository), which needs git,
# ssh and the git provider; 2.10 only parses DAGs. The names feed the cache keys
# (the root tarball, the pip target, the image's label), so changing a list
# rebuilds the image on a machine that has the old one cached.
airflow_debs() { case $1 in 3.*) echo "git,openssh-client" ;; *) echo "" ;; esac; }
airflow_pips() { case $1 in 3.*) echo "apache-airflow-providers-git==1.0.1" ;; *) echo "" ;; esac; }

# The cache key of one image: empty for an image of plain Python + Airflow
# (keeps the 2.10 image and its cache as they were).
airflow_key() {
    local debs pips
    debs=$(airflow_debs "$1"); pips=$(airflow_pips "$1")
    [ -z "$debs$pips" ] && return 0
    printf '%s' "debs=$debs;pips=$pips" | tr -c 'A-Za-z0-9.=;,_-' '_'
}

image_is_current() {   # tag key
    docker image inspect "$1" >/dev/null 2>&1 || return 1
    [ -z "$2" ] && return 0
    [ "$(docker image inspect -f '{{ index .Config.Labels "deployd.testenv.key" }}' "$1" 2>/dev/null)" = "$2" ]
}

# A bookworm root with python3 and the extra Debian packages, as a tarball
# (cached by package list) and as an image (tagged by it).
make_base() {   # debs -> prints the base image tag
    local debs=$1 suffix="" include=python3
    if [ -n "$debs" ]; then suffix=+${debs//,/+}; include=python3,$debs; fi
    local tar="$CACHE/bookworm-python$suffix.tar" base=deployd-test/bookworm-python:1${suffix//+/-}
    if [ ! -f "$tar" ]; then
        log "debootstrap bookworm with $include (about 40 s, once per machine)"
        local root="$CACHE/bookworm$suffix.partial"
        rm -rf "$root"
        debootstrap --variant=minbase --include="$include" bookworm "$root" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1; }
        rm -rf "$root/var/cache/apt/archives/"*.deb
        tar -C "$root" -cf "$tar.partial" .
        mv "$tar.partial" "$tar"
        rm -rf "$root"
    fi
    docker image inspect "$base" >/dev/null 2>&1 || docker import "$tar" "$base" >/dev/null
    printf '%s' "$base"
}

# Airflow (and the extra pip requirements, resolved together so that pip never
# swaps Airflow for another version) in a --target directory, cached by both.
make_site() {   # version pips -> prints the directory
    local version=$1 pips=$2 dir="$CACHE/airflow-$1"
    [ -n "$pips" ] && dir="$dir+$(printf '%s' "$pips" | tr ' =' '+-')"
    if [ ! -d "$dir" ]; then
        log "pip install apache-airflow==$version $pips (about 30 s, once per machine)"
        rm -rf "$dir.partial"
        # (this machine's pip config names local indexes that may be absent: not our noise)
        # shellcheck disable=SC2086  # $pips is a list of requirements
        "$PYTHON" -m pip install -q --disable-pip-version-check --target "$dir.partial" \
            "apache-airflow==$version" pytest $pips 2>&1 | grep -v "WARNING: Location" >&2 || true
        [ -d "$dir.partial/airflow" ] && [ -d "$dir.partial/apache_airflow-$version.dist-info" ] \
            || { echo "pip install apache-airflow==$version $pips failed" >&2; exit 1; }
        mv "$dir.partial" "$dir"
    fi
    printf '%s' "$dir"
}

build_airflow_image() {
    local AIRFLOW_VERSION=$1
    local tag=deployd-test/airflow:$AIRFLOW_VERSION key
    key=$(airflow_key "$AIRFLOW_VERSION")
    image_is_current "$tag" "$key" && return
    local base site
    base=$(make_base "$(airflow_debs "$AIRFLOW_VERSION")")
    site=$(make_site "$AIRFLOW_VERSION" "$(airflow_pips "$AIRFLOW_VERSION")")
    log "importing $tag"
    # The Airflow packages go in as one layer over the Python base, like a
    # runtime image; ONBUILD COPY makes a project's Dockerfile one FROM line.
    local ctx; ctx=$(mktemp -d)
    ln -s "$site" "$ctx/site"
    tar -C "$ctx" -ch --transform 's,^\./site,./opt/airflow-site,' ./site \
        | docker import -c "ENV PYTHONPATH=/opt/airflow-site" -c "ENV PATH=/opt/airflow-site/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
            -c "ENV AIRFLOW_HOME=/usr/local/airflow" - deployd-test/airflow-site:$AIRFLOW_VERSION >/dev/null
    rm -rf "$ctx"
    # docker import makes a single-layer image; stack them with a tiny build.
    ctx=$(mktemp -d)
    local label=""
    [ -n "$key" ] && label="LABEL deployd.testenv.key=\"$key\""
    cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM deployd-test/airflow-site:$AIRFLOW_VERSION AS site
FROM $base
COPY --from=site /opt/airflow-site /opt/airflow-site
ENV PYTHONPATH=/opt/airflow-site \
    PATH=/opt/airflow-site/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    AIRFLOW_HOME=/usr/local/airflow \
    PYTHONDONTWRITEBYTECODE=1
$label
WORKDIR /usr/local/airflow
ONBUILD COPY . .
DOCKERFILE
    DOCKER_BUILDKIT=0 docker build -q -t "$tag" "$ctx" >/dev/null
    rm -rf "$ctx"
    docker image rm deployd-test/airflow-site:$AIRFLOW_VERSION >/dev/null
}

write_env() {
    cat >"$RUN/env" <<ENV
DOCKER_HOST=$DOCKER_HOST
DEPLOYD_TEST_REGISTRY=127.0.0.1:$REGISTRY_PORT
DEPLOYD_TEST_REGISTRY_USER=deployd
DEPLOYD_TEST_REGISTRY_PASSWORD_FILE=$RUN/registry-password
DEPLOYD_TEST_BUSYBOX_IMAGE=deployd-test/busybox:1
DEPLOYD_TEST_AIRFLOW_IMAGE=deployd-test/airflow:${AIRFLOW_VERSIONS%% *}
DEPLOYD_TEST_AIRFLOW2_IMAGE=deployd-test/airflow:${AIRFLOW_VERSIONS##* }
ENV
}

stop_dockerd() {
    if [ -f "$RUN/dockerd.pid" ]; then
        local pid; pid=$(cat "$RUN/dockerd.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
}

down() {
    if [ -f "$RUN/registry.pid" ]; then kill "$(cat "$RUN/registry.pid")" 2>/dev/null || true; rm -f "$RUN/registry.pid"; fi
    stop_dockerd
    rm -rf "$RUN/registry-data" "$RUN/env"
}

case "${1:-up}" in
    up)
        install_packages
        start_dockerd
        start_registry
        build_busybox_image
        for version in $AIRFLOW_VERSIONS; do build_airflow_image "$version"; done
        write_env
        log "test environment ready: $RUN/env"
        ;;
    down) down ;;
    # The fault tests stop and start the Engine under a deploy (tests/faults/test_engine.py).
    stop-engine) stop_dockerd ;;
    start-engine) start_dockerd ;;
    *) echo "usage: $0 up|down|stop-engine|start-engine" >&2; exit 2 ;;
esac
