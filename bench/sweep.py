"""CPU per request as the number of connections grows, for the gateway and two peers.

The S1 target asks req/s at 1,000 connections to stay within 0.9x of req/s at 64. On a
CPU-bound worker that ratio is the ratio of CPU per request, so this measures where
that cost rises: each system serves ``/api/fast`` (the nginx upstream of ``make
bench``) to wrk at 64, 128, 256, 512, 1,000 and 2,000 connections, each measured as
S1 measures (once every connection is accepted, a warm-up, then a window counted at
the upstream). The table gives req/s, the user and kernel CPU per request of the
system's process tree, and each count's CPU per request over the 64-connection one.
Comparing with nginx and aiohttp separates what the gateway does at high concurrency
from what the machine does (a larger working set costs every server).

    .venv/bin/python -m bench.sweep                       # gateway-1, aiohttp, nginx-proxy
    .venv/bin/python -m bench.sweep --systems gateway-1 --seconds 5
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import _procs
from bench._scenarios import Budget, Recorder, steady_window
from bench._services import NotAvailable
from bench._systems import SYSTEMS, nginx_upstream

DEFAULT_SYSTEMS = ("gateway-1", "aiohttp", "nginx-proxy")
CONNECTIONS = (64, 128, 256, 512, 1000, 2000)

#: connections, req/s, user ms and kernel ms of CPU per request, seconds to accept all
Row = tuple[int, float, float, float, float | None]


def sweep(name: str, connections: tuple[int, ...], seconds: float) -> list[Row]:
    """One row per connection count for one system."""
    system = next(s for s in SYSTEMS if s.name == name)
    service = system.service()
    if service is None:
        raise SystemExit(f"{name} has no process of its own to measure")
    service.start()
    rows: list[Row] = []
    budget = Budget(measure_s=seconds)
    try:
        for count in connections:
            _procs.wait_quiet(service.pid)
            run = steady_window(system, count, service.pid, budget, Recorder())
            served = max(int(run["window_requests"] or 0), 1)
            rows.append((count, float(run["rps"] or 0),
                         1000 * float(run["cpu_user_s"] or 0) / served,
                         1000 * float(run["cpu_kernel_s"] or 0) / served, run["accept_s"]))
            print(f"  {name} c{count}: {rows[-1][1]:,.0f} req/s", file=sys.stderr)
            time.sleep(0.5)
    finally:
        service.stop()
    return rows


def table(results: dict[str, list[Row]]) -> str:
    lines = ["| system | connections | accepted all after s | req/s | user ms/req "
             "| kernel ms/req | CPU/req ÷ first |", "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        base = rows[0][2] + rows[0][3]
        for count, rps, user, kernel, accept_s in rows:
            accepted = "never" if accept_s is None else f"{accept_s:.1f}"
            lines.append(f"| {name} | {count:,} | {accepted} | {rps:,.0f} | {user:.3f} "
                         f"| {kernel:.3f} | {(user + kernel) / base:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS),
                        choices=[s.name for s in SYSTEMS if s.name != "direct"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, nargs="+", default=list(CONNECTIONS))
    args = parser.parse_args()
    upstream = nginx_upstream()
    upstream.start()
    results: dict[str, list[Row]] = {}
    try:
        for name in args.systems:
            try:
                results[name] = sweep(name, tuple(args.connections), args.seconds)
            except NotAvailable as exc:
                print(f"{name}: not available ({exc})", file=sys.stderr)
    finally:
        upstream.stop()
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
