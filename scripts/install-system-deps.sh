#!/usr/bin/env bash
# System packages for the tests: PostgreSQL and Redis from Debian's archive for the CeleryExecutor tier
# (tests/celery), and Chromium for the browser check of Data Docs (tests/security).
#
# Idempotent: does nothing when the binaries are already there. The tests start their own private postgres and
# redis-server on 127.0.0.1 under a temporary folder, so the system services are never used: this script keeps
# them from starting during the install and stops / disables anything the install left running (Debian's
# postgresql package creates a `main` cluster on port 5432, redis-server a daemon on 6379).
#
# Needs root (or passwordless sudo) and apt-get. Without them it only says so and exits 0: the celery tests then
# report themselves as skipped, except under CI (CI=true), where missing binaries fail them.
set -euo pipefail

have_postgres() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null; }
have_redis() { command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ]; }
have_chromium() { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }

# Only what is missing; services of packages that were already installed are none of our business.
PACKAGES=()
SERVICES=()
have_postgres || { PACKAGES+=(postgresql); SERVICES+=(postgresql); }
have_redis || { PACKAGES+=(redis-server); SERVICES+=(redis-server); }
have_chromium || PACKAGES+=(chromium)
if [ ${#PACKAGES[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "install-system-deps: not root and no passwordless sudo; not installing ${PACKAGES[*]}" \
         "(their tests will be skipped, or fail under CI)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install-system-deps: apt-get not found; install PostgreSQL, Redis and Chromium yourself" \
         "(their tests will be skipped, or fail under CI)" >&2
    exit 0
fi

# Keep invoke-rc.d from starting the services while the packages install (the classic policy-rc.d trick);
# an existing policy-rc.d (e.g. a container's) is left as it is.
POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=0
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# added by install-system-deps.sh during apt-get install\nexit 101\n' \
        | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    OWN_POLICY=1
fi
cleanup() { if [ "$OWN_POLICY" = 1 ]; then "${SUDO[@]}" rm -f "$POLICY"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
echo "install-system-deps: apt-get install ${PACKAGES[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${PACKAGES[@]}" >/dev/null

# Nothing we installed may keep listening (the tests start their own servers on 127.0.0.1): stop and, under
# systemd, disable the services that came with the new packages.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now "${SERVICES[@]}" >/dev/null 2>&1 || true
fi
if [[ " ${SERVICES[*]} " == *" postgresql "* ]] && command -v pg_lsclusters >/dev/null; then
    pg_lsclusters --no-header 2>/dev/null | while read -r ver name _port status _rest; do
        if [ "$status" = online ]; then
            "${SUDO[@]}" pg_ctlcluster "$ver" "$name" stop || true
        fi
    done
fi
if [[ " ${SERVICES[*]} " == *" redis-server "* ]] && [ -f /run/redis/redis-server.pid ]; then
    "${SUDO[@]}" kill "$(cat /run/redis/redis-server.pid)" 2>/dev/null || true
fi

dpkg-query -W -f='${db:Status-Abbrev} ${Package} ${Version}\n' 'postgresql-[0-9]*' redis-server chromium 2>/dev/null \
    | awk '$1 == "ii" && $2 !~ /-(client|contrib|jit)/ {print "install-system-deps: installed", $2, $3}' || true
