"""A small HTTP/1.1 load client for what wrk cannot classify per request.

``overload`` (S3): open loop. Requests arrive at a fixed rate whatever the server does,
each on an idle keep-alive connection or a new one (at most ``--max-connections``;
an arrival with none free is counted ``not_sent``). Every request is classified by
status and latency: ``good`` (2xx within the deadline), ``shed_fast`` (503 in under
10 ms), ``shed_slow``, ``deadline`` (504), ``late`` (2xx after the deadline),
``client_timeout`` (no connection or no answer within ``--give-up-ms``; the
connection is closed with a reset), ``not_sent`` (all ``--max-connections`` busy), ``other``
statuses and ``conn_error``.

``giveup`` (S4): ``--requests`` requests at ``--concurrency``, each on its own
connection to ``<url>-<run>-<n>``, closed after ``--give-up-ms`` if not yet answered.
Prints every request's send and give-up times (``time.monotonic()``, which is
CLOCK_MONOTONIC and so comparable with the upstream's records).

asyncio protocols on uvloop with httptools' parser: the cheapest client per request
we can write in Python, so it takes as little as possible of the CPU it shares with
the system under test. Output: one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import ipaddress
import itertools
import json
import os
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools
import uvloop

SHED_FAST_S = 0.010
#: Niceness the client asks for (it needs root or CAP_SYS_NICE), see favour_this_process.
CLIENT_NICE = -10
#: SO_LINGER of a client that gives up: close with a reset, so that no TIME_WAIT is left
#: holding a local port (a run opens tens of thousands of connections).
LINGER_RESET = struct.pack("ii", 1, 0)
#: Loopback source addresses connections are spread over (127.42.0.1 onwards).
SOURCE_ADDRESSES = 64
TICK_S = 0.001


@dataclass
class Target:
    """Where requests go and what they carry."""

    host: str
    port: int
    path: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, url: str, headers: list[str]) -> Target:
        parts = urlsplit(url)
        pairs = [tuple(h.split(":", 1)) for h in headers]
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 80,
            path=parts.path or "/",
            headers=[(k.strip(), v.strip()) for k, v in pairs],
        )

    def request(self, path: str | None = None) -> bytes:
        lines = [f"GET {path or self.path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``on_done(conn, status, latency_s)`` per response."""

    def __init__(
        self,
        on_done: Callable[[Connection, int, float], None],
        on_lost: Callable[[Connection], None],
    ) -> None:
        self.on_done = on_done
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sent_at = 0.0
        self.busy = False
        self.closed = False
        self.connected = asyncio.get_running_loop().create_future()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.connected.done():
            self.connected.set_exception(exc or ConnectionError("closed"))
        self.on_lost(self)

    # httptools callbacks
    def on_message_complete(self) -> None:
        self.busy = False
        status = self.parser.get_status_code()
        keep_alive = self.parser.should_keep_alive()
        self.parser = httptools.HttpResponseParser(self)
        self.on_done(self, status, time.perf_counter() - self.sent_at)
        if not keep_alive:
            self.close()

    def send(self, request: bytes, arrived_at: float | None = None) -> None:
        """Write the request; latency counts from ``arrived_at`` (default: now)."""
        assert self.transport is not None
        self.busy = True
        self.sent_at = time.perf_counter() if arrived_at is None else arrived_at
        self.transport.write(request)

    def close(self, reset: bool = False) -> None:
        """Close the connection; ``reset`` closes it with a reset instead of a FIN."""
        if self.transport is not None and not self.closed:
            self.closed = True
            sock = self.transport.get_extra_info("socket")
            if reset and sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self.transport.close()


def spread_sources(host: str) -> Iterator[tuple[str, int] | None]:
    """Local addresses to connect from, in turn: 64 loopback addresses when the target
    is on loopback, else the kernel's choice.

    Every connection from one source address to the target takes one of the ~28,000
    local ports; an open-loop run opens tens of thousands, and with the range nearly
    used the kernel's search for a free port took most of the client's CPU (``perf``:
    ``__inet_hash_connect``), stalling its schedule by seconds. Each source address in
    127/8 has a port range of its own.
    """
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        loopback = False
    if not loopback:
        return itertools.repeat(None)
    return itertools.cycle((f"127.42.{n // 250}.{1 + n % 250}", 0)
                           for n in range(SOURCE_ADDRESSES))


