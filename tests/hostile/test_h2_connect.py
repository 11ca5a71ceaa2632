"""CONNECT: the gateway opens no tunnels, and says so alike over HTTP/2 and HTTP/1.1.

A plain HTTP/2 CONNECT (RFC 9113 8.5: ``:method CONNECT`` and ``:authority``, no
``:path`` nor ``:scheme``) is a well-formed request h2 accepts. Hypercorn's
``H2Protocol._create_stream`` reads ``:path`` into a local that a CONNECT never sets:
``UnboundLocalError`` ended the whole connection, and every other stream on it was
answered with Hypercorn's empty 500."""

from __future__ import annotations

import json

import h2.events
import trio

from tests.gateway_harness import run_gateway
from tests.h2client import H2Client
from tests.hostile.rawclient import exchange
from tests.upstream import proxy_policy, start_upstream


async def test_a_plain_connect_is_refused_alone_and_the_other_streams_are_answered() -> None:
    """Behind a front proxy that carries many clients on one HTTP/2 connection, one
    client's CONNECT turned a healthy GET in flight on it into an empty 500 and cancelled
    its upstream work. The CONNECT alone is refused (405, JSON); the GET gets its 200."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            in_flight = await client.get("/api/slow?ms=300")
            await upstream.wait_for(lambda: upstream.in_flight >= 1)
            connect = client.conn.get_next_available_stream_id()
            client.conn.send_headers(connect, [(":method", "CONNECT"),
                                               (":authority", "example.com:443")],
                                     end_stream=True)
            await client.flush()
            with trio.fail_after(5):
                status, body = await client.response(connect)
            assert status == 405 and json.loads(body)["cause"] == "method_not_allowed"
            with trio.fail_after(5):
                status, body = await client.response(in_flight)
            assert status == 200, f"the GET in flight was answered {status}"
            assert b'"path": "/slow"' in body, body
            assert not any(isinstance(e, h2.events.ConnectionTerminated)
                           for e in client.events)
            with trio.fail_after(5):
                assert await client.response_status(await client.get("/api/ok")) == 200
        nursery.cancel_scope.cancel()


async def test_an_http11_connect_is_refused_as_over_http2() -> None:
    """An HTTP/1.1 CONNECT (RFC 9110 9.3.6, an authority for its target) was told its
    path must start with '/': a 400 that blames the client's syntax. It is refused as
    over HTTP/2: 405, the methods the gateway serves in Allow."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            response, _ = await exchange(
                gw.port, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            assert response is not None
            assert response.status == 405, response.body
            assert json.loads(response.body)["cause"] == "method_not_allowed"
            assert response.header("allow") == b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
            assert upstream.requests == []
        nursery.cancel_scope.cancel()
