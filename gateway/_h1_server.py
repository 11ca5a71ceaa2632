"""The client leg's HTTP/1.1 connection: h11's server side, its state machine unrolled.

Hypercorn's HTTP/1.1 protocol drives an ``h11.Connection`` per client connection, and
h11 cost about 60 µs of CPU per keep-alive request (a GET and its answer), some 13 % of
a proxied request: most of it not in parsing but in its general state machine (a table
lookup and a settling loop over both peers' states for every event), in re-reading the
headers' comma lists for framing and keep-alive several times per message, and in
rebuilding the answer's headers to send them. This class is a drop-in for the server
side only. It reads requests and writes answers byte for byte as h11 0.16 does (its
request-head and body readers are h11's own, so what a client may send is unchanged),
reports the same states, raises the same errors with the same status hints, and keeps
the attributes the gateway's other fixes read (``_reader``, ``_receive_buffer``). A
keep-alive cycle costs about 40 % of h11's, with :func:`response_event` building the
answer's head (``tests/test_h1_server.py`` runs the same conversations through both and
compares every event, byte, state and error).

And it carries the gateway's two leniencies (RFC 9112 2.2, 9.6) and its early-answer
rule, as the h11 subclass before it did:

* Empty lines before a request line are ignored: a CRLF after a POST body (old
  clients add one) made h11 refuse the next request with a 400, which the client on a
  keep-alive connection then read as the answer to its next request.
* Nothing a client sends after a request that closes the connection (``Connection:
  close``, HTTP/1.0) is processed: a stray CRLF or a pipelined request there turned
  that request's answer into a 400 and cancelled its upstream work.
* An answer whose head goes out before its request's body was read says
  ``Connection: close`` unless the rest is known to be small enough to be read and
  dropped (:func:`gateway._h1_unread.rest_discarded`).
"""

from __future__ import annotations

import re
from typing import Any, Final

import h11
from h11._abnf import field_content, token
from h11._headers import CONTENT_LENGTH_MAX_DIGITS, Headers, normalize_and_validate
from h11._readers import (
    ChunkedReader,
    ContentLengthReader,
    _decode_header_lines,
    expect_nothing,
    header_field_re,
    maybe_read_from_IDLE_client,
    request_line_re,
)
from h11._receivebuffer import ReceiveBuffer
from h11._util import validate

from ._h1_unread import rest_discarded

IDLE: Final = h11.IDLE
SEND_RESPONSE: Final = h11.SEND_RESPONSE
SEND_BODY: Final = h11.SEND_BODY
DONE: Final = h11.DONE
MUST_CLOSE: Final = h11.MUST_CLOSE
CLOSED: Final = h11.CLOSED
ERROR: Final = h11.ERROR
MIGHT_SWITCH_PROTOCOL: Final = h11._state.MIGHT_SWITCH_PROTOCOL
SWITCHED_PROTOCOL: Final = h11.SWITCHED_PROTOCOL
NEED_DATA: Final = h11.NEED_DATA
PAUSED: Final = h11.PAUSED

_Request = h11.Request
_Response = h11.Response
_Informational = h11.InformationalResponse
_Data = h11.Data
_EndOfMessage = h11.EndOfMessage
_ConnectionClosed = h11.ConnectionClosed

#: Switches a client may propose (h11's ``_SWITCH_UPGRADE`` and ``_SWITCH_CONNECT``).
_UPGRADE: Final = "upgrade"
_CONNECT: Final = "connect"


