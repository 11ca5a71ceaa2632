"""The public request path as a lean ASGI handler: door → route → deadline → nursery.

Every request runs in its own nursery under one traced cancel scope whose deadline is
min(route policy, client header). A helper task owns the ASGI ``receive`` channel: it
relays the body (bounded buffer, so a slow upstream slows the client down) and, once
the body is in, waits for ``http.disconnect`` and cancels the whole request with cause
``client_disconnect``. Hypercorn never cancels an app itself (hypercorn#210), so this
watch is what makes a departed client stop its upstream work at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import trio

from ._deadlines import RequestDeadline, effective_deadline, parse_deadline_header
from ._errors import (
    BadRequest,
    GatewayError,
    InternalError,
    PayloadTooLarge,
    RequestTimeout,
    Shed,
    UpstreamTimeout,
    collapse_group,
)
from ._expect_continue import CONTINUE_EXTENSION, SendContinue
from ._guards import MAX_METHOD_LENGTH, BodyFraming, check_request_head
from ._h1_unread import discards
from ._headers import request_id_from
from ._hypercorn_fixes import DISCONNECT_EXTENSION
from ._metrics import METRICS
from ._routing import RouteMatch, origin_form
from ._runtime import Runtime, Snapshot
from ._trace import Trace, TracedScope, traced_scope
from ._trace_context import TraceContext

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

access_log = logging.getLogger("gateway.access")
log = logging.getLogger("gateway.request")
#: Body chunks the relay holds for a handler that is not reading (at most 256 KiB, on
#: top of Hypercorn's own queue): enough for most API bodies, so that a client leaving
#: while its request waits is still seen; a larger unread body is held back by TCP
#: flow control, and its request ends at its deadline or body timeout.
RELAY_CHUNKS = 4
_JSON_HEADERS = [(b"content-type", b"application/json")]


async def send_shielded(send: Send, message: dict[str, Any]) -> None:
    """Send ``http.response.start`` where no cancellation can interrupt it.

    Hypercorn's ``app_send`` moves h11's state before its first checkpoint; a cancel
    landing there leaves Hypercorn and h11 out of step, and the connection task then
    crashes the worker (``LocalProtocolError`` when it tries to answer 500). Hypercorn
    already shields the socket write itself, so this adds no new way to block; the
    cancellation is delivered at the next checkpoint after the send. Body messages
    need no shield: a cancel between h11 and Hypercorn there only ends the response
    early, which the client sees as a truncated body.
    """
    with trio.CancelScope(shield=True):
        await send(message)


class RequestBody:
    """The client's body as an async iterator, relayed by the receive task.

    The whole body must arrive within ``timeout_s`` of the request's start (a trickled
    body is cut with 408) and within ``limit`` bytes (413).
    """

    def __init__(self, receiver: trio.MemoryReceiveChannel[bytes] | None, limit: int,
                 framing: BodyFraming, timeout_s: float,
                 send_continue: SendContinue | None = None) -> None:
        self._receiver = receiver
        self._send_continue = send_continue
        self._limit = limit
        self._deadline = trio.current_time() + timeout_s
        self.announced = framing.announced
        self.declared_length = framing.length
        self.received = 0
        #: The whole body was read (or there is none).
        self.complete = receiver is None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._receiver is None:  # a request without a body
            return
        if self._send_continue is not None:  # the client waits to be asked for it
            send_continue, self._send_continue = self._send_continue, None
            await send_continue()
        while True:
            with trio.move_on_at(self._deadline) as waited:
                try:
                    chunk = await self._receiver.receive()
                except trio.EndOfChannel:
                    self.complete = True
                    return
            if waited.cancelled_caught:
                raise RequestTimeout("the request body did not arrive in time")
            self.received += len(chunk)
            if self.received > self._limit:
                raise PayloadTooLarge(f"the request body is larger than {self._limit} bytes")
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    @property
    def unread(self) -> bool:
        """No byte of the body has been taken yet: a try that failed before reading any
        (its connect) leaves it whole for the next (a chunk is counted as it is taken)."""
        return self.received == 0

    @property
    def waits_to_be_asked(self) -> bool:
        """The client sent ``Expect: 100-continue`` and was never asked for its body."""
        return self._send_continue is not None


class RequestContext:
    """What the handlers of one request share: its policy, trace, scope and I/O."""

    def __init__(self, runtime: Runtime, snapshot: Snapshot, scope: Scope, send: Send,
                 trace: Trace, request_id: str, match: RouteMatch, deadline: RequestDeadline,
                 body: RequestBody) -> None:
        self.runtime = runtime
        self.snapshot = snapshot
        self.scope = scope
        self._send = send
        self.trace = trace
        self.request_id = request_id
        self.match = match
        self.deadline = deadline
        self.body = body
        self.request_scope: TracedScope | None = None
        self.response_started = False
        self.response_complete = False
        self.status: int | None = None
        self._json_body: dict[str, Any] | BadRequest | None = None
        self._json_lock: trio.Lock | None = None

    @property
    def policy(self) -> Any:
        return self.snapshot.policy

    async def json_body(self) -> dict[str, Any]:
        """The body as a JSON object, read and parsed once: the calls of a fan-out that
        take arguments from it share it (the body can be read only once)."""
        if self._json_lock is None:
            self._json_lock = trio.Lock()
        async with self._json_lock:
            if self._json_body is None:
                data = await self.body.read()
                try:
                    parsed = json.loads(data) if data else {}
                except (ValueError, RecursionError):  # RecursionError: nested too deep
                    self._json_body = BadRequest("the request body is not valid JSON")
                else:
                    self._json_body = parsed if isinstance(parsed, dict) else BadRequest(
                        "the request body must be a JSON object")
        if isinstance(self._json_body, BadRequest):
            raise self._json_body
        return self._json_body

    async def start_response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.response_started = True
        self.status = status
        await send_shielded(self._send, {"type": "http.response.start", "status": status,
                                         "headers": headers})

    async def send_body(self, data: bytes, *, more: bool) -> None:
        if not more:
            # Hypercorn answers the final body with ``http.disconnect`` on the receive
            # channel; from here on that message means "done", not "client gone".
            self.response_complete = True
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def send_json(self, status: int, payload: Any,
                        extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()),
                   (self.policy.server.request_id_header.encode(), self.request_id.encode())]
        if extra_headers:
            headers.extend(extra_headers)
        await self.start_response(status, headers)
        await self.send_body(body, more=False)


#: A deadline as a client is told of it, by the kind of span whose deadline fired: which
#: bound it was (``scope``) and why, without the gateway's span names (the trace has them).
_DEADLINE_SCOPES = {
    "request": ("request", "the request's deadline passed"),
    "stage": ("request", "no answer before the request's deadline"),
    "call": ("call", "the call's timeout passed"),
    "attempt": ("try", "the try's per_try_timeout passed"),
}


def error_payload(error: GatewayError, request_id: str) -> dict[str, Any]:
    """The error's JSON body: its cause, a short reason, and the call and upstream it is
    about. The cancel scope that fired is the trace's: a deadline says only whether it
    was the request's, a call's or a try's, and a refusal (shed, circuit open) names
    none, its cause says it all. The reason is the error's public one: an upstream's
    address and the words of the OS, TLS or database are the trace's too."""
    payload: dict[str, Any] = {"error": error.public, "cause": error.cause,
                               "request_id": request_id}
    for key in ("call", "upstream"):
        if key in error.detail:
            payload[key] = error.detail[key]
    fired = error.detail.get("scope")
    if isinstance(error, UpstreamTimeout) and isinstance(fired, str):
        scope, reason = _DEADLINE_SCOPES.get(fired.partition(" ")[0],
                                             (None, "a deadline passed"))
        if error.detail.get("refused"):
            reason = "too little time left to call the upstream; not sent"
        payload["error"] = reason
        if scope is not None:
            payload["scope"] = scope
    return payload


