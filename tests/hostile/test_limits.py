"""Limits: header count and size (431), URI length (414), body size per route (413),
upstream response head too large (502), upstream body over ``max_response_body`` (502
when its Content-Length says so; else the client connection is aborted, since
streaming had begun)."""

import json

import pytest

from tests.hostile import stage
from tests.hostile.rawclient import connect, exchange, request_bytes
from tests.upstream import Responder, SeenRequest


async def assert_refused(s, data, status, *, before=0):
    response, closed = await exchange(s.port, data)
    await s.settle()
    assert len(s.upstream.requests) == before, "a refused request reached the upstream"
    assert response is not None and response.status == status, response
    assert closed in ("eof", "reset")
    await s.assert_serves()
    return response


async def test_too_many_headers_is_431():
    async with stage() as s:
        ok = [(f"x-h{n}", "1") for n in range(40)]
        response, _ = await exchange(s.port, request_bytes("GET", "/api/up/ok", ok))
        assert response is not None and response.status == 200
        many = [(f"x-h{n}", "1") for n in range(60)]  # policy: max_header_count 50
        response = await assert_refused(s, request_bytes("GET", "/api/up/ok", many), 431,
                                        before=1)
        assert b'"cause":"bad_request"' in response.body


async def test_header_bytes_over_the_policy_limit_is_431():
    async with stage() as s:
        # 10 KiB: above the policy's 8 KiB, below Hypercorn's 16 KiB head buffer.
        big = [(f"x-big{n}", "v" * 1000) for n in range(10)]
        await assert_refused(s, request_bytes("GET", "/api/up/ok", big), 431)


async def test_header_bytes_over_the_server_buffer_is_431():
    async with stage() as s:
        huge = [(f"x-huge{n}", "v" * 1000) for n in range(20)]
        await assert_refused(s, request_bytes("GET", "/api/up/ok", huge), 431)


@pytest.mark.parametrize(("target", "status"), [
    ("/api/up/" + "a" * 3000, 414),                    # policy: max_uri_bytes 2048
    ("/api/up/ok?" + "q=1&" * 700, 414),               # the query string counts
])
async def test_long_uri_is_414(target, status):
    async with stage() as s:
        await assert_refused(s, request_bytes("GET", target), status)


async def test_body_over_route_limit_with_content_length_is_413():
    async with stage() as s:
        data = request_bytes("POST", "/api/small/ok", [("Content-Length", "2000")],
                             b"x" * 2000)
        response = await assert_refused(s, data, 413)
        assert b'"cause":"bad_request"' in response.body
        # At the limit it passes.
        ok, _ = await exchange(s.port, request_bytes(
            "POST", "/api/small/ok", [("Content-Length", "1024")], b"x" * 1024))
        assert ok is not None and ok.status == 200
        assert s.upstream.requests[-1].body == b"x" * 1024


async def test_chunked_body_growing_past_route_limit_is_413():
    async with stage() as s:
        async with connect(s.port) as conn:
            await conn.send(request_bytes("POST", "/api/small/ok",
                                          [("Transfer-Encoding", "chunked")]))
            for _ in range(8):  # 8 x 300 bytes against a 1 KiB limit
                if not await conn.try_send(b"12c\r\n" + b"y" * 300 + b"\r\n"):
                    break
            await conn.try_send(b"0\r\n\r\n")
            response = await conn.read_response()
            closed = await conn.wait_closed()
        assert response is not None and response.status == 413, response
        assert closed in ("eof", "reset")
        await s.settle()
        # The body streams, so the upstream may have seen the head; never a whole request.
        assert s.complete_since(0) == []
        assert all(r.cancelled and r.body_size <= 1024 for r in s.upstream.requests)
        await s.assert_serves()


async def test_upstream_response_head_too_large_is_502():
    async def big_head(request: SeenRequest, respond: Responder) -> None:
        if request.path == "/big-head":
            await respond.respond(200, b"ok", [("x-big", "a" * 20_000)])  # limit: 16 KiB
        else:
            await respond.fallback()

    async with stage() as s:
        s.upstream.behaviour = big_head
        response, _ = await exchange(s.port, request_bytes("GET", "/api/up/big-head"))
        assert response is not None and response.status == 502, response
        assert b'"cause":"upstream_protocol"' in response.body
        await s.settle()
        assert s.pool_statistics().active == 0
        await s.assert_serves()


@pytest.mark.parametrize("path", ["/api/capped/endless-body"])
async def test_upstream_body_over_max_response_body_aborts_the_client(path):
    # A body of no declared length: over the cap only once streaming has begun.
    async with stage() as s:
        response, _ = await exchange(s.port, request_bytes("GET", path),
                                     max_body=4 * 1024 * 1024)
        assert response is not None and response.status == 200
        assert not response.complete, "an oversized body must not end cleanly"
        assert response.ending in ("eof", "reset")
        assert len(response.body) <= 256 * 1024 + 64 * 1024
        await s.settle()
        assert s.pool_statistics().active == 0
        await s.assert_serves()


async def test_an_answer_declared_over_max_response_body_is_a_502_before_any_byte():
    # The upstream's Content-Length already says the body is over the cap: a 200 head
    # and a cut connection told the client nothing it could act on.
    async with stage() as s:
        async with connect(s.port) as conn:
            await conn.send(request_bytes("GET", "/api/capped/download?bytes=1000000"))
            response = await conn.read_response(timeout_s=5)
        assert response is not None and response.status == 502, response
        assert json.loads(response.body)["cause"] == "upstream_protocol"
        await s.assert_serves()
