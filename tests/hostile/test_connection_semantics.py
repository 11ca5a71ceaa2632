"""HTTP/1.x connection semantics of the public listener, with exact bytes.

What a client of the gateway gets on one connection; nginx and Envoy are
the bar (RFC 9112 sections are cited where they decide).
"""

from functools import partial

import pytest
import trio

from tests.hostile import POLICY, closed_port, stage
from tests.hostile.rawclient import (
    RawConnection,
    RawResponse,
    connect,
    exchange,
    request_bytes,
)

OK = request_bytes("GET", "/api/up/ok")


@pytest.mark.parametrize("request_head", [
    request_bytes("GET", "/api/up/ok", [("Connection", "close")]),
    request_bytes("GET", "/api/up/ok", version=b"HTTP/1.0"),
    request_bytes("POST", "/api/up/ok", [("Content-Length", "2")], b"{}", version=b"HTTP/1.0"),
], ids=["http11-connection-close", "http10-get", "http10-post"])
async def test_a_last_request_is_answered_even_when_bytes_follow_it(request_head):
    """A request that ends the connection (``Connection: close``, or HTTP/1.0) followed
    by a stray CRLF -- legacy clients append one after a POST body -- gets a 400 "the
    request is not valid HTTP/1.1" in place of its answer, and is never sent upstream.
    RFC 9112 9.6: the server answers that request, then closes, and processes nothing
    after it (nginx and Envoy do)."""
    async with stage() as s:
        response, closed = await exchange(s.port, request_head + b"\r\n")
        assert response is not None
        assert response.status == 200, (response.status, response.body)
        assert closed == "eof"
        assert len(s.upstream.requests) == 1


async def test_bytes_after_a_connection_close_request_do_not_cancel_its_answer():
    """A ``Connection: close`` request whose upstream is slow: a CRLF (or a pipelined
    request, which RFC 9112 9.6 says the server must simply not process) arriving
    while it waits makes the gateway answer 400 at once and cancel the upstream call."""
    async with stage() as s:
        async with connect(s.port) as conn:
            await conn.send(request_bytes("GET", "/api/up/slow?ms=300",
                                          [("Connection", "close")]))
            with trio.fail_after(5):
                await s.upstream.wait_requests(1)
            await conn.send(request_bytes("GET", "/api/up/ok"))
            response = await conn.read_response(timeout_s=5)
            assert response is not None
            assert response.status == 200, (response.status, response.body)
            assert b"slept_ms" in response.body
            assert await conn.wait_closed() == "eof"
        assert s.upstream.cancelled == []


async def test_an_empty_line_before_a_request_line_is_ignored():
    """RFC 9112 2.2: a server SHOULD ignore at least one empty line received before the
    request-line (nginx and Envoy skip them). The gateway answers 400 and closes."""
    async with stage() as s:
        response, closed = await exchange(s.port, b"\r\n" + OK)
        assert response is not None
        assert response.status == 200, (response.status, response.body)
        assert closed is None


async def test_a_crlf_after_a_keep_alive_post_body_does_not_poison_the_next_request():
    """A client that ends its POST body with an extra CRLF (as old user agents do) gets
    its 200, but the gateway then parses the CRLF as the next request, sends an
    unsolicited 400 and closes: the client's next request on that keep-alive
    connection reads that 400 (or finds the connection gone)."""
    async with stage() as s:
        async with connect(s.port) as conn:
            await conn.send(request_bytes("POST", "/api/up/ok", [("Content-Length", "2")],
                                          b"{}") + b"\r\n")
            first = await conn.read_response()
            assert first is not None and first.status == 200
            await trio.sleep(0.1)  # a client's think time before its next request
            sent = await conn.try_send(OK)
            second = await conn.read_response()
            assert sent and second is not None, "the keep-alive connection was dropped"
            assert second.status == 200, (second.status, second.body)


