"""Settings the peer proxies share, so that they differ from the gateway only in code."""

from __future__ import annotations

import argparse
import math

DEADLINE_HEADER = "x-request-timeout-ms"
ROUTE_DEADLINE_S = 5.0
# Upstream connections per process: the same cap as `pool.max_connections` in
# bench/gateway.yaml, above what a Python process reaches on 2 cores.
POOL_CONNECTIONS = 4096
BACKLOG = 4096


def deadline_s(header: str | None) -> float:
    """The request's deadline: the route's 5 s, shortened (never extended) by the header."""
    if header is None:
        return ROUTE_DEADLINE_S
    try:
        value = float(header) / 1000
    except ValueError:
        return ROUTE_DEADLINE_S
    if not math.isfinite(value) or value <= 0:
        return ROUTE_DEADLINE_S
    return min(value, ROUTE_DEADLINE_S)


def parse_args(description: str) -> argparse.Namespace:
    """``--port`` to listen on (127.0.0.1) and ``--upstream`` base URL."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="http://127.0.0.1:18081")
    return parser.parse_args()
