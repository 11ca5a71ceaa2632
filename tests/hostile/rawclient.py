"""A raw-socket HTTP/1.1 client for hostile tests: exact bytes out, a strict reader in.

httpx cleans up whatever it sends (dot segments, header framing), so malformed input
goes through this module instead. Everything is bounded by trio timeouts; a test
never hangs on a server that keeps a socket open.

    response = await exchange(port, b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    assert response.status == 404 and response.complete

``RawResponse.complete`` is true only when the body ended as its framing says
(Content-Length reached, or the final ``0`` chunk and its CRLF). A body cut by the
server closing the connection has ``complete = False`` and ``ending`` set to
``"eof"`` or ``"reset"``: that is how a client tells an aborted stream from a clean end.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import trio

Ending = Literal["complete", "eof", "reset", "timeout", "limit"]

RECEIVE_BYTES = 64 * 1024
DEFAULT_TIMEOUT_S = 5.0


class RawProtocolError(Exception):
    """The server answered something that is not an HTTP/1.1 response."""


@dataclass
class RawResponse:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False
    ending: Ending = "complete"
    framing: Literal["length", "chunked", "close", "none"] = "none"
    raw_head: bytes = b""
    #: Statuses of the interim (1xx) answers that came before this one.
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> bytes | None:
        wanted = name.lower().encode()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    def header_values(self, name: str) -> list[bytes]:
        wanted = name.lower().encode()
        return [value for key, value in self.headers if key == wanted]

    @property
    def closes(self) -> bool:
        """The server announced that it closes the connection after this response."""
        value = self.header("connection") or b""
        return b"close" in value.lower()


@dataclass
class RawConnection:
    """One TCP connection to a server; send exact bytes, read responses or the close."""

    stream: trio.SocketStream
    buffer: bytearray = field(default_factory=bytearray)
    eof: bool = False
    reset: bool = False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def try_send(self, data: bytes) -> bool:
        """Send; False when the server already closed or reset the connection."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def trickle(self, data: bytes, *, every_s: float, size: int = 1) -> bool:
        """Send ``size`` bytes at a time, ``every_s`` apart; False once the server is gone."""
        for start in range(0, len(data), size):
            if not await self.try_send(data[start:start + size]):
                return False
            await trio.sleep(every_s)
        return True

    async def _fill(self) -> bool:
        """Read more into the buffer; False on EOF or reset."""
        if self.eof:
            return False
        try:
            data = await self.stream.receive_some(RECEIVE_BYTES)
        except trio.BrokenResourceError:
            self.eof = self.reset = True
            return False
        except trio.ClosedResourceError:
            self.eof = True
            return False
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    async def _read_until(self, marker: bytes, limit: int) -> bytes | None:
        while True:
            index = self.buffer.find(marker)
            if index >= 0:
                out = bytes(self.buffer[:index + len(marker)])
                del self.buffer[:index + len(marker)]
                return out
            if len(self.buffer) > limit:
                raise RawProtocolError(f"no {marker!r} within {limit} bytes")
            if not await self._fill():
                return None

    async def _read_exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if not await self._fill():
                break
        out = bytes(self.buffer[:count])
        del self.buffer[:count]
        return out

    async def read_head(self, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> RawResponse | None:
        """The next response head alone, interim (1xx) ones included; None on close or
        when none came within the timeout."""
        with trio.move_on_after(timeout_s):
            head = await self._read_until(b"\r\n\r\n", 1024 * 1024)
            return None if head is None else _parse_head(head)
        return None

    async def read_response(self, *, method: str = "GET", max_body: int = 64 * 1024 * 1024,
                            timeout_s: float = DEFAULT_TIMEOUT_S) -> RawResponse | None:
        """The next response, or None when the connection closed before any byte of it.

        Interim (1xx) responses are skipped. On timeout the partial response is returned
        with ``ending="timeout"``; when the body passes ``max_body`` reading stops with
        ``ending="limit"`` (for endless bodies).
        """
        response: RawResponse | None = None
        interim: list[int] = []
        with trio.move_on_after(timeout_s):
            while True:
                head = await self._read_until(b"\r\n\r\n", 1024 * 1024)
                if head is None:
                    if self.buffer:
                        raise RawProtocolError(f"incomplete response head: {bytes(self.buffer)!r}")
                    return None
                response = _parse_head(head)
                if not 100 <= response.status < 200:
                    response.interim = interim
                    break
                interim.append(response.status)
            await self._read_body(response, method, max_body)
            return response
        if response is None:
            raise trio.TooSlowError("no response head within the timeout")
        response.complete = False
        response.ending = "timeout"
        return response

    async def _read_body(self, response: RawResponse, method: str, max_body: int) -> None:
        length = response.header("content-length")
        chunked = b"chunked" in (response.header("transfer-encoding") or b"").lower()
        if method == "HEAD" or response.status in (204, 304):
            response.complete, response.framing = True, "none"
            return
        if chunked:
            response.framing = "chunked"
            body = bytearray()
            while True:
                line = await self._read_until(b"\r\n", 4096)
                if line is None:
                    break
                size_text = line[:-2].split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise RawProtocolError(f"bad chunk size line {line!r}") from None
                if size == 0:
                    trailer_end = await self._read_until(b"\r\n", 4096)
                    while trailer_end not in (None, b"\r\n"):
                        trailer_end = await self._read_until(b"\r\n", 4096)
                    if trailer_end == b"\r\n":
                        response.complete = True
                    break
                data = await self._read_exact(size + 2)
                body += data[:size]
                if len(data) < size + 2:
                    break
                if len(body) > max_body:
                    response.body = bytes(body)
                    response.ending = "limit"
                    return
            response.body = bytes(body)
        elif length is not None:
            response.framing = "length"
            want = int(length)
            if want > max_body:
                response.body = await self._read_exact(max_body)
                response.ending = "limit"
                return
            response.body = await self._read_exact(want)
            response.complete = len(response.body) == want
        else:
            response.framing = "close"
            body = bytearray()
            while await self._fill():
                if len(self.buffer) > max_body:
                    response.body = bytes(self.buffer)
                    response.ending = "limit"
                    return
            body += self.buffer
            self.buffer.clear()
            response.body = bytes(body)
            response.complete = True  # close-delimited: the close is the end
        if not response.complete:
            response.ending = "reset" if self.reset else "eof"

    async def wait_closed(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ending | None:
        """Wait for the server to close: ``"eof"``, ``"reset"``, or None if still open.

        Bytes that arrive meanwhile are discarded.
        """
        with trio.move_on_after(timeout_s):
            while await self._fill():
                self.buffer.clear()
            return "reset" if self.reset else "eof"
        return None

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    def abort(self) -> None:
        """Close with RST (SO_LINGER 0), as a crashed client would."""
        with contextlib.suppress(OSError):
            self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
        self.stream.socket.close()


def _parse_head(head: bytes) -> RawResponse:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise RawProtocolError(f"not an HTTP/1.x status line: {lines[0]!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise RawProtocolError(f"bad response header line {line!r}")
        headers.append((name.strip().lower(), value.strip()))
    return RawResponse(int(parts[1]), parts[2] if len(parts) > 2 else b"", headers,
                       raw_head=head)


@contextlib.asynccontextmanager
async def connect(port: int, *, timeout_s: float = DEFAULT_TIMEOUT_S):
    """A raw connection to 127.0.0.1:port, closed (forcefully) when the block ends."""
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = RawConnection(stream)
    try:
        yield conn
    finally:
        await conn.aclose()


async def exchange(port: int, data: bytes, *, method: str = "GET",
                   timeout_s: float = DEFAULT_TIMEOUT_S,
                   max_body: int = 64 * 1024 * 1024) -> tuple[RawResponse | None, Ending | None]:
    """Send ``data`` on a fresh connection; the response and how the connection ended.

    The second value is ``"eof"``/``"reset"`` when the server closed the connection
    after the response (within ``timeout_s``), None when it kept it open.
    """
    async with connect(port, timeout_s=timeout_s) as conn:
        await conn.try_send(data)
        response = await conn.read_response(method=method, timeout_s=timeout_s,
                                            max_body=max_body)
        if response is None:
            return None, "reset" if conn.reset else "eof"
        closed = await conn.wait_closed(timeout_s=0.5 if not response.closes else timeout_s)
        return response, closed


def request_bytes(method: str, target: str | bytes,
                  headers: Sequence[tuple[str | bytes, str | bytes]] = (),
                  body: bytes = b"", *, host: bytes = b"gateway.test",
                  version: bytes = b"HTTP/1.1") -> bytes:
    """Serialise a request exactly as given (no validation, no added framing but Host)."""
    def raw(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode("latin-1")

    target_bytes = raw(target)
    lines = [raw(method) + b" " + target_bytes + b" " + version]
    if not any(raw(name).lower() == b"host" for name, _ in headers) and host:
        lines.append(b"Host: " + host)
    lines.extend(raw(name) + b": " + raw(value) for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
