"""CPU cost per upstream request: the gateway's pool vs httpx vs one httpcore connection.

Run: ``.venv/bin/python bench/pool_cpu.py [--requests N] [--concurrency C]``

A keep-alive upstream answering a ~200-byte JSON runs in a separate process (plain
asyncio, uvloop when installed), so only the client's work lands in this process's
``time.process_time()``. Each client runs C tasks that share N requests; the table shows
CPU milliseconds per request and the ratio to the gateway's pool. Loopback only; the
upstream process is stopped on exit.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BODY = (
    b'{"id": 42, "name": "Ada Lovelace", "email": "ada@example.test", "plan": "pro", '
    b'"roles": ["admin", "billing"], "created": "2026-11-25T12:00:00Z", "active": true, '
    b'"score": 0.97, "tags": ["a", "b", "c"]}'
)
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)


# -- the upstream (child process) ---------------------------------------------------------


def serve(port_file: str) -> None:
    """Answer every request head (no request bodies in this bench) with RESPONSE."""
    import asyncio

    def publish_port(port: int) -> None:
        Path(port_file).write_text(str(port))

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            count = self.buffer.count(b"\r\n\r\n")
            if count:
                self.buffer = self.buffer[self.buffer.rindex(b"\r\n\r\n") + 4 :]
                self.transport.write(RESPONSE * count)  # type: ignore[attr-defined]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Upstream, "127.0.0.1", 0, backlog=1024)
        publish_port(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# -- the clients --------------------------------------------------------------------------


async def run_clients(
    concurrency: int, requests: int, one: Callable[[int], Awaitable[None]]
) -> float:
    """CPU seconds per request for ``requests`` calls of ``one`` over ``concurrency`` tasks."""
    import trio

    per_task = requests // concurrency

    async def worker(index: int) -> None:
        for _ in range(per_task):
            await one(index)

    gc.collect()
    start = time.process_time()
    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(worker, index)
    return (time.process_time() - start) / (per_task * concurrency)


async def bench_pool(url: str, concurrency: int, requests: int) -> float:
    from gateway.upstreams import HttpUpstreamPool, PoolLimits

    pool = HttpUpstreamPool("bench", url, PoolLimits(max_connections=concurrency))
    headers = [(b"accept", b"application/json")]

    async def one(_: int) -> None:
        async with pool.request("GET", "/users/42", headers) as response:
            body = await response.read()
        assert response.status == 200 and len(body) == len(BODY)

    await run_clients(concurrency, concurrency * 4, one)  # warm up: open the connections
    try:
        return await run_clients(concurrency, requests, one)
    finally:
        assert pool.statistics().opened_total == concurrency, pool.statistics()
        await pool.aclose()


async def bench_httpx(url: str, concurrency: int, requests: int) -> float:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:

        async def one(_: int) -> None:
            response = await client.get("/users/42", headers={"accept": "application/json"})
            assert response.status_code == 200 and len(response.content) == len(BODY)

        await run_clients(concurrency, concurrency * 4, one)
        return await run_clients(concurrency, requests, one)


async def bench_httpcore(url: str, concurrency: int, requests: int) -> float:
    import httpcore

    origin = httpcore.URL(url).origin
    conns = [httpcore.AsyncHTTPConnection(origin=origin) for _ in range(concurrency)]
    target = url + "/users/42"

    async def one(index: int) -> None:
        response = await conns[index].request(
            "GET", target, headers=[(b"accept", b"application/json")]
        )
        assert response.status == 200 and len(response.content) == len(BODY)

    try:
        await run_clients(concurrency, concurrency * 4, one)
        return await run_clients(concurrency, requests, one)
    finally:
        for conn in conns:
            await conn.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6400)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    parser.add_argument("--serve", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    import tempfile

    import trio

    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        upstream = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
        try:
            deadline = time.monotonic() + 10
            while not port_file.exists() or not port_file.read_text():
                if upstream.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the upstream process did not start")
                time.sleep(0.02)
            url = f"http://127.0.0.1:{port_file.read_text()}"
            clients = {
                "HttpUpstreamPool (gateway)": bench_pool,
                "httpx.AsyncClient": bench_httpx,
                "httpcore connection per task": bench_httpcore,
            }
            results: dict[str, float] = {}
            for name, bench in clients.items():
                runs = [
                    trio.run(bench, url, args.concurrency, args.requests)
                    for _ in range(args.rounds)
                ]
                results[name] = min(runs)
        finally:
            upstream.terminate()
            upstream.wait(timeout=10)

    base = results["HttpUpstreamPool (gateway)"]
    print(
        f"\n{args.requests} GET requests, {args.concurrency} concurrent tasks, loopback, "
        f"~{len(BODY)}-byte JSON, best of {args.rounds}; client CPU only "
        f"(python {sys.version.split()[0]})\n"
    )
    print(f"{'client':<30} {'ms CPU/request':>15} {'vs pool':>9}")
    for name, seconds in results.items():
        print(f"{name:<30} {seconds * 1000:>15.3f} {seconds / base:>8.1f}x")


if __name__ == "__main__":
    main()
