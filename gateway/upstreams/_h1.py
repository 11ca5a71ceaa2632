"""HTTP/1.1 framing of the upstream leg: requests written here, answers parsed by llhttp.

h11 (pure Python) cost about 70 µs of CPU per proxied request on this leg, the largest
single share of the gateway's own: a request event validated header by header, a state
machine stepped per event, every answer head matched line by line with regular
expressions. Here a request head is checked with three regular expressions over its
joined names, values and target, and written in one join; the answer is parsed by
httptools (llhttp, Node's parser, in C), strict as configured by default.

The connection speaks h11's events and raises h11's exceptions, so that the pool's one
place that maps library errors (``_MapExceptions``) reads them as before:
``h11.RemoteProtocolError`` for what the upstream got wrong, ``h11.LocalProtocolError``
for a request that cannot be framed. Like h11's, an error is sticky: every later
``next_event`` raises it again.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Final

import h11
import httptools

NEED_DATA: Final = h11.NEED_DATA

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: Header names joined with ``:`` (no name may hold one): all tokens.
_NAMES = re.compile(_TOKEN + rb"(?::" + _TOKEN + rb")*")
#: A byte no header value may hold (values are joined with HTAB, which they may).
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_METHOD = re.compile(_TOKEN)
_HEAD_END = b"\r\n\r\n"
#: ``close`` among a Connection header's tokens, in any case.
_CLOSE = re.compile(rb"(?:^|,)[ \t]*close[ \t]*(?:,|$)", re.IGNORECASE)


class InformationalResponse:
    """A 1xx head passed on the way to the answer."""

    __slots__ = ("headers", "reason", "status_code")

    def __init__(self, status_code: int, reason: bytes,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status_code
        self.reason = reason
        #: (lower-cased name, value) pairs, as h11 gives them.
        self.headers = headers


class Response(InformationalResponse):
    """The answer's head."""

    __slots__ = ()


class Data:
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class EndOfMessage:
    __slots__ = ()


class ConnectionClosed:
    __slots__ = ()


END_OF_MESSAGE: Final = EndOfMessage()
CONNECTION_CLOSED: Final = ConnectionClosed()

Event = InformationalResponse | Data | EndOfMessage | ConnectionClosed | type[h11.NEED_DATA]


class RequestHead:
    """A request head, validated and written once (it may be sent again on a fresh
    connection), with the framing its body will have."""

    __slots__ = ("chunked", "close", "data", "is_head", "length")

    def __init__(self, method: str, target: str, headers: list[tuple[bytes, bytes]]) -> None:
        raw_method = method.encode("ascii")
        raw_target = target.encode("ascii")
        if _METHOD.fullmatch(raw_method) is None:
            raise h11.LocalProtocolError(f"illegal method {method!r}")
        if _TARGET.fullmatch(raw_target) is None:
            raise h11.LocalProtocolError(f"illegal request target {target!r}")
        names = [name for name, _ in headers]
        joined = b":".join(names)
        if names and (_NAMES.fullmatch(joined) is None
                      or joined.count(b":") != len(names) - 1):  # a name holding a colon
            bad = next((n for n in names if re.fullmatch(_TOKEN, n) is None), b"")
            raise h11.LocalProtocolError(f"illegal header name {bad!r}")
        if _BAD_VALUE_BYTE.search(b"\t".join([value for _, value in headers])) is not None:
            raise h11.LocalProtocolError("illegal byte in a header value")
        length: int | None = None
        chunked = close = False
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise h11.LocalProtocolError(f"bad Content-Length {value!r}")
                length = int(value)
            elif lowered == b"transfer-encoding":
                if value.lower() != b"chunked" or chunked:
                    raise h11.LocalProtocolError("only Transfer-Encoding: chunked is sent")
                chunked = True
            elif lowered == b"connection":
                close = close or _CLOSE.search(value) is not None
        #: Content-Length of the body (0 when neither framing header is there).
        self.length = None if chunked else (length or 0)
        self.chunked = chunked
        #: The request says ``Connection: close``: the connection ends with it.
        self.close = close
        self.is_head = raw_method == b"HEAD"
        self.data = b"".join([raw_method, b" ", raw_target, b" HTTP/1.1\r\n",
                              *[b"%s: %s\r\n" % pair for pair in headers], b"\r\n"])


