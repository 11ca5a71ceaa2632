"""Changes to Hypercorn 0.18's trio worker the gateway depends on: two races it hits and
two per-request costs it cannot afford. Each says which behaviour it changes, so it can
be dropped when Hypercorn changes it.

Races:

* ``TCPServer._close`` calls ``send_eof`` without the connection's ``send_lock``. When
  the read side closes the connection (e.g. a client pipelines garbage after a request
  the gateway is refusing) while the app's response is being written, the response's
  ``send_all`` fails with ``BusyResourceError`` and the client gets nothing, not its
  400. Taking the lock (unless this task already holds it) serialises the two.
* A client that left (or half-closed) while a request it had pipelined waited behind
  the one being answered was not seen: the reader waits without reading then. The
  socket's state is looked at while it waits (:class:`_PeerWatchingEvent`).
* ``TCPServer.run`` keeps a connection's task group (and so its socket, in CLOSE_WAIT)
  alive after the client has closed, until the keep-alive idle timer expires
  (``keep_alive_timeout``, 75 s here): under connection churn, tasks and file
  descriptors pile up (hypercorn#106). Ending the idle timer once the read side ends
  lets the connection finish at once; a response still being written is waited for.

* Hypercorn hands an HTTP/2 stream's body to its app through a bounded queue and
  reads the connection's next frame only once the body has been queued: a stream whose
  app is not reading its body (waiting for an upstream slot, relaying to a slow
  upstream) stopped every other stream of the connection. A stream's body is now
  queued without waiting, bounded by the stream's flow-control window, which is
  reopened only as the app takes the body; a stream answered before its body was read
  is reset with NO_ERROR (:mod:`gateway._h2_flow`).
* A stream the client reset kept its send buffer and priority node (Hypercorn's send
  task blocks an empty, unfinished buffer for good); 1,000 such resets on one
  connection filled the priority tree, and the next stream's ``TooManyStreamsError``
  ended the worker. The buffer is now closed on the reset, and a full tree refuses the
  new stream (REFUSED_STREAM) instead of raising. A WebSocket's end over HTTP/2 sends
  its close frame and END_STREAM (it was taken for an answer cut mid-body and reset).
* A client that resets most of the streams it opens, at once (HTTP/2 rapid reset), is
  sent GOAWAY (ENHANCE_YOUR_CALM) and closed after ``server.limits.h2_premature_resets``
  of them (:mod:`gateway._h2_resets`); Hypercorn let it run 1,000 streams a connection.
* An HTTP/2 stream whose flow-control window the client keeps shut had its whole
  answer buffered in the worker (Hypercorn woke the writer for every empty pop); the
  buffer now pushes back on the upstream at its high-water mark.
* Hypercorn's waits for a client to take a stream's answer were unbounded; they are
  now bounded as a socket write is over HTTP/1.1: each 64 KiB of the answer (or the
  rest of what is buffered) must be taken within ``server.send_timeout``, else the
  stream is reset (CANCEL) and its request cancelled (:func:`_wait_while_progressing`),
  whether the client grants no window or a byte of it at a time.
* An HTTP/2 answer without a body (to a HEAD, a 204, a 304) ended with an empty DATA
  frame carrying END_STREAM; its HEADERS frame now ends it (:func:`_end_on_headers`).
* PRIORITY frames are taken only for open streams and never raise: frames naming
  idle streams filled the priority tree, or built chains whose re-parenting or
  scheduling raised, and each ended the worker.
* An h2c upgrade whose ``HTTP2-Settings`` h2 would refuse is answered over HTTP/1.1:
  it was upgraded, then raised and ended the worker.
* A request Hypercorn's HTTP/1.1 parser refuses (no Host, a bad method or header line,
  a bad Content-Length or chunk size) was answered with an empty 400; it now gets the
  gateway's JSON error body and a request id, as every other bad request does.
* ``100 Continue`` went out as soon as a request's head was parsed, so a client
  uploading to a request the gateway refuses on its head (413, 404, 503) sent its body
  anyway; it is now sent when the app first reads the body (:mod:`gateway._expect_continue`).
* An HTTP/1.1 answer given with its request's body unread closed the connection at
  once: a shed POST cost its client a new connection, and a client still sending its
  body was reset before it read the answer. The rest is now read and dropped, and the
  connection kept (a small rest) or closed in stages (:mod:`gateway._h1_unread`).
* Anything but ``OSError`` a connection raised ended the worker (``TCPServer.run``);
  it now ends that connection only, and is logged.
* A cancelled task's write was dropped once it had left the protocol's state machine:
  for HTTP/2 a lost HEADERS frame or WINDOW_UPDATE breaks the whole connection. HTTP/2
  writes are now shielded from the writer's cancellation (:func:`send_bounded`).

Settings:

* An idle HTTP/2 connection closed to make room for a new client was closed without
  GOAWAY; it is now sent GOAWAY(NO_ERROR) first (:func:`_goaway_before_reclaim`). A
  request read from a connection as it is closed to make room is not served
  (:meth:`IdleTimer.reclaimed`).
* Connections are accepted one per scheduler pass; ``server.accept_batch`` lets a
  listener take more per wake-up (:class:`BatchAcceptListener`).
* At the drain an HTTP/2 connection was closed without GOAWAY and a stream opened
  then reset with NO_ERROR; it is now sent GOAWAY, new streams are refused
  (REFUSED_STREAM, retryable), and an HTTP/1.1 answer given then says
  ``Connection: close``.
* At the drain the admin listener closed with the public ones; it now stays open
  until the public connections have ended, and answers that the worker is draining
  (:mod:`gateway._drain`).
* A write to a client ran without any bound, shielded from cancellation: a client that
  stopped reading held its request, its upstream work and the worker's graceful
  shutdown forever. ``server.send_timeout`` bounds each write (:func:`send_bounded`);
  past it the connection is dropped, which cancels the request's work.

Costs (measured together with ``bench.overhead --feature worker``; the environment
variable ``GATEWAY_WORKER=stock`` leaves them out, for that comparison):

* The keep-alive timer was a task started (through ``nursery.start`` and a lock) every
  time a connection went idle and cancelled every time a request arrived: a task, two
  locks and several scheduler passes per request. :class:`IdleTimer` keeps one task per
  connection, which wakes once per keep-alive period; a request only records the time
  the connection went idle.
* Every socket write took the send lock and ran ``send_all`` in a shielded scope: two
  scheduler passes per write, two or three writes per response. When the lock is free,
  the write is first tried directly on the non-blocking socket; only what the kernel
  does not take at once goes the original way.
* An ASGI app learns that its client left only from ``http.disconnect`` on its receive
  channel, so every request needed a task of its own waiting there (a spawn and four
  scheduler passes). A stream now also calls the function an app leaves in its scope's
  :data:`DISCONNECT_EXTENSION`, at the moment Hypercorn closes the stream, so a request
  without a body needs no watcher task.
* Each message Hypercorn hands an app (the end of the request body, the disconnect)
  went through ``MemorySendChannel.send``, a scheduler pass even when the channel has
  room. It is put without waiting when it can be, and only waits when the app's queue
  is full. While it waits, the connection is not read, so a client that resets it is
  looked for in the kernel's socket state instead (:func:`_send_watching_peer`).
* Every response's ``Date`` header was formatted anew (``wsgiref``'s
  ``format_date_time``, about 1 % of the worker's CPU at 64 connections); it is
  formatted once a second (:func:`http_date`).
* h11's ``Connection`` cost about 60 µs per keep-alive request on the client leg (13 %
  of a proxied request). Hypercorn's HTTP/1.1 protocol now drives
  :class:`gateway._h1_server.ServerConnection`, which reads and writes as h11 does at
  about 40 % of that, and answer heads are built by
  :func:`gateway._h1_server.response_event`. Both stay with ``GATEWAY_WORKER=stock``:
  the connection carries the gateway's HTTP/1.1 leniencies.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import secrets
import select
import sys
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any
from wsgiref.handlers import format_date_time as _format_date_time

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
import hypercorn.config
import hypercorn.trio.run
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, EndBody, Request, Response, StreamClosed
from hypercorn.protocol.h2 import (
    BUFFER_HIGH_WATER,
    BUFFER_LOW_WATER,
    BufferCompleteError,
    H2Protocol,
    StreamBuffer,
)
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.trio.tcp_server import MAX_RECV as _MAX_RECV
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import EventWrapper, WorkerContext
from hypercorn.utils import suppress_body
from hyperframe.frame import GoAwayFrame, SettingsFrame
from priority.priority import PriorityError, TooManyStreamsError

from gateway import _drain, _expect_continue
from gateway._connections import CONNECTIONS, OUT_OF_DESCRIPTORS
from gateway._errors import NO_TUNNELS
from gateway._h1_server import ServerConnection, response_event
from gateway._h1_unread import UnreadBody
from gateway._h2_flow import (
    H2Inbox,
    H2Put,
    connection_window,
    reset_if_answered_early,
    reset_if_cut,
)
from gateway._h2_resets import PREMATURE_S, PrematureResets
from gateway._metrics import METRICS
from gateway._policy import ALL_METHODS

#: Scope extension of a server that calls ``extension["on_close"]()``, if an app has set
#: it, when the request's stream closes: after the response, or when the client leaves.
#: ``extension["closed"]`` is true once the stream has closed, callback or not.
DISCONNECT_EXTENSION = "gateway.stream_close_callback"
#: Scope extension of an HTTP/2 request: true when its HEADERS frame ended the stream,
#: so it has no body. HTTP/2 need not announce a body by any header.
H2_NO_BODY_EXTENSION = "gateway.h2_headers_ended_stream"

log = logging.getLogger("gateway.server")

_applied = False
#: Most connections a listener takes per wake-up (``server.accept_batch`` of the policy).
_accept_batch = 1
#: Called once when the worker passes Hypercorn's ``max_requests`` (it then drains).
_retire_hook: Callable[[], None] | None = None
#: Longest one write to a client may wait (``server.send_timeout`` of the policy).
_send_timeout = 30.0
#: The request id header of the policy, sent with the answers Hypercorn gives itself.
_request_id_header = b"x-request-id"
#: Premature stream resets an HTTP/2 connection may make before it is closed
#: (``server.limits.h2_premature_resets`` of the policy; 0: no limit).
_premature_reset_limit = 100


#: The second :func:`http_date` last formatted, and its text.
_date_cache: tuple[int, str] = (-1, "")


def http_date(timestamp: float | None = None) -> str:
    """The IMF-fixdate of ``timestamp``'s second (now's if None), formatted at most once
    per second."""
    global _date_cache
    second = math.floor(time.time() if timestamp is None else timestamp)
    cached_second, text = _date_cache  # one read: the pair cannot be torn by a writer
    if cached_second != second:
        text = _format_date_time(second)
        _date_cache = (second, text)
    return text


def set_accept_batch(batch: int) -> None:
    """Set how many queued connections a listener takes per wake-up (from now on)."""
    global _accept_batch
    _accept_batch = batch


def set_retire_hook(hook: Callable[[], None] | None) -> None:
    """Call ``hook`` once when this worker starts to drain past ``max_requests``."""
    global _retire_hook
    _retire_hook = hook


def set_premature_reset_limit(limit: int) -> None:
    """Apply ``server.limits.h2_premature_resets`` to connections opened from now on."""
    global _premature_reset_limit
    _premature_reset_limit = limit


def set_request_id_header(name: str) -> None:
    """Apply ``server.request_id_header`` to the answers Hypercorn's parser gives."""
    global _request_id_header
    _request_id_header = name.encode()


