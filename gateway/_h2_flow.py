"""HTTP/2 request bodies handed to the app without blocking the connection, and the
flow-control credit that bounds them.

Hypercorn queued a stream's body through a bounded queue and read the connection's
next frame only once it was queued, so one stream whose app was not reading (waiting
for an upstream slot) stopped every stream of the connection. Here a stream's body is
queued at once (:class:`H2Inbox`); what bounds it is the stream's flow-control window,
which is reopened only as the app takes the body (:class:`StreamWindow`). The
connection's window is reopened as DATA arrives (:class:`ConnectionWindow`). Both give
credit back in batches of half a window, as h2's own window manager does, so a client
sending tiny DATA frames does not get a WINDOW_UPDATE for each.

A stream answered before its body was read (a 413, a request shed while it waited) is
reset with NO_ERROR once the answer has ended (RFC 9113, section 8.1): the client stops
sending a body nobody will read, instead of waiting forever on a window that the body
queued for a finished app would never reopen. A stream whose app ended in the middle of
its answer (an upstream broke mid-body) is reset with INTERNAL_ERROR, so its client
sees the answer fail rather than wait for the rest of it.
"""

from __future__ import annotations

from collections import deque
from contextlib import suppress
from typing import Any

import h2.errors
import h2.exceptions
import trio
from h2.stream import StreamState

#: Hypercorn leaves HTTP/2's initial windows (connection and stream) at RFC 9113's
#: default; credit is given back once half of one has been used.
_DEFAULT_WINDOW = 65535
CREDIT_BATCH = _DEFAULT_WINDOW // 2


class StreamWindow:
    """One stream's flow-control credit, given back as its app takes the body."""

    def __init__(self, protocol: Any, stream_id: int) -> None:
        self._protocol = protocol
        self._stream_id = stream_id
        self._owed = 0

    def give(self, credit: int) -> bool:
        """Record ``credit`` bytes taken; true when a WINDOW_UPDATE is now queued."""
        self._owed += credit
        if self._owed < CREDIT_BATCH:
            return False
        owed, self._owed = self._owed, 0
        # The stream may have ended meanwhile (reset, or answered): h2 then raises its
        # own error, or KeyError once it has forgotten the stream. No credit is due.
        with suppress(h2.exceptions.H2Error, KeyError):
            self._protocol.connection.increment_flow_control_window(
                owed, stream_id=self._stream_id)
            return True
        return False

    async def flush(self) -> None:
        await self._protocol._flush()


class ConnectionWindow:
    """The connection's flow-control credit, given back as DATA arrives (bodies are
    bounded by their streams' windows, so one waiting stream cannot stop the others)."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._owed = 0

    def give(self, credit: int) -> bool:
        """Record ``credit`` bytes arrived; true when a WINDOW_UPDATE is now queued."""
        self._owed += credit
        if self._owed < CREDIT_BATCH:
            return False
        owed, self._owed = self._owed, 0
        # The connection may have closed earlier in the same read (a GOAWAY after the
        # DATA, Hypercorn's keep_alive_max_requests): no credit is due then, and h2's
        # ProtocolError would end the whole worker.
        with suppress(h2.exceptions.H2Error):
            self._protocol.connection.increment_flow_control_window(owed)
            return True
        return False


def connection_window(protocol: Any) -> ConnectionWindow:
    window: ConnectionWindow | None = getattr(protocol, "_gateway_window", None)
    if window is None:
        window = protocol._gateway_window = ConnectionWindow(protocol)
    return window


class H2Inbox:
    """One HTTP/2 stream's messages for its app, queued without blocking the connection.

    Pieces of body waiting together are handed over as one message, so tiny DATA frames
    cannot pile up as many messages.
    """

    def __init__(self) -> None:
        self._messages: deque[dict[str, Any]] = deque()
        self._credit: deque[int] = deque()  # flow-control bytes owed, per message
        self._arrived = trio.lowlevel.ParkingLot()
        self._window: StreamWindow | None = None

    def add_body(self, data: bytes, credit: int, protocol: Any, stream_id: int) -> None:
        """Queue a DATA frame's bytes; their credit goes back once the app takes them."""
        if self._window is None:
            self._window = StreamWindow(protocol, stream_id)
        if self._messages and self._open_body(self._messages[-1]):
            self._messages[-1]["body"] += data
            self._credit[-1] += credit
        else:
            self._append({"type": "http.request", "body": bytearray(data), "more_body": True},
                         credit)

    def put(self, message: dict[str, Any]) -> None:
        if (message.get("type") == "http.request" and not message.get("more_body")
                and self._messages and self._open_body(self._messages[-1])):
            self._messages[-1]["body"] += message.get("body", b"")
            self._messages[-1]["more_body"] = False
            return
        self._append(dict(message), 0)

    async def receive(self) -> dict[str, Any]:
        while not self._messages:
            await self._arrived.park()
        message, credit = self._messages.popleft(), self._credit.popleft()
        if credit and self._window is not None and self._window.give(credit):
            # Not a checkpoint (writes are shielded, see send_bounded): a cancelled
            # caller still gets the message it has taken off the queue.
            await self._window.flush()
        if message.get("type") == "http.request":
            message["body"] = bytes(message["body"])
        return message

    def _append(self, message: dict[str, Any], credit: int) -> None:
        self._messages.append(message)
        self._credit.append(credit)
        self._arrived.unpark_all()

    @staticmethod
    def _open_body(message: dict[str, Any]) -> bool:
        return message["type"] == "http.request" and bool(message["more_body"])


class H2Put:
    """The ``app_put`` of an HTTP/2 stream: queues into its :class:`H2Inbox`."""

    def __init__(self, inbox: H2Inbox) -> None:
        self.inbox = inbox

    async def __call__(self, message: dict[str, Any]) -> None:
        self.inbox.put(message)


def reset_if_answered_early(protocol: Any, stream_id: int) -> bool:
    """Reset with NO_ERROR a stream whose answer has ended while its client is still
    sending the body; true when a reset is now queued.

    Only once the answer's END_STREAM is queued (h2's half-closed local state), so the
    RST_STREAM follows the whole answer on the wire.
    """
    stream = protocol.connection.streams.get(stream_id)
    if stream is None or stream.state_machine.state is not StreamState.HALF_CLOSED_LOCAL:
        return False
    with suppress(h2.exceptions.H2Error):
        protocol.connection.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)
        return True
    return False


def reset_if_cut(protocol: Any, stream_id: int) -> bool:
    """Reset with INTERNAL_ERROR a stream whose app ended in the middle of its answer (an
    upstream broke mid-body); true when a reset is now queued.

    Over HTTP/1.1 Hypercorn then drops the connection; over HTTP/2 it only forgot the
    stream, which stayed open with neither END_STREAM nor RST_STREAM: the client waited
    for the rest of the body for ever.
    """
    buffer = protocol.stream_buffers.get(stream_id)
    stream = protocol.connection.streams.get(stream_id)
    if (buffer is None or buffer._complete or stream is None
            or stream.state_machine.state not in _ANSWER_OPEN):
        return False
    with suppress(h2.exceptions.H2Error):
        protocol.connection.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
        return True
    return False


#: States of a stream whose answer has not ended (no END_STREAM queued).
_ANSWER_OPEN = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
