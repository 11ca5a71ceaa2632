"""``Expect: 100-continue``: a client is asked for its body only when the gateway is
going to read it, so an upload refused on its head is never sent."""

import h2.events
import pytest
import trio

from tests.h2client import H2Client
from tests.hostile import stage
from tests.hostile.rawclient import connect


def expecting(method: str, target: str, length: int,
              expect: str = "Expect: 100-continue") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: g\r\n{expect}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


async def test_an_upload_refused_on_its_head_is_never_asked_for():
    async with stage() as s:
        before = len(s.upstream.requests)
        for target, length, status in [
            ("/api/up/upload", 10_000_000, 413),  # over max_body (256 KiB) as declared
            ("/nowhere", 1000, 404),
            ("/api/item/7", 1000, 405),  # a GET-only route
        ]:
            async with connect(s.port) as conn:
                await conn.send(expecting("POST", target, length))
                response = await conn.read_response()
                assert response is not None and response.status == status, (target, response)
                # Hypercorn sent "100 Continue" first: the client would upload it all.
                assert response.interim == [], (target, response.interim)
        assert len(s.upstream.requests) == before
        await s.assert_serves()


async def test_an_accepted_upload_is_asked_for_once_and_arrives_whole():
    body = b"0123456789" * 5000
    async with stage() as s, connect(s.port) as conn:
        await conn.send(expecting("POST", "/api/up/upload", len(body)))
        interim = await conn.read_head(timeout_s=5)
        assert interim is not None and interim.status == 100, interim
        await conn.send(body)
        response = await conn.read_response()
        assert response is not None and response.status == 200 and response.interim == []
        assert s.upstream.requests[-1].body == body
        # The connection serves on.
        await conn.send(expecting("PUT", "/api/up/again", 3))
        assert (await conn.read_head()).status == 100
        await conn.send(b"abc")
        response = await conn.read_response()
        assert response is not None and response.status == 200
        assert s.upstream.requests[-1].body == b"abc"


#: Expectations h11 (so Hypercorn) takes as 100-continue: it splits every Expect line on
#: commas and looks for the element, in any case.
LISTED = ["Expect: 100-continue, foo", "Expect: foo, 100-Continue",
          "Expect: foo\r\nExpect: 100-continue"]


@pytest.mark.parametrize("expect", LISTED)
async def test_a_listed_100_continue_is_asked_for_only_when_wanted(expect):
    # Taken by h11 but not by the gateway, Hypercorn sent 100 at once: a refused
    # upload was sent in full.
    body = b"0123456789" * 500
    async with stage() as s:
        async with connect(s.port) as conn:
            await conn.send(expecting("POST", "/api/up/upload", 10_000_000, expect))
            response = await conn.read_response()
            assert response is not None and response.status == 413, response
            assert response.interim == [], response.interim
        async with connect(s.port) as conn:
            await conn.send(expecting("POST", "/api/up/upload", len(body), expect))
            interim = await conn.read_head(timeout_s=5)
            assert interim is not None and interim.status == 100, interim
            await conn.send(body)
            response = await conn.read_response()
            assert response is not None and response.status == 200
            assert response.interim == [], response.interim
            assert s.upstream.requests[-1].body == body


async def test_a_client_that_sends_without_waiting_is_served():
    async with stage() as s, connect(s.port) as conn:
        await conn.send(expecting("POST", "/api/up/upload", 5) + b"hello")
        with trio.fail_after(5):
            response = await conn.read_response()
        assert response is not None and response.status == 200
        assert s.upstream.requests[-1].body == b"hello"


async def test_an_http10_upload_refused_on_its_head_is_read_on_and_not_reset():
    """RFC 9110 10.1.1: a server MUST ignore ``100-continue`` in an HTTP/1.0 request
    (h11 does), and its client sends its body without waiting. The gateway took it as
    a client waiting to be asked: refused on its head (413 on its declared length),
    the connection was closed at once with the body unread instead of closed in
    stages, so the client, still sending, was reset and lost its answer."""
    size, piece = 768 * 1024, 16 * 1024
    async with stage() as s, connect(s.port) as conn:
        await conn.send(b"POST /api/small/ok HTTP/1.0\r\nHost: g\r\n"
                        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % size)
        assert await conn.trickle(b"x" * size, every_s=0.005, size=piece), "the upload was cut"
        response = await conn.read_response()
        assert response is not None and response.status == 413 and response.complete
        assert response.interim == []
        assert await conn.wait_closed(timeout_s=5) == "eof"


async def test_over_http2_the_client_is_asked_when_its_body_is_wanted():
    """Hypercorn never answered the expectation over HTTP/2: a client waited out its own
    timer (a second, for curl) before sending any body."""

    def interim(stream_id: int):
        return lambda e: (isinstance(e, h2.events.InformationalResponseReceived)
                          and e.stream_id == stream_id)

    def post(client: H2Client, path: str, length: int) -> int:
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, [
            (":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "gw"),
            ("expect", "100-continue"), ("content-length", str(length))])
        return stream_id

    async with stage() as s:
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", s.port))
        await client.start()
        refused = post(client, "/nowhere", 1000)
        await client.flush()
        assert await client.response_status(refused) == 404
        accepted = post(client, "/api/up/upload", 5)
        await client.flush()
        with trio.fail_after(5):
            asked = await client.until(interim(accepted))
        assert dict(asked.headers)[b":status"] == b"100"
        client.conn.send_data(accepted, b"hello", end_stream=True)
        await client.flush()
        status, _ = await client.response(accepted)
        assert status == 200 and s.upstream.requests[-1].body == b"hello"
        assert not any(interim(refused)(event) for event in client.events)
        await client.stream.aclose()


async def test_an_upload_refused_by_the_admin_listener_is_never_asked_for():
    # README: "A client that uploads with Expect: 100-continue is asked for its body
    # only when the gateway reads it, so an upload refused on its head (413, 404, 405,
    # 503) is never sent." On the admin bind the 100 is tied to the admin app's first
    # ``receive`` (continue_on_first_receive), but Quart starts reading the body as
    # soon as the request arrives, before routing: a 100 MB upload (over max_body) to
    # a path the admin does not serve is asked for, then refused with 404.
    head = (b"POST /nowhere HTTP/1.1\r\nHost: g\r\nExpect: 100-continue\r\n"
            b"Content-Length: 100000000\r\n\r\n")
    with trio.fail_after(20):
        async with stage() as s:
            for _ in range(3):
                async with connect(s.gw.admin_port) as conn:
                    await conn.send(head)
                    response = await conn.read_response()
                    assert response is not None and response.status in (404, 405, 413)
                    assert response.interim == [], response.interim
