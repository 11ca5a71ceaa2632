"""A scriptable HTTP/1.1 upstream for end-to-end tests: it records what it saw and
misbehaves on demand.

The gateway cancels upstream work by closing its connection, so the one thing this
server must get right is *noticing* that: every connection has a reader task that owns
``receive_some``; when it sees EOF or a reset while a request is being handled it
records a ``CancelledRequest`` at once (``trio.current_time()``) and cancels the
handler. Tests then assert on recorded timestamps instead of sleeping.

Start one inside a test's nursery::

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        ...                                    # point a policy at upstream.url
        await upstream.wait_cancelled()
        assert upstream.cancelled[0].at - sent_at < 0.1
        nursery.cancel_scope.cancel()

Built-in routes (query parameters as shown; any method):

==========================  ============================================================
``/ok``, anything unknown   200 ``{"path": ..., "method": ...}``
``/users/{id}``             200 ``{"id": id, "name": "user-<id>"}``
``/orders?user=U``          200 ``{"orders": [...], "user": "U"}``
``/slow?ms=N``              200 after N ms; a peer that leaves first is recorded as cancelled
``/stall``                  never answers; the peer leaving is recorded as cancelled
``/status/NNN``             status NNN with ``{"status": NNN}`` (no body for 204/304);
                            ``?retry_after=S`` adds a ``Retry-After`` header
``/reset``                  reads the request, then resets the connection (RST, no answer)
``/reset-mid-body``         ``Content-Length: 1000``, 10 bytes, then closes (FIN)
``/garbage``                writes ``NOT HTTP\\r\\n\\r\\n`` and closes
``/endless-headers``        a status line, then header lines until 10 MB or the peer leaves
``/endless-body``           a chunked body until 1 GiB or the peer leaves
``/echo``                   streams the request body back, chunked, as it arrives
``/headers``                200 ``{"headers": [[name, value], ...], "target": raw target}``
``/download?bytes=N``       N bytes of ``DOWNLOAD_PATTERN`` in 64 KiB chunks, Content-Length set
``/flaky?fail_ratio=R``     503 with probability R, else 200; ``&seed=S`` picks a sequence
                            (``random.Random(S)``, per upstream, restarted by reset_records)
``/tail?p50_ms=A&p99_ms=B`` 200 after a seeded delay whose median is A ms and p99 is B ms
``/close-after``            200 with keep-alive allowed, then closes the connection once
                            idle (``&idle_ms=N`` waits N ms first; default 0)
==========================  ============================================================

Every route except ``/echo`` reads the whole request body before answering. Bodies are
kept in ``SeenRequest.body`` up to ``BODY_KEEP_LIMIT``; above it ``body`` is ``None``
and only ``body_size`` is recorded. ``/echo`` answers while the client still sends: a
client that writes a large body before reading any answer (httpx does) can fill both
socket buffers, so keep echoed bodies in tests to a few MB.

Records
-------
``requests`` (``SeenRequest``: method, raw target, header pairs, body or body_size,
connection_id, started_at/ended_at, the status answered, cancelled), ``cancelled``
(``CancelledRequest``: target, connection_id, at, elapsed), ``errors``,
``connections_opened``/``connections_closed``/``open_connections``, ``in_flight`` and
``max_in_flight``. A request counts as ended, and leaves ``in_flight``, just *before* its
last byte is written, so a client holding a complete answer always finds it ended.
``wait_for(predicate)``, ``wait_requests(n)``, ``wait_cancelled(n)`` and
``wait_connections_closed(n)`` wake on every record change (no polling), so wrap them in
``trio.fail_after``. ``reset_records()`` forgets all of it and restarts the seeded
sequences; ``stop()`` closes the listener and every connection.

Custom behaviour
----------------
``start_upstream(nursery, behaviour=fn)`` (or assigning ``upstream.behaviour``) replaces
the routing: ``async def fn(request: SeenRequest, respond: Responder) -> None``. The
request body has already been read into ``request``. ``Responder`` offers:

- ``await respond.json(obj, status=200, headers=())`` — a whole JSON answer;
- ``await respond.respond(status, body=b"", headers=())`` — a whole answer;
- ``await respond.start(status, headers, content_length=None, close=False)`` then
  ``await respond.send(data)`` any number of times, then ``await respond.end()`` —
  streaming; chunked unless a length is given;
- ``await respond.send_raw(data)`` — bytes straight to the socket, bypassing HTTP
  framing (the connection is closed afterwards);
- ``await respond.close()`` — close now (FIN), whatever was sent;
- ``await respond.reset()`` — abort now (RST);
- ``respond.close_when_idle(after_s=0.0)`` — keep-alive advertised, but close the
  connection once this exchange is done and ``after_s`` has passed;
- ``await respond.fallback()`` — answer with the built-in route instead.

A behaviour that returns without answering gets a 500. An exception raised by a
behaviour is recorded in ``upstream.errors`` and answered with 500 (or a closed
connection if the answer had started), so assert ``upstream.errors == []``.
"""

