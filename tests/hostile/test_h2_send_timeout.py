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
import h2.settings
import trio

from tests.gateway_harness import run_gateway
from tests.upstream import start_upstream

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