class _Framing:
    """What one message's head says about its body and its connection, read in one pass
    over its headers (h11 read the comma lists anew for each question)."""

    __slots__ = ("chunked", "close", "connection", "content_length", "expect_continue",
                 "upgrade")

    def __init__(self, headers: Headers) -> None:
        self.chunked = False
        self.close = False
        self.upgrade = False
        self.expect_continue = False
        self.content_length: int | None = None
        #: The Connection elements (only gathered when there are any).
        self.connection: list[bytes] = []
        for _, name, value in headers._full_items:
            if name == b"content-length":
                if self.content_length is None:
                    # normalize_and_validate left one, digits only.
                    self.content_length = int(value)
            elif name == b"transfer-encoding":
                self.chunked = True  # normalize_and_validate let only "chunked" through
            elif name == b"connection":
                for element in value.lower().split(b","):
                    element = element.strip()
                    if element:
                        self.connection.append(element)
                        if element == b"close":
                            self.close = True
            elif name == b"upgrade":
                if any(element.strip() for element in value.split(b",")):
                    self.upgrade = True
            elif name == b"expect" and any(element.strip() == b"100-continue"
                                           for element in value.lower().split(b",")):
                self.expect_continue = True


def _set_comma_header(headers: list[tuple[bytes, bytes, bytes]], name: bytes,
                      new_values: list[bytes]) -> list[tuple[bytes, bytes, bytes]]:
    """h11's ``set_comma_header``: every ``name`` line dropped, one per new value added
    at the end under the title-cased name."""
    kept = [item for item in headers if item[1] != name]
    title = name.title()
    kept.extend((title, name, value) for value in new_values)
    return kept


