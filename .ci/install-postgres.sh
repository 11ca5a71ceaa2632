#!/usr/bin/env bash
# Install the PostgreSQL server binaries the tests start their throwaway cluster from
# (tests/pg.py runs initdb/pg_ctl from /usr/lib/postgresql/<version>/bin).
#
# Idempotent: does nothing when initdb is already there. The Debian package may start
# its own cluster service; the tests do not use it, so it is stopped and disabled.
set -euo pipefail

have_initdb() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

fail() {
    echo "install-postgres: $*" >&2
    exit 1
}

if have_initdb; then
    echo "install-postgres: found $(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)"
    exit 0
fi

command -v apt-get >/dev/null || fail "no initdb under /usr/lib/postgresql/*/bin and no apt-get to install it"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || fail "not root and no sudo: cannot install postgresql"
    SUDO="sudo"
fi

# policy-rc.d (exit 101) keeps the package from starting its service at all; it is
# only ours to remove when it was not there before.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi

$SUDO apt-get update || fail "apt-get update failed"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
    || fail "apt-get install postgresql failed"

# Should a cluster of the package's own be running anyway, stop it and keep it from
# starting at boot. On machines without systemd nothing was started.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl stop postgresql.service >/dev/null 2>&1 || true
    $SUDO systemctl disable postgresql.service >/dev/null 2>&1 || true
fi
if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters --no-header 2>/dev/null | while read -r version name _port status _rest; do
        if [ "$status" = "online" ]; then
            $SUDO pg_ctlcluster "$version" "$name" stop || true
        fi
    done || true
fi

have_initdb || fail "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
echo "install-postgres: installed $(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)"
