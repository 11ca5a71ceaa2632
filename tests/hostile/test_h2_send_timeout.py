"""``server.send_timeout`` over HTTP/2: a client that stops taking its answer.

Over HTTP/1.1 a client that stops reading is dropped after send_timeout. Over HTTP/2
the same client stops *granting flow-control window* instead, while it reads its socket
and answers PINGs and SETTINGS as every h2 stack does: the gateway's socket writes never
block, so send_timeout never fired, and the stream held its upstream slot until the
route's deadline.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

from tests.gateway_harness import run_gateway
from tests.upstream import Responder, SeenRequest, start_upstream

POLICY = """
version: 1
server:
  send_timeout: 500ms
upstreams:
  up: {{url: "{url}", limit: {{concurrency: 2, queue: 0}}}}
routes:
  - path: /api/{{rest*}}
    deadline: 30s
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""


async def _shut_window_client(
        port: int, paths: list[str]) -> tuple[trio.SocketStream, h2.connection.H2Connection]:
    """An HTTP/2 client that reads its socket (so the connection stays healthy) but
    never opens any stream's flow-control window."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    conn.initiate_connection()
    for path in paths:
        conn.send_headers(conn.get_next_available_stream_id(),
                          [(":method", "GET"), (":scheme", "http"), (":authority", "t"),
                           (":path", path)], end_stream=True)
    await stream.send_all(conn.data_to_send())
    return stream, conn


async def test_an_http2_client_that_stops_taking_its_answer_is_dropped_after_send_timeout():
    """Two streams whose client never opens their windows held the upstream's two slots
    for the whole 30 s deadline, and every other client of that upstream was shed (503)
    meanwhile. They are reset after send_timeout and their upstream work cancelled."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw:
            stream, conn = await _shut_window_client(
                gw.port, ["/api/endless-body", "/api/endless-body"])

            async def keep_reading() -> None:
                while data := await stream.receive_some(65536):
                    conn.receive_data(data)
                    if out := conn.data_to_send():
                        await stream.send_all(out)

            async with trio.open_nursery() as reading:
                reading.start_soon(keep_reading)
                await upstream.wait_for(lambda: upstream.in_flight >= 2)
                with trio.fail_after(3):  # send_timeout is 500 ms
                    await upstream.wait_cancelled(2)
                async with gw.client() as client:
                    response = await client.get("/api/users/1")
                assert response.status_code == 200, response.text
                reading.cancel_scope.cancel()
            await stream.aclose()
            traces = gw.gateway.runtime.traces
            with trio.fail_after(2):
                while len(dropped := [t for t in traces.query(route="/api/{rest*}")
                                      if t.path == "/api/endless-body"]) < 2:
                    await trio.sleep(0.01)
            for trace in dropped:
                assert trace.cause == "deadline" and trace.root is not None
                assert trace.root.fired_scope == "send_timeout"
        nursery.cancel_scope.cancel()


async def test_an_http2_client_trickling_its_window_is_dropped_after_send_timeout():
    """A client that grants a byte of window every 150 ms (send_timeout is 500 ms) took
    a byte of its answer each time, which counted as progress: the stream held its
    upstream slot for the whole 30 s deadline (or for ever, on a route streaming an
    endless body). As over HTTP/1.1, each 64 KiB piece of an answer must be taken
    within send_timeout: the streams are reset and their upstream work cancelled."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw:
            stream, conn = await _shut_window_client(
                gw.port, ["/api/endless-body", "/api/endless-body"])
            resets: list[int] = []

            async def keep_reading() -> None:
                while data := await stream.receive_some(65536):
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.StreamReset):
                            resets.append(event.stream_id)
                    if out := conn.data_to_send():
                        await stream.send_all(out)

            async def trickle() -> None:
                while True:
                    await trio.sleep(0.15)
                    for sid in (1, 3):
                        if sid in conn.streams and not conn.streams[sid].closed:
                            conn.increment_flow_control_window(1, sid)
                    await stream.send_all(conn.data_to_send())

            async with trio.open_nursery() as reading:
                reading.start_soon(keep_reading)
                reading.start_soon(trickle)
                await upstream.wait_for(lambda: upstream.in_flight >= 2)
                with trio.fail_after(3):  # send_timeout is 500 ms
                    await upstream.wait_cancelled(2)
                assert sorted(resets) == [1, 3]
                async with gw.client() as client:
                    response = await client.get("/api/users/1")
                assert response.status_code == 200, response.text
                reading.cancel_scope.cancel()
            await stream.aclose()
            traces = gw.gateway.runtime.traces
            with trio.fail_after(2):
                while len(dropped := [t for t in traces.query(route="/api/{rest*}")
                                      if t.path == "/api/endless-body"]) < 2:
                    await trio.sleep(0.01)
            for trace in dropped:
                assert (trace.cause, trace.status) == ("deadline", 200)
                assert trace.root is not None and trace.root.fired_scope == "send_timeout"
        nursery.cancel_scope.cancel()


STEADY = """
version: 1
server:
  send_timeout: 500ms