@pytest.mark.parametrize(("target", "status"), [("/nope", 404), ("/api/item/1", 405)])
async def test_an_error_sent_before_the_body_arrived_keeps_the_connection_or_says_close(
        target, status):
    """A POST whose head and body go out in two writes (Node, Go and Java clients
    stream bodies that way) to a path with no route gets its 404 (405) before the body
    arrives. The gateway then closes the connection without having said
    ``Connection: close``, so the client's next request on it fails. nginx reads and
    discards the body and keeps the connection; Envoy says ``Connection: close``."""
    async with stage() as s:
        async with connect(s.port) as conn:
            await conn.send(f"POST {target} HTTP/1.1\r\nHost: g\r\n"
                            "Content-Length: 5\r\n\r\n".encode())
            response = await conn.read_response()
            assert response is not None and response.status == status
            if response.closes:
                return  # announced: the client opens a new connection
            await trio.sleep(0.1)
            assert await conn.try_send(b"hello"), "connection dropped without Connection: close"
            assert await conn.try_send(OK), "connection dropped without Connection: close"
            following = await conn.read_response()
            assert following is not None, "connection dropped without Connection: close"
            assert following.status == 200


@pytest.mark.parametrize("host", [b"evil.example/login?next=x", b"a b.example", b"x<y>.example"])
async def test_an_invalid_host_is_400_and_not_forwarded(host):
    """RFC 9112 3.2: a request whose Host is not a valid uri-host[:port] MUST be
    answered 400 (nginx refuses '/' and spaces; Envoy validates the authority). The
    gateway serves it and hands the value to the upstream as X-Forwarded-Host, where
    frameworks build absolute URLs (redirects, password-reset links) from it."""
    async with stage() as s:
        response, _ = await exchange(s.port, b"GET /api/up/headers HTTP/1.1\r\nHost: "
                                     + host + b"\r\n\r\n")
        assert response is not None
        assert response.status == 400, (
            response.status, [r.header_values("x-forwarded-host") for r in s.upstream.requests])
        assert s.upstream.requests == []


async def test_absolute_form_authority_that_is_no_host_is_refused():
    """An absolute-form target's authority stands instead of Host (RFC 9112 3.2.2) and is
    forwarded as X-Forwarded-Host: ``GET http://evil.example"><script>/api/up/ok`` got
    a 200, and the upstream built its links from that."""
    async with stage() as s:
        before = len(s.upstream.requests)
        raw = (b'GET http://evil.example"><script>/api/up/ok HTTP/1.1\r\n'
               b"Host: gateway.test\r\n\r\n")
        response, _ = await exchange(s.port, raw)
        assert response is not None
        forwarded = (dict(s.upstream.requests[-1].headers).get("x-forwarded-host")
                     if len(s.upstream.requests) > before else None)
        assert response.status == 400, (response.status, forwarded)
        assert len(s.upstream.requests) == before


async def test_host_with_an_ipv6_zone_id_is_served():
    """RFC 6874 allows a zone id in an IPv6 literal (``[fe80::1%25eth0]``)."""
    async with stage() as s:
        response, _ = await exchange(
            s.port, request_bytes("GET", "/api/up/ok", host=b"[fe80::1%25eth0]:8080"))
        assert response is not None and response.status == 200, response


@pytest.mark.parametrize("target", [
    b"http://gateway.test#@evil.example/api/up/headers",
    b"HTTP://gateway.test#@evil.example/api/up/headers",
])
async def test_an_absolute_form_target_cannot_smuggle_a_forwarded_host_past_the_check(target):
    """The check cut the authority at '#' and saw 'gateway.test'; the forwarding cut it at
    '/' and '?' and kept what followed the last '@': X-Forwarded-Host: evil.example."""
    async with stage() as s:
        before = len(s.upstream.requests)
        raw = b"GET " + target + b" HTTP/1.1\r\nHost: gateway.test\r\n\r\n"
        response, _ = await exchange(s.port, raw)
        assert response is not None
        forwarded = [r.header_values("x-forwarded-host") for r in s.upstream.requests[before:]]
        assert response.status == 400, (response.status, forwarded)
        assert forwarded == []