class ServerConnection:
    """One client connection's HTTP/1.1, as h11's ``Connection(h11.SERVER)`` sees it."""

    __slots__ = (
        "_keep_alive",
        "_max_incomplete_event_size",
        "_our",
        "_reader",
        "_receive_buffer",
        "_receive_buffer_closed",
        "_request_method",
        "_switches",
        "_their",
        "_writer",
        "client_is_waiting_for_100_continue",
        "their_http_version",
    )

    def __init__(self, our_role: Any = h11.SERVER, max_incomplete_event_size: int = 16 * 1024
                 ) -> None:
        if our_role is not h11.SERVER:
            raise ValueError("ServerConnection is the server side only")
        self._max_incomplete_event_size = max_incomplete_event_size
        self._our: Any = IDLE
        self._their: Any = IDLE
        self._keep_alive = True
        self._switches: set[str] = set()
        self._reader: Any = read_request_head
        #: None between answers (the next event sent must be a head);
        #: else the body writer's state, as (kind, Content-Length left).
        self._writer: tuple[str, int] | None = None
        self._receive_buffer = ReceiveBuffer()
        self._receive_buffer_closed = False
        self._request_method: bytes | None = None
        self.their_http_version: bytes | None = None
        self.client_is_waiting_for_100_continue = False

    # -- h11's read-only view -----------------------------------------------------------

    @property
    def states(self) -> dict[Any, Any]:
        return {h11.CLIENT: self._their, h11.SERVER: self._our}

    @property
    def our_state(self) -> Any:
        return self._our

    @property
    def their_state(self) -> Any:
        return self._their

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return self.client_is_waiting_for_100_continue

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        return (bytes(self._receive_buffer), self._receive_buffer_closed)

    # -- state --------------------------------------------------------------------------

    def _settle(self) -> None:
        """h11's state-triggered transitions, in the order its loop reaches them; then
        the reader for the client's state (a body's reader stays while it sends one)."""
        while True:
            their, our = self._their, self._our
            if self._switches:
                if self._their is DONE:
                    self._their = MIGHT_SWITCH_PROTOCOL
            elif self._their is MIGHT_SWITCH_PROTOCOL:
                self._their = DONE
            if not self._keep_alive:
                if self._their is DONE:
                    self._their = MUST_CLOSE
                if self._our is DONE:
                    self._our = MUST_CLOSE
            client, server = self._their, self._our
            # h11's STATE_TRIGGERED_TRANSITIONS.
            if client is MIGHT_SWITCH_PROTOCOL and server is SWITCHED_PROTOCOL:
                self._their = SWITCHED_PROTOCOL
            elif ((client is CLOSED and (server is DONE or server is IDLE))
                  or (client is ERROR and server is DONE)):
                self._our = MUST_CLOSE
            elif ((server is CLOSED and (client is DONE or client is IDLE))
                  or (server is ERROR and client is DONE)):
                self._their = MUST_CLOSE
            if self._their is their and self._our is our:
                break
        their = self._their
        if their is IDLE:
            self._reader = read_request_head
        elif their is not SEND_BODY:
            self._reader = expect_nothing if their is not ERROR else None

    def disable_keep_alive(self) -> None:
        """The connection closes after this exchange (h11's
        ``process_keep_alive_disabled``)."""
        self._keep_alive = False
        self._settle()

    def start_next_cycle(self) -> None:
        if self._their is not DONE or self._our is not DONE:
            raise h11.LocalProtocolError(
                f"not in a reusable state. self.states={self.states}")
        self._their = self._our = IDLE
        self._request_method = None  # their_http_version stays, as in h11
        self._reader = read_request_head
        self._writer = None

    # -- receiving ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if data:
            if self._receive_buffer_closed:
                raise RuntimeError("received close, then received more data?")
            self._receive_buffer += data
        else:
            self._receive_buffer_closed = True

    def next_event(self) -> Any:
        their = self._their
        if their is ERROR:
            raise h11.RemoteProtocolError("Can't receive data when peer state is ERROR")
        buffer = self._receive_buffer
        if their is IDLE or their is MUST_CLOSE:
            data = buffer._data  # h11 0.16's ReceiveBuffer (pinned in pyproject.toml)
            if their is MUST_CLOSE:
                del data[:]
            elif data and data[0] in (13, 10):  # CR, LF
                stripped = data.lstrip(b"\r\n")
                del data[:len(data) - len(stripped)]
        try:
            event = self._extract_next_receive_event()
            kind = type(event)
            if kind is _Data:
                self.client_is_waiting_for_100_continue = False
            elif kind is _EndOfMessage:
                self._their = DONE
                self.client_is_waiting_for_100_continue = False
                self._settle()
            elif kind is _Request:
                self._received_request(event)
            elif kind is _ConnectionClosed:  # at IDLE, DONE or MUST_CLOSE: EOF between messages
                self._their = CLOSED
                self._settle()
            elif event is NEED_DATA:
                if len(buffer) > self._max_incomplete_event_size:
                    raise h11.RemoteProtocolError("Receive buffer too long",
                                                  error_status_hint=431)
                if self._receive_buffer_closed:
                    raise h11.RemoteProtocolError("peer unexpectedly closed connection")
            return event
        except BaseException as exc:
            self._their = ERROR
            self._settle()
            if isinstance(exc, h11.LocalProtocolError):
                exc._reraise_as_remote_protocol_error()
            raise

    def _extract_next_receive_event(self) -> Any:
        their = self._their
        if their is DONE and self._receive_buffer:
            return PAUSED
        if their is MIGHT_SWITCH_PROTOCOL or their is SWITCHED_PROTOCOL:
            return PAUSED
        reader = self._reader
        assert reader is not None
        event = reader(self._receive_buffer)
        if event is None:
            if not self._receive_buffer and self._receive_buffer_closed:
                read_eof = getattr(reader, "read_eof", None)
                return read_eof() if read_eof is not None else _ConnectionClosed()
            return NEED_DATA
        return event

    def _received_request(self, request: h11.Request) -> None:
        if self._our is not IDLE:  # h11: the server's state sees the request
            raise h11.LocalProtocolError(
                f"can't handle event type Request when role=SERVER and state={self._our}")
        framing = _Framing(request.headers)
        if request.method == b"CONNECT":
            self._switches.add(_CONNECT)
        if framing.upgrade:
            self._switches.add(_UPGRADE)
        self._their = SEND_BODY
        self._our = SEND_RESPONSE
        self._request_method = request.method
        version = self.their_http_version = request.http_version
        if framing.close or version < b"1.1":
            self._keep_alive = False
        if framing.expect_continue and version >= b"1.1":
            self.client_is_waiting_for_100_continue = True
        self._settle()
        if framing.chunked:
            self._reader = ChunkedReader()
        else:
            self._reader = ContentLengthReader(framing.content_length or 0)

    # -- sending ------------------------------------------------------------------------

    def send(self, event: Any) -> bytes | None:
        """The bytes that put ``event`` on the wire (None for ``ConnectionClosed``)."""
        if self._our is ERROR:
            raise h11.LocalProtocolError("Can't send data when our state is ERROR")
        try:
            kind = type(event)
            if kind is _Data:
                return self._send_data(event.data)
            if kind is _EndOfMessage:
                return b"".join(self._send_end(event.headers))
            if kind is _Response:
                if not rest_discarded(self):  # type: ignore[arg-type]
                    self.disable_keep_alive()  # said below, as h11 says it
                return b"".join(self._send_response(event))
            if kind is _Informational:
                return b"".join(self._send_informational(event))
            if kind is _ConnectionClosed:
                self._send_closed()
                return None
            raise h11.LocalProtocolError(
                f"can't handle event type {kind.__name__} when role=SERVER and "
                f"state={self._our}")
        except BaseException:
            self._our = ERROR
            self._settle()
            raise

    def send_failed(self) -> None:
        self._our = ERROR
        self._settle()

    def _cannot(self, kind: str) -> h11.LocalProtocolError:
        return h11.LocalProtocolError(
            f"can't handle event type {kind} when role=SERVER and state={self._our}")

    def _send_informational(self, event: h11.InformationalResponse) -> list[bytes]:
        # In h11's order: the switch, the state, then the writer (which may still refuse).
        if event.status_code == 101:
            if _UPGRADE not in self._switches:
                raise h11.LocalProtocolError(
                    "Received server _SWITCH_UPGRADE event without a pending proposal")
            if self._our is not SEND_RESPONSE:
                raise self._cannot("InformationalResponse")
            self._our = SWITCHED_PROTOCOL
        elif self._our is not SEND_RESPONSE:
            raise self._cannot("InformationalResponse")
        self.client_is_waiting_for_100_continue = False
        self._settle()
        return _head(event, event.headers._full_items)

    def _send_response(self, event: h11.Response) -> list[bytes]:
        status = event.status_code
        method = self._request_method
        switch_connect = _CONNECT in self._switches and 200 <= status < 300
        # The head as h11 cleans it up (_clean_up_response_headers_for_sending).
        items = event.headers._full_items
        framing = _Framing(event.headers)
        bodiless = status in (204, 304) or (method == b"CONNECT" and 200 <= status < 300)
        need_close = False
        #: How the body is framed on the wire: "length", "chunked" or "close".
        body = "length"
        if not bodiless and (framing.chunked or framing.content_length is None):
            # Chunked for an HTTP/1.1 client, else framed by the close; h11 writes the
            # framing header itself (title-cased, last).
            items = _set_comma_header(items, b"content-length", [])
            version = self.their_http_version
            if version is None or version < b"1.1":
                items = _set_comma_header(items, b"transfer-encoding", [])
                need_close = method != b"HEAD"
                body = "close"
            else:
                items = _set_comma_header(items, b"transfer-encoding", [b"chunked"])
                body = "chunked"
        if not self._keep_alive or need_close:
            connection = set(framing.connection)
            connection.discard(b"keep-alive")
            connection.add(b"close")
            items = _set_comma_header(items, b"connection", sorted(connection))
            # Validated as h11 does when it rebuilds the head.
            items = normalize_and_validate(
                [(raw, value) for raw, _, value in items])._full_items
        # The state, as h11's _process_event(SERVER, Response): an answer that is no
        # switch drops the client's proposals, even one the state then refuses.
        if not switch_connect:
            self._switches.clear()
        our = self._our
        if our is not SEND_RESPONSE and our is not IDLE:
            raise self._cannot("Response")
        self._our = SWITCHED_PROTOCOL if switch_connect else SEND_BODY
        if framing.close or need_close:  # the head says close either way
            self._keep_alive = False
        self.client_is_waiting_for_100_continue = False
        self._settle()
        # The body's writer, framed by the real method (a HEAD's answer has none).
        if self._our is SEND_BODY:
            if bodiless or method == b"HEAD":
                self._writer = ("length", 0)
            elif body == "length":
                self._writer = ("length", framing.content_length or 0)
            else:
                self._writer = (body, 0)
        return _head(event, items)

    def _body_writer(self, event_name: str) -> tuple[str, int]:
        writer = self._writer
        if self._our is not SEND_BODY or writer is None:
            raise self._cannot(event_name)
        return writer

    def _send_data(self, data: bytes) -> bytes:
        kind, left = self._body_writer("Data")
        if kind == "length":
            left -= len(data)
            if left < 0:
                raise h11.LocalProtocolError("Too much data for declared Content-Length")
            self._writer = (kind, left)
        elif kind == "chunked":
            return b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        return bytes(data)

    def _send_end(self, trailers: Headers) -> list[bytes]:
        kind, left = self._body_writer("EndOfMessage")
        if kind == "length":
            if left != 0:
                raise h11.LocalProtocolError("Too little data for declared Content-Length")
            if trailers:
                raise h11.LocalProtocolError("Content-Length and trailers don't mix")
            parts: list[bytes] = []
        elif kind == "chunked":
            parts = [b"0\r\n", *_header_lines(trailers._full_items), b"\r\n"]
        else:
            if trailers:
                raise h11.LocalProtocolError("can't send trailers to HTTP/1.0 client")
            parts = []
        self._our = DONE
        self._writer = None
        self._settle()
        return parts

    def _send_closed(self) -> None:
        our = self._our
        if our is not IDLE and our is not DONE and our is not MUST_CLOSE and our is not CLOSED:
            raise self._cannot("ConnectionClosed")
        self._our = CLOSED
        self._settle()