class _Stop(Exception):
    """Raised from a parser callback to stop parsing where it stands."""


class ClientConnection:
    """One upstream connection's HTTP/1.1 framing, cycle after cycle (keep-alive)."""

    __slots__ = (
        "_body_until_eof",
        "_error",
        "_events",
        "_head_buffer",
        "_head_bytes",
        "_headers",
        "_heads",
        "_in_body",
        "_is_head",
        "_keep_alive",
        "_length",
        "_max_head_bytes",
        "_our_close",
        "_parser",
        "_reason",
        "_started",
        "_stop",
        "_their_done",
        "_trailing",
        "our_done",
    )

    def __init__(self, max_head_bytes: int) -> None:
        self._max_head_bytes = max_head_bytes
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._cycle()

    def _cycle(self) -> None:
        self.our_done = False
        self._our_close = False
        self._is_head = False
        self._length: int | None = 0
        self._events: deque[Event] = deque()
        #: Why the answer is refused; raised anew on each call (an exception kept and
        #: raised again would hold, through its traceback, the frame that holds it).
        self._error: str | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._started = False  # a byte of the answer came
        self._in_body = False
        self._body_until_eof = False
        self._their_done = False
        self._keep_alive = False
        self._trailing = False  # bytes (or the upstream's close) after the answer
        self._head_bytes = 0
        self._heads = 0  # heads complete this cycle (1xx ones included)
        self._head_buffer: bytearray | None = None
        self._stop = ""

    def close(self) -> None:
        """Drop the parser (it refers back to this object: a cycle, and the worker's
        garbage collector runs seldom)."""
        self._parser = None

    # -- the request --------------------------------------------------------------------

    def send_head(self, head: RequestHead) -> bytes:
        self._length = head.length
        self._our_close = head.close
        self._is_head = head.is_head
        if head.is_head:
            self._head_buffer = bytearray()
        return head.data

    def send_data(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        size = len(data)
        if self._length is None:  # chunked
            return b"".join([b"%x\r\n" % size, data, b"\r\n"]) if size else b""
        if size > self._length:
            raise h11.LocalProtocolError("Too much data for declared Content-Length")
        self._length -= size
        return data

    def send_end(self) -> bytes:
        if self._length is None:
            data = b"0\r\n\r\n"
        elif self._length:
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        else:
            data = b""
        self.our_done = True
        return data

    # -- the answer ---------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Parse what the socket gave; ``b""`` is the upstream's end of stream."""
        if self._error is not None:
            return
        if not data:
            self._end_of_stream()
            return
        if self._their_done:
            self._trailing = True
            return
        self._started = True
        parser = self._parser
        if parser is None:
            raise h11.LocalProtocolError("the connection is closed")
        if self._head_buffer is not None:
            self._head_buffer += data
        # Bytes that are no body (a head, a chunk's size line, a trailer section) are
        # bounded like a head: counted here, each body byte taken off as it is parsed,
        # the count started again at each head and chunk. What follows a restart in the
        # same read goes uncounted, so the bound holds within two reads (128 KiB).
        self._head_bytes = max(self._head_bytes, 0) + len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the upstream switched protocols unasked")
        except httptools.HttpParserCallbackError:
            stop, self._stop = self._stop, ""
            if stop == "trailing":
                self._trailing = True
            elif stop == "head-answered":
                self._head_answered()
            elif stop != "failed":
                raise
        except httptools.HttpParserError as error:
            if self._their_done:
                self._trailing = True  # garbage after the answer: not reused
            else:
                self._fail(str(error) or type(error).__name__)
        if self._head_bytes > self._max_head_bytes and not self._their_done:
            self._fail(f"response head (or a chunk's framing) over {self._max_head_bytes} "
                       "bytes")

    def next_event(self) -> Event:
        events = self._events
        if events:
            event = events.popleft()
            if type(event) is Data and events and type(events[0]) is Data:
                parts = [event.data]
                while events and type(events[0]) is Data:
                    parts.append(events.popleft().data)  # type: ignore[union-attr]
                return Data(b"".join(parts))
            return event
        if self._error is not None:
            raise h11.RemoteProtocolError(self._error)
        return NEED_DATA

    def reusable(self) -> bool:
        """Both messages ended, both sides keep the connection, nothing came after."""
        return (self.our_done and self._their_done and self._keep_alive
                and not self._our_close and not self._trailing and self._error is None)

    def start_next_cycle(self) -> None:
        if not self.reusable():
            raise h11.LocalProtocolError("not in a reusable state")
        parser = self._parser
        if parser is not None and not parser.should_keep_alive():
            # llhttp read the connection as closing where HTTP/1.1 does not (a
            # Proxy-Connection header): it would refuse the next answer.
            self._parser = httptools.HttpResponseParser(self)
        self._cycle()

    def _fail(self, why: str) -> None:
        self._error = why

    def _end_of_stream(self) -> None:
        if self._their_done:
            self._trailing = True  # closed after the answer: not reused
        elif self._in_body and self._body_until_eof:
            self._events.append(END_OF_MESSAGE)  # a body framed by the close itself
            self._their_done = True
        elif not self._started:
            self._events.append(CONNECTION_CLOSED)
        else:
            self._fail("peer closed connection without sending complete message body")

    def _head_answered(self) -> None:
        """A HEAD's answer has no body whatever its framing says: it ends at its head;
        anything after that head is trailing."""
        buffer = self._head_buffer
        assert buffer is not None
        end = -len(_HEAD_END)
        for _ in range(self._heads):
            end = buffer.find(_HEAD_END, end + len(_HEAD_END))
        if end < 0 or len(buffer) > end + len(_HEAD_END):
            self._trailing = True
        self._head_buffer = None
        # The parser stopped inside a message (it would read the body the head
        # announced): the next cycle needs a fresh one.
        self._parser = httptools.HttpResponseParser(self)

    # -- llhttp's callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._their_done:
            self._stop = "trailing"
            raise _Stop

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_body:  # a chunked body's trailers are dropped
            self._headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        headers, reason = self._headers, self._reason
        self._headers, self._reason = [], b""
        self._heads += 1
        self._head_bytes = 0
        if status < 100:  # three digits, but no HTTP status (h11 refused it too)
            self._stop = "failed"
            self._fail(f"status {status:03d} is no HTTP status")
            raise _Stop
        if status < 200:
            self._events.append(InformationalResponse(status, reason, headers))
            return
        length = chunked = close = False
        for name, value in headers:
            if name == b"connection":
                close = close or _CLOSE.search(value) is not None
            elif name == b"content-length":
                length = True
            elif name == b"transfer-encoding":
                # As h11: nothing else frames a body, and chunked twice is no framing
                # (RFC 9112 §7: chunked is applied once).
                if value.lower() != b"chunked" or chunked:
                    self._stop = "failed"
                    self._fail("only Transfer-Encoding: chunked, once, is read")
                    raise _Stop
                chunked = True
        self._events.append(Response(status, reason, headers))
        self._in_body = True
        self._body_until_eof = not length and not chunked and status not in (204, 304)
        # Kept only after an HTTP/1.1 answer, as h11 kept it (an HTTP/1.0 one framed by
        # Transfer-Encoding must close, RFC 9112 §6.1), and read here rather than from
        # llhttp: it would take a HEAD answer without a length for a body framed by the
        # close, and Proxy-Connection (no HTTP/1.1 header) for Connection.
        self._keep_alive = (parser.get_http_version() == "1.1" and not close
                            and (self._is_head or not self._body_until_eof))
        if self._is_head:
            self._events.append(END_OF_MESSAGE)
            self._their_done = True
            self._stop = "head-answered"
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._head_bytes -= len(body)
        self._events.append(Data(body))

    def on_chunk_header(self) -> None:
        self._head_bytes = 0

    def on_message_complete(self) -> None:
        if not self._in_body:
            return  # a 1xx head's end
        self._events.append(END_OF_MESSAGE)
        self._their_done = True
