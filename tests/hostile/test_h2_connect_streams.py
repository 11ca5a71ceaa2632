"""A plain HTTP/2 CONNECT is answered 405 before Hypercorn's ``_create_stream`` runs.
It was recorded as opened by the rapid-reset bookkeeping but never forgotten, and never
counted against ``keep_alive_max_requests``: one connection could open CONNECT streams
without end, each leaving an entry behind for the connection's life."""

from __future__ import annotations

import gc

import h2.events
import hypercorn.config
import pytest
import trio
from hypercorn.protocol.h2 import H2Protocol

from tests.gateway_harness import run_gateway
from tests.h2client import H2Client
from tests.upstream import proxy_policy, start_upstream

CONNECTS = 300


def _open_stream_records() -> int:
    return max((len(obj.premature_resets.opened_at) for obj in gc.get_objects()
                if isinstance(obj, H2Protocol) and "premature_resets" in obj.__dict__),
               default=0)


async def test_answered_connect_streams_leave_no_state_and_count_as_requests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn.config.Config, "keep_alive_max_requests", 100)
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            answered = 0
            with trio.fail_after(20):
                for _ in range(CONNECTS // 50):
                    ids = []
                    for _ in range(50):
                        sid = client.conn.get_next_available_stream_id()
                        client.conn.send_headers(sid, [(":method", "CONNECT"),
                                                       (":authority", "example.com:443")],
                                                 end_stream=True)
                        ids.append(sid)
                    await client.flush()
                    for sid in ids:
                        event = await client.until(
                            lambda e, s=sid: (getattr(e, "stream_id", None) == s
                            and isinstance(e, h2.events.StreamEnded | h2.events.StreamReset))
                            or isinstance(e, h2.events.ConnectionTerminated))
                        if isinstance(event, h2.events.ConnectionTerminated):
                            break
                        answered += 1
                    if any(isinstance(e, h2.events.ConnectionTerminated)
                           for e in client.events):
                        break
            left = _open_stream_records()
            goaway = any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)
            await client.stream.aclose()
            assert left == 0 and goaway, (
                f"{answered} CONNECT streams answered on one connection "
                f"(keep_alive_max_requests is 100; GOAWAY: {goaway}); {left} of them are "
                "still recorded as open streams")
        nursery.cancel_scope.cancel()
