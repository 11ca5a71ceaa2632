"""An HTTP/1.1 request body left unread by an early answer: read and dropped, so that the
connection carries the next request, or is closed in stages.

An answer given before the body was read (a 503 shed at the door, a 404, a 413, an
upstream refusing an upload on its head) left the rest of the body on the connection,
and Hypercorn closed the connection at once. Under overload every shed POST then cost
its client a new connection, and the worker an accept. And closing a socket with
unread bytes makes the kernel reset the connection: a client still sending its body
had its send fail, and could lose the answer before it read it (RFC 9112 9.6).

As nginx does (its discarding of an unread body, and ``lingering_close``):

* A rest known to be at most ``server.limits.discard_body`` (64 KiB) when the answer's
  head goes out (a Content-Length no further than that past what was read) is read and
  dropped, and the connection is kept, its answer saying nothing of a close.
* Otherwise the answer says ``Connection: close`` (:func:`rest_discarded`, as Envoy
  says it on any answer given before its request was read): a chunked body, whose size
  the head does not tell, a larger rest, a client still waiting for ``100 Continue``;
  and so does an answer that closes anyway (a 400, 408, 413; a request closing its
  connection). The gateway then shuts its sending side down after the answer and reads
  and drops what the client still sends, then closes. So an answer that keeps the
  connection is not followed by a close its client was not told of (unless its small
  rest takes longer than ``lingering_time`` to come).

Either way at most ``server.limits.lingering_bytes`` (1 MiB) are read, for at most
``server.limits.lingering_time`` (2 s) after the answer; past either the connection is
closed (nginx's ``lingering_time``; the policy's values are applied by
:func:`set_unread_body_limits`, at start and on each reload). It is counted against the
worker's connections all along. One that closes anyway is closed first when a new
client needs its descriptor (``_connections``); one kept is busy, as its client may have
sent its next request already, and is not closed for room. Only requests answered with
their body unread come here; a request read whole is recycled as before.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import h11
import trio
from hypercorn.events import Closed, Updated
from hypercorn.protocol.events import Body, EndBody, StreamClosed

#: Largest unread rest of a body that is read and dropped to keep its connection
#: (``server.limits.discard_body``).
_discard_bytes = 64 * 1024
#: Most bytes read and dropped after an early answer before the connection closes
#: (``server.limits.lingering_bytes``).
_lingering_bytes = 1024 * 1024
#: Longest time after an early answer that the rest of its body is read for
#: (``server.limits.lingering_time``).
_lingering_s = 2.0


def set_unread_body_limits(discard_bytes: int, lingering_bytes: int,
                           lingering_s: float) -> None:
    """Apply ``server.limits.discard_body``, ``lingering_bytes`` and ``lingering_time``
    to answers given from now on (an unread rest already being dropped keeps its own)."""
    global _discard_bytes, _lingering_bytes, _lingering_s
    _discard_bytes, _lingering_bytes, _lingering_s = discard_bytes, lingering_bytes, lingering_s


def discards(declared_length: int | None, received: int) -> bool:
    """Whether the rest of a body of ``declared_length`` (None: chunked) of which
    ``received`` bytes were read is known to be small enough to be read and dropped, so
    the answer need not close the connection. A chunked body's size is not known: its
    answer says close, as the connection may have to close before its end."""
    return declared_length is not None and declared_length - received <= _discard_bytes


def rest_discarded(connection: h11.Connection) -> bool:
    """Whether an answer whose head goes out now leaves nothing of its request's body
    that would close the connection: the body was read whole, or its rest is known to
    be small (:func:`discards`). Else the answer must say ``Connection: close``: a
    client told nothing of a close reuses the connection, and would find it reset."""
    if connection.their_state is not h11.SEND_BODY:
        return True
    if connection.they_are_waiting_for_100_continue:
        return False  # it sent none, and may never: closed at once (``UnreadBody.take``)
    remaining = getattr(connection._reader, "_remaining", None)  # h11 0.16's readers
    return remaining is not None and remaining <= _discard_bytes


class UnreadBody:
    """Stands as an HTTP/1.1 connection's stream once its request was answered with its
    body unread: it takes the rest of the body from Hypercorn's parser and drops it,
    then recycles the connection (``keep``) or closes it."""

    def __init__(self, protocol: Any, keep: bool) -> None:
        self._protocol = protocol
        self.keep = keep
        self.received = 0
        self._done = False
        self._limit = _lingering_bytes
        self._timer = trio.CancelScope(deadline=trio.current_time() + _lingering_s)

    @classmethod
    async def take(cls, protocol: Any) -> None:
        """Answered, its body unread: keep the connection when the answer allows it (its
        rest is small, :func:`rest_discarded`), else close it in stages. A client that
        still waits to be asked for its body (``Expect: 100-continue``) sent none:
        closed at once, as before."""
        connection = protocol.connection
        if protocol.__dict__.get("continue_withheld") == protocol.keep_alive_requests:
            await protocol.can_read.set()
            await protocol.send(Closed())
            return
        reader = connection._reader  # h11 0.16 (pinned in pyproject.toml)
        remaining = getattr(reader, "_remaining", None)
        keep = (connection.our_state is h11.DONE
                and not protocol.context.terminated.is_set()
                and remaining is not None and remaining <= _discard_bytes)
        sink = protocol.stream = cls(protocol, keep)  # before any await: the reader may run
        if not keep:
            await sink._shut_sending()
        protocol.task_group.spawn(sink._expire)

    @property
    def lingering(self) -> bool:
        """The connection closes once the rest is dropped (its sending side is shut)."""
        return not self.keep

    async def handle(self, event: Any) -> None:
        kind = type(event)
        if kind is Body:
            self.received += len(event.data)
            if self.received > self._limit:
                await self._close()
        elif kind is EndBody:
            if self.keep:
                await self._recycle()
            else:
                await self._close()  # nothing is left unread: a clean close, no reset
        elif kind is StreamClosed:  # the connection closed
            self._done = True
            self._timer.cancel()

    async def _recycle(self) -> None:
        """The body is read whole: the connection waits for its next request (what
        Hypercorn does when an answered request's body was read)."""
        protocol = self._protocol
        self._done = True
        self._timer.cancel()
        protocol.stream = None
        if protocol.context.terminated.is_set():
            await protocol.send(Closed())
            return
        try:
            protocol.connection.start_next_cycle()
        except h11.LocalProtocolError:
            await protocol.send(Closed())
            return
        await protocol.can_read.set()
        await protocol.send(Updated(idle=True))

    async def _shut_sending(self) -> None:
        """The answer is out: shut the sending side down, so the client reads the end of
        it (and of the connection) while the gateway goes on reading (TLS: not shut)."""
        server: Any = getattr(self._protocol.send, "__self__", None)  # TCPServer.protocol_send
        stream = getattr(server, "stream", None)
        if server is None or not isinstance(stream, trio.SocketStream):
            return
        async with server.send_lock:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                          trio.BusyResourceError, OSError):
                await stream.send_eof()

    async def _close(self) -> None:
        if not self._done:
            self._done = True
            self._timer.cancel()
            await self._protocol.send(Closed())

    async def _expire(self) -> None:
        with self._timer:
            await trio.sleep_forever()
        await self._close()  # lingering_time passed (a no-op once the body was dealt with)
