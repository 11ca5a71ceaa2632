"""The gateway's own HTTP/1.1 connection pool, one per upstream, over trio.

Why not httpx: its pool costs 1.3-6.1 ms of CPU a request at 64 concurrent requests,
while h11 over a trio stream cost about 0.1 ms, and the framing in ``_h1`` (requests
written here, answers parsed by llhttp) costs about a sixth of h11's. The gateway's hot
path is this file.

Shape of the pool:

* Idle connections sit on a LIFO stack (the warmest socket is reused first, the coldest
  ones age out at the bottom). Checkout and release are O(1).
* ``max_connections`` counts every open *and connecting* socket. When all are busy,
  requests wait in a FIFO queue; a release hands its connection (or its free slot)
  straight to the first waiter, so nobody can barge in ahead of the queue.
* A connection returns to the pool only after a clean cycle: the response body was read
  to the end and the framing says both messages ended and the connection is kept.
  Every other ending, cancellation included, closes the socket at once, which is how
  the upstream learns that the gateway gave up on the request.
* Library exceptions (the framing's, which are h11's types; trio's; ``OSError``) are
  translated into the gateway's ``Upstream*Error`` tree in one place,
  :class:`_MapExceptions`.
"""

from __future__ import annotations

import errno
import functools
import re
import select
import socket
import ssl
from collections import OrderedDict, deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

import h11
import trio

from .._connections import out_of_resources
from .._errors import (
    BadRequest,
    GatewayError,
    Shed,
    UpstreamCertificateError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResetError,
)
from ._h1 import (
    END_OF_MESSAGE,
    NEED_DATA,
    ClientConnection,
    Data,
    InformationalResponse,
    RequestHead,
    Response,
)
from ._tls import UpstreamTls, client_context

__all__ = ["HttpUpstreamPool", "PoolLimits", "PoolStatistics", "UpstreamResponse"]

RECEIVE_BYTES = 64 * 1024
"""Most bytes asked of the socket per read; trio allocates at most this much per call."""

