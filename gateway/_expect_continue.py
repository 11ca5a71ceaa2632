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
``100-continue`` in an HTTP/1.0 request is ignored (RFC 9110 10.1.1), as h11 does.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable
from typing import Any

import h11
from hypercorn.events import RawData
from hypercorn.protocol.events import InformationalResponse
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio.task_group import TaskGroup

#: Scope extension: ``await extension()`` sends ``100 Continue`` when the client asked
#: for it and still waits; a no-op otherwise. Present only on requests that asked.
CONTINUE_EXTENSION = "gateway.send_continue"

SendContinue = Callable[[], Awaitable[None]]


def _asks_to_continue(headers: list[tuple[bytes, bytes]]) -> bool:
    """h11's rule (``has_expect_100_continue``), so that Hypercorn's HTTP/1.1 and the
    gateway agree on who waits: ``100-continue`` among the comma-separated elements of
    any ``Expect`` line, in any case. Taken as 100-continue by h11 but not here,
    Hypercorn sent 100 at once and a refused upload was sent in full."""
    # Header names arrive lower-cased from both protocols.
    return any(element.strip() == b"100-continue"
               for name, value in headers if name == b"expect"
               for element in value.lower().split(b","))


def apply() -> None:
    """Defer Hypercorn's ``100 Continue`` to the app's first read of the body.

    Hooked where a request's app is spawned (once per request), and on the connections
    of requests that asked only, so that others pay nothing per event."""
    previous_spawn: Callable[..., Awaitable[Any]] = TaskGroup.spawn_app

    async def spawn_app(self: Any, app: Any, config: Any, scope: Any,
                        send: Callable[[Any], Awaitable[None]]) -> Any:
        # RFC 9110 10.1.1: 100-continue in an HTTP/1.0 request is ignored (h11 does); its
        # client sends its body unasked, and an early answer must read it on, not close.
        if (scope["type"] == "http" and scope["http_version"] != "1.0"
                and _asks_to_continue(scope["headers"])):
            stream = getattr(send, "__self__", None)  # HTTPStream.app_send
            if isinstance(stream, HTTPStream):
                protocol = getattr(stream.send, "__self__", None)
                if isinstance(protocol, H11Protocol):
                    # Hypercorn sends 100 as soon as the head is parsed; not on this
                    # connection any more.
                    protocol._send_h11_event = types.MethodType(  # type: ignore[method-assign]
                        _send_h11_event_but_continue, protocol)
                    # This request (the one about to be counted) has not been asked for
                    # its body: answered first, it sent none to read (``_h1_unread``).
                    protocol.__dict__["continue_withheld"] = protocol.keep_alive_requests + 1
                scope["extensions"][CONTINUE_EXTENSION] = _continue_once(stream, protocol)
        return await previous_spawn(self, app, config, scope, send)

    TaskGroup.spawn_app = spawn_app  # type: ignore[method-assign]


async def _send_h11_event_but_continue(self: Any, event: Any) -> None:
    if type(event) is h11.InformationalResponse and event.status_code == 100:
        return  # sent by the request's own ``send_continue`` when it reads the body
    await H11Protocol._send_h11_event(self, event)


def _continue_once(stream: Any, protocol: Any) -> SendContinue:
    sent = False

    async def send_continue() -> None:
        nonlocal sent
        if sent or stream.closed or stream.state != ASGIHTTPState.REQUEST:
            return  # already sent, or the answer has started: too late to ask for more
        sent = True
        if isinstance(protocol, H11Protocol):
            protocol.__dict__["continue_withheld"] = None
            # Hypercorn's HTTP/1.1 drops interim answers a stream sends (early hints);
            # this one goes out only while h11 says the client waits for it.
            if protocol.connection.they_are_waiting_for_100_continue:
                data = protocol.connection.send(h11.InformationalResponse(
                    status_code=100, headers=protocol.config.response_headers("h11")))
                await protocol.send(RawData(data=data))
            return
        await stream.send(InformationalResponse(stream_id=stream.stream_id, headers=[],
                                                status_code=100))

    return send_continue