class Overload:
    """Open-loop load at ``rate`` requests per second; see the module docstring."""

    def __init__(
        self,
        target: Target,
        rate: float,
        duration_s: float,
        deadline_s: float,
        give_up_s: float,
        max_connections: int,
    ) -> None:
        self.target = target
        self.request = target.request()
        self.rate = rate
        self.duration_s = duration_s
        self.deadline_s = deadline_s
        self.give_up_s = give_up_s
        self.max_connections = max_connections
        self.counts: collections.Counter[str] = collections.Counter()
        self.latencies: list[float] = []
        #: idle keep-alive connections, newest last (a dict: O(1) removal when one closes)
        self.idle: dict[Connection, None] = {}
        self.open = 0
        self.connecting = 0
        self.busy: set[Connection] = set()
        self.measuring = True
        self.sources = spread_sources(target.host)

    def classify(self, status: int, latency: float) -> str:
        if 200 <= status < 300:
            return "good" if latency <= self.deadline_s else "late"
        if status == 503:
            return "shed_fast" if latency < SHED_FAST_S else "shed_slow"
        if status == 504:
            return "deadline"
        return "other"

    def done(self, conn: Connection, status: int, latency: float) -> None:
        self.busy.discard(conn)
        self.counts[self.classify(status, latency)] += 1
        self.latencies.append(latency)
        if not conn.closed and self.measuring:
            self.idle[conn] = None

    def lost(self, conn: Connection) -> None:
        self.open -= 1
        if conn in self.busy:
            self.busy.discard(conn)
            self.counts["conn_error"] += 1
        self.idle.pop(conn, None)

    async def send_on_new(self) -> None:
        loop = asyncio.get_running_loop()
        arrived_at = time.perf_counter()
        self.connecting += 1
        try:
            async with asyncio.timeout(self.give_up_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(self.done, self.lost), self.target.host, self.target.port,
                    local_addr=next(self.sources),
                )
        except TimeoutError:
            self.counts["client_timeout"] += 1
            return
        except OSError:
            self.counts["conn_error"] += 1
            return
        except asyncio.CancelledError:
            self.counts["client_timeout"] += 1  # still connecting when the run ended
            raise
        finally:
            self.connecting -= 1
        self.open += 1
        self.busy.add(conn)
        conn.send(self.request, arrived_at)

    def arrive(self, tasks: set[asyncio.Task[None]]) -> None:
        self.counts["sent"] += 1
        while self.idle:
            conn, _ = self.idle.popitem()
            if not conn.closed:
                self.busy.add(conn)
                conn.send(self.request)
                return
        if self.open + self.connecting >= self.max_connections:
            self.counts["not_sent"] += 1
            return
        task = asyncio.get_running_loop().create_task(self.send_on_new())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def reap(self, now: float) -> None:
        """Close connections whose request has waited longer than the give-up time."""
        for conn in [c for c in self.busy if now - c.sent_at > self.give_up_s]:
            self.busy.discard(conn)
            self.counts["client_timeout"] += 1
            conn.close(reset=True)

    async def run(self) -> dict[str, object]:
        tasks: set[asyncio.Task[None]] = set()
        niceness = favour_this_process()
        # The collector walked every connection and task many times a second (a third
        # of the client's CPU in ``perf``), stalling the schedule; the run is seconds
        # long, so cyclic garbage waits until it ends (peak RSS in the output).
        gc.disable()
        try:
            return {**await self._issue_and_drain(tasks), "client_nice": niceness}
        finally:
            gc.enable()

    async def _issue_and_drain(self, tasks: set[asyncio.Task[None]]) -> dict[str, object]:
        start = time.perf_counter()
        issued = 0
        last_reap = start
        previous = start
        max_stall_s = 0.0
        while (elapsed := time.perf_counter() - start) < self.duration_s:
            due = int(elapsed * self.rate)
            for _ in range(due - issued):
                self.arrive(tasks)
            issued = max(issued, due)
            now = time.perf_counter()
            max_stall_s = max(max_stall_s, now - previous)
            previous = now
            if now - last_reap > 0.05:
                self.reap(now)
                last_reap = now
            await asyncio.sleep(TICK_S)
        sending_s = time.perf_counter() - start
        # Let the last arrivals finish or give up, then close everything.
        self.measuring = False
        drain_until = time.perf_counter() + self.give_up_s + 0.1
        while (self.busy or tasks) and time.perf_counter() < drain_until:
            self.reap(time.perf_counter())
            await asyncio.sleep(0.01)
        self.reap(float("inf"))
        for conn in self.idle:
            conn.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3 if lat else None

        return {
            "rate": self.rate,
            "duration_s": sending_s,
            "counts": dict(self.counts),
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "max_stall_ms": max_stall_s * 1e3,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


async def give_up_run(
    target: Target, run_id: str, requests: int, concurrency: int, give_up_s: float
) -> dict[str, object]:
    """S4: requests that are abandoned after ``give_up_s``; see the module docstring."""
    loop = asyncio.get_running_loop()
    records: list[dict[str, object]] = []
    numbers = iter(range(requests))

    async def one(n: int) -> None:
        path = f"{target.path}-{run_id}-{n}"
        answered: asyncio.Future[int] = loop.create_future()

        def on_done(_conn: Connection, status: int, _latency: float) -> None:
            if not answered.done():
                answered.set_result(status)

        def on_lost(_conn: Connection) -> None:
            if not answered.done():
                answered.set_result(0)

        record: dict[str, object] = {"id": path.rsplit("/", 1)[-1]}
        try:
            _, conn = await loop.create_connection(
                lambda: Connection(on_done, on_lost), target.host, target.port
            )
        except OSError as exc:
            record.update(sent=None, gave_up=None, status=None, error=repr(exc))
            records.append(record)
            return
        record["sent"] = time.monotonic()
        conn.send(target.request(path))
        try:
            record["status"] = await asyncio.wait_for(asyncio.shield(answered), give_up_s)
            record["gave_up"] = None
        except TimeoutError:
            record["gave_up"] = time.monotonic()
            record["status"] = None
        conn.close()
        records.append(record)

    async def worker() -> None:
        for n in numbers:
            await one(n)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"records": records}