upstreams:
  up: {{url: "{url}"}}
routes:
  - path: /api/big
    deadline: 20s
    fanout:
      calls:
        data: {{upstream: up, path: /big}}
"""

#: The answer's size: about 512 KiB of JSON.
ITEMS = 512


async def _big(request: SeenRequest, respond: Responder) -> None:
    await respond.json({"items": ["x" * 1000] * ITEMS})


async def test_an_http2_client_granting_window_steadily_gets_a_large_answer_whole():
    """A fan-out answer is one body message (512 KiB here): the client grants 32 KiB
    every 100 ms, ten times 64 KiB per 500 ms send_timeout, yet its stream was reset
    after 500 ms. Each piece that goes out gives the stream another send_timeout."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=_big)
        async with run_gateway(STEADY.format(url=upstream.url)) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                                    (":authority", "gw"), (":path", "/api/big")],
                              end_stream=True)
            await stream.send_all(conn.data_to_send())
            status = None
            body = bytearray()
            outcome = None

            async def grant_steadily() -> None:
                while True:
                    await trio.sleep(0.1)
                    conn.increment_flow_control_window(32768)
                    if sid in conn.streams and not conn.streams[sid].closed:
                        conn.increment_flow_control_window(32768, sid)
                    await stream.send_all(conn.data_to_send())

            with trio.fail_after(15):
                async with trio.open_nursery() as granting:
                    granting.start_soon(grant_steadily)
                    while outcome is None:
                        data = await stream.receive_some(65536)
                        assert data, "connection closed"
                        for event in conn.receive_data(data):
                            if isinstance(event, h2.events.ResponseReceived):
                                status = int(dict(event.headers)[b":status"])
                            elif isinstance(event, h2.events.DataReceived):
                                body += event.data  # window given back only by the granter
                            elif isinstance(event, h2.events.StreamEnded):
                                outcome = "ended"
                            elif isinstance(event, h2.events.StreamReset):
                                outcome = f"reset ({event.error_code!r})"
                        if out := conn.data_to_send():
                            await stream.send_all(out)
                    granting.cancel_scope.cancel()
            await stream.aclose()
            assert status == 200
            assert outcome == "ended", (
                f"stream {outcome} after {len(body)} of ~{ITEMS} KiB although the client "
                "granted 32 KiB every 100 ms")
        nursery.cancel_scope.cancel()


async def test_an_http2_client_keeping_the_default_window_steadily_gets_its_answer_whole():
    """A client on a slow link that keeps RFC 9113's default 65,535-byte window (one
    byte short of the 64 KiB piece send_timeout asks for) and grants it again every
    0.3 s takes about 213 KiB/s, steadily above the bar of 64 KiB per 500 ms. The bytes
    past a finished piece were thrown away, so every piece took two grants (0.6 s) and
    the stream was reset partway through its download."""
    size, window, every_s = 512 * 1024, 65535, 0.3
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            assert conn.local_settings.initial_window_size == window
            conn.initiate_connection()
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                                    (":authority", "t"),
                                    (":path", f"/api/download?bytes={size}")],
                              end_stream=True)
            await stream.send_all(conn.data_to_send())
            received = unacked = 0
            reset = None
            ended = False
            next_grant = trio.current_time() + every_s
            with trio.fail_after(20):
                while not ended and reset is None:
                    with trio.move_on_at(next_grant):
                        data = await stream.receive_some(65536)
                        assert data, "connection closed"
                        for event in conn.receive_data(data):
                            if isinstance(event, h2.events.DataReceived):
                                received += len(event.data)
                                unacked += event.flow_controlled_length
                            elif isinstance(event, h2.events.StreamReset):
                                reset = event.error_code
                            elif isinstance(event, h2.events.StreamEnded):
                                ended = True
                        if out := conn.data_to_send():
                            await stream.send_all(out)
                        continue
                    # The link delivers one window's worth each every_s: grant it back.
                    if unacked:
                        conn.acknowledge_received_data(unacked, sid)
                        unacked = 0
                        await stream.send_all(conn.data_to_send())
                    next_grant += every_s
            await stream.aclose()
            assert reset is None, f"stream reset ({reset!r}) after {received} of {size} bytes"
            assert received == size
        nursery.cancel_scope.cancel()
