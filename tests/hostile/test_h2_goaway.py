"""HTTP/2 GOAWAY handling: a GOAWAY, whoever sends it, must not swallow the answers of
streams already being served.

h2's connection state machine goes to CLOSED both when it *sends* a GOAWAY
(``close_connection``) and when it *receives* one; from then on every HEADERS or DATA
the gateway writes raises inside h2 and is dropped silently by Hypercorn's
``stream_send``.
"""

from __future__ import annotations

import h2.events
import h2.settings
import hypercorn.config
import pytest
import trio
from hyperframe.frame import GoAwayFrame

from tests.gateway_harness import run_gateway
from tests.h2client import H2Client
from tests.upstream import proxy_policy, start_upstream


async def _events_until_quiet(client: H2Client, seconds: float) -> bool:
    """Read frames for ``seconds``; True when the gateway closed the connection."""
    with trio.move_on_after(seconds):
        while True:
            data = await client.stream.receive_some(65536)
            if not data:
                return True
            client.events.extend(client.conn.receive_data(data))
            await client.flush()
    return False


def _answered(client: H2Client, stream_id: int) -> bool:
    return any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream_id
               for e in client.events)


def _reset(client: H2Client, stream_id: int) -> bool:
    return any(isinstance(e, h2.events.StreamReset) and e.stream_id == stream_id
               for e in client.events)


async def test_streams_in_flight_when_keep_alive_max_requests_is_reached_are_answered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Hypercorn ended an HTTP/2 connection at ``keep_alive_max_requests`` (1,000 by
    default) with h2's ``close_connection()``: a GOAWAY(NO_ERROR) whose last-stream-id
    included the request that crossed the limit and every stream in flight, promising
    they may be processed, while closing h2's state machine, so that none of those
    answers could be written. The client (an Envoy, a gRPC or Go client keeping one
    connection for thousands of requests) got neither answer nor reset, while the
    upstream did the work. Every stream the GOAWAY names is answered now."""
    monkeypatch.setattr(hypercorn.config.Config, "keep_alive_max_requests", 3)
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            in_flight = await client.get("/api/slow?ms=300")
            for _ in range(2):
                with trio.fail_after(5):
                    assert await client.response_status(await client.get("/api/ok")) == 200
            last = await client.get("/api/ok")  # the 4th stream: over the limit of 3
            closed = await _events_until_quiet(client, 3)
            goaway = [e for e in client.events
                      if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaway, "no GOAWAY at keep_alive_max_requests"
            promised = goaway[0].last_stream_id
            assert promised >= last
            with trio.fail_after(5):
                await upstream.wait_for(lambda: sum(
                    r.status == 200 for r in upstream.requests) == 4)
            for stream_id in (in_flight, last):
                assert _answered(client, stream_id), (
                    f"stream {stream_id} (<= last-stream-id {promised}) was not answered")
            assert closed  # once its last stream is answered, the connection ends
        nursery.cancel_scope.cancel()


async def test_a_client_s_graceful_goaway_lets_its_streams_in_flight_finish() -> None:
    """A client that sends GOAWAY(NO_ERROR) says it will open no new stream; RFC 9113
    6.8 lets the streams it already opened complete (Node's ``session.close()`` does
    exactly this). The gateway closed the connection at once: the request in flight was
    cancelled (499) and its answer never sent. It is delivered now."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            stream_id = await client.get("/api/slow?ms=300")
            await upstream.wait_for(lambda: upstream.in_flight >= 1)
            # Written raw, so that this test's h2 stays open to read the answer (h2
            # closes its own state machine on sending a GOAWAY, as on receiving one).
            goaway = GoAwayFrame(stream_id=0)
            goaway.last_stream_id = 0  # no push streams to keep
            goaway.error_code = 0
            await client.stream.send_all(goaway.serialize())
            closed = await _events_until_quiet(client, 3)
            assert _answered(client, stream_id), (
                "the stream in flight was dropped after the client's graceful GOAWAY; "
                f"upstream saw {[(r.target, r.status) for r in upstream.requests]}")
            assert not upstream.cancelled
            assert closed  # and the connection ends once it is answered
        nursery.cancel_scope.cancel()


async def test_past_keep_alive_max_requests_a_client_with_a_long_stream_is_told_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``keep_alive_max_requests`` the connection refuses new streams; a client
    holding one long stream open (a download, a long poll) was not told to move on, so
    every request it sent meanwhile was refused for as long as that stream lasted. It is
    told at once (SETTINGS_MAX_CONCURRENT_STREAMS 0: open no stream here, without the
    GOAWAY that makes h2-based clients fail their open streams); its long stream is
    answered, then the connection says GOAWAY and closes."""
    monkeypatch.setattr(hypercorn.config.Config, "keep_alive_max_requests", 3)
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            long_stream = await client.get("/api/slow?ms=1500")
            for _ in range(3):  # the third of these crosses the limit
                with trio.fail_after(5):
                    assert await client.response_status(await client.get("/api/ok")) == 200
            with trio.fail_after(1):  # well before the long stream ends
                streams = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
                await client.until(
                    lambda e: isinstance(e, h2.events.RemoteSettingsChanged)
                    and streams in e.changed_settings
                    and e.changed_settings[streams].new_value == 0)
            assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
            closed = await _events_until_quiet(client, 3)
            assert _answered(client, long_stream) and closed
            assert any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
        nursery.cancel_scope.cancel()