#: A byte no header field value may hold (RFC 9110 §5.5): the controls other than HTAB,
#: and DEL (checked again here whatever the parser let through).
_CONTROL_BYTE = re.compile(rb"[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: A request head built this long before it could be sent (the pool's queue, a new
#: connection) is built again, for the budget its headers announce.
_STALE_HEAD_S = 0.001

INLINE_BODY_BYTES = 64 * 1024
"""Bytes bodies up to this size are written together with the request head in one
``send_all``: they fit the socket buffer, so an upstream that answers early cannot block
the write. Larger and streamed bodies are written by a task running beside the reader."""

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""Methods that may be replayed once on a fresh connection after a stale keep-alive."""

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
"""Methods that get ``content-length: 0`` when sent without a body."""

_BYTES_TYPES = (bytes, bytearray, memoryview)

Headers = list[tuple[bytes, bytes]]
Body = bytes | bytearray | memoryview | AsyncIterable[bytes] | None


@dataclass(frozen=True)
class PoolLimits:
    """Per-upstream pool limits; every default is the value used when a policy omits it."""

    max_connections: int = 100
    """Hard cap on sockets open (or being opened) to this upstream."""
    idle_timeout_s: float = 30.0
    """Idle connections older than this are closed, never reused."""
    connect_timeout_s: float = 1.0
    """Bound on TCP connect (name resolution included); past it, UpstreamConnectError."""
    max_response_header_bytes: int = 64 * 1024
    """A response head larger than this is an UpstreamProtocolError."""

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections!r}")
        if not self.idle_timeout_s > 0:
            raise ValueError(f"idle_timeout_s must be positive, got {self.idle_timeout_s!r}")
        if not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be positive, got {self.connect_timeout_s!r}")
        if self.max_response_header_bytes < 1:
            raise ValueError(
                "max_response_header_bytes must be positive, "
                f"got {self.max_response_header_bytes!r}"
            )


_DEFAULT_LIMITS = PoolLimits()


@dataclass(frozen=True)
class PoolStatistics:
    """A snapshot of the pool, in the spirit of trio's ``statistics()`` methods.

    ``active`` counts connections checked out or still connecting; ``waiting`` counts
    requests queued for a connection.
    """

    active: int
    idle: int
    waiting: int
    opened_total: int
    closed_total: int


class _MapExceptions:
    """The one place where library exceptions become gateway errors.

    Like httpcore's ``map_exceptions``: h11, trio and ``OSError`` failures are re-raised
    as ``UpstreamConnectError`` / ``UpstreamResetError`` / ``UpstreamProtocolError``
    (or ``BadRequest`` when the request itself cannot be framed), chained with
    ``from`` so the cause stays visible. ``BaseException`` (``trio.Cancelled``
    above all) and exceptions already in the gateway tree pass through untouched.
    """

    __slots__ = ("_address", "_conn", "_connecting", "_tls", "_upstream")

    def __init__(
        self, upstream: str, conn: _Connection | None = None, *, connecting: bool = False,
        tls: UpstreamTls | None = None, address: str = "",
    ) -> None:
        self._upstream = upstream
        self._conn = conn
        self._connecting = connecting
        self._tls = tls
        #: ``host:port`` of a connect, for the trace and the log: never the client's.
        self._address = address

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, GatewayError):
            return
        mapped = self._translate(exc)
        if mapped is not None:
            try:
                raise mapped from exc
            finally:
                # This frame is in the raised error's traceback: holding it and the
                # original (whose traceback holds the connection's frames) would make
                # a cycle, freed only by a full collection.
                mapped = exc = None

    def _translate(self, exc: Exception) -> GatewayError | None:
        # Each error's message (the trace's, the log's) says what failed in the words of
        # h11, the OS or OpenSSL, and a connect's the address it tried; its public
        # reason (the client's) is the gateway's own, naming the upstream by its name.
        upstream = self._upstream
        if isinstance(exc, h11.RemoteProtocolError):
            if self._conn is not None and self._conn.eof:
                # A message cut short by EOF: a reset, not garbage.
                public = f"upstream {upstream!r} closed the connection mid-response"
                return UpstreamResetError(f"{public}: {exc}", public=public,
                                          upstream=upstream)
            public = f"upstream {upstream!r} sent invalid HTTP/1.1"
            return UpstreamProtocolError(f"{public}: {exc}", public=public, upstream=upstream)
        if isinstance(exc, h11.LocalProtocolError | UnicodeError):
            return BadRequest(f"request cannot be sent to upstream {upstream!r}: {exc}")
        if self._connecting:
            at = f" at {self._address}" if self._address else ""
            if isinstance(exc, trio.TooSlowError):
                public = f"connect to upstream {upstream!r} timed out"
                return UpstreamConnectError(f"connect to upstream {upstream!r}{at} timed out",
                                            public=public, upstream=upstream)
            if isinstance(exc, trio.BrokenResourceError):  # the TLS handshake failed
                reason = exc.__cause__ if exc.__cause__ is not None else exc
                if isinstance(reason, ssl.SSLCertVerificationError):
                    # Its reason names the upstream's host or address ("not valid for
                    # '10.0.0.5'"): the trace's only.
                    why = (reason.verify_message or str(reason)).rstrip(".")
                    public = f"the certificate of upstream {upstream!r} was not verified"
                    return UpstreamCertificateError(
                        f"the certificate of upstream {upstream!r}{at} was not verified: "
                        f"{why}", public=public, upstream=upstream)
                if (refused := self._client_certificate_refused(reason)) is not None:
                    return refused
                return UpstreamConnectError(
                    f"TLS handshake with upstream {upstream!r}{at} failed: {reason}",
                    public=f"TLS handshake with upstream {upstream!r} failed",
                    upstream=upstream,
                )
            if isinstance(exc, OSError):
                if (shortage := out_of_resources(exc)) is not None:
                    # The worker's own shortage, not the upstream failing: shed (503,
                    # Retry-After), and no failure for the upstream's circuit breaker.
                    return Shed(f"no socket for upstream {upstream!r}: the worker is out "
                                f"of {_RESOURCE_NAMES[shortage]}", upstream=upstream,
                                reason="no_descriptors", retry_after_s=1.0)
                return UpstreamConnectError(
                    f"cannot connect to upstream {upstream!r}{at}: {_connect_reasons(exc)}",
                    public=f"cannot connect to upstream {upstream!r}", upstream=upstream,
                )
        if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError):
            # trio's BrokenResourceError says nothing itself: the TLS alert or the socket
            # error that broke the stream is its cause.
            reason = exc.__cause__ if exc.__cause__ is not None else exc
            # Under TLS 1.3 an upstream refuses the client certificate after the client's
            # side of the handshake is done: its alert is read with the answer.
            if (refused := self._client_certificate_refused(reason)) is not None:
                return refused
            over = "TLS connection" if isinstance(reason, ssl.SSLError) else "connection"
            public = f"{over} to upstream {upstream!r} broke"
            return UpstreamResetError(f"{public}: {reason!r}", public=public,
                                      upstream=upstream)
        return None

    def _client_certificate_refused(self, reason: BaseException) -> GatewayError | None:
        """The upstream's refusal of the gateway's client certificate (or of its lack of
        one), when ``reason`` is the TLS alert that says so; None otherwise."""
        if self._tls is None or not isinstance(reason, ssl.SSLError) or not reason.reason:
            return None
        match = _ALERT.fullmatch(reason.reason)
        if match is None:
            return None
        alert = match[1].lower().replace("_", " ")
        upstream = self._upstream
        if self._tls.client_certificate:
            if alert not in _CERTIFICATE_ALERTS:
                return None
            message = f"upstream {upstream!r} refused the gateway's client certificate"
        elif alert in _CERTIFICATE_ALERTS:
            message = (f"upstream {upstream!r} refused the TLS handshake without a client "
                       "certificate: it asks for one and tls.cert_file is not set")
        elif alert == "handshake failure":  # how TLS 1.2 refuses a missing certificate
            message = (f"upstream {upstream!r} refused the TLS handshake without a client "
                       "certificate: it may ask for one and tls.cert_file is not set")
        else:
            return None
        # Whether the gateway has a client certificate, and the alert, are the trace's.
        return UpstreamCertificateError(
            f"{message} (TLS alert {alert!r})", upstream=upstream,
            public=f"upstream {upstream!r} refused the TLS handshake over the client "
                   "certificate")


def _connect_reasons(exc: OSError) -> str:
    """Why a connect failed: trio's "all attempts to connect to HOST:PORT failed" keeps
    each address's reason (refused, unreachable) in the group it was raised from."""
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(str(one) for one in group.exceptions))
    return str(exc)