#: Header names joined with ``:`` (which no name may hold): all tokens.
_NAMES: Final = re.compile(rb"%s(?::%s)*" % (token.encode(), token.encode()))
#: Header values joined with LF (which no value may hold): each a field-value as h11
#: reads it (no leading or trailing whitespace, no NUL, CR or LF).
_VALUES: Final = re.compile(rb"(?:%s)?(?:\n(?:%s)?)*" % (field_content.encode(),
                                                          field_content.encode()))


def _headers_as_h11(pairs: list[tuple[bytes, bytes]], parsed: bool) -> Headers | None:
    """``normalize_and_validate(pairs, _parsed=parsed)`` on its common path: the names
    lower-cased, one Content-Length kept, Transfer-Encoding only ``chunked``; with
    ``parsed`` False every name a token and every value a field-value (checked over
    the joined names and values, two regular expressions for the whole head). None
    for anything else (a name or value h11 refuses, conflicting lengths): h11's own
    function then says why, in its words."""
    if not parsed:
        for name, value in pairs:
            if type(name) is not bytes or type(value) is not bytes:
                return None  # h11 converts other types first
        names = b":".join([name for name, _ in pairs])
        if pairs and (_NAMES.fullmatch(names) is None
                      or names.count(b":") != len(pairs) - 1):
            return None
        values = b"\n".join([value for _, value in pairs])
        if _VALUES.fullmatch(values) is None or values.count(b"\n") != len(pairs) - 1:
            return None
    items: list[tuple[bytes, bytes, bytes]] = []
    length: bytes | None = None
    chunked = False
    for raw, value in pairs:
        name = raw.lower()
        if name == b"content-length":
            if b"," in value:
                return None
            value = value.strip()
            if not value.isdigit() or len(value) > CONTENT_LENGTH_MAX_DIGITS:
                return None
            if length is not None:
                if value != length:
                    return None
                continue
            length = value
        elif name == b"transfer-encoding":
            value = value.lower()
            if chunked or value != b"chunked":
                return None
            chunked = True
        items.append((raw, name, value))
    return Headers(items)


