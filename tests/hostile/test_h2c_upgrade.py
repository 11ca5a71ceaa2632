"""An ``Upgrade: h2c`` request is served as HTTP/2 stream 1 (RFC 7540 3.2), a request
with no body: Hypercorn upgrades only requests without Content-Length or
Transfer-Encoding. The gateway takes an HTTP/2 stream to have a body unless its HEADERS
ended it, and Hypercorn builds stream 1's request event by hand with no END_STREAM: the
upgraded GET was taken to carry a body of unknown length, sent upstream chunked, and,
its body not replayable, never retried."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import trio

from tests.gateway_harness import run_gateway
from tests.upstream import Responder, SeenRequest, start_upstream

POLICY = """
version: 1
upstreams:
  up:
    url: "{url}"
    call:
      retries: {{attempts: 3, on: [503], backoff: 1ms..2ms}}
routes:
  - path: /api/{{rest*}}
    deadline: 5s
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""


async def _upgraded_get(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` as an h2c upgrade (as ``curl --http2`` does over http://)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection()
    await stream.send_all(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gateway.test\r\n"
                          b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                          b"HTTP2-Settings: " + settings + b"\r\n\r\n")
    buffered = b""
    while b"\r\n\r\n" not in buffered:
        data = await stream.receive_some(65536)
        assert data, "the connection closed before the 101"
        buffered += data
    head, _, rest = buffered.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    await stream.send_all(conn.data_to_send())
    status, body, ended = 0, b"", False
    data = rest
    while not ended:
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == 1:
                ended = True
        if out := conn.data_to_send():
            await stream.send_all(out)
        if not ended:
            data = await stream.receive_some(65536)
            assert data, "the connection closed before the answer ended"
    await stream.aclose()
    return status, body


async def test_an_h2c_upgraded_get_is_retried_like_any_get_and_sent_without_a_body():
    answered: dict[str, int] = {}

    async def first_busy(request: SeenRequest, respond: Responder) -> None:
        answered[request.path] = answered.get(request.path, 0) + 1
        if answered[request.path] == 1:
            await respond.json({"busy": True}, status=503)
        else:
            await respond.json({"ok": True})

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=first_busy)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw:
            with trio.fail_after(10):
                status, body = await _upgraded_get(gw.port, "/api/items")
            assert (status, body) == (200, b'{"ok": true}'), (status, body)
            assert upstream.attempts("/items") == 2  # retried after the 503
            for seen in upstream.requests:
                assert seen.header("transfer-encoding") is None, seen.headers
                assert seen.header("content-length") in (None, "0"), seen.headers
        nursery.cancel_scope.cancel()
