"""The HPACK cap (4 KiB for the table compressing a connection's answers) is applied
only to SETTINGS frames seen as ``RemoteSettingsChanged`` events. A client that gets to
HTTP/2 by ``Upgrade: h2c`` gives its settings in the ``HTTP2-Settings`` header instead:
h2 applies them in ``initiate_upgrade_connection`` and discards the event, so the cap
never runs and the table grows to whatever the client asked (here 2 GiB). (A client
whose preface SETTINGS frame repeats the value is capped then; one whose preface
SETTINGS is empty, as RFC 9113 allows, is not.)"""

from __future__ import annotations

import gc
import itertools

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio
from hypercorn.protocol.h2 import H2Protocol
from hyperframe.frame import SettingsFrame

from tests.gateway_harness import run_gateway
from tests.upstream import Responder, SeenRequest, proxy_policy, start_upstream

_counter = itertools.count()


async def _unique_header(request: SeenRequest, respond: Responder) -> None:
    tag = f"{next(_counter):08d}" * 128  # a unique 1 KiB header per answer
    await respond.json({"ok": True}, headers=[("x-upstream-trace", tag)])


def _upgraded_encoder_tables() -> list[int]:
    return [obj.connection.encoder.header_table._current_size
            for obj in gc.get_objects()
            if isinstance(obj, H2Protocol) and obj.__dict__.get("upgraded")]


async def test_the_hpack_table_cap_holds_for_an_h2c_upgraded_connection() -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=_unique_header)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.local_settings = h2.settings.Settings(
                client=True,
                initial_values={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**31})
            conn.decoder.max_allowed_table_size = 2**31
            settings = conn.initiate_upgrade_connection()
            await stream.send_all(
                b"GET /api/x HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n")
            buffered = b""
            while b"\r\n\r\n" not in buffered:
                data = await stream.receive_some(65536)
                assert data
                buffered += data
            head, _, rest = buffered.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            conn.data_to_send()  # h2's preface repeats the settings: send an empty one
            await stream.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                                  + SettingsFrame(0).serialize())
            ended: set[int] = set()
            wanted = {1}
            for _ in range(40):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, [(":method", "GET"), (":path", "/api/x"),
                                        (":scheme", "http"), (":authority", "gw")],
                                  end_stream=True)
                wanted.add(sid)
            await stream.send_all(conn.data_to_send())
            data = rest
            with trio.fail_after(10):
                while not wanted <= ended:
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.StreamEnded):
                            ended.add(event.stream_id)
                        elif isinstance(event, h2.events.DataReceived):
                            conn.acknowledge_received_data(event.flow_controlled_length,
                                                           event.stream_id)
                    if out := conn.data_to_send():
                        await stream.send_all(out)
                    if not wanted <= ended:
                        data = await stream.receive_some(65536)
                        assert data, "connection closed"
            tables = _upgraded_encoder_tables()
            assert tables
            assert max(tables) <= 4096, (
                f"the upgraded connection's HPACK encoder table holds {max(tables)} bytes of "
                "response headers after 41 answers (its HTTP2-Settings asked 2 GiB), "
                "not 4 KiB at most")
            await stream.aclose()
        nursery.cancel_scope.cancel()
