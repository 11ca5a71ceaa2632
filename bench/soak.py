"""A bounded soak: the real gateway process under mixed hostile and normal traffic.

    python -m bench.soak [--seconds 180] [--concurrency 32]

Starts ``python -m gateway serve`` (one worker) in front of the recording test upstream,
sends a mix of normal requests and hostile ones (smuggling attempts, oversized heads and
bodies, bad paths, upstream faults, clients that leave mid-request) from a Trio load
client, over HTTP/1.1 and HTTP/2 (normal streams three to a connection; streams reset
at once, uploads reset mid-body and PRIORITY frames for idle streams), then reports:

* normal requests answered correctly (must be 100 %);
* worker RSS after warm-up against the end (must stay within ±10 %);
* the worker's open file descriptors (less the idle connections its upstream pool
  keeps, which grow with the peak concurrency) and the admin ``/metrics`` in-flight
  gauges back to their baseline once the traffic stops.

Prints a summary table and exits non-zero when a bound is broken. Traffic goes to
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h2.errors
import h2.events
import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.h2client import H2Client  # noqa: E402
from tests.hostile.rawclient import connect, exchange, request_bytes  # noqa: E402
from tests.process_harness import serve_process  # noqa: E402
from tests.upstream import start_upstream  # noqa: E402

RSS_TOLERANCE = 0.10
FD_SLACK = 4
KEEP_ALIVE_S = 2
HOSTILE_SHARE = 0.3
#: Share of the clients' turns (normal or hostile) taken over HTTP/2.
H2_SHARE = 0.2
#: Streams a rapid-reset client opens and resets (the policy's limit is 100).
RAPID_RESETS = 150

POLICY = """
version: 1
server:
  max_inflight: 2000
  limits: {{max_header_count: 50, max_header_bytes: 8KiB, max_uri_bytes: 2048,
           max_body: 256KiB, body_timeout: 1s}}
upstreams:
  up: {{url: "{url}"}}
routes:
  - path: /api/users/{{id}}
    proxy: {{upstream: up, path: "/users/{{id}}"}}
  - path: /api/up/{{rest*}}
    max_body: 1KiB
    max_response_body: 256KiB
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""

HOSTILE = [
    request_bytes(
        "POST",
        "/api/up/ok",
        [("Content-Length", "5"), ("Transfer-Encoding", "chunked")],
        b"0\r\n\r\n",
    ),
    b"POST /api/up/ok HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"GET /api/up/ok HTTP/1.1\r\nHost: a\r\nX-A: 1\rX-B: 2\r\n\r\n",
    request_bytes("GET", "/api/up/" + "a" * 3000),
    request_bytes("GET", "/api/up/ok", [(f"x-h{n}", "1") for n in range(60)]),
    request_bytes("POST", "/api/up/ok", [("Content-Length", "2000")], b"x" * 2000),
    request_bytes("GET", "/api/up/%00"),
    request_bytes("GET", "/api/up/..;/admin"),
    request_bytes("GET", "/../../etc/passwd"),
    request_bytes("GET", "/api/up/reset"),
    request_bytes("GET", "/api/up/garbage"),
    request_bytes("GET", "/api/up/reset-mid-body"),
    request_bytes("GET", "/api/up/endless-headers"),
    request_bytes("GET", "/api/up/endless-body"),
    request_bytes("GET", "/api/up/stall", [("x-request-timeout-ms", "100")]),
]


@dataclass
class Tally:
    normal_ok: int = 0
    normal_bad: int = 0
    hostile: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def worker_pid(master: int) -> int:
    """The Hypercorn worker: a spawned child that is not multiprocessing's tracker."""
    for child in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            return int(child)
    raise RuntimeError("the gateway has no worker process")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pooled_upstream(admin_url: str) -> int:
    """Idle connections the upstream pool keeps: open descriptors, but not leaked ones."""
    text = httpx.get(admin_url + "/metrics", timeout=5).text
    return int(sum(
        float(m[1])
        for m in re.finditer(r'^gateway_upstream_connections\{[^}]*state="idle"[^}]*\} (\S+)$',
                             text, re.M)))


def in_flight_gauges(admin_url: str) -> float:
    text = httpx.get(admin_url + "/metrics", timeout=5).text
    return sum(
        float(m[1])
        for m in re.finditer(r"^gateway_upstream_(?:in_flight|queued)\{[^}]*\} (\S+)$", text, re.M)
    )