#: OpenSSL's reason for a TLS alert received from the peer, the alert in capitals.
_ALERT = re.compile(r"(?:SSLV3|TLSV1|TLSV13)_ALERT_(\w+)")
#: Alerts a server sends about the client's certificate (RFC 8446 6.2): every handshake
#: with the same certificate gets the same.
_CERTIFICATE_ALERTS = frozenset({
    "bad certificate", "unsupported certificate", "certificate revoked",
    "certificate expired", "certificate unknown", "unknown ca", "access denied",
    "certificate required"})

#: What the worker is short of, by errno, when it cannot open a socket.
_RESOURCE_NAMES = {errno.EMFILE: "file descriptors", errno.ENFILE: "file descriptors",
                   errno.ENOBUFS: "buffer memory", errno.ENOMEM: "memory"}


def _head_size(head: InformationalResponse) -> int:
    """A response head's bytes on the wire, near enough: status line and header lines."""
    return len(head.reason) + 16 + sum(len(name) + len(value) + 4
                                       for name, value in head.headers)


class _Connection:
    """One socket and its HTTP/1.1 framing, plus the flags of the current cycle."""

    __slots__ = ("eof", "errors", "framing", "idle_since", "received", "reused", "socket", "stream",
                 "tls_buffers", "unwritten")

    def __init__(self, upstream: str, stream: trio.SocketStream | trio.SSLStream[trio.SocketStream],
                 max_header_bytes: int, tls: UpstreamTls | None = None) -> None:
        self.stream = stream
        if isinstance(stream, trio.SSLStream):
            self.socket = stream.transport_stream.socket
            # trio reads TLS a record at a time: bytes past a response can wait in these
            # two buffers (encrypted, decrypted) while the socket itself is not readable.
            self.tls_buffers: tuple[ssl.MemoryBIO, ssl.SSLObject] | None = (
                stream._incoming, stream._ssl_object)  # trio's own, read only
        else:
            self.socket = stream.socket
            self.tls_buffers = None
        self.framing = ClientConnection(max_header_bytes)
        self.errors = _MapExceptions(upstream, self, tls=tls)
        self.idle_since = 0.0
        self.reused = False
        """Served an earlier request: a failure before any byte may just be a stale socket."""
        self.received = False
        """Some response byte of the current cycle has arrived (no replay after this)."""
        self.eof = False
        """The upstream closed its side during the current cycle."""
        self.unwritten = False
        """Part of the current request was never written (the answer came first)."""

    def begin(self, *, reused: bool) -> None:
        self.reused = reused
        self.received = False
        self.eof = False
        self.unwritten = False

    def send_now(self, data: bytes) -> int:
        """Bytes of ``data`` the kernel takes at once without waiting (none over TLS)."""
        if self.tls_buffers is not None:
            return 0
        raw: socket.socket = self.socket._sock  # type: ignore[attr-defined]  # trio's, sync
        try:
            return raw.send(data)
        except BlockingIOError:
            return 0

    async def receive(self) -> None:
        """Feed the framing with what the socket has (at most RECEIVE_BYTES), or with EOF."""
        data = await self.stream.receive_some(RECEIVE_BYTES)
        if data:
            self.received = True
        else:
            self.eof = True
        self.framing.receive_data(data)

    def peer_gone(self) -> bool:
        """True when an idle socket is readable: EOF (or stray bytes) is pending on it.

        An idle keep-alive connection has nothing to say; anything readable (or a hang-up
        or error) means the upstream closed it (or broke protocol), so it must not carry
        a request. ``poll()``, not ``select()``: select cannot take descriptors above
        1,023, which a worker holding 1,000 client connections reaches, and every idle
        connection there would look gone.
        """
        if self.tls_pending():
            return True
        poller = select.poll()
        try:
            poller.register(self.socket.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def tls_pending(self) -> bool:
        """Bytes the TLS layer holds that no one has read (none over plain HTTP)."""
        buffers = self.tls_buffers
        return buffers is not None and bool(buffers[0].pending or buffers[1].pending())

    def close(self) -> None:
        """Close the socket now. Synchronous, so it cannot be cancelled or hang: the
        kernel sends FIN (or RST if unread bytes remain) and the upstream sees it."""
        self.socket.close()
        self.framing.close()
        self.errors._conn = None  # it refers back to this connection: a cycle


class UpstreamResponse:
    """A response head plus its streaming body, valid inside ``pool.request(...)``.

    ``headers`` holds lower-cased names. Reading the body to the end
    is what lets the connection return to the pool.
    """

    __slots__ = ("_complete", "_conn", "_pending", "headers", "reason", "status")

    def __init__(self, conn: _Connection, event: Response) -> None:
        self._conn = conn
        self.status: int = event.status_code
        self.reason: bytes = bytes(event.reason)
        self.headers: Headers = event.headers
        self._pending: bytes | None = None
        self._complete = False

    def __repr__(self) -> str:
        return f"<UpstreamResponse [{self.status} {self.reason.decode('latin-1')}]>"

    def aiter_body(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk as it arrives (``async for chunk in r.aiter_body()``).

        Raises UpstreamResetError when the upstream ends early, UpstreamProtocolError
        when it breaks the framing with garbage.
        """
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        pending = self._pending
        if pending is not None:
            self._pending = None
            return pending
        if self._complete:
            raise StopAsyncIteration
        conn = self._conn
        h = conn.framing
        with conn.errors:
            while True:
                event = h.next_event()
                if event is NEED_DATA:
                    await conn.receive()
                    continue
                if type(event) is Data:
                    if event.data:
                        return event.data
                    continue
                if event is END_OF_MESSAGE:
                    self._complete = True
                    raise StopAsyncIteration
                raise UpstreamResetError(f"upstream closed the connection mid-response ({event!r})")

    def at_end(self) -> bool:
        """Whether the body is known to be finished, without waiting for more bytes.

        Lets a relay mark its last chunk as final (one write fewer per response). A
        chunk already received is kept for the next ``__anext__``.
        """
        if self._complete:
            return True
        if self._pending is not None:
            return False
        h = self._conn.framing
        with self._conn.errors:
            event = h.next_event()
        if event is END_OF_MESSAGE:
            self._complete = True
            return True
        if type(event) is Data and event.data:
            self._pending = event.data
        elif event is not NEED_DATA and type(event) is not Data:
            raise UpstreamResetError(f"upstream closed the connection mid-response ({event!r})")
        return False

    async def read(self, max_bytes: int | None = None) -> bytes:
        """The whole body; UpstreamProtocolError once it grows past ``max_bytes``."""
        chunks: list[bytes] = []
        total = 0
        async for chunk in self:
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise UpstreamProtocolError(
                    f"upstream response body exceeds {max_bytes} bytes", max_bytes=max_bytes
                )
            chunks.append(chunk)
        return b"".join(chunks)

    def _reusable(self) -> bool:
        """Both messages ended, and nothing came after the response: bytes beyond it (a
        body longer than its Content-Length, a body on a HEAD answer) would be read as
        the next request's answer."""
        return (self._complete and self._conn.framing.reusable() and not self._conn.unwritten
                and not self._conn.tls_pending())


class _Waiter:
    """A request parked for a connection; ``grant`` is a connection or None (a slot)."""

    __slots__ = ("grant", "task")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.grant: _Connection | None = None


class _Upload:
    """State of the task writing a request body beside the response reader."""

    __slots__ = ("error", "scope", "written")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.error: BaseException | None = None
        """The caller's body iterable (or its framing) failed: the exchange is void."""
        self.written = False
        """The whole body, its end included, is in the socket. The framing counts the
        request as sent once it has framed the end, before the write: a write cut short there
        would leave the upstream reading the next request as this body."""


class _Exchange:
    """The block of :meth:`HttpUpstreamPool.request`: the connection is released (to
    the pool, or closed) when it ends. A class, not a generator: one is entered on every
    proxied request."""

    __slots__ = ("body", "conn", "headers", "inner", "method", "pool", "refresh",
                 "response", "sent", "target")

    def __init__(self, pool: HttpUpstreamPool, method: str, target: str, headers: Headers,
                 body: Body, refresh: Callable[[], Headers] | None,
                 sent: Callable[[], None] | None) -> None:
        self.pool = pool
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.refresh = refresh
        self.sent = sent
        self.conn: _Connection | None = None
        #: The exchange's own block, when it is not a plain inline one: a streamed
        #: upload, or the rest of a body written beside the reading.
        self.inner: AbstractAsyncContextManager[UpstreamResponse] | None = None
        self.response: UpstreamResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        body = self.body
        if body is not None and (
            not isinstance(body, _BYTES_TYPES) or len(body) > INLINE_BODY_BYTES
        ):
            inner = self.inner = self.pool._request_streamed(self)
            self.response = await inner.__aenter__()
            return self.response
        try:
            self.response = await self.pool._send_inline(self)
        except BaseException:
            if self.conn is not None:
                self.pool._release(self.conn, False)
                self.conn = None
            raise
        return self.response

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> bool | None:
        conn, inner, response = self.conn, self.inner, self.response
        reusable = (conn is not None and exc is None and response is not None
                    and response._reusable())
        try:
            if inner is not None:
                return await inner.__aexit__(exc_type, exc, tb)  # type: ignore[arg-type]
            return False
        finally:
            if conn is not None:
                self.conn = None
                self.pool._release(conn, reusable)


class HttpUpstreamPool:
    """HTTP/1.1 keep-alive connections to one upstream, bounded and queued.

    ``base_url`` is ``http://host:port`` or ``https://host:port`` with an optional path
    prefix that is prepended to every target. ``https://`` connects with ``tls`` (a
    verifying context for the URL's host unless given).
    """

    def __init__(self, name: str, base_url: str, limits: PoolLimits = _DEFAULT_LIMITS,
                 *, tls: UpstreamTls | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"upstream {name!r}: base_url must start with http:// or "
                             f"https:// ({base_url!r})")
        if tls is not None and parts.scheme != "https":
            raise ValueError(f"upstream {name!r}: TLS settings for an http:// URL ({base_url!r})")
        if not parts.hostname:
            raise ValueError(f"upstream {name!r}: base_url has no host ({base_url!r})")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(
                f"upstream {name!r}: base_url takes no credentials, query or fragment "
                f"({base_url!r})"
            )
        self.name = name
        self.base_url = base_url
        self.limits = limits
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme == "https" and tls is None:
            tls = UpstreamTls(client_context(), parts.hostname)
        self._tls = tls
        self._host_header = parts.netloc.encode("ascii")
        self._prefix = parts.path.rstrip("/")
        self._max_connections = limits.max_connections
        self._idle_timeout = limits.idle_timeout_s
        self._idle: deque[_Connection] = deque()
        self._waiters: OrderedDict[_Waiter, None] = OrderedDict()
        self._total = 0  # open plus connecting; never above max_connections
        self._opened_total = 0
        self._closed_total = 0
        self._closed = False
        self._build_errors = _MapExceptions(name)
        self._connect_errors = _MapExceptions(name, connecting=True, tls=tls,
                                              address=f"{self._host}:{self._port}")

    # -- public API -------------------------------------------------------------------

    def request(
        self, method: str, target: str, headers: Headers, body: Body = None,
        *, refresh: Callable[[], Headers] | None = None,
        sent: Callable[[], None] | None = None,
    ) -> _Exchange:
        """``async with pool.request(...) as response``: send one request and yield the
        response once its head has arrived.

        ``body`` as bytes is sent with Content-Length; an async iterable streams with
        ``Transfer-Encoding: chunked`` unless ``headers`` carry a content-length. Leaving
        the block before the body was read to the end closes the connection.
        ``refresh`` gives the headers again when the request waited for a connection
        (or opened one) before it could be sent: a budget announced in them is then
        what is left when it goes out. ``sent`` is called once the request, its body
        whole, is in the socket (an upload may end after the answer has started).
        """
        return _Exchange(self, method, target, headers, body, refresh, sent)

    async def _send_inline(self, exchange: _Exchange) -> UpstreamResponse:
        """The exchange of a request without a body or with a small one: on a pooled
        connection (again on a fresh one if a reused one turns out to be closed)."""
        method, body, refresh = exchange.method, exchange.body, exchange.refresh
        assert body is None or isinstance(body, _BYTES_TYPES)
        head = self._build_request(method, exchange.target, exchange.headers, body)
        built_at = trio.current_time()
        retry = method in _IDEMPOTENT
        conn = exchange.conn = await self._checkout()
        while True:
            try:
                if refresh is not None:
                    head = self._current_head(exchange, head, built_at)
                outcome = await self._exchange_inline(conn, head, body, exchange.sent)
                break
            except UpstreamResetError:
                if not (retry and conn.reused and not conn.received):
                    raise
                retry = False
                exchange.conn = None
                conn = exchange.conn = await self._reconnect(conn)
        if isinstance(outcome, UpstreamResponse):
            return outcome
        exchange.inner = self._answer_beside_writing(conn, outcome, exchange.sent)
        return await exchange.inner.__aenter__()

    def _request_streamed(self, exchange: _Exchange) -> AbstractAsyncContextManager[
            UpstreamResponse]:
        """The exchange of a request with a large or streamed body."""
        method, body = exchange.method, exchange.body
        head = self._build_request(method, exchange.target, exchange.headers, body)
        current = functools.partial(self._current_head, exchange,
                                    built_at=trio.current_time())
        retry = isinstance(body, _BYTES_TYPES) and method in _IDEMPOTENT
        return self._request_with_upload(head, body, retry, current, exchange.sent)

    def _current_head(self, exchange: _Exchange, head: RequestHead, built_at: float
                      ) -> RequestHead:
        """``head`` as it goes out now: built again from the exchange's ``refresh`` (for
        the budget its headers announce) once it has waited ``_STALE_HEAD_S`` since
        ``built_at`` (the pool's queue, a new connection)."""
        refresh = exchange.refresh
        if refresh is None or trio.current_time() - built_at < _STALE_HEAD_S:
            return head
        return self._build_request(exchange.method, exchange.target, refresh(), exchange.body)

    def statistics(self) -> PoolStatistics:
        idle = len(self._idle)
        return PoolStatistics(
            active=self._total - idle,
            idle=idle,
            waiting=len(self._waiters),
            opened_total=self._opened_total,
            closed_total=self._closed_total,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<{type(self).__name__} {self.name} [Requests: {s.active} active, {s.waiting} "
            f"queued | Connections: {s.active} active, {s.idle} idle]>"
        )

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` has been called: new requests are refused."""
        return self._closed

    async def aclose(self) -> None:
        """Close idle connections; connections in use are closed when released.

        Requests already running or queued finish normally; new ones are refused.
        """
        self._closed = True
        while self._idle:
            self._discard(self._idle.pop())
        await trio.lowlevel.checkpoint()

    # -- request framing --------------------------------------------------------------

    def _build_request(self, method: str, target: str, headers: Headers,
                       body: Body) -> RequestHead:
        has_host = has_framing = False
        for name, _ in headers:
            lowered = name.lower()
            if lowered == b"host":
                has_host = True
            elif lowered == b"content-length" or lowered == b"transfer-encoding":
                has_framing = True
        extra: Headers = []
        if not has_host:
            extra.append((b"host", self._host_header))
        if not has_framing:
            if body is None:
                if method in _BODY_METHODS:
                    extra.append((b"content-length", b"0"))
            elif isinstance(body, _BYTES_TYPES):
                extra.append((b"content-length", b"%d" % len(body)))
            else:
                extra.append((b"transfer-encoding", b"chunked"))
        with self._build_errors:
            return RequestHead(method, self._prefix + target,
                               extra + headers if extra else headers)

    # -- exchanges --------------------------------------------------------------------

    async def _exchange_inline(
        self, conn: _Connection, head: RequestHead, body: bytes | bytearray | memoryview | None,
        sent: Callable[[], None] | None = None,
    ) -> UpstreamResponse | memoryview:
        """Write head and (small) body in one send, then wait for the response head.

        What of a body the kernel does not take at once (an upstream that stopped
        reading, a small receive window) is returned unwritten, for
        :meth:`_answer_beside_writing` to write beside the reading: the upstream may
        answer on the head alone (413, 401), or while it reads (an echo), and that
        answer must be read instead of waiting on the write until the deadline."""
        h = conn.framing
        with conn.errors:
            data = h.send_head(head)
            if not body:
                await conn.stream.send_all(data + h.send_end())
                written = -1
            else:
                data = b"".join([data, h.send_data(body), h.send_end()])
                written = conn.send_now(data)
        if 0 <= written < len(data):
            return memoryview(data)[written:]
        if sent is not None:
            sent()
        return await self._receive_head(conn)

    @asynccontextmanager
    async def _answer_beside_writing(
        self, conn: _Connection, rest: memoryview, sent: Callable[[], None] | None = None,
    ) -> AsyncIterator[UpstreamResponse]:
        """Write ``rest`` of a request from a task while this one reads the answer, head
        and body; the write ends with the exchange (a connection whose request was not
        written whole is not reused)."""
        conn.unwritten = True

        async def write() -> None:
            with suppress(UpstreamError), conn.errors:  # the reader reports a broken socket
                await conn.stream.send_all(rest)
                conn.unwritten = False
            if not conn.unwritten and sent is not None:
                sent()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                try:
                    yield await self._receive_head(conn)
                finally:
                    nursery.cancel_scope.cancel(reason="upstream exchange ended")
        except BaseExceptionGroup as group:
            raise _first_leaf(group) from None

    @asynccontextmanager
    async def _request_with_upload(
        self, head: RequestHead, body: Body, retry: bool,
        current: Callable[[RequestHead], RequestHead], sent: Callable[[], None] | None = None,
    ) -> AsyncIterator[UpstreamResponse]:
        """Stream the body from a task while this one reads the response.

        An upstream may answer (413, 401, ...) before the body ends; the reader must see
        that answer instead of blocking on a write. The task lives in a nursery that is
        cancelled when the block ends, so it never outlives the request. Its socket
        failures are left to the reader to report; a failure of the caller's body
        iterable voids the exchange and is re-raised as is.
        """
        conn: _Connection | None = None
        upload: _Upload | None = None
        reusable = False
        caught: BaseException | None = None
        try:
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        conn = await self._checkout()
                        while True:
                            upload = _Upload()
                            try:
                                head = current(head)
                                with conn.errors:
                                    await conn.stream.send_all(conn.framing.send_head(head))
                                nursery.start_soon(
                                    self._upload, conn, body, upload, nursery.cancel_scope,
                                    sent,
                                )
                                response = await self._receive_head(conn)
                                break
                            except UpstreamResetError:
                                upload.scope.cancel(reason="retrying on a fresh connection")
                                if not (retry and conn.reused and not conn.received):
                                    raise
                                retry = False
                                stale, conn = conn, None
                                # Closing wakes the old upload task if it is mid-write.
                                conn = await self._reconnect(stale)
                        yield response
                        reusable = response._reusable()
                    except BaseException as exc:
                        caught = exc
                    finally:
                        nursery.cancel_scope.cancel(reason="upstream exchange ended")
            except BaseExceptionGroup as group:
                # Only Cancelled can get here (an enclosing scope fired while the upload
                # task ran): let the outermost Cancelled through, ungrouped.
                cancelled, rest = group.split(trio.Cancelled)
                if rest is not None or cancelled is None:
                    raise
                if not isinstance(caught, trio.Cancelled):
                    caught = _first_leaf(cancelled)
        finally:
            if conn is not None:
                # Read once the upload task has ended: its last write may have been in
                # the socket while it had not yet returned when the answer was read.
                self._release(conn, reusable and upload is not None and upload.written)
        if (
            upload is not None
            and upload.error is not None
            and (caught is None or isinstance(caught, trio.Cancelled))
        ):
            raise upload.error
        if caught is not None:
            raise caught

    async def _upload(
        self,
        conn: _Connection,
        body: Body,
        upload: _Upload,
        exchange: trio.CancelScope,
        sent: Callable[[], None] | None = None,
    ) -> None:
        h = conn.framing
        send_all = conn.stream.send_all
        with upload.scope:
            try:
                if isinstance(body, _BYTES_TYPES):
                    view = memoryview(body)
                    for start in range(0, len(view), RECEIVE_BYTES):
                        with conn.errors:
                            await send_all(h.send_data(view[start : start + RECEIVE_BYTES]))
                elif body is not None:
                    async for chunk in body:
                        if chunk:
                            with conn.errors:
                                await send_all(h.send_data(chunk))
                with conn.errors:
                    await send_all(h.send_end())
                upload.written = True
                if sent is not None:
                    sent()
            except UpstreamError:
                # The socket broke: the reader reports it (or reads an early answer).
                return
            except Exception as exc:
                upload.error = exc
                exchange.cancel(reason="request body failed")

    async def _receive_head(self, conn: _Connection) -> UpstreamResponse:
        h = conn.framing
        # Informational (1xx) heads passed over before the answer (a 100 Continue, 103
        # Early Hints, a long job's 102 Processing every second) are bounded by their
        # bytes together, as Go's net/http bounds them: max_response_header_bytes. A
        # steady trickle passes for as long as the deadline allows, while an upstream
        # flooding them fails at once (upstream_protocol) instead of holding its slot.
        informational = 0
        with conn.errors:
            while True:
                event = h.next_event()
                if event is NEED_DATA:
                    await conn.receive()
                    continue
                if type(event) is Response:
                    response = UpstreamResponse(conn, event)
                    break
                if type(event) is InformationalResponse:
                    informational += _head_size(event)
                    if informational > self.limits.max_response_header_bytes:
                        raise UpstreamProtocolError(
                            f"upstream {self.name!r} sent informational (1xx) heads over "
                            f"{self.limits.max_response_header_bytes} bytes before its "
                            "answer", upstream=self.name)
                    continue
                raise UpstreamResetError(
                    f"upstream {self.name!r} closed the connection before answering",
                    upstream=self.name,
                )
            size = len(response.reason) + 16  # as _head_size counts, in the one pass
            framing = 0
            for name, value in response.headers:
                size += len(name) + len(value) + 4
                if _CONTROL_BYTE.search(value) is not None:
                    # RFC 9110 §5.5 (any control but HTAB): relayed, an
                    # HTTP/2 client refuses the whole stream, an HTTP/1.1 one may too.
                    raise UpstreamProtocolError(
                        f"upstream {self.name!r} sent control bytes in its "
                        f"{name.decode('latin-1')!r} header", upstream=self.name)
                if name == b"content-length":
                    framing |= 1
                elif name == b"transfer-encoding":
                    framing |= 2
            if response.status > 599:
                # Not a status (RFC 9110 §15): relayed, a client could read anything.
                raise UpstreamProtocolError(
                    f"upstream {self.name!r} answered status {response.status}, "
                    "which is not an HTTP status", upstream=self.name)
            if framing == 3:
                # Ambiguous framing (RFC 9112 §6.3): never relay it to a client.
                raise UpstreamProtocolError(
                    f"upstream {self.name!r} sent both Content-Length and Transfer-Encoding",
                    upstream=self.name,
                )
            if size > self.limits.max_response_header_bytes:
                raise UpstreamProtocolError(
                    f"upstream {self.name!r} sent a response head over "
                    f"{self.limits.max_response_header_bytes} bytes",
                    upstream=self.name,
                )
            # Peek: a body already buffered (or an empty one) needs no further read, and
            # an empty body counts as read so the connection can be reused. A framing
            # error found here is left for the body reader: the framing stays in its error
            # state and raises it again on the next call.
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:
                return response
            if type(event) is Data:
                response._pending = event.data
            elif event is END_OF_MESSAGE:
                response._complete = True
            elif event is not NEED_DATA:
                raise UpstreamResetError(
                    f"upstream {self.name!r} closed the connection mid-response",
                    upstream=self.name,
                )
        return response

    def close_idle(self, now: float) -> None:
        """Close idle connections past ``idle_timeout``, and those the upstream closed,
        without waiting for the next request to this upstream to find them."""
        idle = self._idle
        cutoff = now - self._idle_timeout
        while idle and idle[0].idle_since < cutoff:
            self._discard(idle.popleft())
        for conn in [conn for conn in idle if conn.peer_gone()]:
            idle.remove(conn)
            self._discard(conn)

    # -- connection accounting --------------------------------------------------------

    async def _checkout(self) -> _Connection:
        """A connection for one request: warmest idle one, a new one, or the queue."""
        if self._closed:
            # A request of a retired policy that outlived its grace (a retry, a hedge):
            # an upstream failure to its client, not a crash.
            raise UpstreamConnectError(f"upstream pool {self.name!r} is closed (its "
                                       "policy was replaced)", upstream=self.name)
        idle = self._idle
        if idle:
            cutoff = trio.current_time() - self._idle_timeout
            while idle:
                conn = idle.pop()
                if conn.idle_since < cutoff:
                    # LIFO: everything below is older still.
                    self._discard(conn)
                    while idle:
                        self._discard(idle.pop())
                    break
                if conn.peer_gone():
                    self._discard(conn)
                    continue
                conn.begin(reused=True)
                return conn
        if self._total < self._max_connections:
            self._total += 1
            return await self._open()
        waiter = _Waiter(trio.lowlevel.current_task())
        waiters = self._waiters
        waiters[waiter] = None

        def abort(_: object) -> trio.lowlevel.Abort:
            del waiters[waiter]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        granted = waiter.grant
        if granted is None:  # a slot was freed for us: connect in it
            return await self._open()
        conn = granted
        conn.begin(reused=True)
        return conn

    async def _open(self) -> _Connection:
        """Connect in a slot already counted in ``_total``; give it back on failure."""
        tls = self._tls
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        try:
            # The TLS handshake is part of connecting: within the same bound, and a
            # failure of it is a connect failure (nothing of the request was sent).
            deadline = trio.current_time() + self.limits.connect_timeout_s
            with self._connect_errors, trio.fail_at(deadline):
                tcp = await trio.open_tcp_stream(self._host, self._port)
                stream = tcp
            if tls is not None:
                # Not https_compatible: an EOF without close_notify is an error, so that
                # a body delimited by the close and cut by a dropped connection is not
                # taken for complete (RFC 9112 9.8).
                stream = trio.SSLStream(tcp, tls.context, server_hostname=tls.server_name)
                try:
                    with self._connect_errors, trio.move_on_at(deadline) as handshake:
                        await stream.do_handshake()
                    if handshake.cancelled_caught:
                        raise UpstreamConnectError(
                            f"TLS handshake with upstream {self.name!r} at {self._host}:"
                            f"{self._port} timed out (the TCP connection was open)",
                            public=f"TLS handshake with upstream {self.name!r} timed out",
                            upstream=self.name)
                except BaseException:
                    tcp.socket.close()
                    raise
        except BaseException:
            self._free_slot()
            raise
        # trio sets TCP_NODELAY on TCP streams already; this states the intent.
        with suppress(OSError):
            tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._opened_total += 1
        conn = _Connection(self.name, stream, self.limits.max_response_header_bytes, tls)
        conn.begin(reused=False)
        return conn

    async def _reconnect(self, stale: _Connection) -> _Connection:
        """Replace a stale connection by a fresh one, keeping its slot."""
        stale.close()
        self._closed_total += 1
        return await self._open()

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not self._closed:
            conn.framing.start_next_cycle()
            if self._waiters:
                if conn.peer_gone():  # what the idle path checks at checkout
                    self._discard(conn)  # its slot goes to the waiter, who connects
                else:
                    self._grant(conn)
                return
            now = trio.current_time()
            conn.idle_since = now
            idle = self._idle
            idle.append(conn)
            cutoff = now - self._idle_timeout
            while idle[0].idle_since < cutoff:
                self._discard(idle.popleft())
            return
        conn.close()
        self._closed_total += 1
        self._free_slot()

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._closed_total += 1
        self._free_slot()

    def _free_slot(self) -> None:
        if self._waiters:
            self._grant(None)
        else:
            self._total -= 1

    def _grant(self, conn: _Connection | None) -> None:
        waiter, _ = self._waiters.popitem(last=False)
        waiter.grant = conn
        trio.lowlevel.reschedule(waiter.task)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
