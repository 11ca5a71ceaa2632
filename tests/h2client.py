"""A minimal HTTP/2 client over one connection (prior knowledge, cleartext), enough to
open, reset and read streams: for the HTTP/2 tests and the soak."""

from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import trio


class H2Client:
    """A minimal HTTP/2 client over one connection, enough to open and reset streams."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.events: list[h2.events.Event] = []

    async def start(self) -> None:
        self.conn.initiate_connection()
        await self.flush()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def get(self, path: str) -> int:
        return await self.request("GET", path)

    async def request(self, method: str, path: str) -> int:
        """Open a stream asking ``method path``, without a body; its id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", method), (":path", path),
                                           (":scheme", "http"), (":authority", "gw")],
                               end_stream=True)
        await self.flush()
        return stream_id

    async def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id)
        await self.flush()

    async def response_status(self, stream_id: int) -> int:
        event = await self.until(lambda e: isinstance(e, h2.events.ResponseReceived)
                                 and e.stream_id == stream_id)
        return int(dict(event.headers)[b":status"])

    async def until(self, wanted: Callable[[h2.events.Event], bool]) -> Any:
        """The first event (seen or still to come) that is ``wanted``."""
        while True:
            for event in self.events:
                if wanted(event):
                    return event
            data = await self.stream.receive_some(65536)
            assert data, "connection closed"
            self.events.extend(self.conn.receive_data(data))
            await self.flush()

    async def round_trip(self) -> None:
        """Return once the gateway has handled every frame sent before this call, and
        everything it wrote in answer to them has been read: two PINGs, since what
        answers a frame may follow the PING ACK of the same read."""
        for payload in (b"first...", b"second.."):
            self.conn.ping(payload)
            await self.flush()
            await self.until(lambda e, p=payload: isinstance(e, h2.events.PingAckReceived)
                             and e.ping_data == p)

    async def response(self, stream_id: int) -> tuple[int, bytes]:
        """The status and whole body of a stream's answer."""
        status = await self.response_status(stream_id)
        body = bytearray()
        seen = 0
        while True:
            for event in self.events[seen:]:
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                if isinstance(event, h2.events.DataReceived):
                    body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                        stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    await self.flush()
                    return status, bytes(body)
            seen = len(self.events)
            data = await self.stream.receive_some(65536)
            assert data, "connection closed"
            self.events.extend(self.conn.receive_data(data))
            await self.flush()
