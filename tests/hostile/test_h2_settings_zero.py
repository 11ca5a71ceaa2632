"""Past keep_alive_max_requests the gateway sends SETTINGS_MAX_CONCURRENT_STREAMS 0.
h2 enforces an acknowledged limit as a *connection* error: a stream opened after the
client acknowledged it gets the whole connection GOAWAY(PROTOCOL_ERROR), and the long
stream still being answered on it is lost. RFC 9113 5.1.2 asks for a stream error
(PROTOCOL_ERROR or REFUSED_STREAM) there, which is what such a stream got before the
change (REFUSED_STREAM, from ``closing``)."""

from __future__ import annotations

import collections
import contextlib

import h2.errors
import h2.events
import h2.settings
import hypercorn.config
import pytest
import trio

from tests.gateway_harness import run_gateway
from tests.h2client import H2Client
from tests.upstream import proxy_policy, start_upstream


async def test_stream_opened_past_the_settings_is_refused_and_the_long_stream_answered(
        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(hypercorn.config.Config, "keep_alive_max_requests", 2)
    streams = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            long_stream = await client.get("/api/slow?ms=1000")
            for _ in range(2):  # the second crosses the limit
                with trio.fail_after(5):
                    assert await client.response_status(await client.get("/api/ok")) == 200
            with trio.fail_after(2):
                await client.until(
                    lambda e: isinstance(e, h2.events.RemoteSettingsChanged)
                    and streams in e.changed_settings
                    and e.changed_settings[streams].new_value == 0)
            await client.round_trip()  # our ACK of it has been handled
            # A client that does not honour it (one whose request raced the setting):
            client.conn.remote_settings._settings[streams] = collections.deque([100])
            extra = await client.get("/api/ok")
            status = None
            with trio.fail_after(5):
                with contextlib.suppress(AssertionError):  # the connection closed
                    status, _ = await client.response(long_stream)
            goaway = [(e.error_code, e.last_stream_id) for e in client.events
                      if isinstance(e, h2.events.ConnectionTerminated)]
            assert status == 200, f"long stream lost: connection ended by GOAWAY {goaway}"
            refused = [e for e in client.events if isinstance(e, h2.events.StreamReset)
                       and e.stream_id == extra]
            assert refused and refused[0].error_code in (
                h2.errors.ErrorCodes.REFUSED_STREAM, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        nursery.cancel_scope.cancel()
