"""HPACK: the dynamic table the gateway keeps to compress its answers on one HTTP/2
connection was as large as the *client* said (SETTINGS_HEADER_TABLE_SIZE, up to 2^32-1).

hpack indexes every response header it has not seen: each answer's ``x-request-id``,
its ``date``, and whatever unique headers the upstream sends (cookies, trace ids). A
client advertising a huge table made the worker keep every answer's headers for the
life of the connection (1,000 requests at up to 64 KiB each: ~64 MiB per connection).
nghttp2 (Envoy, nginx, curl) caps the encoder's table at 4 KiB; so does the gateway.
"""

from __future__ import annotations

import gc
import itertools

import h2.settings
import trio
from hypercorn.protocol.h2 import H2Protocol

from tests.gateway_harness import run_gateway
from tests.h2client import H2Client
from tests.upstream import Responder, SeenRequest, proxy_policy, start_upstream

_counter = itertools.count()


async def _unique_header(request: SeenRequest, respond: Responder) -> None:
    # An upstream that sets a unique 1 KiB header per answer (a session cookie, say).
    tag = f"{next(_counter):08d}" * 128
    await respond.json({"ok": True}, headers=[("x-upstream-trace", tag)])


def _server_encoder_table_bytes() -> list[int]:
    return [obj.connection.encoder.header_table._current_size
            for obj in gc.get_objects() if isinstance(obj, H2Protocol)]


async def test_the_hpack_table_kept_for_a_connection_s_answers_is_capped() -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=_unique_header)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            client.conn.local_settings = h2.settings.Settings(
                client=True,
                initial_values={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**31})
            client.conn.decoder.max_allowed_table_size = 2**31
            await client.start()
            await client.round_trip()
            for _ in range(200):
                with trio.fail_after(5):
                    status, body = await client.response(await client.get("/api/x"))
                assert status == 200 and b'"ok"' in body
            tables = _server_encoder_table_bytes()  # earlier tests' may linger too
            assert tables
            table_bytes = max(tables)
            assert table_bytes <= 4096, (
                f"the worker keeps {table_bytes / 1024:.0f} KiB of response headers for "
                "one connection after 200 answers")
            await client.stream.aclose()
        nursery.cancel_scope.cancel()