async def one_normal(port: int, tally: Tally, rng: random.Random) -> None:
    user = rng.randrange(1, 10_000)
    async with connect(port) as conn:
        await conn.send(request_bytes("GET", f"/api/users/{user}"))
        response = await conn.read_response()
    if (
        response is not None
        and response.status == 200
        and response.complete
        and f'"id": "{user}"'.encode() in response.body
    ):
        tally.normal_ok += 1
    else:
        tally.normal_bad += 1
        if len(tally.failures) < 10:
            tally.failures.append(repr(response)[:300])


async def one_normal_h2(port: int, tally: Tally, rng: random.Random) -> None:
    users = [rng.randrange(1, 10_000) for _ in range(3)]
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = H2Client(stream)
        await client.start()
        streams = [await client.get(f"/api/users/{user}") for user in users]
        for user, stream_id in zip(users, streams, strict=True):
            with trio.move_on_after(10):
                status, body = await client.response(stream_id)
                if status == 200 and f'"id": "{user}"'.encode() in body:
                    tally.normal_ok += 1
                    continue
            tally.normal_bad += 1
            if len(tally.failures) < 10:
                tally.failures.append(f"HTTP/2 /api/users/{user}")


async def one_hostile_h2(port: int, tally: Tally, rng: random.Random) -> None:
    kind = rng.choice(("rapid reset", "reset upload", "idle priority"))
    try:
        with trio.fail_after(10):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                client = H2Client(stream)
                await client.start()
                if kind == "rapid reset":
                    for _ in range(RAPID_RESETS):
                        await client.reset(await client.get("/api/up/stall"))
                    goaway = await client.until(
                        lambda e: isinstance(e, h2.events.ConnectionTerminated))
                    cut = goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
                    tally.hostile["h2 rapid reset " + ("cut" if cut else "NOT cut")] += 1
                    return
                if kind == "reset upload":
                    upload = client.conn.get_next_available_stream_id()
                    client.conn.send_headers(upload, [
                        (":method", "POST"), (":path", "/api/up/ok"), (":scheme", "http"),
                        (":authority", "soak"), ("content-length", "900")])
                    client.conn.send_data(upload, b"x" * 300)
                    await client.flush()
                    await client.reset(upload)
                else:
                    for stream_id in range(101, 301, 2):
                        client.conn.prioritize(stream_id, weight=rng.randrange(1, 256))
                    await client.flush()
                status = await client.response_status(await client.get("/api/up/ok"))
                tally.hostile[f"h2 {kind} then {status}"] += 1
    except (trio.TooSlowError, trio.BrokenResourceError, AssertionError) as error:
        tally.hostile[f"h2 {kind}: {type(error).__name__}"] += 1


async def one_hostile(port: int, tally: Tally, rng: random.Random) -> None:
    kind = rng.randrange(len(HOSTILE) + 1)
    if kind == len(HOSTILE):  # a client that leaves mid-request
        async with connect(port) as conn:
            await conn.send(request_bytes("GET", "/api/up/slow?ms=500"))
            await trio.sleep(0.02)
            conn.abort()
        tally.hostile["left early"] += 1
        return
    response, _ = await exchange(port, HOSTILE[kind], max_body=512 * 1024, timeout_s=5)
    tally.hostile[str(response.status) if response is not None else "closed"] += 1


async def load(
    port: int, seconds: float, concurrency: int, tally: Tally, warmed: threading.Event
) -> None:
    end = trio.current_time() + seconds
    warm_at = trio.current_time() + min(10.0, seconds / 6)

    async def client(n: int) -> None:
        rng = random.Random(n)
        while trio.current_time() < end:
            if trio.current_time() >= warm_at:
                warmed.set()
            h2 = rng.random() < H2_SHARE
            if rng.random() < HOSTILE_SHARE:
                await (one_hostile_h2 if h2 else one_hostile)(port, tally, rng)
            else:
                await (one_normal_h2 if h2 else one_normal)(port, tally, rng)

    async with trio.open_nursery() as nursery:
        for n in range(concurrency):
            nursery.start_soon(client, n)