SHED = "  max_inflight: 1\n"


async def _shed_while(s, conn_action):
    """Run ``conn_action`` while the worker's one request slot is held, so that what it
    sends is shed at the door (503)."""
    async with connect(s.port) as hold:
        await hold.send(request_bytes("GET", "/api/long/stall"))
        with trio.fail_after(5):
            await s.upstream.wait_requests(1)
        await conn_action()


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("refusal", ["no_route", "shed"])
async def test_a_small_body_left_unread_by_an_early_answer_is_discarded(refusal, framing):
    """A small POST answered before its body arrived (a 404, a 503 shed at the door) kept
    the connection only to close it after the answer, saying ``Connection: close``:
    under overload every shed POST cost its client a new connection, and the worker an
    accept. As nginx does (it discards a request body it does not read), the rest of a
    small body is read and dropped and the connection carries the next request. A
    chunked body's size is not known when the answer goes out: that answer says close,
    and the connection closes cleanly once the body is read."""
    server = SHED if refusal == "shed" else ""
    target = "/nope" if refusal == "no_route" else "/api/up/ok"
    status = 404 if refusal == "no_route" else 503
    chunked = framing == "chunked"
    if chunked:
        head, rest = [("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n0\r\n\r\n"
    else:
        head, rest = [("Content-Length", "5")], b"hello"
    async with stage(server=server) as s, connect(s.port) as conn:
        answers = []

        async def refused_then_next() -> None:
            await conn.send(request_bytes("POST", target, head))
            answers.append(await conn.read_response())
            await trio.sleep(0.05)  # the body follows the answer, as a streaming client's
            if chunked:
                await conn.send(rest)
                answers.append(await conn.wait_closed())
                return
            await conn.send(rest + request_bytes("GET", "/nope/either"))
            answers.append(await conn.read_response())

        if refusal == "shed":
            await _shed_while(s, refused_then_next)
        else:
            await refused_then_next()
        first, following = answers
        assert first is not None and first.status == status and first.complete
        if chunked:
            assert first.closes, first.raw_head
            assert following == "eof"
            return
        assert not first.closes, first.raw_head
        assert following is not None, "the connection was closed after the early answer"
        assert following.status == status and following.complete  # shed too, or no route


async def test_a_large_body_left_unread_by_an_early_answer_still_closes():
    """More than a small rest unread (here 10 MB announced): the answer says
    ``Connection: close`` and the connection closes after it."""
    async with stage() as s, connect(s.port) as conn:
        await conn.send(request_bytes("POST", "/nope", [("Content-Length", "10000000")]))
        response = await conn.read_response()
        assert response is not None and response.status == 404 and response.complete
        assert response.closes
        assert await conn.wait_closed(timeout_s=5) in ("eof", "reset")


async def test_an_upload_refused_on_its_head_is_not_reset_while_it_is_sent():
    """A 413 answered on a declared length while the client sends its 768 KB body at a
    steady pace, reading only once it has sent it all (as simple synchronous clients
    do): the gateway closed at once with the body unread, the kernel reset the
    connection, and the client's send failed before it could read the answer (RFC 9112
    9.6: a server closes in stages, reading on for a while, as nginx's lingering_close
    does)."""
    size, piece = 768 * 1024, 16 * 1024
    async with stage() as s, connect(s.port) as conn:
        await conn.send(request_bytes("POST", "/api/small/ok", [("Content-Length", str(size))]))
        assert await conn.trickle(b"x" * size, every_s=0.005, size=piece), "the upload was cut"
        response = await conn.read_response()
        assert response is not None and response.status == 413 and response.complete
        assert b'"cause":"bad_request"' in response.body
        assert await conn.wait_closed(timeout_s=5) == "eof"


async def test_a_client_uploading_on_after_an_early_answer_is_closed_soon():
    """The lingering read is bounded: a client that goes on sending an endless body
    after its 413 is closed within seconds, not held open for as long as it sends."""
    async with stage() as s, connect(s.port) as conn:
        await conn.send(request_bytes("POST", "/api/small/ok",
                                      [("Transfer-Encoding", "chunked")]))

        async def pump() -> None:
            while await conn.try_send(b"4000\r\n" + b"z" * 0x4000 + b"\r\n"):
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            response = await conn.read_response()
            assert response is not None and response.status == 413 and response.complete
            with trio.fail_after(5):
                while not conn.eof:
                    await conn.wait_closed(timeout_s=5)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("refusal", ["no_route", "shed"])
async def test_a_chunked_body_left_unread_by_an_early_answer_does_not_mislead(refusal):
    """A chunked POST answered before its body arrived (a 404, a 503 shed at the door)
    whose body turns out larger than the small rest the gateway reads and drops: its
    size cannot be known from the head, yet the answer said nothing of a close and the
    connection was reset 64 KiB into the body, so a client reusing it (the answer
    allowed that) lost its next request. An answer that keeps the connection must keep
    it; one that will not must say ``Connection: close`` (Envoy does, for any answer
    given before its request was read)."""
    server = SHED if refusal == "shed" else ""
    target = "/nope" if refusal == "no_route" else "/api/up/ok"
    chunk = b"4000\r\n" + b"z" * 0x4000 + b"\r\n"  # 16 KiB
    async with stage(server=server) as s, connect(s.port) as conn:
        answers = []

        async def refused_then_next() -> None:
            await conn.send(request_bytes("POST", target, [("Transfer-Encoding", "chunked")]))
            answers.append(await conn.read_response())
            if answers[0] is None or answers[0].closes:
                return
            for _ in range(12):  # 192 KiB
                assert await conn.try_send(chunk), "reset without Connection: close"
            assert await conn.try_send(b"0\r\n\r\n" + request_bytes("GET", "/nope/either"))
            answers.append(await conn.read_response())

        if refusal == "shed":
            await _shed_while(s, refused_then_next)
        else:
            await refused_then_next()
        first = answers[0]
        assert first is not None and first.status in (404, 503) and first.complete
        if first.closes:
            assert await conn.wait_closed(timeout_s=5) == "eof"
        else:
            following = answers[1]
            assert following is not None, "closed without Connection: close"
            assert following.status == first.status and following.complete


async def test_an_upstream_answer_to_an_unread_upload_says_whether_it_closes():
    """An upstream refusing a large upload on its head (a 401): the gateway relays the
    answer, then reads the rest of the body for a while and closes. The answer must
    say ``Connection: close``, or the client takes the connection for reusable."""

    async def refuse_unread(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\nno way")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, refuse_unread, 0,
                                                host="127.0.0.1"))
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        policy = POLICY.format(url=url, dead_port=closed_port(), extra="").replace(
            "max_body: 256KiB", "max_body: 64MiB")
        async with stage(policy) as s, connect(s.port) as conn:
            await conn.send(request_bytes("POST", "/api/long/upload",
                                          [("Content-Length", str(10_000_000))]) + b"x" * 1000)
            response = await conn.read_response(timeout_s=10)
            assert response is not None and response.status == 401 and response.complete
            assert response.closes, response.raw_head
        nursery.cancel_scope.cancel()



def _with_limits(limits: str) -> str:
    """The hostile policy with ``limits`` (YAML lines) added to ``server.limits``; its
    upstream is never called (the requests here go to no route)."""
    policy = POLICY.format(url=f"http://127.0.0.1:{closed_port()}", dead_port=closed_port(),
                           extra="")
    return policy.replace("  limits:\n", "  limits:\n" + limits, 1)


async def _small_post_refused(conn: RawConnection) -> tuple[RawResponse | None, object]:
    """A POST of 5 bytes to no route, its body sent after its 404 (as a streaming client
    sends it), then a GET: the 404, and what follows it (the GET's answer, or how the
    connection ended)."""
    await conn.send(request_bytes("POST", "/nope", [("Content-Length", "5")]))
    first = await conn.read_response()
    await conn.send(b"hello")
    if first is None or first.closes:
        return first, await conn.wait_closed(timeout_s=5)
    await conn.send(request_bytes("GET", "/nope/either"))
    return first, await conn.read_response()


async def test_discard_body_sets_the_rest_read_and_dropped_to_keep_the_connection():
    """``server.limits.discard_body: 0``: no unread rest is read to keep its connection,
    so the 404 that keeps it by default (a 5-byte rest) says ``Connection: close``, and
    the connection closes cleanly once the body is read."""
    async with stage(_with_limits("")) as s, connect(s.port) as conn:
        first, following = await _small_post_refused(conn)
        assert first is not None and first.status == 404 and not first.closes
        assert isinstance(following, RawResponse) and following.status == 404
    async with stage(_with_limits("    discard_body: 0\n")) as s, connect(s.port) as conn:
        first, following = await _small_post_refused(conn)
        assert first is not None and first.status == 404 and first.complete
        assert first.closes, first.raw_head
        assert following == "eof"


@pytest.mark.parametrize("lingering", ["default", "64KiB"])
async def test_lingering_bytes_bounds_what_is_read_after_an_early_answer(lingering):
    """After a 404 to a 10 MB upload (it closes), the gateway reads on and drops what
    the client sends, at most ``server.limits.lingering_bytes`` (1 MiB by default): past
    64 KiB it closes when that is the setting (the client's sends then fail), and reads
    on otherwise."""
    limits = "" if lingering == "default" else f"    lingering_bytes: {lingering}\n"
    piece, size = b"x" * (16 * 1024), 512 * 1024
    async with stage(_with_limits(limits)) as s, connect(s.port) as conn:
        await conn.send(request_bytes("POST", "/nope", [("Content-Length", "10000000")]))
        response = await conn.read_response()
        assert response is not None and response.status == 404 and response.closes
        sent = 0
        with trio.move_on_after(1):  # well within lingering_time
            while sent < size and await conn.try_send(piece):
                sent += len(piece)
                await trio.sleep(0.005)
        if lingering == "default":
            assert sent == size  # read and dropped, all of it
        else:
            assert 64 * 1024 <= sent < size, sent


@pytest.mark.parametrize("lingering", ["default", "100ms"])
async def test_lingering_time_bounds_how_long_an_unread_rest_is_waited_for(lingering):
    """A 404 that keeps its connection for a 5-byte rest the client never sends: the
    connection is closed ``server.limits.lingering_time`` (2 s by default) after the
    answer."""
    limits = "" if lingering == "default" else f"    lingering_time: {lingering}\n"
    async with stage(_with_limits(limits)) as s, connect(s.port) as conn:
        await conn.send(request_bytes("POST", "/nope", [("Content-Length", "5")]))
        response = await conn.read_response()
        assert response is not None and response.status == 404 and not response.closes
        ending = await conn.wait_closed(timeout_s=1)
        assert (ending is None) == (lingering == "default"), ending


async def test_a_reload_changes_what_an_unread_rest_does(tmp_path):
    """``discard_body``, ``lingering_bytes`` and ``lingering_time`` apply on a reload,
    without a restart: the same small POST keeps its connection, then closes it."""
    path = tmp_path / "policy.yaml"
    async with stage(_with_limits(""), policy_path=path) as s:
        async with connect(s.port) as conn:
            first, _ = await _small_post_refused(conn)
            assert first is not None and not first.closes
        path.write_text(_with_limits("    discard_body: 0\n    lingering_bytes: 0\n"))
        assert await s.gw.gateway.reload()
        async with connect(s.port) as conn:
            first, following = await _small_post_refused(conn)
            assert first is not None and first.status == 404 and first.closes
            assert following in ("eof", "reset")
        path.write_text(_with_limits(""))
        assert await s.gw.gateway.reload()
        async with connect(s.port) as conn:
            first, following = await _small_post_refused(conn)
            assert first is not None and not first.closes
            assert isinstance(following, RawResponse) and following.status == 404