def response_event(status_code: int, headers: list[tuple[bytes, bytes]]) -> h11.Response:
    """``h11.Response(status_code=..., headers=...)``, validated as h11 validates it,
    at a fraction of the cost; h11's constructor whenever it would refuse it."""
    if type(status_code) is int and 200 <= status_code < 1000 and type(headers) is list:
        validated = _headers_as_h11(headers, parsed=False)
        if validated is not None:
            event = object.__new__(_Response)
            object.__setattr__(event, "headers", validated)
            object.__setattr__(event, "status_code", status_code)
            object.__setattr__(event, "reason", b"")
            object.__setattr__(event, "http_version", b"1.1")
            return event
    return _Response(status_code=status_code, headers=headers)


def read_request_head(buffer: ReceiveBuffer) -> h11.Request | None:
    """h11's reader of a request head (``maybe_read_from_IDLE_client``) on its common
    path: the same lines, the same regular expressions per line, the same checks of
    Host, Content-Length and Transfer-Encoding, without h11 checking the line's
    method and target a second time or normalising the headers in another pass.
    Anything unusual (an obs-fold, a refused line) goes to h11's reader for its error."""
    data = buffer._data
    if data[:1].isalpha():  # hence not obviously invalid (h11 checks that too)
        lines = buffer.maybe_extract_lines()
        if lines is None:
            return None
        pairs: list[tuple[bytes, bytes]] = []
        line_match = request_line_re.fullmatch(lines[0]) if lines else None
        if line_match is not None:
            for line in lines[1:]:
                if line and line[0] in (32, 9):  # SP, HTAB: an obs-fold
                    break
                field = header_field_re.fullmatch(line)
                if field is None:
                    break
                pairs.append((field["field_name"], field["field_value"]))
            else:
                headers = _headers_as_h11(pairs, parsed=True)
                if headers is not None:
                    hosts = 0
                    for _, name, _ in headers._full_items:
                        if name == b"host":
                            hosts += 1
                    version = line_match["http_version"]
                    if hosts == 1 or (hosts == 0 and version != b"1.1"):
                        request = object.__new__(_Request)
                        object.__setattr__(request, "method", line_match["method"])
                        object.__setattr__(request, "target", line_match["target"])
                        object.__setattr__(request, "http_version", version)
                        object.__setattr__(request, "headers", headers)
                        return request
        # Something h11 refuses or reads its own way: the rest of its reader, on the
        # same lines.
        if not lines:
            raise h11.LocalProtocolError("no request line received")
        raw_lines: list[bytes] = lines  # type: ignore[assignment]  # as h11 passes them
        matches = validate(request_line_re, raw_lines[0], "illegal request line: {!r}",
                           raw_lines[0])
        return _Request(headers=list(_decode_header_lines(raw_lines[1:])), _parsed=True,
                        **matches)
    return maybe_read_from_IDLE_client(buffer)


def _header_lines(items: list[tuple[bytes, bytes, bytes]]) -> list[bytes]:
    """h11's ``write_headers``: Host first, then the rest in order (without the blank
    line that ends the head)."""
    lines = [b"%s: %s\r\n" % (raw, value) for raw, name, value in items if name == b"host"]
    lines.extend(b"%s: %s\r\n" % (raw, value) for raw, name, value in items if name != b"host")
    return lines


def _head(event: Any, items: list[tuple[bytes, bytes, bytes]]) -> list[bytes]:
    """h11's ``write_any_response``."""
    if event.http_version != b"1.1":
        raise h11.LocalProtocolError("I only send HTTP/1.1")
    return [b"HTTP/1.1 %d %s\r\n" % (event.status_code, event.reason), *_header_lines(items),
            b"\r\n"]


__all__ = ["ServerConnection"]