def favour_this_process() -> int:
    """Run ahead of the system under test on the cores both share, when allowed.

    An open-loop client that gets only its fair share of a CPU the system under test
    saturates falls behind its schedule (arrivals due during a stall are sent late or
    not at all), so it would offer less than the load asked for. Returns the niceness
    the client runs at (the inherited one when lowering it is not permitted).
    """
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, CLIENT_NICE)
    return os.getpriority(os.PRIO_PROCESS, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    over = sub.add_parser("overload")
    over.add_argument("url")
    over.add_argument("--rate", type=float, required=True, help="arrivals per second")
    over.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals")
    over.add_argument("--deadline-ms", type=float, default=200.0)
    over.add_argument("--give-up-ms", type=float, default=1000.0)
    over.add_argument("--max-connections", type=int, default=8000)
    over.add_argument("-H", "--header", action="append", default=[])
    give = sub.add_parser("giveup")
    give.add_argument("url")
    give.add_argument("--run-id", required=True)
    give.add_argument("--requests", type=int, default=200)
    give.add_argument("--concurrency", type=int, default=50)
    give.add_argument("--give-up-ms", type=float, default=100.0)
    give.add_argument("-H", "--header", action="append", default=[])
    args = parser.parse_args()
    target = Target.parse(args.url, args.header)
    if args.mode == "overload":
        coro = Overload(
            target,
            args.rate,
            args.duration,
            args.deadline_ms / 1e3,
            args.give_up_ms / 1e3,
            args.max_connections,
        ).run()
    else:
        coro = give_up_run(
            target, args.run_id, args.requests, args.concurrency, args.give_up_ms / 1e3
        )
    print(json.dumps(uvloop.run(coro)))


if __name__ == "__main__":
    main()
