"""A client's GOAWAY(NO_ERROR) lets the streams it opened finish (README, RFC 9113 6.8),
but only when those streams were already open when the GOAWAY was read:
``_keep_streams_after_client_goaway`` looks at ``protocol.streams`` before the
HEADERS read in the same batch have been turned into streams. A client that sends its
request and its GOAWAY together (one write: ``session.request(); session.close()``)
has the request cancelled and never answered."""

from __future__ import annotations

import h2.events
import trio
from hyperframe.frame import GoAwayFrame

from tests.gateway_harness import run_gateway
from tests.h2client import H2Client
from tests.upstream import proxy_policy, start_upstream


async def test_request_sent_with_the_client_s_goaway_in_one_write_is_answered():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            await client.round_trip()  # the preface and SETTINGS are done with
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, [(":method", "GET"), (":path", "/api/ok"),
                                                 (":scheme", "http"), (":authority", "gw")],
                                     end_stream=True)
            goaway = GoAwayFrame(stream_id=0)
            goaway.last_stream_id = 0
            goaway.error_code = 0
            await client.stream.send_all(client.conn.data_to_send() + goaway.serialize())
            with trio.move_on_after(3):
                while True:
                    data = await client.stream.receive_some(65536)
                    if not data:
                        break
                    client.events.extend(client.conn.receive_data(data))
            answered = any(isinstance(e, h2.events.ResponseReceived)
                           and e.stream_id == stream_id for e in client.events)
            assert answered, (
                f"stream {stream_id}, opened before the client's GOAWAY, was not "
                f"answered; upstream saw {[(r.target, r.status) for r in upstream.requests]}"
                f", cancelled {len(upstream.cancelled)}")
        nursery.cancel_scope.cancel()
