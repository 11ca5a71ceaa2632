"""One HTTP/2 stream whose head Hypercorn cannot decode fails alone: the connection's
other streams (behind a front proxy, other users' requests) are answered."""

import json

import h2.events
import pytest
import trio

from tests.gateway_harness import run_gateway
from tests.h2client import H2Client
from tests.upstream import proxy_policy, start_upstream


@pytest.mark.parametrize(("method", "path"), [
    (b"GET", b"/api/caf\xc3\xa9"),   # raw UTF-8 in :path (HTTP/1.1: 400)
    (b"G\xc9T", b"/api/users/1"),    # a non-ASCII :method (HTTP/1.1: 400)
])
async def test_a_non_ascii_request_head_fails_its_own_stream_not_the_others(method, path):
    """HTTP/2 allows such bytes (RFC 9113 8.2.1); Hypercorn decodes :method and :path as
    ASCII, and the UnicodeDecodeError ended the connection: another request in flight
    on it got an empty 500, its upstream work was cancelled, no GOAWAY was sent."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            innocent = await client.get("/api/slow?ms=300")
            with trio.fail_after(5):
                await upstream.wait_requests(1)
            bad = client.conn.get_next_available_stream_id()
            client.conn.send_headers(bad, [(b":method", method), (b":path", path),
                                           (b":scheme", b"http"), (b":authority", b"gw")],
                                     end_stream=True)
            await client.flush()
            with trio.fail_after(5):
                status, body = await client.response(bad)
                assert status == 400 and json.loads(body)["cause"] == "bad_request"
                assert (await client.response(innocent))[0] == 200
                # The connection serves on.
                assert await client.response_status(await client.get("/api/users/2")) == 200
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def _closed_within(client: H2Client, seconds: float) -> bool:
    with trio.move_on_after(seconds):
        while True:
            data = await client.stream.receive_some(65536)
            if not data:
                return True
            for event in client.conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    return True
    return False


@pytest.mark.parametrize("headers", [
    [(b":method", b"GET"), (b":path", b"/api/caf\xc3\xa9"), (b":scheme", b"http"),
     (b":authority", b"gw")],
    [(b":method", b"CONNECT"), (b":authority", b"example.com:443")],
], ids=["non_ascii_path", "connect"])
async def test_a_connection_whose_only_stream_was_answered_alone_closes_at_keep_alive_timeout(
        headers):
    """A client that sent one such request and went quiet kept its connection (a
    descriptor, a task) for ever: Hypercorn marked it busy for the stream, which never
    closed through it. A plain GET's connection closes on time (the control)."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url), keep_alive_timeout=0.5) as gw:
            # Control: an ordinary request's connection closes at keep_alive_timeout.
            control = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await control.start()
            with trio.fail_after(5):
                assert await control.response_status(await control.get("/api/ok")) == 200
            assert await _closed_within(control, 3), "control connection stayed open"
            await control.stream.aclose()

            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, headers, end_stream=True)
            await client.flush()
            with trio.fail_after(5):
                status, _ = await client.response(sid)
            assert status in (400, 405)
            closed = await _closed_within(client, 3)
            await client.stream.aclose()
            assert closed, ("the connection was still open 3 s after its only stream was "
                            "answered (keep_alive_timeout 0.5 s)")
        nursery.cancel_scope.cancel()