def run_upstream(
    ready: queue.Queue[tuple[str, trio.lowlevel.TrioToken]], stop: list[trio.Event]
) -> None:
    async def main() -> None:
        stop.append(trio.Event())
        async with trio.open_nursery() as nursery:
            upstream = await start_upstream(nursery)
            ready.put((upstream.url, trio.lowlevel.current_trio_token()))
            await stop[0].wait()
            nursery.cancel_scope.cancel(reason="soak finished")

    trio.run(main)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    ready: queue.Queue[tuple[str, trio.lowlevel.TrioToken]] = queue.Queue()
    stop: list[trio.Event] = []
    upstream_thread = threading.Thread(target=run_upstream, args=(ready, stop), daemon=True)
    upstream_thread.start()
    url, token = ready.get(timeout=20)
    tally = Tally()
    rows: list[tuple[str, str, str, bool]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-soak-") as work:
            policy = Path(work) / "policy.yaml"
            policy.write_text(POLICY.format(url=url))
            config = Path(work) / "hypercorn.toml"
            config.write_text(
                f'worker_class = "trio"\ngraceful_timeout = 5\n'
                f"keep_alive_timeout = {KEEP_ALIVE_S}\n"
            )
            with serve_process(policy, config=config) as served:
                port = int(served.url.rsplit(":", 1)[1])
                pid = worker_pid(served.process.pid)
                fds_idle = fd_count(pid) - pooled_upstream(served.admin_url)
                warmed = threading.Event()
                rss_warm: list[int] = []

                def sample_warm() -> None:
                    warmed.wait()
                    rss_warm.append(rss_bytes(pid))

                sampler = threading.Thread(target=sample_warm, daemon=True)
                sampler.start()
                started = time.monotonic()
                trio.run(load, port, args.seconds, args.concurrency, tally, warmed)
                elapsed = time.monotonic() - started
                warmed.set()
                sampler.join(timeout=5)
                rss_end = rss_bytes(pid)
                # Closed connections keep their server tasks until keep_alive_timeout.
                deadline = time.monotonic() + KEEP_ALIVE_S + 5
                while time.monotonic() < deadline and (
                    fd_count(pid) - pooled_upstream(served.admin_url) > fds_idle + FD_SLACK
                    or in_flight_gauges(served.admin_url) > 0
                ):
                    time.sleep(0.25)
                pooled_end = pooled_upstream(served.admin_url)
                fds_end = fd_count(pid) - pooled_end
                gauges_end = in_flight_gauges(served.admin_url)
    finally:
        if stop:
            token.run_sync_soon(stop[0].set)
        upstream_thread.join(timeout=10)

    normal = tally.normal_ok + tally.normal_bad
    share = tally.normal_ok / normal if normal else 0.0
    rss_change = (rss_end - rss_warm[0]) / rss_warm[0] if rss_warm and rss_warm[0] else 0.0
    rows.append(
        (
            "normal requests answered correctly",
            f"{tally.normal_ok}/{normal}",
            "100 %",
            normal > 0 and tally.normal_bad == 0,
        )
    )
    rows.append(
        (
            "worker RSS warm → end (MiB)",
            f"{rss_warm[0] / 2**20:.1f} → {rss_end / 2**20:.1f} ({rss_change:+.1%})"
            if rss_warm
            else "n/a",
            f"±{RSS_TOLERANCE:.0%}",
            bool(rss_warm) and abs(rss_change) <= RSS_TOLERANCE,
        )
    )
    rows.append(
        (
            "worker open fds idle → end, less pooled upstream connections",
            f"{fds_idle} → {fds_end} ({pooled_end} pooled at the end)",
            f"≤ idle + {FD_SLACK}",
            fds_end <= fds_idle + FD_SLACK,
        )
    )
    rows.append(("upstream in-flight + queued at end", f"{gauges_end:g}", "0", gauges_end == 0))
    print(
        f"\nsoak: {elapsed:.0f} s, {args.concurrency} clients, "
        f"{normal / elapsed:.0f} normal req/s, hostile outcomes "
        f"{dict(sorted(tally.hostile.items()))}, {share:.2%} normal ok"
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  {'measured':<32} {'bound':<14} result")
    for name, measured, bound, ok in rows:
        print(f"{name:<{width}}  {measured:<32} {bound:<14} {'ok' if ok else 'BROKEN'}")
    for failure in tally.failures:
        print("  normal request failed:", failure)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
