"""Slow and idle clients: a head or a body trickled byte by byte is cut by the server's
timeouts, and a thousand such connections do not stop normal requests being answered.

Hypercorn bounds a request head by ``keep_alive_timeout`` (the connection counts as idle
until the head is complete). Once the head is in, the body is bounded by the gateway:
``server.limits.body_timeout``; an answer the client stops reading, by
``server.send_timeout``.
"""

import re
import resource
import socket

import trio

from tests.gateway_harness import run_gateway, traces_with
from tests.hostile import NORMAL, stage
from tests.hostile.rawclient import connect, request_bytes
from tests.upstream import Responder, SeenRequest, start_upstream

#: Hypercorn timeouts short enough for a test; production sets them in hypercorn.toml.
FAST_TIMEOUTS = {"keep_alive_timeout": 2}


async def test_slowloris_head_is_cut():
    async with stage(**FAST_TIMEOUTS) as s:
        head = request_bytes("GET", "/api/up/ok", [("x-pad", "p" * 200)])[:-2]
        async with connect(s.port) as conn:
            started = trio.current_time()
            with trio.move_on_after(8):
                await conn.trickle(head, every_s=0.1)
            closed = await conn.wait_closed(timeout_s=1)
            elapsed = trio.current_time() - started
        assert closed in ("eof", "reset"), "a trickled head was never cut"
        assert elapsed < 5
        await s.settle()
        assert s.upstream.requests == []
        await s.assert_serves()


async def test_silent_connection_is_closed():
    async with stage(**FAST_TIMEOUTS) as s:
        async with connect(s.port) as conn:
            await conn.send(b"GET /api/up/ok HTTP/1.1\r\n")
            closed = await conn.wait_closed(timeout_s=5)
        assert closed in ("eof", "reset")
        assert s.upstream.requests == []
        await s.assert_serves()


async def test_trickled_body_is_cut_by_body_timeout():
    # /api/long has a 30 s deadline; the policy's body_timeout is 1 s.
    async with stage(**FAST_TIMEOUTS) as s:
        async with connect(s.port) as conn:
            await conn.send(request_bytes("POST", "/api/long/ok", [("Content-Length", "1000")]))
            started = trio.current_time()
            with trio.move_on_after(6):
                await conn.trickle(b"z" * 1000, every_s=0.1)
            response = await conn.read_response(timeout_s=1) if not conn.eof else None
            closed = await conn.wait_closed(timeout_s=1)
            elapsed = trio.current_time() - started
        assert closed in ("eof", "reset"), "a trickled body was never cut"
        assert elapsed < 5
        if response is not None:
            assert response.status == 408, response
        await s.settle()
        assert s.complete_since(0) == []
        await s.assert_serves()


#: Far more than the socket buffers between the upstream and a client that stops reading.
ENDLESS_DOWNLOAD = request_bytes("GET", "/api/long/download?bytes=4294967296")


async def test_a_client_that_stops_reading_is_dropped_and_its_work_cancelled():
    async with stage(server="  send_timeout: 500ms\n") as s:
        async with connect(s.port) as conn:
            await conn.send(ENDLESS_DOWNLOAD)
            await s.upstream.wait_for(lambda: s.upstream.in_flight >= 1)
            # The client reads nothing; /api/long's deadline is 30 s.
            await s.upstream.wait_cancelled(1)
            assert await conn.wait_closed(timeout_s=5) in ("eof", "reset")
        (trace,) = await traces_with(s.gw, route="/api/long/{rest*}")
        # The gateway dropped it (it had not left): the send deadline fired.
        assert (trace.cause, trace.status) == ("deadline", 200)
        assert trace.root is not None and trace.root.fired_scope == "send_timeout"
        await s.settle()
        await s.assert_serves()


async def test_a_client_that_stops_reading_does_not_hold_up_shutdown():
    with trio.fail_after(20):
        async with stage(server="  send_timeout: 2s\n", graceful_timeout=1) as s:
            conn_context = connect(s.port)
            conn = await conn_context.__aenter__()
            await conn.send(ENDLESS_DOWNLOAD)
            await s.upstream.wait_for(lambda: s.upstream.in_flight >= 1)
            started = trio.current_time()
            s.gw.shutdown.set()
        # The gateway has shut down with the client still connected and not reading.
        elapsed = trio.current_time() - started
        await conn_context.__aexit__(None, None, None)
    assert elapsed < 1 + 2 + 2


async def _big_json(request: SeenRequest, respond: Responder) -> None:
    await respond.json({"items": ["x" * 1000] * 12_000})  # about 12 MB


async def test_a_client_reading_steadily_keeps_a_large_answer_going():
    # A fan-out's answer is one write of the whole body; send_timeout (1 s) bounds each
    # 64 KiB piece of it, not the whole: a client taking ~2 s to read it is not cut.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=_big_json)
        policy = f"""
version: 1
server: {{send_timeout: 1s}}
upstreams:
  up: {{url: "{upstream.url}"}}
routes:
  - path: /agg
    deadline: 30s
    max_response_body: 16MiB
    fanout:
      calls:
        a: {{upstream: up, path: /big}}
"""
        async with run_gateway(policy) as gw:
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            await sock.connect(("127.0.0.1", gw.port))
            stream = trio.SocketStream(sock)
            await stream.send_all(b"GET /agg HTTP/1.1\r\nhost: t\r\n\r\n")
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(re.search(rb"content-length: (\d+)", head.lower())[1])
            got = len(body)
            started = trio.current_time()
            with trio.fail_after(30):
                while got < length:
                    data = await stream.receive_some(65536)
                    assert data, f"cut after {got} of {length} bytes"
                    got += len(data)
                    await trio.sleep(0.01)  # about 6 MB/s
            assert trio.current_time() - started > 1  # longer than send_timeout
            await stream.aclose()
        nursery.cancel_scope.cancel()


def raise_nofile_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= needed, f"RLIMIT_NOFILE {soft} is below the {needed} this test needs"


async def test_a_thousand_slow_connections_do_not_block_normal_requests():
    count = 1000
    raise_nofile_limit(2 * count + 256)  # both ends of each connection live in this process
    async with stage() as s:
        streams: list[trio.SocketStream] = []
        try:
            with trio.fail_after(20):
                for n in range(count):
                    stream = await trio.open_tcp_stream("127.0.0.1", s.port)
                    streams.append(stream)
                    # A third send nothing, a third half a head, a third a head and part
                    # of a body that never ends.
                    if n % 3 == 1:
                        await stream.send_all(b"GET /api/up/ok HTTP/1.1\r\nHost: a\r\nX-")
                    elif n % 3 == 2:
                        await stream.send_all(request_bytes(
                            "POST", "/api/long/ok", [("Content-Length", "1000")], b"x" * 10))
            # Every normal request is still answered promptly.
            for _ in range(20):
                started = trio.current_time()
                async with connect(s.port) as conn:
                    await conn.send(NORMAL)
                    response = await conn.read_response(timeout_s=5)
                assert response is not None, "no answer while slow clients are connected"
                assert response.status == 200, response.body
                assert trio.current_time() - started < 1.0
        finally:
            for stream in streams:
                stream.socket.close()
        await s.assert_serves()
