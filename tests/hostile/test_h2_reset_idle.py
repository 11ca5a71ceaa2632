"""An HTTP/2 connection whose streams all ended by a reset (the client's RST_STREAM, or
the gateway's own CANCEL at send_timeout) never became idle again: Hypercorn sends
``Updated(idle=True)`` only from the app's own ``StreamClosed``, which a stream already
closed by the reset never sends. The connection then escapes keep_alive_timeout, the
descriptor reserve's ``make_room`` (it never looks idle), and the close promised at
keep_alive_max_requests."""

from __future__ import annotations

import h2.events
import hypercorn.config
import pytest
import trio

from gateway._connections import CONNECTIONS
from tests.gateway_harness import run_gateway
from tests.h2client import H2Client
from tests.upstream import proxy_policy, start_upstream


async def _closed_within(client: H2Client, seconds: float) -> bool:
    """Read frames for ``seconds``; True when the gateway closed the connection."""
    with trio.move_on_after(seconds):
        while True:
            try:
                data = await client.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return True
            if not data:
                return True
            client.events.extend(client.conn.receive_data(data))
            await client.flush()
    return False


def _server_of(port: int):
    """The gateway's TCPServer of the (only) client connection on ``port``."""
    found = [s for s in CONNECTIONS._live
             if s.stream.socket.getpeername()[1] == port]
    assert len(found) == 1, found
    return found[0]


async def test_h2_connection_whose_stream_was_reset_by_its_client_times_out_when_idle():
    """A client opens a stream to a slow route and resets it. Nothing is in flight, yet
    the connection is never closed by keep_alive_timeout (1 s here) and never counted
    idle by the descriptor reserve: a client can hold descriptors for ever this way,
    where one that opened no stream is closed after 1 s."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url), keep_alive_timeout=1.0) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            stream_id = await client.get("/api/slow?ms=5000")
            with trio.fail_after(5):
                await upstream.wait_for(lambda: upstream.in_flight >= 1)
            await client.reset(stream_id)
            with trio.fail_after(5):
                await upstream.wait_cancelled()  # the request's work is over
            await client.round_trip()
            server = _server_of(client.stream.socket.getsockname()[1])
            idle_seen = server.idle_task.idle
            closed = await _closed_within(client, 3)
            assert idle_seen and closed, (
                f"idle as the reserve sees it: {idle_seen}; closed by keep_alive_timeout "
                f"(1 s) within 3 s: {closed}")
        nursery.cancel_scope.cancel()


async def test_h2_connection_past_max_requests_closes_when_its_last_stream_is_reset(
        monkeypatch: pytest.MonkeyPatch):
    """Past keep_alive_max_requests the connection is to close once no stream is left
    (README). When the client resets its last (long) stream instead of waiting for it,
    no GOAWAY comes and the connection stays open, refusing every stream, for good."""
    monkeypatch.setattr(hypercorn.config.Config, "keep_alive_max_requests", 2)
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url), keep_alive_timeout=30.0) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            long_stream = await client.get("/api/slow?ms=10000")
            for _ in range(2):  # the second of these crosses the limit
                with trio.fail_after(5):
                    assert await client.response_status(await client.get("/api/ok")) == 200
            with trio.fail_after(5):
                await upstream.wait_for(lambda: upstream.in_flight >= 1)
            await client.round_trip()
            await trio.sleep(0.2)  # the answered streams' ends are handled first
            await client.reset(long_stream)
            closed = await _closed_within(client, 3)
            goaway = any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
            assert goaway and closed, f"GOAWAY: {goaway}, closed: {closed}"
        nursery.cancel_scope.cancel()



async def test_h2_connection_whose_stream_was_dropped_at_send_timeout_times_out_when_idle():
    """The gateway's own reset (CANCEL after send_timeout, 500 ms here) leaves the
    connection the same way: its stream is gone, its upstream work cancelled, yet the
    connection never counts as idle and keep_alive_timeout (1 s) never closes it."""
    from tests.hostile.test_h2_send_timeout import POLICY, _shut_window_client
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url), keep_alive_timeout=1.0) as gw:
            stream, conn = await _shut_window_client(gw.port, ["/api/endless-body"])
            closed = trio.Event()

            async def keep_reading() -> None:
                try:
                    while data := await stream.receive_some(65536):
                        conn.receive_data(data)
                        if out := conn.data_to_send():
                            await stream.send_all(out)
                except trio.BrokenResourceError:
                    pass
                closed.set()

            async with trio.open_nursery() as reading:
                reading.start_soon(keep_reading)
                with trio.fail_after(5):
                    await upstream.wait_cancelled(1)  # dropped at send_timeout
                server = _server_of(stream.socket.getsockname()[1])
                with trio.move_on_after(3):
                    await closed.wait()
                idle_seen = server.idle_task.idle
                reading.cancel_scope.cancel()
            await stream.aclose()
            assert closed.is_set(), (
                f"not closed 3 s after its only stream was dropped (keep_alive_timeout "
                f"1 s); idle as the reserve sees it: {idle_seen}")
        nursery.cancel_scope.cancel()
