"""Upstream faults: refused, reset before the head, reset mid-body, garbage, a head that
never ends, an endless body. Before the response starts the client gets a 502 (or a
504 when the deadline fires first); once streaming began, the client connection is
aborted so the client sees an incomplete body. After each fault the pool holds no
connection and a normal request succeeds."""

import json

import pytest
import trio

from tests.h2client import H2Client
from tests.hostile import stage
from tests.hostile.rawclient import connect, exchange, request_bytes
from tests.upstream import Responder, SeenRequest


async def misbehave(request: SeenRequest, respond: Responder) -> None:
    if request.path == "/head-stalls":
        await respond.send_raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Half")
        await trio.sleep_forever()
    elif request.path == "/bad-status":
        await respond.send_raw(b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n")
        await respond.close()
    elif request.path == "/bad-chunk":
        await respond.send_raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"5\r\nhello\r\nzz\r\n")
        await respond.close()
    elif request.path == "/no-content-with-length":
        await respond.send_raw(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
        await respond.close()
    elif request.path == "/not-modified-with-length":
        # RFC 9110 8.6: a 304 may carry the length of the representation it stands for.
        await respond.send_raw(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n"
                               b"Content-Length: 5\r\n\r\n")
    elif request.path == "/control-bytes":
        await respond.send_raw(b"HTTP/1.1 200 OK\r\nX-Trace: a\x01b\x7fc\r\n"
                               b"Content-Length: 2\r\n\r\nok")
    elif request.path == "/smuggle-response":
        await respond.send_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        await respond.close()
    elif request.path == "/endless-informational":
        # 102 Processing (or 100 Continue) for ever: no final answer ever comes.
        while True:
            await respond.send_raw(b"HTTP/1.1 102 Processing\r\n\r\n" * 10)
    elif request.path == "/large-informational":
        # Ten heads, each 2 KiB: together past the upstream's header limit (16 KiB).
        await respond.send_raw(b"HTTP/1.1 103 Early Hints\r\nLink: </%s.css>\r\n\r\n"
                               % (b"a" * 2000) * 10
                               + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    elif request.path == "/processing-then-ok":
        # A long job's 102 Processing every second, 150 of them (2.5 minutes' worth).
        await respond.send_raw(b"HTTP/1.1 102 Processing\r\n\r\n" * 150
                               + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
    elif request.path == "/hints-then-ok":
        await respond.send_raw(b"HTTP/1.1 100 Continue\r\n\r\n" + b"".join(
            b"HTTP/1.1 103 Early Hints\r\nLink: </%d.css>; rel=preload\r\n\r\n" % n
            for n in range(20)) + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    else:
        await respond.fallback()


BEFORE_STREAMING = {
    # path: (status, cause)
    "/api/dead": (502, "upstream_connect"),
    "/api/up/reset": (502, "upstream_reset"),
    "/api/up/garbage": (502, "upstream_protocol"),
    "/api/up/bad-status": (502, "upstream_protocol"),
    "/api/up/endless-headers": (502, "upstream_protocol"),
    "/api/up/head-stalls": (504, "deadline"),
    "/api/up/smuggle-response": (502, "upstream_protocol"),
    # Field values are visible characters (RFC 9110 5.5): relayed, an HTTP/2 client
    # (curl) failed the stream with PROTOCOL_ERROR and an HTTP/1.1 one got \x01 and DEL.
    "/api/up/control-bytes": (502, "upstream_protocol"),
    # Informational heads without end: bounded by their bytes, not by the deadline.
    "/api/up/endless-informational": (502, "upstream_protocol"),
    "/api/up/large-informational": (502, "upstream_protocol"),
}


@pytest.mark.parametrize("path", sorted(BEFORE_STREAMING))
async def test_fault_before_the_response_is_a_clean_error(path):
    status, cause = BEFORE_STREAMING[path]
    async with stage() as s:
        s.upstream.behaviour = misbehave
        response, _ = await exchange(s.port, request_bytes(
            "GET", path, [("x-request-timeout-ms", "500")]))
        assert response is not None and response.status == status, response
        assert response.complete
        assert json.loads(response.body)["cause"] == cause
        await s.settle()
        assert s.pool_statistics().active == 0
        assert s.pool_statistics("dead").active == 0
        await s.assert_serves()


@pytest.mark.parametrize("path", ["/api/up/reset-mid-body", "/api/up/bad-chunk"])
async def test_fault_while_streaming_aborts_the_client(path):
    async with stage() as s:
        s.upstream.behaviour = misbehave
        response, closed = await exchange(s.port, request_bytes("GET", path))
        assert response is not None and response.status == 200
        assert not response.complete, "a broken upstream body must not end cleanly"
        assert response.ending in ("eof", "reset")
        assert closed in ("eof", "reset")
        await s.settle()
        assert s.pool_statistics().active == 0
        await s.assert_serves()


@pytest.mark.parametrize("route", ["/api/up", "/api/capped"])
async def test_endless_body_is_bounded(route):
    # Without max_response_body the gateway streams for as long as the client reads:
    # the client bounds its read and leaves; the gateway must then let go upstream.
    async with stage() as s:
        async with connect(s.port) as conn:
            await conn.send(request_bytes("GET", route + "/endless-body"))
            response = await conn.read_response(max_body=2 * 1024 * 1024, timeout_s=5)
        assert response is not None and response.status == 200
        assert not response.complete
        if route == "/api/capped":
            assert response.ending in ("eof", "reset")
        else:
            assert response.ending == "limit"
        await s.settle()
        stats = s.pool_statistics()
        assert stats.active == 0 and stats.idle == 0, stats
        with trio.fail_after(5):
            await s.upstream.wait_cancelled(1)
        await s.assert_serves()


async def test_client_leaving_mid_stream_frees_the_pool():
    async with stage() as s:
        for _ in range(5):
            async with connect(s.port) as conn:
                await conn.send(request_bytes("GET", "/api/up/download?bytes=5000000"))
                await conn.read_response(max_body=100_000)
                conn.abort()
        await s.settle()
        assert s.pool_statistics().active == 0
        await s.assert_serves()


async def test_informational_heads_before_the_answer_are_passed_over():
    async with stage() as s:
        s.upstream.behaviour = misbehave
        response, _ = await exchange(s.port, request_bytes("GET", "/api/up/hints-then-ok"))
        assert response is not None and response.status == 200 and response.complete
        assert response.body == b"ok"


async def test_a_long_jobs_steady_processing_heads_are_passed_over():
    # Bounded by their count (100), a job sending 102 Processing every second was cut
    # 502 after 100 s, well inside its deadline; 150 small heads are 4 KiB of 16.
    async with stage() as s:
        s.upstream.behaviour = misbehave
        response, _ = await exchange(s.port, request_bytes(
            "GET", "/api/up/processing-then-ok"))
        assert response is not None and response.status == 200 and response.complete
        assert response.body == b"done"


@pytest.mark.parametrize(("path", "status"), [("/api/up/no-content-with-length", 204),
                                             ("/api/up/not-modified-with-length", 304)])
async def test_a_bodiless_answer_is_relayed_without_the_length_its_upstream_gave_it(
        path, status):
    """RFC 9110 (8.6): no Content-Length on a 204; a 304 may carry the length of the
    representation. Relayed as the upstream wrote them, an HTTP/2 client refused the
    stream (a length, then an empty DATA frame) and never got its 204 or 304 (httpx
    over HTTP/2 raised on a conditional GET), and an HTTP/1.1 client in front could
    wait for bytes that never come."""
    async with stage() as s:
        s.upstream.behaviour = misbehave
        response, _ = await exchange(s.port, request_bytes("GET", path))
        assert response is not None and response.status == status and response.complete
        assert response.header_values("content-length") == [], response.headers
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", s.port))
        await client.start()
        try:
            stream_id = await client.get(path)
            assert await client.response(stream_id) == (status, b"")
        finally:
            await client.stream.aclose()