async def send_error(send: Send, error: GatewayError, request_id: str,
                     request_id_header: bytes, *, close: bool = False) -> None:
    """The error's JSON answer; ``close``: the connection will not carry another request
    (its body is unread), and the answer says so."""
    body = json.dumps(error_payload(error, request_id), separators=(",", ":")).encode()
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()),
               (request_id_header, request_id.encode())]
    retry_after = error.retry_after_header()
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    if "allow" in error.detail:
        headers.append((b"allow", str(error.detail["allow"]).encode()))
    if close or error.status in (400, 408, 413, 414, 431):
        headers.append((b"connection", b"close"))
    await send_shielded(send, {"type": "http.response.start", "status": error.status,
                               "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _body_relayed(scope: Scope, framing: BodyFraming) -> bool:
    """Whether the request may have a body to relay: one is announced, or the server
    offers no stream-close callback to learn of a disconnect by, or it is HTTP/2 (whose
    head need not announce a body)."""
    if DISCONNECT_EXTENSION not in scope.get("extensions", {}):
        return True
    return framing.announced or scope.get("http_version") not in ("1.1", "1.0")


def _rest_discarded(scope: Scope, framing: BodyFraming | None,
                    context: RequestContext | None) -> bool:
    """Whether the server reads and drops the unread rest of this HTTP/1.1 request's
    body and keeps the connection (``_h1_unread``): a small rest, unless its client
    still waits to be asked for it (``Expect: 100-continue``: it sent none)."""
    if framing is None or scope.get("http_version") != "1.1":
        return False
    if context is None:
        if CONTINUE_EXTENSION in scope.get("extensions", {}):
            return False
        return discards(framing.length, 0)
    if context.body.waits_to_be_asked:
        return False
    return discards(framing.length, context.body.received)


def _stream_closed(context: RequestContext, request_scope: TracedScope,
                   extension: dict[str, Any]) -> None:
    """The server closed the request's stream: unless the response was complete, the
    client left (or, after ``send_timeout``, was dropped for not taking its answer),
    and everything the request started is cancelled."""
    if context.response_complete:
        return
    if extension.get("send_timeout"):
        request_scope.cancel("deadline", scope="send_timeout")
    else:
        request_scope.cancel("client_disconnect")


async def _relay_receive(receive: Receive, sender: trio.MemorySendChannel[bytes],
                         context: RequestContext, request_scope: TracedScope) -> None:
    """Feed the body to the handler, then turn ``http.disconnect`` into a cancel.

    A disconnect after the response was completed is Hypercorn closing the exchange,
    not the client leaving: it cancels nothing.
    """
    async with sender:
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "http.request":
                chunk = message.get("body", b"")
                if chunk:
                    # If the handler stopped reading, keep watching for the disconnect.
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await sender.send(chunk)
                if not message.get("more_body", False):
                    break
            elif kind == "http.disconnect":
                if not context.response_complete:
                    request_scope.cancel("client_disconnect")
                return
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not context.response_complete:
                request_scope.cancel("client_disconnect")
            return


Handler = Callable[[RequestContext], Awaitable[None]]


async def handle_request(runtime: Runtime, scope: Scope, receive: Receive, send: Send,
                         dispatch: Handler) -> None:
    """Serve one public HTTP request under the current policy snapshot."""
    snapshot = runtime.enter()
    policy = snapshot.policy
    server = policy.server
    rid_header = server.request_id_header.encode()
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    request_id = request_id_from(headers, rid_header)
    method: str = scope["method"]
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    raw_path = origin_form(raw_path.partition(b"?")[0])
    # Bounded as the path is: an HTTP/2 :method is the client's (refused below when
    # it is no short token, but a trace is kept of that refusal too).
    trace = Trace(request_id, method[:MAX_METHOD_LENGTH], raw_path.decode("latin-1")[:512],
                  None)
    if server.tracing and server.trace_context == "w3c":
        trace.context = TraceContext.from_headers(headers)
    gate = runtime.gate
    entered = False
    request_scope: TracedScope | None = None
    context: RequestContext | None = None
    framing: BodyFraming | None = None
    try:
        framing = check_request_head(scope, server.limits)
        if not gate.try_enter():
            raise Shed("the gateway is at max_inflight", retry_after_s=server.shed_retry_after,
                       reason="max_inflight")
        entered = True
        if runtime.loop_lag.overloaded(server.max_loop_lag):
            gate.shed_total += 1
            raise Shed("the gateway is overloaded", retry_after_s=server.shed_retry_after,
                       reason="loop_lag")
        match = snapshot.routes.match(method, raw_path)
        trace.route = match.route.path
        now = trio.current_time()
        header_deadline = parse_deadline_header(headers, server.deadline_header.encode())
        deadline = effective_deadline(now, match.route.deadline or policy.defaults.deadline,
                                      header_deadline)
        trace.deadline_source = deadline.source
        limit = match.route.max_body or server.limits.max_body
        declared = framing.length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"the request body ({declared} bytes) is larger than "
                                  f"{limit} bytes")
        on_close = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
        relayed = _body_relayed(scope, framing)
        if not relayed:
            body = RequestBody(None, limit, framing, server.limits.body_timeout)
        else:
            # Room for a few chunks (Hypercorn reads at most 64 KiB at a time): while
            # the handler is not reading (waiting for an upstream slot, say) the relay
            # goes on taking the client's messages, so a disconnect is still seen.
            sender, receiver = trio.open_memory_channel[bytes](RELAY_CHUNKS)
            body = RequestBody(receiver, limit, framing, server.limits.body_timeout,
                               scope.get("extensions", {}).get(CONTINUE_EXTENSION))
        context = RequestContext(runtime, snapshot, scope, send, trace, request_id, match,
                                 deadline, body)
        with traced_scope(trace, None, "request", match.route.path, deadline=deadline.at,
                          deadline_source=deadline.source) as request_scope:
            context.request_scope = request_scope
            if on_close is not None:
                # The server calls back when the stream closes: the client leaving is
                # seen at once, even while a body waits unread behind the relay.
                on_close["on_close"] = partial(_stream_closed, context, request_scope,
                                               on_close)
                if on_close.get("closed"):  # the client left before this task started
                    _stream_closed(context, request_scope, on_close)
            try:
                if not relayed:
                    await dispatch(context)
                else:
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(_relay_receive, receive, sender, context,
                                               request_scope)
                            await dispatch(context)
                            nursery.cancel_scope.cancel(reason="request answered")
                    except BaseExceptionGroup as group:
                        raise collapse_group(group) from None
                    receiver.close()
            finally:
                if on_close is not None:
                    on_close.pop("on_close", None)
        if request_scope.cancel_cause == "client_disconnect":
            trace.status, trace.cause = 499, "client_disconnect"
        else:
            trace.status = context.status
            trace.cause = request_scope.cancel_cause  # dropped after send_timeout
    except GatewayError as error:
        if trace.route is None and "route" in error.detail:
            trace.route = error.detail["route"]  # a 405: the route the path is one of
        trace.cause = error.cause if error.status >= 500 or error.cause == "shed" else None
        if isinstance(error, Shed):
            trace.cause = "shed"
        if context is not None and context.response_started:
            # Too late for a status: end without finishing the body, so Hypercorn drops
            # the connection and the client can tell the body is incomplete.
            trace.status = context.status
            trace.cause = trace.cause or error.cause
            return
        trace.status = error.status
        # Answered before its body was read: unless the server reads and drops the
        # rest to keep the connection (a small one), it closes the connection after
        # the answer (the unread body would be taken for the next request): say so.
        unread = (framing is not None and framing.announced
                  and (context is None or not context.body.complete)
                  and scope.get("http_version") in ("1.0", "1.1"))
        close = unread and not _rest_discarded(scope, framing, context)
        await send_error(send, error, request_id, rid_header, close=close)
    except Exception:
        # A fault of the gateway's own (a bug): a JSON 500 with the request id and the
        # traceback in the log, where Hypercorn would answer an empty 500.
        log.exception("request %s failed inside the gateway", request_id)
        trace.status, trace.cause = 500, "internal"
        if context is None or not context.response_started:
            await send_error(send, InternalError("the gateway failed to serve this request; "
                                                 "it logged why"), request_id, rid_header)
    except BaseException as exc:
        # Cancelled from outside the request (Hypercorn's graceful deadline on shutdown):
        # nothing can be sent any more; the trace keeps the cause, and the status the
        # client was sent, if any: none (null, counted as "0") when the connection was
        # closed before an answer started.
        if trace.status is None:
            root = trace.root
            trace.cause = root.cause if root is not None and root.cause else "shutdown"
            trace.status = (499 if trace.cause == "client_disconnect"
                            else context.status if context is not None
                            and context.response_started else None)
        raise exc
    finally:
        if entered:
            gate.leave()
        runtime.leave(snapshot)
        finish_trace(runtime, trace, snapshot)


def _hide_private_path(trace: Trace, snapshot: Snapshot) -> None:
    """A path whose values a route binds as SQL arguments is kept as its template."""
    if trace.route in snapshot.private_paths:
        trace.path = trace.route


def finish_trace(runtime: Runtime, trace: Trace, snapshot: Snapshot) -> None:
    """Count the request, keep its trace, log it when it is worth a line."""
    server = snapshot.policy.server
    trace.finish()
    if trace.route is None and trace.status not in (404, 405):
        # Refused before routing (shed at the door, say): found and counted by its route.
        # (A 404 or 405 was routed already, and found none.)
        with contextlib.suppress(GatewayError):
            trace.route = snapshot.routes.match(
                trace.method, trace.path.encode("latin-1")).route.path
    if snapshot.private_paths:
        _hide_private_path(trace, snapshot)
    status = trace.status or 0
    cancelled = trace.cancelled_spans()
    METRICS.observe_request(trace, status, cancelled)
    if server.tracing:
        runtime.traces.add(trace)
    # The access log is not the trace buffer: with tracing off, failures are still told.
    # A cause with a 2xx is an answer cut mid-body (an upstream reset while streaming).
    if (status >= 500 or status == 499 or status == 0 or cancelled
            or trace.cause is not None
            or trace.duration_ms >= server.slow_request * 1000
            or (server.log_sample and random.random() < server.log_sample)):
        access_log.info(json.dumps(trace.to_json(), separators=(",", ":")))
