"""Bodies stream through the gateway both ways, with flat memory and exact framing.

The gateway runs as a real process (``python -m gateway serve``, one Hypercorn trio
worker); the recording upstream and the httpx client run in the test process. The
worker's memory is read from ``/proc/<pid>/status``: ``VmHWM`` is its peak resident
set, so a body buffered whole anywhere in the worker, even for a moment, shows up.
"""

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio
import trio.lowlevel

from tests.process_harness import serve_process
from tests.upstream import BODY_KEEP_LIMIT, DOWNLOAD_PATTERN, Responder, SeenRequest, start_upstream

MiB = 1024 * 1024
TRANSFER_BYTES = 200 * MiB
WARM_UP_BYTES = 8 * MiB
#: Peak RSS growth allowed over the warmed-up worker while 3 x 200 MiB pass through.
MAX_PEAK_GROWTH_KB = 20 * 1024

POLICY = """
version: 1
upstreams:
  up: {{url: "{url}"}}
routes:
  - path: /s/{{rest*}}
    deadline: 60s
    max_body: 300MiB
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""


async def counting(request: SeenRequest, respond: Responder) -> None:
    """``/count`` answers how many body bytes arrived; the upstream read them by now and
    kept none above ``BODY_KEEP_LIMIT``. Everything else takes the built-in routes."""
    if request.path != "/count":
        await respond.fallback()
        return
    await respond.json({
        "bytes": request.body_size,
        "content_length": request.header("content-length"),
        "transfer_encoding": request.header("transfer-encoding"),
    })


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


async def repeated(total: int, block: bytes) -> AsyncIterator[bytes]:
    """``total`` bytes of ``block`` repeated, without ever holding more than one block."""
    sent = 0
    while sent < total:
        piece = block if total - sent >= len(block) else block[: total - sent]
        sent += len(piece)
        yield piece


async def download(client: httpx.AsyncClient, size: int) -> int:
    """Stream ``/download`` through the gateway; check every byte; return the count."""
    pattern = DOWNLOAD_PATTERN * (4 * MiB // len(DOWNLOAD_PATTERN))
    received = 0
    async with client.stream("GET", f"/s/download?bytes={size}") as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        async for chunk in response.aiter_raw():
            offset = received % len(DOWNLOAD_PATTERN)
            assert len(chunk) <= len(pattern) - offset
            assert chunk == pattern[offset: offset + len(chunk)], received
            received += len(chunk)
    return received


async def upload(client: httpx.AsyncClient, size: int, *, declared: bool) -> dict[str, object]:
    """Send ``size`` bytes from a generator, with a Content-Length or chunked; return
    the upstream's answer."""
    block = bytes(range(256)) * 1024
    headers = {"content-length": str(size)} if declared else {}
    response = await client.post("/s/count", content=repeated(size, block), headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def test_200_mib_each_way_with_flat_worker_memory(tmp_path: Path):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=counting)
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(url=upstream.url))
        with serve_process(policy, workers=1) as served:
            (worker,) = served.worker_pids()
            async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
                # Warm up both directions, so that what is allocated once is counted
                # before the baseline and what grows with the body size after it.
                assert await download(client, WARM_UP_BYTES) == WARM_UP_BYTES
                for declared in (True, False):
                    warm = await upload(client, WARM_UP_BYTES, declared=declared)
                    assert warm["bytes"] == WARM_UP_BYTES
                before_kb, rss_before_kb = peak_rss_kb(worker), rss_kb(worker)

                started = time.monotonic()
                assert await download(client, TRANSFER_BYTES) == TRANSFER_BYTES
                download_s = time.monotonic() - started
                started = time.monotonic()
                answer = await upload(client, TRANSFER_BYTES, declared=True)
                upload_s = time.monotonic() - started
                started = time.monotonic()
                chunked = await upload(client, TRANSFER_BYTES, declared=False)
                chunked_s = time.monotonic() - started
                after_kb, rss_after_kb = peak_rss_kb(worker), rss_kb(worker)

            assert answer == {"bytes": TRANSFER_BYTES, "content_length": str(TRANSFER_BYTES),
                              "transfer_encoding": None}
            assert chunked == {"bytes": TRANSFER_BYTES, "content_length": None,
                               "transfer_encoding": "chunked"}
            mb = TRANSFER_BYTES / MiB
            print(f"\nworker {worker}: VmHWM {before_kb} kB -> {after_kb} kB "
                  f"(+{after_kb - before_kb} kB), VmRSS {rss_before_kb} kB -> {rss_after_kb} kB; "
                  f"download {mb:.0f} MiB in {download_s:.2f} s "
                  f"({mb / download_s:.0f} MiB/s), upload in {upload_s:.2f} s "
                  f"({mb / upload_s:.0f} MiB/s), chunked upload in {chunked_s:.2f} s "
                  f"({mb / chunked_s:.0f} MiB/s)")
            assert after_kb - before_kb <= MAX_PEAK_GROWTH_KB, (before_kb, after_kb)
        assert upstream.errors == []
        nursery.cancel_scope.cancel()


async def irregular_chunks(data: bytes, sizes: list[int]) -> AsyncIterator[bytes]:
    """``data`` cut at the given sizes (cycled), empty pieces included."""
    position, n = 0, 0
    while position < len(data):
        size = sizes[n % len(sizes)]
        n += 1
        yield data[position: position + size]
        position += size
        await trio.lowlevel.checkpoint()


async def test_chunked_upload_of_unknown_length_arrives_exactly(tmp_path: Path):
    data = random.Random(7).randbytes(BODY_KEEP_LIMIT - 12345)
    sizes = [1, 0, 2, 7, 4095, 4096, 4097, 65535, 65536, 65537, 0, 131072, 3, 300_001]
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=counting)
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(url=upstream.url))
        with serve_process(policy, workers=1) as served:
            async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
                response = await client.post("/s/count", content=irregular_chunks(data, sizes))
                assert response.status_code == 200, response.text
                # The client sent it chunked: no length was known up front.
                assert response.request.headers["transfer-encoding"] == "chunked"
                assert "content-length" not in response.request.headers
                # A second, empty chunked body on the same route: framing still right.
                empty = await client.post("/s/count", content=irregular_chunks(b"", [1]))
                assert empty.status_code == 200, empty.text
        answer = response.json()
        assert answer == {"bytes": len(data), "content_length": None,
                          "transfer_encoding": "chunked"}
        first, second = upstream.requests[-2:]
        assert first.body == data
        assert second.body == b"" and second.body_size == 0
        assert upstream.errors == []
        nursery.cancel_scope.cancel()