#: What a client is told when Hypercorn's HTTP/1.1 parser refuses its request.
_PARSER_ERRORS = {431: "the request head is too large"}


async def _send_json_error_response(self: Any, status_code: int) -> None:
    """Hypercorn's own answer to a request h11 refuses, in the gateway's JSON form."""
    request_id = secrets.token_hex(12)
    body = json.dumps({
        "error": _PARSER_ERRORS.get(status_code, "the request is not valid HTTP/1.1"),
        "cause": "bad_request", "request_id": request_id}, separators=(",", ":")).encode()
    await self._send_h11_event(h11.Response(status_code=status_code, headers=[
        (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"), (_request_id_header, request_id.encode()),
        *self.config.response_headers("h11")]))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


def set_send_timeout(seconds: float) -> None:
    """Set how long one write may wait for its client to take it (from now on)."""
    global _send_timeout
    _send_timeout = seconds


#: A write is sent in pieces of this size, each with its own send_timeout, so the
#: timeout measures a client's lack of progress, not the size of the answer.
SEND_PIECE = 64 * 1024


async def _unless_multiplexed(server: Any, step: Callable[[], Awaitable[None]]) -> None:
    if not isinstance(getattr(server.protocol, "protocol", None), H2Protocol):
        await step()


async def send_bounded(server: Any, data: bytes) -> None:
    """Hypercorn's write of ``data`` under the connection's send lock, given up when the
    client takes no piece of it within ``server.send_timeout``: the connection is then
    closed and its streams told so.

    On HTTP/2 the write is shielded from the writer's cancellation, the wait for the
    lock included: its bytes have already left the protocol's state machine (header
    compression state, flow-control credit, END_STREAM), so dropping them would break
    the connection for every stream on it, not only the cancelled request's. Each
    writer ahead holds the lock for at most ``send_timeout`` a piece. On HTTP/1.1 a
    cancelled request writes nothing more and its connection closes: a request cut by
    the graceful timeout gets no half answer, and no 500.
    """
    await _unless_multiplexed(server, trio.lowlevel.checkpoint_if_cancelled)
    with trio.CancelScope(shield=True):
        async with server.send_lock:
            view = memoryview(data)
            try:
                with trio.CancelScope() as scope:
                    for start in range(0, len(view), SEND_PIECE):
                        scope.deadline = trio.current_time() + _send_timeout
                        await server.stream.send_all(view[start:start + SEND_PIECE])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await server.protocol.handle(Closed())
                return
            if scope.cancelled_caught:
                log.info("a client took no %d-byte piece of its answer within send_timeout "
                         "(%.3g s): closing its connection", SEND_PIECE, _send_timeout)
                server.dropped_for_send_timeout = True  # the gateway's doing, not the client's
                await trio.aclose_forcefully(server.stream)
                await server.protocol.handle(Closed())


class IdleTimer:
    """A connection's keep-alive timer: one task that wakes once per keep-alive period.

    Same contract as Hypercorn's ``TrioSingleTask`` running ``TCPServer._idle_timeout``:
    while the connection is idle it is closed after ``keep_alive_timeout`` or as soon as
    the worker is told to terminate; while a request is in flight there is no deadline.
    A request only records when the connection went idle; the task's deadline is the
    one it set itself, and when it wakes it closes the connection or, if a request came
    in the meantime, sleeps until the newer idle deadline. Moving a cancel scope's
    deadline at every request instead cost a heap entry in trio's deadline queue (and
    its pruning) per request.
    """

    def __init__(self, server: Any) -> None:
        self._server = server
        self._scope: trio.CancelScope | None = None
        self._idle = False
        self._idle_since = 0.0
        self._ended = False

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        """The connection went idle: note when (and start the task the first time)."""
        if self._ended:
            return
        self._idle = True
        self._idle_since = trio.current_time()
        if self._scope is None:
            self._scope = trio.CancelScope()
            task_group._nursery.start_soon(self._watch, self._scope)
        if (self._server.context.terminated.is_set()
                or _closing_protocol(self._server) is not None):
            self._scope.cancel()

    async def stop(self) -> None:
        """A request is in flight: no deadline until the connection is idle again."""
        self._idle = False

    @property
    def idle(self) -> bool:
        """No request in flight (a connection that has not sent one yet included)."""
        return self._idle and not self._ended

    def reclaimed(self) -> None:
        """The connection is closed to make room for a new client (``_connections``):
        a request its reader took from the socket just before is not served (its client
        sees only the close, as for any idle connection closed), nor sent upstream."""
        self.stop = self._refuse_request  # type: ignore[method-assign]

    async def _refuse_request(self) -> None:
        raise _Reclaimed

    def end(self) -> None:
        """The read side ended: the task finishes without closing anything itself."""
        self._ended = True
        if self._scope is not None:
            self._scope.cancel()

    async def _watch(self, scope: trio.CancelScope) -> None:
        timeout = self._server.config.keep_alive_timeout
        terminated = self._server.context.terminated
        with scope:
            while True:
                if terminated.is_set():
                    await _goaway_on_drain(self._server)
                    if self._idle:
                        break
                    # Terminating with a request in flight: restart() cancels when it ends.
                    await trio.sleep_forever()
                # Busy: look again a whole period from now (the request's end moves
                # the idle deadline past that).
                due = (self._idle_since if self._idle else trio.current_time()) + timeout
                if self._idle and trio.current_time() >= due:
                    break
                with trio.move_on_at(due):
                    await terminated.wait()
        if self._ended:
            return
        with trio.CancelScope(shield=True):
            if (protocol := _closing_protocol(self._server)) is not None:
                await _send_goaway(protocol, protocol.connection.highest_inbound_stream_id)
            await self._server._initiate_server_close()


#: The connection (``TCPServer``) whose task this is: its reader puts the body to the app.
_connection: contextvars.ContextVar[Any] = contextvars.ContextVar("gateway_connection")
#: How often a read stalled behind an app not reading its body looks for the client's reset.
PEER_CHECK_S = 0.25
_PEER_GONE = select.POLLERR | select.POLLHUP | select.POLLRDHUP


def _peer_poller(server: Any) -> select.poll | None:
    """A poll of a connection's socket for the client's reset or end of sending (read
    nothing), or None when the connection is not a plain TCP one of ours."""
    sock = getattr(getattr(getattr(server, "stream", None), "socket", None), "_sock", None)
    if sock is None:
        return None
    poller = select.poll()
    poller.register(sock.fileno(), _PEER_GONE)
    return poller


async def _send_watching_peer(to_app: trio.MemorySendChannel[Any], message: Any) -> None:
    """Put a body message to an app whose queue is full, and meanwhile look for the
    client's reset: the connection is not read while its app is not reading the body
    (waiting for an upstream slot, or relaying to a slow upstream), so a client that
    gave up on a large upload would not be seen before ``body_timeout`` or the deadline.
    The kernel reports the reset (or the end of the client's sending) without the
    socket being read; the connection is then closed, which cancels the request."""
    server = _connection.get(None)
    poller = _peer_poller(server)
    if poller is None:  # TLS, or not a connection of ours: wait as before
        await to_app.send(message)
        return
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            # No event to wait for: the socket is readable all along (the unread body).
            while not poller.poll(0):  # noqa: ASYNC110
                await trio.sleep(PEER_CHECK_S)
            await server.protocol.handle(Closed())  # the request sees its client leave
            nursery.cancel_scope.cancel(reason="client gone while its body waited")

        nursery.start_soon(watch)
        await to_app.send(message)
        nursery.cancel_scope.cancel(reason="body put")


class _PeerGone(Exception):
    """The client left while its connection was not being read."""


class _Reclaimed(_PeerGone):
    """A request arrived on a connection already closed to make room."""


class _PeerWatchingEvent(EventWrapper):
    """The event an HTTP/1.1 connection's reader waits on while a request the client
    pipelined waits for the one before it to be answered. The reader reads nothing
    then, so a client that leaves (closes, resets, or half-closes: taken as leaving)
    was not seen, and the request being answered ran on to its end. While it waits,
    the socket's state is looked at as in :func:`_send_watching_peer`."""

    async def wait(self) -> None:
        if self._event.is_set():
            return
        poller = _peer_poller(_connection.get(None))
        if poller is None:  # TLS, or not a connection of ours
            await self._event.wait()
            return
        while True:
            with trio.move_on_after(PEER_CHECK_S):
                await self._event.wait()
                return
            if poller.poll(0):
                raise _PeerGone


async def _goaway_on_drain(server: Any) -> None:
    """An HTTP/2 connection is told of the drain before it is closed, as RFC 9113 (6.8)
    asks of a graceful shutdown: the client opens no new stream there, and knows what
    was not processed."""
    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    if isinstance(protocol, H11Protocol):
        # Its answer in flight is its last: Hypercorn then says ``Connection: close``
        # (as at keep_alive_max_requests), so the client sends no next request on a
        # connection about to close.
        protocol.keep_alive_requests = sys.maxsize
        return
    # Only once no stream is being answered: h2-based clients (httpx's HTTP/2, among
    # them) take a GOAWAY as the end and fail the streams still running. A busy
    # connection gets its GOAWAY from Hypercorn when its last stream ends, and the
    # streams it opens meanwhile are refused (``_handle_h2_events``).
    if isinstance(protocol, H2Protocol) and not protocol.streams:
        await _send_goaway(protocol, protocol.connection.highest_inbound_stream_id)


async def _send_goaway(protocol: Any, last_stream_id: int) -> None:
    """GOAWAY (NO_ERROR) naming the last stream that will be answered, written as a raw
    frame: h2's ``close_connection`` would also close its state machine, and the
    streams still being answered could then send nothing."""
    if protocol.closed or protocol.__dict__.get("goaway_sent"):
        return
    protocol.goaway_sent = True
    frame = GoAwayFrame(stream_id=0)
    frame.last_stream_id = max(last_stream_id, 0)
    frame.error_code = h2.errors.ErrorCodes.NO_ERROR
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await protocol._flush()  # what h2 has queued goes first, whole frames
        await protocol.send(RawData(data=frame.serialize()))


def _goaway_before_reclaim(server: Any) -> None:
    """GOAWAY (NO_ERROR) naming the last stream processed, written at once to an idle
    HTTP/2 connection closed to make room for a new client (``_connections``).

    It was closed without a word: a client that sent a request just then saw its
    connection reset and could not tell whether the request was processed (RFC 9113
    6.8), so a POST could not be retried. Written straight to the socket, as the close
    follows at once: the send lock is free (no frame half written), and an idle
    connection's socket buffer takes a few bytes whole."""
    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    if (not isinstance(protocol, H2Protocol) or protocol.closed
            or protocol.__dict__.get("goaway_sent") or server.send_lock.locked()):
        return
    protocol.__dict__["goaway_sent"] = True  # as ``_send_goaway`` marks it
    frame = GoAwayFrame(stream_id=0)
    frame.last_stream_id = max(protocol.connection.highest_inbound_stream_id, 0)
    frame.error_code = h2.errors.ErrorCodes.NO_ERROR
    # What h2 has queued goes first, whole frames.
    _direct_send(server, protocol.connection.data_to_send() + frame.serialize())


class _StalledStream(Exception):
    """A stream's answer made no progress for ``send_timeout``."""


async def _wait_while_progressing(buffer: Any, event: Any) -> None:
    """Wait for ``event`` of a stream's send buffer while its answer goes out: each
    ``H2_SEND_PIECE`` bytes its client takes (or all the buffer holds, when less) give it
    another ``send_timeout``, as each 64 KiB piece written does over HTTP/1.1; a whole
    ``send_timeout`` without one raises ``_StalledStream``.

    Any byte taken counted as progress: a client granting one byte of window per
    ``send_timeout`` held its stream, and its request's upstream slot, for ever. The
    piece's clock runs from the first wait until the client has taken everything
    buffered (:func:`_piece_taken`), across the waits of one answer, so that the few
    KiB a wait needs before the app may write again do not each restart it."""
    if getattr(buffer, "piece_sent", None) is None:  # caught up until now: a piece starts
        buffer.progressed_at = trio.current_time()
        buffer.piece_sent = 0
    while True:
        with trio.move_on_at(buffer.progressed_at + _send_timeout):
            await event.wait()
            return
        if trio.current_time() >= buffer.progressed_at + _send_timeout:
            raise _StalledStream


#: A stream's piece: RFC 9113's initial flow-control window (§6.9.2), one byte short of
#: HTTP/1.1's 64 KiB, so that a client keeping the default window and granting it once
#: per ``send_timeout`` makes progress with every grant. With 64 KiB, a piece that
#: started just as the window ran out needed two grants, and a steady client was reset
#: now and then (about one download in ten in the test of it).
H2_SEND_PIECE = 65_535


def _piece_taken(buffer: Any, length: int) -> None:
    """Count ``length`` bytes of a stream's answer taken by its client: a whole
    ``H2_SEND_PIECE``, or the last of what the buffer held, is progress. Bytes past a
    piece count toward the next."""
    sent = getattr(buffer, "piece_sent", None)
    if not buffer.buffer:
        buffer.piece_sent = None  # the client has caught up: no piece is owed
    elif sent is not None:
        sent += length
        if sent >= H2_SEND_PIECE:
            buffer.progressed_at = trio.current_time()
            sent %= H2_SEND_PIECE
        buffer.piece_sent = sent


async def _drop_stalled_stream(protocol: Any, stream_id: int) -> None:
    """A stream whose answer made no progress for ``send_timeout``: reset (CANCEL), and
    its request cancelled as one whose client stopped taking its answer."""
    log.info("an HTTP/2 client took no %d-byte piece of stream %d's answer (nor the "
             "rest of it) within send_timeout (%.3g s): resetting the stream", H2_SEND_PIECE,
             stream_id, _send_timeout)
    stream = protocol.streams.get(stream_id)
    scope = getattr(stream, "scope", None)
    extension = scope["extensions"].get(DISCONNECT_EXTENSION) if scope else None
    if extension is not None:
        extension["send_timeout"] = True
    with suppress(h2.exceptions.H2Error):
        protocol.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    buffer = protocol.stream_buffers.get(stream_id)
    if buffer is not None:
        await buffer.close()
    await protocol._close_stream(stream_id)
    await protocol._window_updated(stream_id)
    await protocol._flush()


def _bodiless(stream: Any, status: int) -> bool:
    """Whether an HTTP/2 stream's answer has no body (to a HEAD, a 204, a 304: Hypercorn
    drops any the app sends) and no trailers, so its HEADERS frame can end it."""
    return (type(stream) is HTTPStream and suppress_body(stream.scope["method"], status)
            and not stream.response.get("trailers", False))


async def _end_on_headers(protocol: Any, head: Any) -> None:
    """Send a bodiless answer's HEADERS with END_STREAM, once its app has ended it.

    Hypercorn sent the HEADERS when the answer started and its end as an empty DATA
    frame with END_STREAM: allowed (RFC 9113 8.1), but Envoy and nghttp2 end such an
    answer on its HEADERS, and a strict client takes DATA after a HEAD's or a 304's
    content-length for a protocol error. Held until the app's end, the client is told
    the answer is whole only once it is (a cut answer is reset, no head sent)."""
    stream_id = head.stream_id
    with suppress(h2.exceptions.H2Error):
        protocol.connection.send_headers(
            stream_id, [(b":status", b"%d" % head.status_code), *head.headers,
                        *protocol.config.response_headers("h2")], end_stream=True)
    # What Hypercorn's send task does once a stream's answer has gone out.
    protocol.stream_buffers.pop(stream_id, None)
    with suppress(PriorityError):
        protocol.priority.remove_stream(stream_id)
    await protocol._flush()


def _plain_connect(headers: list[tuple[bytes, bytes]]) -> bool:
    """A CONNECT without ``:path`` (RFC 9113 8.5): Hypercorn reads ``:path`` into a
    local a CONNECT never sets, and the ``UnboundLocalError`` ended the connection with
    every stream on it."""
    method = path = None
    for name, value in headers:
        if name == b":method":
            method = value
        elif name == b":path":
            path = value
    return method == b"CONNECT" and path is None


def _non_ascii_head(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether ``:method`` or ``:path`` holds a byte above 0x7f. HTTP/2 allows them
    (RFC 9113 8.2.1), but Hypercorn decodes both as ASCII: the ``UnicodeDecodeError``
    ended the connection, and every request in flight on it (behind a front proxy, other
    users' requests)."""
    return any(name in (b":method", b":path") and not value.isascii()
               for name, value in headers)


async def _refuse_connect(protocol: Any, request: Any) -> None:
    """Answer a CONNECT alone, 405 with a JSON body: the gateway opens no tunnels."""
    await _answer_alone(protocol, request, b"405", {
        "error": NO_TUNNELS, "cause": "method_not_allowed"},
        [(b"allow", ", ".join(ALL_METHODS).encode())])


async def _answer_alone(protocol: Any, request: Any, status: bytes, payload: dict[str, str],
                        headers: list[tuple[bytes, bytes]]) -> None:
    """Answer one HTTP/2 stream with a JSON error, without Hypercorn or the app."""
    body = json.dumps(payload).encode()
    connection = protocol.connection
    protocol.answered_alone = True  # for the idle mark after this read's events
    # Counted as a request, and closed as a stream, like any other.
    protocol.keep_alive_requests += 1
    if protocol.keep_alive_requests > protocol.config.keep_alive_max_requests:
        _stop_taking_streams(protocol)
    resets = protocol.__dict__.get("premature_resets")
    if resets is not None:
        resets.closed(request.stream_id)
    with suppress(h2.exceptions.H2Error):
        connection.send_headers(request.stream_id, [
            (b":status", status), (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()), *headers])
        connection.send_data(request.stream_id, body, end_stream=True)
        if request.stream_ended is None:  # it may go on sending: tell it to stop
            connection.reset_stream(request.stream_id, h2.errors.ErrorCodes.NO_ERROR)
    await protocol._flush()
    if protocol.__dict__.get("closing") and not protocol.streams:
        await protocol.send(Updated(idle=True))  # nothing left to answer: close now


#: Largest HPACK table the gateway keeps to compress one connection's answers (nghttp2's).
HPACK_TABLE_BYTES = 4096


def _close_gracefully_at_max_requests(protocol: Any) -> None:
    """Hypercorn ends a connection at ``keep_alive_max_requests`` with h2's
    ``close_connection``, which also closes h2's state machine: the streams it names
    as processed could send nothing more, and their clients waited for answers that
    never came. It now only notes it, and the connection ends as a draining one does:
    later streams are refused (REFUSED_STREAM), the open ones answered, and GOAWAY is
    sent once none is left (h2-based clients fail the streams still running on a
    GOAWAY), then the connection closes."""
    connection = protocol.connection
    original = connection.close_connection

    def close_connection(error_code: int = 0, additional_data: bytes | None = None,
                         last_stream_id: int | None = None) -> None:
        if error_code or protocol.context.terminated.is_set():
            original(error_code, additional_data, last_stream_id)
        else:
            _stop_taking_streams(protocol)

    connection.close_connection = close_connection


def _stop_taking_streams(protocol: Any) -> None:
    """No new stream on this connection: those opened are refused (REFUSED_STREAM), and
    SETTINGS_MAX_CONCURRENT_STREAMS 0 tells the client at once to open another
    connection (a GOAWAY would, but h2-based clients then fail their open streams); it
    closes once idle. Sent with the next write of the connection."""
    if protocol.__dict__.get("closing"):
        return
    protocol.closing = True
    # Written raw: through h2, its own limit would drop to 0 once acknowledged, and a
    # stream the client opened before seeing it would end the whole connection with a
    # PROTOCOL_ERROR, where it is refused like the rest (REFUSED_STREAM).
    frame = SettingsFrame(0, settings={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
    protocol.connection._data_to_send += frame.serialize()


def _keep_streams_after_client_goaway(protocol: Any, events: list[Any]) -> list[Any]:
    """A client's GOAWAY(NO_ERROR) says it opens no new stream; the ones it opened may
    finish (RFC 9113 6.8), as Node's ``session.close()`` expects. h2 closed its state
    machine on receiving it, and Hypercorn then closed the connection: both are undone,
    and the connection closes once its last stream is answered."""
    for index, event in enumerate(events):
        if (type(event) is h2.events.ConnectionTerminated and event.error_code == 0
                and (protocol.streams or any(type(earlier) is h2.events.RequestReceived
                                             for earlier in events[:index]))):
            protocol.connection.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
            protocol.closing = True  # new streams are refused
            return events[:index] + events[index + 1:]
    return events


def _closing_protocol(server: Any) -> Any:
    """The HTTP/2 protocol of a connection to close once no stream is left (it reached
    ``keep_alive_max_requests``, or its client sent GOAWAY), or None."""
    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    return protocol if getattr(protocol, "__dict__", {}).get("closing") else None


async def _read_until_closed(server: TCPServer) -> None:
    """Hypercorn's read loop without the ``fail_after(read_timeout or inf)`` it enters
    around every read: with no ``read_timeout`` (the gateway refuses one) that is a
    cancel scope made and left on every request for nothing."""
    receive, handle = server.stream.receive_some, server.protocol.handle
    while True:
        try:
            data = await receive(_MAX_RECV)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            break
        await handle(RawData(bytes(data)))
        if not data:
            break
    await handle(Closed())


def _direct_send(server: Any, data: bytes) -> int | None:
    """Bytes of ``data`` the kernel took at once, or None when the socket is gone."""
    sock = getattr(server.stream, "socket", None)
    raw = getattr(sock, "_sock", None)
    if raw is None:  # not a plain TCP stream (TLS): nothing is sent here
        return 0
    try:
        return int(raw.send(data))
    except BlockingIOError:
        return 0
    except OSError:
        return None


class BatchAcceptListener(trio.abc.Listener[trio.SocketStream]):
    """A ``trio.SocketListener`` that takes up to ``server.accept_batch`` queued
    connections per wake-up instead of one per scheduler pass.

    Trio's accept loop takes one connection per pass; a pass of a saturated worker
    serving 1,000 connections lasts tens of milliseconds, so new connections then wait
    seconds in the listen backlog. The first connection is accepted the usual way
    (waiting, and handling the errors trio handles); those queued behind it are taken
    without blocking and handed out by the following ``accept()`` calls, which return
    at once. A failure while taking them (``EMFILE`` and the like) ends the batch: the
    next waiting accept meets it and reports it as before.
    """

    def __init__(self, socket: trio.socket.SocketType) -> None:
        self._listener = trio.SocketListener(socket)
        self.socket = socket
        self._accepted: deque[trio.SocketStream] = deque()
        self._admin: bool | None = None  # known at the first accept (the app is built)

    async def accept(self) -> trio.SocketStream:
        """The next connection, taken only with a descriptor to spare for it
        (``_connections``): an idle connection is closed to make room, or it is. The
        admin listener's are always taken."""
        if self._admin is None:
            self._admin = CONNECTIONS.is_admin(self.socket.getsockname())
        while True:
            stream = await self._next()
            if (self._admin or CONNECTIONS.has_room(stream.socket.fileno())
                    or CONNECTIONS.make_room()):
                return stream
            stream.socket.close()
            CONNECTIONS.refuse()

    async def _next(self) -> trio.SocketStream:
        if self._accepted:
            return self._accepted.popleft()
        while True:
            try:
                stream = await self._listener.accept()
                break
            except OSError as error:
                # Out of descriptors: close an idle connection and try again at once;
                # with none idle, trio's accept loop logs it and waits a moment.
                if error.errno not in OUT_OF_DESCRIPTORS or not CONNECTIONS.make_room():
                    raise
        raw = getattr(self.socket, "_sock", None)
        if raw is not None:
            for _ in range(_accept_batch - 1):
                try:
                    conn, _address = raw.accept()
                except OSError:  # nothing queued, or an error the next accept reports
                    break
                self._accepted.append(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
        return stream

    async def aclose(self) -> None:
        # Closed without waiting, so a cancelled shutdown cannot leave any of them open.
        while self._accepted:
            self._accepted.popleft().socket.close()
        await self._listener.aclose()


async def _maybe_recycle(self: Any) -> None:
    """Hypercorn's end of an HTTP/1.1 exchange, word for word on its common path (the
    request read whole, the answer done: the connection waits for the next request). An
    answer given with the request's body unread closed the connection at once; the rest
    of the body is now read and dropped, and the connection kept or closed in stages
    (:mod:`gateway._h1_unread`)."""
    await self._close_stream()
    connection = self.connection
    if (not self.context.terminated.is_set() and connection.our_state is h11.DONE
            and connection.their_state is h11.DONE):
        try:
            connection.start_next_cycle()
        except h11.LocalProtocolError:
            await self.send(Closed())
        else:
            self.response = None
            self.scope = None
            await self.can_read.set()
            await self.send(Updated(idle=True))
    elif (connection.their_state is h11.SEND_BODY
          and (connection.our_state is h11.DONE or connection.our_state is h11.MUST_CLOSE)
          and type(connection) is ServerConnection):  # not a WebSocket
        await UnreadBody.take(self)
    else:
        await self.can_read.set()
        await self.send(Closed())


class _TrioWithBatchAccept(types.ModuleType):
    """What ``hypercorn.trio.run`` sees as ``trio``: trio, but for its listener and
    for the accept loops, whose admin listeners outlive the public ones at the drain."""

    SocketListener = BatchAcceptListener
    serve_listeners = staticmethod(_drain.serve_listeners)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def _h2c_settings_refused(headers: list[tuple[bytes, bytes]]) -> bool:
    """True for an ``Upgrade: h2c`` request whose ``HTTP2-Settings`` h2 would refuse."""
    upgrade = settings = b""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"upgrade":
            upgrade = value.strip().lower()
        elif lowered == b"http2-settings":
            settings = value
    if upgrade != b"h2c" or not settings:
        return False
    try:
        # What the upgrade itself will do with the header, on a throwaway connection.
        H2Connection(H2Configuration(client_side=False)).initiate_upgrade_connection(settings)
    except Exception:
        return True
    return False


async def _close_for_resets(protocol: Any, resets: PrematureResets,
                            last_stream_id: int) -> None:
    """GOAWAY (ENHANCE_YOUR_CALM) naming the last stream acted on, then close."""
    log.warning("HTTP/2: closing a connection from %s that reset %d of the %d streams it "
                "opened within %g s of opening them", protocol.client, resets.premature,
                resets.streams, PREMATURE_S)
    METRICS.connections_closed.labels("h2_premature_resets").inc()
    with suppress(h2.exceptions.H2Error):
        protocol.connection.close_connection(
            error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM,
            last_stream_id=last_stream_id, additional_data=b"too many streams reset")
    await protocol._flush()
    await protocol.send(Closed())


def apply() -> None:
    global _applied
    if _applied:
        return
    stock_send: Callable[[Any, Event], Awaitable[None]] = TCPServer.protocol_send

    async def protocol_send_bounded(self: Any, event: Event) -> None:
        if type(event) is RawData:
            await send_bounded(self, event.data)
        else:
            await stock_send(self, event)

    TCPServer.protocol_send = protocol_send_bounded  # type: ignore[method-assign]
    if os.environ.get("GATEWAY_WORKER") != "stock":
        _apply_cost_changes()

    original_close: Callable[[Any], Awaitable[None]] = TCPServer._close

    async def _close(self: Any) -> None:
        lock: trio.Lock = self.send_lock
        if lock.statistics().owner is trio.lowlevel.current_task():
            await original_close(self)
            return
        async with lock:
            await original_close(self)

    TCPServer._close = _close  # type: ignore[method-assign]

    original_read: Callable[[Any], Awaitable[None]] = TCPServer._read_data

    async def _read_data(self: Any) -> None:
        try:
            if self.config.read_timeout is None:
                await _read_until_closed(self)
            else:
                await original_read(self)
        except _PeerGone:  # seen while a pipelined request waited its turn, or reclaimed
            await self.protocol.handle(Closed())
        finally:
            if isinstance(self.idle_task, IdleTimer):
                self.idle_task.end()
            else:
                with trio.CancelScope(shield=True):
                    await self.idle_task.stop()

    TCPServer._read_data = _read_data  # type: ignore[method-assign]

    original_h11_init: Callable[..., None] = H11Protocol.__init__

    def h11_init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_h11_init(self, *args, **kwargs)
        self.can_read = _PeerWatchingEvent()
        self.connection = ServerConnection(
            h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size)

    H11Protocol.__init__ = h11_init  # type: ignore[method-assign]

    h11_stream_send: Callable[[Any, Any], Awaitable[None]] = H11Protocol.stream_send

    async def stream_send(self: Any, event: Any) -> None:
        # Hypercorn's head of an answer, built without h11's header-by-header checks
        # (``response_event`` makes the same ones at a fraction of the cost).
        if type(event) is Response and event.status_code >= 200:
            headers = [*event.headers, *self.config.response_headers("h11")]
            if self.keep_alive_requests >= self.config.keep_alive_max_requests:
                headers.append((b"connection", b"close"))
            await self._send_h11_event(response_event(event.status_code, headers))
        else:
            await h11_stream_send(self, event)

    H11Protocol.stream_send = stream_send  # type: ignore[method-assign]

    original_run: Callable[[Any], Awaitable[None]] = TCPServer.run

    async def run_contained(self: Any) -> None:
        # Hypercorn catches only OSError here: anything else one connection raised (an
        # error of h2's, h11's or the priority tree's no one foresaw) went up through
        # serve_listeners and ended the worker, with every connection on it. It now
        # ends that connection (already closed by ``run``'s own ``finally``).
        _connection.set(self)  # for a read stalled behind an app not reading its body
        CONNECTIONS.opened(self)
        try:
            await original_run(self)
        except Exception:
            log.exception("a connection ended with an unexpected error; the worker "
                          "serves on")
        finally:
            CONNECTIONS.closed(self)

    TCPServer.run = run_contained  # type: ignore[method-assign]
    H11Protocol._send_error_response = _send_json_error_response  # type: ignore[method-assign]
    H11Protocol._maybe_recycle = _maybe_recycle  # type: ignore[method-assign]


    original_h2_events: Callable[[Any, list[Any]], Awaitable[None]] = (
        H2Protocol._handle_events)

    async def _handle_h2_events(self: Any, events: list[Any]) -> None:
        resets: PrematureResets | None = self.__dict__.get("premature_resets")
        if resets is None:
            resets = self.premature_resets = PrematureResets(_premature_reset_limit)
            _close_gracefully_at_max_requests(self)
        for event in events:
            if (type(event) is h2.events.RemoteSettingsChanged
                    and h2.settings.SettingCodes.HEADER_TABLE_SIZE in event.changed_settings):
                # The table that compresses this connection's answers is kept for its
                # life: at most nghttp2's 4 KiB, whatever the client offers.
                encoder = self.connection.encoder
                encoder.header_table_size = min(encoder.header_table_size, HPACK_TABLE_BYTES)
        closing = self.__dict__.get("closing")  # before this read's own GOAWAY, if any
        events = _keep_streams_after_client_goaway(self, events)
        last_stream_id = None
        refused = {event.stream_id for event in events
                   if type(event) is h2.events.RequestReceived
                   } if (self.context.terminated.is_set() or closing) else None
        if refused:
            # Draining: a stream opened now is refused as never processed, which a
            # client may retry elsewhere (Hypercorn reset it with NO_ERROR).
            for stream_id in sorted(refused):
                with suppress(h2.exceptions.H2Error):
                    self.connection.reset_stream(stream_id,
                                                 h2.errors.ErrorCodes.REFUSED_STREAM)
            # Its DATA is kept: finding no stream, it is dropped and its connection
            # credit given back (else an upload on another stream stalls).
            events = [event for event in events
                      if type(event) is h2.events.DataReceived
                      or getattr(event, "stream_id", None) not in refused]
            await self._flush()
        for index, event in enumerate(events):
            kind = type(event)
            if kind is h2.events.RequestReceived:
                resets.opened(event.stream_id, trio.current_time())
            elif kind is h2.events.StreamReset:
                resets.reset_by_client(event.stream_id, trio.current_time())
                if resets.exceeded():
                    # One read can hold thousands of open-and-reset pairs: the rest of
                    # it is not acted on, and GOAWAY says so.
                    events, last_stream_id = events[:index + 1], event.stream_id
                    break
        await _handle_h2_events_in_order(self, events)
        # A stream the client reset keeps its send buffer and its node in the
        # priority tree: Hypercorn's send task finds the buffer empty but not complete
        # and blocks the stream for good. 1,000 such resets on one connection filled
        # the tree, and the next request's TooManyStreamsError ended the worker. As
        # for an answer cut mid-body, closing the buffer lets the send task drop both.
        for event in events:
            if type(event) is h2.events.StreamReset:
                buffer = self.stream_buffers.get(event.stream_id)
                if buffer is not None:
                    await buffer.close()
                    await self._window_updated(event.stream_id)
        if last_stream_id is not None and not self.closed:
            await _close_for_resets(self, resets, last_stream_id)
        if self.__dict__.pop("answered_alone", False) and not self.streams and not self.closed:
            # A stream answered without Hypercorn (a CONNECT, a non-ASCII head) never
            # closes through it, while Hypercorn marked the connection busy for it:
            # the connection would never be idle again (no keep-alive timeout).
            await self.send(Updated(idle=True))

    original_close_stream: Callable[[Any, int], Awaitable[None]] = H2Protocol._close_stream

    async def _close_stream(self: Any, stream_id: int) -> None:
        resets: PrematureResets | None = self.__dict__.get("premature_resets")
        if resets is not None:
            resets.closed(stream_id)
        open_before = stream_id in self.streams
        unanswered = getattr(self.streams.get(stream_id), "unanswered", False)
        await original_close_stream(self, stream_id)
        if unanswered and not self.closed:
            with suppress(h2.exceptions.H2Error):
                self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            await self._flush()
        if open_before and not self.closed and not self.streams:
            # Hypercorn says a connection is idle only when an app closes its stream;
            # one reset by its client or dropped at send_timeout would never be idle
            # again (no keep-alive timeout, never closed to make room, never ending
            # after keep_alive_max_requests).
            await self.send(Updated(idle=True))

    H2Protocol._close_stream = _close_stream  # type: ignore[method-assign]

    async def _handle_h2_events_in_order(self: Any, events: list[Any]) -> None:
        # A client may go on sending DATA on a stream already answered (a 413 before
        # the body, a shed upload); Hypercorn looks the stream up and its KeyError ends
        # the worker. Such data is dropped, its flow-control credit given back.
        if not any(type(event) is h2.events.DataReceived for event in events):
            await original_h2_events(self, events)
            return
        credited = False
        for event in events:  # one at a time: an earlier event may close the stream
            if type(event) is h2.events.DataReceived:
                stream = self.streams.get(event.stream_id)
                if stream is None:
                    with suppress(h2.exceptions.H2Error):
                        self.connection.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id)
                    continue
                app_put = getattr(stream, "app_put", None)
                if isinstance(app_put, H2Put):
                    # Queued without waiting; only the stream's window waits for the app.
                    if event.flow_controlled_length:  # an empty DATA frame (END_STREAM) has none
                        credited |= connection_window(self).give(event.flow_controlled_length)
                        app_put.inbox.add_body(event.data, event.flow_controlled_length,
                                               self, event.stream_id)
                    continue
            await original_h2_events(self, [event])
        if credited:
            await self._flush()

    H2Protocol._handle_events = _handle_h2_events  # type: ignore[method-assign]

    original_create_stream: Callable[[Any, Any], Awaitable[None]] = H2Protocol._create_stream

    async def _create_stream(self: Any, request: Any) -> None:
        # Should per-stream state ever leak again, a full priority tree costs the new
        # stream (REFUSED_STREAM: safe for the client to retry), not the worker.
        if _plain_connect(request.headers):
            await _refuse_connect(self, request)
            return
        if _non_ascii_head(request.headers):
            await _answer_alone(self, request, b"400", {
                "error": "the request method or path holds bytes that are not ASCII "
                         "(percent-encode them)", "cause": "bad_request"}, [])
            return
        try:
            await original_create_stream(self, request)
            stream = self.streams.get(request.stream_id)
            scope = getattr(stream, "scope", None)
            if scope is not None:  # the app task is only scheduled yet: it will see this
                # An h2c upgrade's stream 1 is the HTTP/1.1 request, which Hypercorn
                # upgrades only without a body; its event is built with no END_STREAM.
                scope["extensions"][H2_NO_BODY_EXTENSION] = (
                    request.stream_ended is not None
                    or (request.stream_id == 1 and self.__dict__.get("upgraded", False)))
        except TooManyStreamsError:
            self.streams.pop(request.stream_id, None)
            self.stream_buffers.pop(request.stream_id, None)
            with suppress(h2.exceptions.H2Error):
                self.connection.reset_stream(request.stream_id,
                                             h2.errors.ErrorCodes.REFUSED_STREAM)
            log.warning("HTTP/2: refused stream %d, the connection's priority tree is full",
                        request.stream_id)

    H2Protocol._create_stream = _create_stream  # type: ignore[method-assign]

    original_initiate: Callable[..., Awaitable[None]] = H2Protocol.initiate

    async def initiate(self: Any, headers: Any = None, settings: Any = None) -> None:
        self.upgraded = headers is not None  # stream 1 is an upgraded HTTP/1.1 request
        await original_initiate(self, headers, settings)
        # An h2c upgrade's HTTP2-Settings are applied without an event: cap here too.
        encoder = self.connection.encoder
        encoder.header_table_size = min(encoder.header_table_size, HPACK_TABLE_BYTES)

    H2Protocol.initiate = initiate  # type: ignore[method-assign]

    async def _priority_updated(self: Any, event: Any) -> None:
        # Hypercorn inserted a node for any stream a PRIORITY frame named (never removed)
        # and let the tree's errors escape: 1,001 PRIORITY frames for idle streams
        # (TooManyStreamsError), a chain of 150 re-parented (PriorityLoop), or one 990
        # deep under a new stream (RecursionError in the send task) each ended the
        # worker. RFC 9113 deprecates these signals; they are now taken only for open
        # streams, with a parent that is one, and never raise.
        if event.stream_id not in self.stream_buffers:
            return
        parent = event.depends_on if event.depends_on in self.stream_buffers else None
        with suppress(PriorityError):
            self.priority.reprioritize(stream_id=event.stream_id, depends_on=parent,
                                       weight=event.weight, exclusive=event.exclusive)
        await self.has_data.set()

    H2Protocol._priority_updated = _priority_updated  # type: ignore[method-assign]

    original_check_protocol: Callable[[Any, Any], Awaitable[None]] = (
        H11Protocol._check_protocol)

    async def _check_protocol(self: Any, event: Any) -> None:
        # An h2c upgrade whose HTTP2-Settings h2 cannot take (bad base64, a truncated
        # SETTINGS payload) raised after the 101 and ended the worker. RFC 9113 §3.2
        # (7540 §3.2.1): such a request is not upgraded; it is answered over HTTP/1.1.
        if _h2c_settings_refused(event.headers):
            return
        await original_check_protocol(self, event)

    H11Protocol._check_protocol = _check_protocol  # type: ignore[method-assign]

    original_h2_handle: Callable[[Any, Any], Awaitable[None]] = H2Protocol.handle

    async def _handle_h2(self: Any, event: Any) -> None:
        await original_h2_handle(self, event)
        if isinstance(event, Closed):
            # Hypercorn closes the streams but not their send buffers: a response
            # waiting there for the gone connection would hold its request (and its
            # slot at the door) until the request's deadline.
            for buffer in list(self.stream_buffers.values()):
                await buffer.close()

    H2Protocol.handle = _handle_h2  # type: ignore[method-assign]

    # An answer that ends while its client is still sending the body: the stream is
    # reset with NO_ERROR once both the app has closed it and its END_STREAM is queued,
    # whichever of the two comes last. One the app left unfinished is reset at once.
    original_stream_send: Callable[[Any, Any], Awaitable[None]] = H2Protocol.stream_send

    async def _stream_send(self: Any, event: Any) -> None:
        kind = type(event)
        if kind is Response:
            stream = self.streams.get(event.stream_id)
            if _bodiless(stream, event.status_code):
                stream.bodiless_head = event  # sent with END_STREAM when the answer ends
                return
        elif kind is EndBody:
            head = getattr(self.streams.get(event.stream_id), "bodiless_head", None)
            if head is not None:
                await _end_on_headers(self, head)
                return
        if kind is Body or kind is EndBody:
            # Bounded as a socket write is over HTTP/1.1: a client that grants no
            # flow-control window (while reading its socket, answering PINGs) would
            # hold the stream, and its request's upstream slot, until the deadline.
            try:
                await original_stream_send(self, event)
            except _StalledStream:
                await _drop_stalled_stream(self, event.stream_id)
            return
        closed_websocket = (kind is StreamClosed
                            and isinstance(self.streams.get(event.stream_id), WSStream))
        await original_stream_send(self, event)
        if kind is not StreamClosed:
            return
        if closed_websocket:
            # A WebSocket ends without an end-of-body event: what it queued (its close
            # frame) is sent, then END_STREAM.
            buffer = self.stream_buffers.get(event.stream_id)
            if buffer is not None:
                buffer.set_complete()
                await self._window_updated(event.stream_id)
            return
        if reset_if_cut(self, event.stream_id):
            # As for a client's reset: the send task drops the stream's buffer.
            await self.stream_buffers[event.stream_id].close()
            await self._window_updated(event.stream_id)
            await self._flush()
        elif reset_if_answered_early(self, event.stream_id):
            await self._flush()

    H2Protocol.stream_send = _stream_send  # type: ignore[method-assign]

    original_send_data: Callable[[Any, int], Awaitable[None]] = H2Protocol._send_data

    async def _send_data(self: Any, stream_id: int) -> None:
        await original_send_data(self, stream_id)
        if stream_id not in self.streams and reset_if_answered_early(self, stream_id):
            await self._flush()

    H2Protocol._send_data = _send_data  # type: ignore[method-assign]

    async def push(self: Any, data: bytes) -> None:
        # Hypercorn's, with its waits bounded by the stream's progress (send_timeout).
        if self._complete:
            raise BufferCompleteError()
        self.buffer.extend(data)
        await self._is_empty.clear()
        if len(self.buffer) >= BUFFER_HIGH_WATER:
            await _wait_while_progressing(self, self._paused)
            await self._paused.clear()

    async def drain(self: Any) -> None:
        await _wait_while_progressing(self, self._is_empty)

    StreamBuffer.push = push  # type: ignore[method-assign]
    StreamBuffer.drain = drain  # type: ignore[method-assign]

    async def pop(self: Any, max_length: int) -> bytes:
        # Hypercorn resumed the app's writes when a *pop* was small, and a stream whose
        # flow-control window is shut pops nothing: the app (relaying its upstream) was
        # woken for every write and buffered the whole answer. Writes now resume when
        # what is *left* is below the low-water mark, so a shut window pushes back on
        # the upstream as a full socket does over HTTP/1.1.
        length = min(len(self.buffer), max_length)
        data = bytes(self.buffer[:length])
        del self.buffer[:length]
        if length:
            _piece_taken(self, length)
        if len(self.buffer) < BUFFER_LOW_WATER:
            await self._paused.set()
        if not self.buffer:
            await self._is_empty.set()
        return data

    StreamBuffer.pop = pop  # type: ignore[method-assign]

    previous_spawn: Callable[..., Awaitable[Any]] = TaskGroup.spawn_app

    async def spawn_app(self: Any, app: Any, config: Any, scope: Any,
                        send: Callable[[Any], Awaitable[None]]) -> Any:
        if scope.get("http_version") != "2" or scope["type"] != "http":
            # HTTP/1.1, and HTTP/2 WebSockets, whose DATA frames carry WebSocket frames
            # for Hypercorn to decode, not a request body.
            return await previous_spawn(self, app, config, scope, send)
        inbox = H2Inbox()
        self._nursery.start_soon(_handle, app, config, scope, inbox.receive, send,
                                 trio.to_thread.run_sync, trio.from_thread.run)
        return H2Put(inbox)

    TaskGroup.spawn_app = spawn_app  # type: ignore[method-assign]
    stock_app_send: Callable[[Any, Any], Awaitable[None]] = HTTPStream.app_send

    async def app_send(self: Any, message: Any) -> None:
        if (message is None and not self.closed and self.state == ASGIHTTPState.REQUEST
                and trio.current_effective_deadline() == -math.inf):
            # The app was cancelled (the graceful deadline) before it answered: no answer
            # goes out, not Hypercorn's empty 500, which HTTP/2 clients got (its writes
            # are shielded) while the trace and metrics said nothing was sent. Over
            # HTTP/2 the stream is reset (CANCEL) as it closes.
            self.unanswered = True
            await self.send(StreamClosed(stream_id=self.stream_id))
            return
        await stock_app_send(self, message)

    HTTPStream.app_send = app_send  # type: ignore[method-assign]
    stock_mark_request: Callable[[Any], Awaitable[None]] = WorkerContext.mark_request

    async def mark_request(self: Any) -> None:
        global _retire_hook
        await stock_mark_request(self)
        if _retire_hook is not None and self.terminate.is_set():
            hook, _retire_hook = _retire_hook, None
            hook()

    WorkerContext.mark_request = mark_request  # type: ignore[method-assign]
    hypercorn.trio.run.trio = _TrioWithBatchAccept("trio")  # type: ignore[attr-defined]
    CONNECTIONS.farewell = _goaway_before_reclaim
    _expect_continue.apply()  # outermost spawn_app: it sees HTTP/1.1 and HTTP/2 alike
    _applied = True


def _apply_cost_changes() -> None:
    hypercorn.config.format_date_time = http_date  # type: ignore[attr-defined]

    original_init: Callable[..., None] = TCPServer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.idle_task = IdleTimer(self)

    TCPServer.__init__ = __init__  # type: ignore[method-assign]

    original_send: Callable[[Any, Event], Awaitable[None]] = TCPServer.protocol_send

    async def protocol_send(self: Any, event: Event) -> None:
        if type(event) is RawData and not self.send_lock.locked():
            # As in send_bounded, only HTTP/1.1 drops a cancelled task's write (this
            # yields only when the task is cancelled).
            await _unless_multiplexed(self, trio.lowlevel.checkpoint_if_cancelled)
            data = event.data
            if not data:
                return
            sent = _direct_send(self, data)
            if sent is None:
                await self.protocol.handle(Closed())
                return
            if sent == len(data):
                return
            event = RawData(data=data[sent:], address=event.address)
        await original_send(self, event)

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]

    original_handle: Callable[[Any, Any], Awaitable[None]] = HTTPStream.handle

    async def handle(self: Any, event: Any) -> None:
        if type(event) is StreamClosed and not self.closed:
            scope = getattr(self, "scope", None)
            extension = scope["extensions"].get(DISCONNECT_EXTENSION) if scope else None
            if extension is not None:
                # Closed before the app has looked (it may not have started): it reads
                # the flag when it installs its callback.
                extension["closed"] = True
                extension["send_timeout"] = extension.get("send_timeout") or getattr(
                    _connection.get(None), "dropped_for_send_timeout", False)
                on_close = extension.pop("on_close", None)
                if on_close is not None:
                    on_close()
        await original_handle(self, event)
        if type(event) is Request and getattr(self, "scope", None) is not None:
            # The app task is only scheduled yet: it sees the extension when it runs.
            self.scope["extensions"][DISCONNECT_EXTENSION] = {}

    HTTPStream.handle = handle  # type: ignore[method-assign]

    async def spawn_app(self: Any, app: Any, config: Any, scope: Any,
                        send: Callable[[Any], Awaitable[None]]
                        ) -> Callable[[Any], Awaitable[None]]:
        to_app, app_receives = trio.open_memory_channel[Any](config.max_app_queue_size)
        self._nursery.start_soon(_handle, app, config, scope, app_receives.receive, send,
                                 trio.to_thread.run_sync, trio.from_thread.run)

        async def put(message: Any) -> None:
            try:
                to_app.send_nowait(message)
            except trio.WouldBlock:
                if message.get("type") != "http.disconnect":
                    await _send_watching_peer(to_app, message)
                    return
                # The stream closed while the app was not reading its body (an upstream
                # that does not read it, a request that ended early). This put may come
                # from the app's own last send, so waiting for room would wait for
                # ever: the unread body is moot now, drop it so that the close gets in.
                while True:
                    try:
                        app_receives.receive_nowait()
                    except trio.WouldBlock:
                        break
                to_app.send_nowait(message)

        return put

    TaskGroup.spawn_app = spawn_app  # type: ignore[method-assign]
