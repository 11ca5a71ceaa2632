"""``Expect: 100-continue`` answered when the body is wanted, not when the head arrives.

A client that sends ``Expect: 100-continue`` waits for ``100 Continue`` before it sends
its body, so that a request refused on its head alone (413 for a declared length over
the limit, 404, 401, 503 when shedding) costs no upload. Hypercorn's HTTP/1.1 protocol
sent ``100 Continue`` as soon as it had parsed the head, before the app had looked at
it, so every refused upload was sent in full anyway; over HTTP/2 it sent none, and the
client waited out its own timer (a second, for curl) before sending.

Now the server puts a callable in the request's scope (:data:`CONTINUE_EXTENSION`)
that sends ``100 Continue`` if the client is still waiting for it; the app calls it
when it first reads the body (as uvicorn does on the first ``receive``). An answer
sent first goes out without it, and the connection is closed after it if the body
never came (HTTP/1.1; an HTTP/2 stream is reset as for any body left unread).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import h11
from hypercorn.events import RawData
from hypercorn.protocol.events import InformationalResponse, Request
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream

#: Scope extension: ``await extension()`` sends ``100 Continue`` when the client asked
#: for it and still waits; a no-op otherwise. Present only on requests that asked.
CONTINUE_EXTENSION = "gateway.send_continue"

SendContinue = Callable[[], Awaitable[None]]


def _asks_to_continue(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"expect" and value.strip().lower() == b"100-continue"
               for name, value in headers)


def apply() -> None:
    """Defer Hypercorn's ``100 Continue`` to the app's first read of the body."""
    original_send_event: Callable[[Any, Any], Awaitable[None]] = H11Protocol._send_h11_event

    async def _send_h11_event(self: Any, event: Any) -> None:
        if type(event) is h11.InformationalResponse and event.status_code == 100:
            return  # sent by ``stream_send`` below when the app reads the body
        await original_send_event(self, event)

    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]

    original_stream_send: Callable[[Any, Any], Awaitable[None]] = H11Protocol.stream_send

    async def stream_send(self: Any, event: Any) -> None:
        if type(event) is InformationalResponse and event.status_code == 100:
            # HTTP/1.1 ignores interim answers from the stream (early hints); this one is
            # sent only while h11 says the client waits for it.
            if self.connection.they_are_waiting_for_100_continue:
                data = self.connection.send(h11.InformationalResponse(
                    status_code=100, headers=self.config.response_headers("h11")))
                await self.send(RawData(data=data))
            return
        await original_stream_send(self, event)

    H11Protocol.stream_send = stream_send  # type: ignore[method-assign]

    original_handle: Callable[[Any, Any], Awaitable[None]] = HTTPStream.handle

    async def handle(self: Any, event: Any) -> None:
        await original_handle(self, event)
        if type(event) is Request and getattr(self, "scope", None) is not None \
                and _asks_to_continue(event.headers):
            self.scope["extensions"][CONTINUE_EXTENSION] = _continue_once(self)

    HTTPStream.handle = handle  # type: ignore[method-assign]


def _continue_once(stream: Any) -> SendContinue:
    sent = False

    async def send_continue() -> None:
        nonlocal sent
        if sent or stream.closed or stream.state != ASGIHTTPState.REQUEST:
            return  # already sent, or the answer has started: too late to ask for more
        sent = True
        await stream.send(InformationalResponse(stream_id=stream.stream_id, headers=[],
                                                status_code=100))

    return send_continue