from __future__ import annotations

import json
import random
import re
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

__all__ = [
    "BODY_KEEP_LIMIT",
    "DOWNLOAD_PATTERN",
    "Behaviour",
    "CancelledRequest",
    "Responder",
    "SeenRequest",
    "Upstream",
    "start_upstream",
]

BODY_KEEP_LIMIT = 1024 * 1024
"""Request bodies up to this many bytes are kept; larger ones only have their size."""
CHUNK_BYTES = 64 * 1024
"""Size of one write for streamed answers and of one socket read."""
READ_AHEAD_CHUNKS = 16
"""Socket reads buffered ahead of the handler (16 x 64 KiB): bounded, never a queue."""
MAX_HEADER_BYTES = 64 * 1024
"""h11's bound on a request head still incomplete; beyond it the answer is 431 and a close."""
ENDLESS_HEADERS_LIMIT = 10 * 1024 * 1024
ENDLESS_BODY_LIMIT = 1024 * 1024 * 1024
DOWNLOAD_PATTERN = b"0123456789abcdef"
"""``/download`` repeats this pattern, so a test can check the bytes, not just the count."""

_DOWNLOAD_CHUNK = DOWNLOAD_PATTERN * (CHUNK_BYTES // len(DOWNLOAD_PATTERN))
_USER_PATH = re.compile(r"^/users/([^/]+)$")
_STATUS_PATH = re.compile(r"^/status/(\d+)$")


@dataclass
class SeenRequest:
    """One request as the upstream received it; mutable while the exchange runs."""

    method: str
    target: str
    """The raw request target (path and query) exactly as sent."""
    headers: list[tuple[str, str]]
    """Header pairs in arrival order, names lower-cased, values as sent (latin-1)."""
    connection_id: int
    started_at: float
    body: bytes | None = b""
    """The request body; ``None`` when it was larger than ``BODY_KEEP_LIMIT``."""
    body_size: int = 0
    ended_at: float | None = None
    status: int | None = None
    """The status this upstream answered with; ``None`` if it never answered."""
    cancelled: bool = False

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        """Query parameters; the last value wins for a repeated name."""
        return dict(parse_qsl(urlsplit(self.target).query, keep_blank_values=True))

    def header(self, name: str) -> str | None:
        """The first value of a header, or ``None``."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]


@dataclass(frozen=True)
class CancelledRequest:
    """A request whose client closed the connection before the answer was complete."""

    target: str
    connection_id: int
    at: float
    """``trio.current_time()`` when the upstream noticed the peer leaving."""
    elapsed: float
    """Seconds from the request head arriving to the cancellation being noticed."""


Behaviour = Callable[[SeenRequest, "Responder"], Awaitable[None]]


class Upstream:
    """The server's records and controls; build one with ``start_upstream``."""

    def __init__(self, behaviour: Behaviour | None = None, *, host: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None) -> None:
        self.behaviour = behaviour
        self.host = host
        self.tls = tls
        """A server context: the upstream speaks HTTPS (``url`` says so)."""
        self.port = 0
        self.requests: list[SeenRequest] = []
        self.cancelled: list[CancelledRequest] = []
        self.errors: list[BaseException] = []
        self.connections_opened = 0
        self.connections_closed = 0
        self.open_connections = 0
        self.tls_failures: list[BaseException] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._changed = trio.Event()
        self._rngs: dict[tuple[str, str], random.Random] = {}
        self._connection_ids = 0
        self._scope: trio.CancelScope | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def __repr__(self) -> str:
        return (
            f"<Upstream {self.url} [requests: {len(self.requests)}, {self.in_flight} in flight"
            f" (max {self.max_in_flight}), {len(self.cancelled)} cancelled | connections:"
            f" {self.connections_opened} opened, {self.connections_closed} closed]>"
        )

    # -- waiting on records, without polling ------------------------------------------

    async def wait_for(self, predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
        """Wait until ``predicate()`` is true; it is re-checked whenever a record changes.
        A test waiting for something that never happens fails after ``timeout_s``."""
        with trio.fail_after(timeout_s):
            while not predicate():
                await self._changed.wait()

    async def wait_cancelled(self, count: int = 1) -> None:
        await self.wait_for(lambda: len(self.cancelled) >= count)

    async def wait_requests(self, count: int) -> None:
        await self.wait_for(lambda: len(self.requests) >= count)

    async def wait_connections_closed(self, count: int) -> None:
        await self.wait_for(lambda: self.connections_closed >= count)

    def attempts(self, path: str) -> int:
        """How many requests for ``path`` (without query) arrived, e.g. retries of /flaky."""
        return sum(1 for request in self.requests if request.path == path)

    def reset_records(self) -> None:
        """Forget what was seen and restart the seeded sequences; live counts stay true."""
        self.requests.clear()
        self.cancelled.clear()
        self.errors.clear()
        self.connections_opened = 0
        self.connections_closed = 0
        self.max_in_flight = self.in_flight
        self._rngs.clear()
        self._notify()

    def stop(self) -> None:
        """Stop listening and drop every connection, as an upstream that went away."""
        if self._scope is not None:
            self._scope.cancel(reason="upstream stopped by the test")

    # -- recording --------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _request_started(self, event: h11.Request, connection_id: int) -> SeenRequest:
        request = SeenRequest(
            method=event.method.decode("latin-1"),
            target=event.target.decode("latin-1"),
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
            connection_id=connection_id,
            started_at=trio.current_time(),
        )
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._notify()
        return request

    def _request_ended(self, request: SeenRequest) -> None:
        request.ended_at = trio.current_time()
        self.in_flight -= 1
        self._notify()

    def _request_cancelled(self, request: SeenRequest) -> None:
        if request.cancelled:
            return
        now = trio.current_time()
        request.cancelled = True
        self.cancelled.append(
            CancelledRequest(request.target, request.connection_id, now, now - request.started_at)
        )
        self._notify()

    def _rng(self, kind: str, seed: str) -> random.Random:
        key = (kind, seed)
        if key not in self._rngs:
            self._rngs[key] = random.Random(f"{kind}:{seed}")
        return self._rngs[key]

    # -- serving ----------------------------------------------------------------------

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self.tls is not None:
            stream = trio.SSLStream(stream, self.tls, server_side=True)  # type: ignore[assignment]
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as error:
                self.tls_failures.append(error)
                await trio.aclose_forcefully(stream)
                return
        self._connection_ids += 1
        self.connections_opened += 1
        self.open_connections += 1
        self._notify()
        try:
            await _Connection(self, stream, self._connection_ids).run()
        finally:
            self.open_connections -= 1
            self.connections_closed += 1
            self._notify()

    async def _route(self, request: SeenRequest, respond: Responder) -> None:
        """The built-in routes documented in the module docstring."""
        path, query = request.path, request.query
        try:
            if path == "/slow":
                await trio.sleep(int(query.get("ms", "1000")) / 1000)
                await respond.json({"path": path, "slept_ms": int(query.get("ms", "1000"))})
            elif path == "/stall":
                await trio.sleep_forever()
            elif match := _STATUS_PATH.match(path):
                await _answer_status(respond, int(match.group(1)), query)
            elif path == "/reset":
                await respond.reset()
            elif path == "/reset-mid-body":
                await respond.start(200, [("content-type", "text/plain")], content_length=1000)
                await respond.send(b"x" * 10)
                await respond.close()
            elif path == "/garbage":
                await respond.send_raw(b"NOT HTTP\r\n\r\n")
                await respond.close()
            elif path == "/endless-headers":
                await _endless_headers(respond)
            elif path == "/endless-body":
                await _endless_body(respond)
            elif path == "/echo":
                await _echo(respond)
            elif path == "/headers":
                await respond.json(
                    {"headers": [list(pair) for pair in request.headers], "target": request.target}
                )
            elif path == "/download":
                await _download(respond, int(query.get("bytes", "0")))
            elif path == "/flaky":
                await self._flaky(request, respond)
            elif path == "/tail":
                await self._tail(respond, query)
            elif path == "/close-after":
                respond.close_when_idle(int(query.get("idle_ms", "0")) / 1000)
                await respond.json({"path": path, "method": request.method})
            elif match := _USER_PATH.match(path):
                user_id = match.group(1)
                await respond.json({"id": user_id, "name": f"user-{user_id}"})
            elif path == "/orders":
                user = query.get("user")
                orders = [{"id": f"{user}-{n}", "total": 10 * n} for n in (1, 2)]
                await respond.json({"orders": orders, "user": user})
            else:
                await respond.json({"path": path, "method": request.method})
        except ValueError as exc:
            if respond.started:
                raise
            await respond.json({"error": f"bad query parameter: {exc}"}, status=400)

    async def _flaky(self, request: SeenRequest, respond: Responder) -> None:
        query = request.query
        ratio = float(query.get("fail_ratio", "0.3"))
        seed = query.get("seed", "0")
        attempt = sum(1 for seen in self.requests if seen.target == request.target)
        if self._rng("flaky", seed).random() < ratio:
            await respond.json({"error": "flaky", "attempt": attempt}, status=503)
        else:
            await respond.json({"path": "/flaky", "attempt": attempt})

    async def _tail(self, respond: Responder, query: dict[str, str]) -> None:
        p50_ms = float(query.get("p50_ms", "5"))
        p99_ms = float(query.get("p99_ms", "500"))
        delay_ms = _tail_quantile(
            self._rng("tail", query.get("seed", "0")).random(), p50_ms, p99_ms
        )
        await trio.sleep(delay_ms / 1000)
        await respond.json({"path": "/tail", "delay_ms": round(delay_ms, 3)})


def proxy_policy(url: str) -> str:
    """The plainest policy in front of a test upstream: ``/api/{rest*}`` to ``/{rest}``."""
    return f"""
version: 1
upstreams:
  users: {{url: "{url}"}}
routes:
  - path: /api/{{rest*}}
    deadline: 10s
    proxy: {{upstream: users, path: "/{{rest}}"}}
"""


async def start_upstream(nursery: trio.Nursery, *, behaviour: Behaviour | None = None,
                         tls: ssl.SSLContext | None = None, port: int = 0) -> Upstream:
    """Listen on 127.0.0.1 on ``port`` (a free one by default) and serve inside
    ``nursery`` until it ends (over TLS with ``tls``, a server context)."""
    upstream = Upstream(behaviour, tls=tls)
    upstream.port = port
    await nursery.start(upstream._serve)
    return upstream


class _PeerLeft(Exception):
    """The client closed or reset the connection while we were writing to it."""


class _Connection:
    """One accepted connection: a reader task owns the socket's receive side."""

    def __init__(self, upstream: Upstream, stream: trio.SocketStream, connection_id: int) -> None:
        self.upstream = upstream
        self.stream = stream
        self.id = connection_id
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.chunks_in, self.chunks_out = trio.open_memory_channel[bytes](READ_AHEAD_CHUNKS)
        self.responder: Responder | None = None
        self.handler_scope: trio.CancelScope | None = None
        self.closing = False
        """We are closing the socket ourselves: a failing read is not the peer leaving."""

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_socket)
                await self._serve_requests()
                nursery.cancel_scope.cancel(reason="connection finished")
        finally:
            self.closing = True
            await trio.aclose_forcefully(self.stream)

    async def _read_socket(self) -> None:
        """Feed socket bytes to the handler, and notice the peer leaving the moment it does."""
        async with self.chunks_in:
            while True:
                try:
                    data = await self.stream.receive_some(CHUNK_BYTES)
                except trio.ClosedResourceError:
                    return
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    self._peer_left()
                    return
                await self.chunks_in.send(data)

    def _peer_left(self) -> None:
        respond = self.responder
        if self.closing or respond is None or respond.ended or self.handler_scope is None:
            return
        self.upstream._request_cancelled(respond.request)
        respond._record_end()
        self.handler_scope.cancel(reason="the client closed the connection")

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h11.they_are_waiting_for_100_continue:
                await self.send_event(h11.InformationalResponse(status_code=100, headers=[]))
            try:
                data = await self.chunks_out.receive()
            except trio.EndOfChannel:
                data = b""
            self.h11.receive_data(data)

    async def send_event(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self.send_bytes(data)

    async def send_bytes(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _PeerLeft from exc

    async def close(self, *, reset: bool = False) -> None:
        self.closing = True
        if reset:
            self.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        await trio.aclose_forcefully(self.stream)

    async def _serve_requests(self) -> None:
        while True:
            try:
                event = await self.next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc)
                return
            if not isinstance(event, h11.Request):
                return
            respond = await self._exchange(event)
            if not respond.reusable or h11.MUST_CLOSE in (
                self.h11.our_state,
                self.h11.their_state,
            ):
                return
            if respond.idle_close_after_s is not None:
                await trio.sleep(respond.idle_close_after_s)
                return
            self.h11.start_next_cycle()

    async def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a malformed request with its status (400, 431) if the protocol allows."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps({"error": str(exc)}).encode()
        headers = [("content-type", "application/json"), ("connection", "close")]
        headers.append(("content-length", str(len(body))))
        try:
            await self.send_event(h11.Response(status_code=exc.error_status_hint, headers=headers))
            await self.send_event(h11.Data(data=body))
            await self.send_event(h11.EndOfMessage())
        except (_PeerLeft, h11.LocalProtocolError):
            return

    async def _exchange(self, event: h11.Request) -> Responder:
        upstream = self.upstream
        request = upstream._request_started(event, self.id)
        respond = Responder(self, request)
        self.responder = respond
        try:
            with trio.CancelScope() as scope:
                self.handler_scope = scope
                await self._handle(request, respond)
        finally:
            self.responder = None
            self.handler_scope = None
            respond._record_end()
        return respond

    async def _handle(self, request: SeenRequest, respond: Responder) -> None:
        upstream = self.upstream
        behaviour = upstream.behaviour
        try:
            if behaviour is not None or request.path != "/echo":
                await respond.read_body()
            if behaviour is not None:
                await behaviour(request, respond)
            else:
                await upstream._route(request, respond)
            if not respond.started and not respond.closed:
                await respond.json({"error": "the behaviour sent no answer"}, status=500)
        except _PeerLeft:
            if not self.closing and not respond.ended:
                upstream._request_cancelled(request)
                respond._record_end()
        except h11.RemoteProtocolError:
            await self.close()
        except Exception as exc:
            upstream.errors.append(exc)
            upstream._notify()
            if respond.started or respond.closed:
                await self.close()
            else:
                try:
                    await respond.json({"error": repr(exc)}, status=500, close=True)
                except (_PeerLeft, h11.LocalProtocolError):
                    await self.close()


class Responder:
    """How a behaviour answers one request; see the module docstring for the catalogue."""

    def __init__(self, connection: _Connection, request: SeenRequest) -> None:
        self._connection = connection
        self.request = request
        self.started = False
        self.finished = False
        self.closed = False
        self.raw = False
        self.body_done = False
        self.idle_close_after_s: float | None = None
        self._body = bytearray()
        self._ended = False
        self._remaining: int | None = None

    @property
    def reusable(self) -> bool:
        """Whether the connection can carry another request after this exchange."""
        return self.finished and self.body_done and not self.closed and not self.raw

    # -- the request body -------------------------------------------------------------

    async def receive(self) -> bytes:
        """The next piece of the request body; ``b""`` once it is complete."""
        if self.body_done:
            return b""
        while True:
            event = await self._connection.next_event()
            if isinstance(event, h11.Data):
                data = bytes(event.data)
                if not data:
                    continue
                self.request.body_size += len(data)
                if self.request.body_size <= BODY_KEEP_LIMIT:
                    self._body += data
                else:
                    self._body = bytearray()
                self._connection.upstream._notify()
                return data
            if isinstance(event, h11.EndOfMessage):
                self.body_done = True
                self.request.body = self.body_so_far()
                return b""
            raise _PeerLeft(f"connection ended inside the request body: {event!r}")

    async def read_body(self) -> bytes | None:
        while await self.receive():
            pass
        return self.request.body

    def body_so_far(self) -> bytes | None:
        return None if self.request.body_size > BODY_KEEP_LIMIT else bytes(self._body)

    # -- answering --------------------------------------------------------------------

    async def start(
        self,
        status: int = 200,
        headers: Iterable[tuple[str, str]] = (),
        *,
        content_length: int | None = None,
        close: bool = False,
    ) -> None:
        """Send the status line and headers; chunked unless a length is given or set."""
        await self._connection.send_bytes(self._head(status, headers, content_length, close))

    async def send(self, data: bytes) -> None:
        await self._connection.send_bytes(self._data(data))

    async def end(self) -> None:
        await self._connection.send_bytes(self._end())

    async def respond(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
        *,
        close: bool = False,
    ) -> None:
        """A whole answer with a Content-Length, written at once."""
        head = self._head(status, headers, len(body), close)
        await self._connection.send_bytes(head + self._data(body) + self._end())

    async def json(
        self,
        obj: Any,
        status: int = 200,
        headers: Iterable[tuple[str, str]] = (),
        *,
        close: bool = False,
    ) -> None:
        body = json.dumps(obj).encode()
        headers = [("content-type", "application/json"), *headers]
        await self.respond(status, body, headers, close=close)

    # The framing below updates the records *before* the bytes leave: a client holding
    # the complete answer must already find the request ended and out of ``in_flight``.

    def _head(
        self, status: int, headers: Iterable[tuple[str, str]], length: int | None, close: bool
    ) -> bytes:
        all_headers = list(headers)
        for name, value in all_headers:
            if name.lower() == "content-length":
                length = int(value)
        if status in (204, 304):
            length = 0
        elif length is not None:
            all_headers = [(n, v) for n, v in all_headers if n.lower() != "content-length"]
            all_headers.append(("content-length", str(length)))
        elif not any(name.lower() == "transfer-encoding" for name, _ in all_headers):
            all_headers.append(("transfer-encoding", "chunked"))
        if close:
            all_headers.append(("connection", "close"))
        data = self._connection.h11.send(h11.Response(status_code=status, headers=all_headers))
        self.started = True
        self.request.status = status
        self._remaining = 0 if self.request.method == "HEAD" else length
        if self._remaining == 0:
            self._record_end()
        return data or b""

    def _data(self, data: bytes) -> bytes:
        if not data or self.request.method == "HEAD":
            return b""
        framed = self._connection.h11.send(h11.Data(data=data))
        if self._remaining is not None:
            self._remaining -= len(data)
            if self._remaining <= 0:
                self._record_end()
        return framed or b""

    def _end(self) -> bytes:
        data = self._connection.h11.send(h11.EndOfMessage())
        self.finished = True
        self._record_end()
        return data or b""

    @property
    def ended(self) -> bool:
        """Whether the client has (or was sent) the complete answer, or the exchange is over."""
        return self._ended

    def _record_end(self) -> None:
        """Set ``ended_at`` and leave ``in_flight``, once, whichever way the exchange ended."""
        if self._ended:
            return
        self._ended = True
        if not self.body_done:
            self.request.body = self.body_so_far()
        self._connection.upstream._request_ended(self.request)

    async def send_raw(self, data: bytes) -> None:
        """Write bytes past the HTTP framing; the connection is closed after this exchange."""
        self.raw = True
        self.started = True
        await self._connection.send_bytes(data)

    async def close(self) -> None:
        """Close the connection now (FIN), answered or not."""
        self.closed = True
        await self._connection.close()

    async def reset(self) -> None:
        """Abort the connection now (RST), as a crashed upstream would."""
        self.closed = True
        await self._connection.close(reset=True)

    def close_when_idle(self, after_s: float = 0.0) -> None:
        """Advertise keep-alive, then close once this exchange is done and ``after_s`` passed."""
        self.idle_close_after_s = after_s

    async def fallback(self) -> None:
        """Answer with the built-in route for this request's path."""
        await self._connection.upstream._route(self.request, self)


# -- the built-in routes that need more than a line -----------------------------------


async def _answer_status(respond: Responder, status: int, query: dict[str, str]) -> None:
    if not 200 <= status <= 599:
        raise ValueError(f"status must be 200..599, got {status}")
    headers = [("retry-after", query["retry_after"])] if "retry_after" in query else []
    if status in (204, 304):
        await respond.start(status, headers)
        await respond.end()
    else:
        await respond.json({"status": status}, status=status, headers=headers)


async def _endless_headers(respond: Responder) -> None:
    await respond.send_raw(b"HTTP/1.1 200 OK\r\n")
    batch = b"".join(b"x-filler-%d: %s\r\n" % (n, b"a" * 100) for n in range(80))
    sent = 0
    while sent < ENDLESS_HEADERS_LIMIT:
        await respond.send_raw(batch)
        sent += len(batch)
    await respond.close()


async def _endless_body(respond: Responder) -> None:
    await respond.start(200, [("content-type", "application/octet-stream")])
    sent = 0
    while sent < ENDLESS_BODY_LIMIT:
        await respond.send(_DOWNLOAD_CHUNK)
        sent += len(_DOWNLOAD_CHUNK)
    await respond.end()


async def _echo(respond: Responder) -> None:
    content_type = respond.request.header("content-type") or "application/octet-stream"
    await respond.start(200, [("content-type", content_type)])
    while data := await respond.receive():
        await respond.send(data)
    await respond.end()


async def _download(respond: Responder, size: int) -> None:
    if size < 0:
        raise ValueError(f"bytes must be non-negative, got {size}")
    await respond.start(200, [("content-type", "application/octet-stream")], content_length=size)
    remaining = size
    while remaining > 0:
        chunk = _DOWNLOAD_CHUNK[: min(remaining, len(_DOWNLOAD_CHUNK))]
        await respond.send(chunk)
        remaining -= len(chunk)
    await respond.end()


def _tail_quantile(q: float, p50_ms: float, p99_ms: float) -> float:
    """Piecewise-linear quantile function through (0, 0), (0.5, p50), (0.99, p99), (1, 2*p99).

    So the median and the 99th percentile of the delays are the asked-for values.
    """
    if q <= 0.5:
        return p50_ms * q / 0.5
    if q <= 0.99:
        return p50_ms + (p99_ms - p50_ms) * (q - 0.5) / 0.49
    return p99_ms + p99_ms * (q - 0.99) / 0.01
