"""Framing and smuggling: a request whose framing two parsers could read differently is
refused (400, connection closed) and never reaches the upstream; what the gateway does
forward is framed cleanly by the gateway itself.

Which layer refuses what (verified against h11 0.16 inside Hypercorn 0.18): h11 answers
400 for conflicting or signed Content-Length, CR/LF/NUL in a value, bad header names and
bad chunk sizes, and 501 for a Transfer-Encoding other than ``chunked``. It accepts
Content-Length together with Transfer-Encoding, Transfer-Encoding in HTTP/1.0 and other
control characters in values: ``gateway._guards`` refuses those. It also accepts obs-fold
(folded into one value) and bare-LF line endings, which RFC 9112 §5.2/§2.2 allow; the
gateway re-frames what it forwards, so the tests check that the upstream gets one clean
request.
"""

import json

import pytest
import trio

from tests.hostile import stage
from tests.hostile.rawclient import connect, exchange

HEAD = b"POST /api/up/ok HTTP/1.1\r\nHost: gateway.test\r\n"

REFUSED_BEFORE_THE_APP = {
    # name: (raw request, statuses h11 answers with)
    "conflicting-content-length": (
        HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", (400,)),
    "signed-content-length-plus": (HEAD + b"Content-Length: +5\r\n\r\nhello", (400,)),
    "signed-content-length-minus": (HEAD + b"Content-Length: -1\r\n\r\n", (400,)),
    "hex-content-length": (HEAD + b"Content-Length: 0x5\r\n\r\nhello", (400,)),
    "transfer-encoding-gzip": (HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                               (400, 501)),
    "transfer-encoding-twice": (
        HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        (400, 501)),
    "transfer-encoding-space-before-colon": (
        HEAD + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", (400,)),
    "cr-inside-value": (HEAD + b"X-A: 1\rX-Injected: 2\r\nContent-Length: 0\r\n\r\n", (400,)),
    "nul-inside-value": (HEAD + b"X-A: 1\x002\r\nContent-Length: 0\r\n\r\n", (400,)),
    "bad-header-name": (HEAD + b"X(A): 1\r\nContent-Length: 0\r\n\r\n", (400,)),
    "two-hosts": (HEAD + b"Host: other.test\r\nContent-Length: 0\r\n\r\n", (400,)),
    "space-in-target": (b"GET /api/up/ok HTTP/1.1 x\r\nHost: a\r\n\r\n", (400,)),
    "no-host": (b"GET /api/up/ok HTTP/1.1\r\n\r\n", (400,)),
    "bad-method-token": (b"G@T /api/up/ok HTTP/1.1\r\nHost: a\r\n\r\n", (400,)),
    "header-without-colon": (b"GET /api/up/ok HTTP/1.1\r\nHost: a\r\nBadHeader\r\n\r\n",
                             (400,)),
    "content-length-not-digits": (HEAD + b"Content-Length: abc\r\n\r\n", (400,)),
}

REFUSED_BY_THE_GATEWAY = {
    "content-length-and-chunked": (
        HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"0\r\n\r\nGET /api/up/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"),
    "chunked-and-content-length": (
        HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "chunked-in-http-1.0": (
        b"POST /api/up/ok HTTP/1.0\r\nHost: gateway.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"),
    "control-character-inside-value": (HEAD + b"X-A: 1\x01\r\nContent-Length: 0\r\n\r\n"),
    "del-inside-value": (HEAD + b"X-A: 1\x7f\r\nContent-Length: 0\r\n\r\n"),
}


@pytest.mark.parametrize("name", sorted(REFUSED_BEFORE_THE_APP))
async def test_malformed_framing_is_refused_by_the_server(name):
    data, statuses = REFUSED_BEFORE_THE_APP[name]
    async with stage() as s:
        response, closed = await exchange(s.port, data)
        assert response is not None and response.status in statuses, response
        # The gateway's JSON error, as for every other bad request (Hypercorn's own
        # answer was empty).
        assert response.header("content-type") == b"application/json", response
        body = json.loads(response.body)
        assert body["cause"] == "bad_request" and body["error"]
        assert response.header("x-request-id") == body["request_id"].encode()
        assert closed in ("eof", "reset")
        await s.settle()
        assert s.upstream.requests == []
        await s.assert_serves()


@pytest.mark.parametrize("name", sorted(REFUSED_BY_THE_GATEWAY))
async def test_ambiguous_framing_is_refused_by_the_gateway(name):
    async with stage() as s:
        response, closed = await exchange(s.port, REFUSED_BY_THE_GATEWAY[name])
        await s.settle()
        assert s.upstream.requests == [], "an ambiguous request reached the upstream"
        assert response is not None and response.status == 400, response
        # With bytes pipelined after the refused request, Hypercorn may close the
        # connection before the small JSON body is written; the status always arrives.
        assert response.body == b"" or b'"cause":"bad_request"' in response.body
        assert closed in ("eof", "reset")
        await s.assert_serves()


@pytest.mark.parametrize("chunk", [b"zz", b"-5", b"0x5", b"5 5", b"ffffffffffffffffffffff"])
async def test_invalid_chunk_size_never_makes_a_complete_upstream_request(chunk):
    # h11 hands the head to the app before it meets the bad chunk, and the gateway streams
    # bodies, so the upstream may see the head; it must never see a complete request.
    data = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk + b"\r\nhello\r\n0\r\n\r\n"
    async with stage() as s:
        async with connect(s.port) as conn:
            await conn.send(data)
            response = await conn.read_response(timeout_s=3)
            closed = await conn.wait_closed(timeout_s=3)
        assert closed in ("eof", "reset")
        if response is not None:
            assert response.status in (400, 413), response
        await s.settle()
        assert s.complete_since(0) == []
        assert all(r.cancelled for r in s.upstream.requests)
        await s.assert_serves()


async def test_obs_fold_is_folded_into_one_clean_value():
    data = (b"GET /api/up/headers HTTP/1.1\r\nHost: gateway.test\r\nX-Folded: one\r\n"
            b" X-Injected: two\r\n\r\n")
    async with stage() as s:
        response, _ = await exchange(s.port, data)
        assert response is not None
        if response.status == 400:
            assert s.upstream.requests == []
        else:
            assert response.status == 200
            (seen,) = s.upstream.requests
            assert seen.header_values("x-folded") == ["one X-Injected: two"]
            assert seen.header("x-injected") is None
        await s.assert_serves()


async def test_bare_lf_line_endings_are_refused_or_reframed():
    data = b"GET /api/up/headers HTTP/1.1\nHost: gateway.test\nX-A: 1\n\n"
    async with stage() as s:
        response, _ = await exchange(s.port, data)
        assert response is not None
        if response.status == 400:
            assert s.upstream.requests == []
        else:
            assert response.status == 200
            (seen,) = s.upstream.requests
            assert seen.target == "/headers" and seen.header("x-a") == "1"
        await s.assert_serves()


async def test_repeated_equal_content_length_is_forwarded_once():
    data = HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"
    async with stage() as s:
        response, _ = await exchange(s.port, data)
        assert response is not None and response.status in (200, 400)
        if response.status == 200:
            (seen,) = s.upstream.requests
            assert seen.header_values("content-length") == ["5"]
            assert seen.body == b"hello"
        else:
            assert s.upstream.requests == []
        await s.assert_serves()


async def test_chunked_client_body_arrives_upstream_with_clean_framing():
    chunks = [b"a" * 10, b"b" * 3000, b"c"]
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    data = HEAD + b"Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n" + body
    async with stage() as s:
        response, _ = await exchange(s.port, data)
        assert response is not None and response.status == 200, response
        (seen,) = s.upstream.requests
        assert seen.body == b"".join(chunks)
        framing = seen.header_values("transfer-encoding") + seen.header_values("content-length")
        assert framing in (["chunked"], [str(len(seen.body))]), seen.headers
        # A pipelined request after a clean body is its own request, not body bytes.
        async with connect(s.port) as conn:
            await conn.send(data + b"GET /api/up/second HTTP/1.1\r\nHost: a\r\n\r\n")
            first = await conn.read_response()
            second = await conn.read_response()
        assert first is not None and first.status == 200
        assert second is not None and second.status == 200
        assert [r.target for r in s.upstream.requests[1:]] == ["/ok", "/second"]
        await s.assert_serves()


async def test_content_length_body_arrives_upstream_exactly():
    async with stage() as s:
        async with connect(s.port) as conn:
            # Sent in pieces, with the next request's bytes right behind the body.
            await conn.send(HEAD + b"Content-Length: 11\r\n\r\nhello")
            await trio.sleep(0.05)
            await conn.send(b" world" + b"GET /api/up/next HTTP/1.1\r\nHost: a\r\n\r\n")
            first = await conn.read_response()
            second = await conn.read_response()
        assert first is not None and first.status == 200
        assert second is not None and second.status == 200
        assert s.upstream.requests[0].body == b"hello world"
        assert s.upstream.requests[0].header_values("content-length") == ["11"]
        assert s.upstream.requests[1].target == "/next"


@pytest.mark.parametrize("settings", [b"AAAA", b"AAMAAABkAAQAAP__X"],
                         ids=["truncated-settings", "bad-base64"])
async def test_an_h2c_upgrade_with_settings_h2_refuses_is_answered_over_http11(settings):
    # It was upgraded (101) and the HTTP/2 side then raised on the settings, which
    # ended the worker and every connection on it.
    async with stage() as s:
        response, _ = await exchange(s.port, b"GET /api/up/ok HTTP/1.1\r\nHost: gateway.test\r\n"
                                     b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                                     b"HTTP2-Settings: " + settings + b"\r\n\r\n")
        assert response is not None and response.status == 200
        await s.assert_serves()
