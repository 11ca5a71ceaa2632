#!/usr/bin/env bash
# Entry point of `make bench`: install the Debian packages the benchmark needs when they
# are missing (wrk, nginx, the nginx echo module), then run bench.run with the
# arguments given (--quick, --only SYSTEM[,SYSTEM], --scenarios S1,S3, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null \
    || [ ! -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y wrk nginx libnginx-mod-http-echo
fi

# Every process the benchmark starts inherits this limit (S2 holds 10,000 connections).
ulimit -n "$(ulimit -Hn)"
# The whole run is bounded: 15 minutes is the budget on 2 cores, 20 the hard stop.
exec timeout --signal=INT --kill-after=30 1200 .venv/bin/python -m bench.run "$@"
