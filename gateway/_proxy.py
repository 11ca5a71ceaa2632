"""Proxy routes: stream the request to one upstream and its answer back.

Bodies stream both ways through bounded buffers, so memory stays flat whatever the
size. A request body is buffered (up to ``REPLAYABLE_BODY_BYTES``) only when the
route may retry or hedge, since a half-sent stream can never be sent again. Once
the response has started, a broken upstream can only be reported by dropping the
client connection (see ``_request``).
"""

from __future__ import annotations

from collections.abc import Callable, Container
from functools import partial
from typing import Any

from ._attempts import AttemptResult, Claim, run_attempts
from ._calls import call_span, capacity_slot, forward_headers
from ._errors import UpstreamProtocolError, UpstreamStatusError
from ._headers import downstream_response_headers
from ._policy import resolve_call_settings
from ._request import RequestContext
from ._trace import TracedScope

#: Largest request body held in memory so that a retry or hedge can send it again.
REPLAYABLE_BODY_BYTES = 1024 * 1024
#: Bodies up to this size are always read before an upstream slot is taken.
BUFFERED_BODY_BYTES = 64 * 1024


async def proxy(ctx: RequestContext) -> None:
    route = ctx.match.route
    action = route.proxy
    assert action is not None
    assert ctx.request_scope is not None
    state = ctx.snapshot.upstreams[action.upstream]
    pool = state.pool
    assert pool is not None
    settings = ctx.snapshot.call_settings(action, resolve_call_settings)
    target = ctx.match.target(action.path, ctx.scope.get("query_string", b""))
    method: str = ctx.scope["method"]
    body: Any = None
    replayable = True
    if ctx.body.announced:
        declared = ctx.body.declared_length
        may_repeat = settings.retries is not None or settings.hedge_after is not None
        if declared is not None and (declared <= BUFFERED_BODY_BYTES or (
                may_repeat and declared <= REPLAYABLE_BODY_BYTES)):
            # Read before taking an upstream slot: a slow client then holds no
            # upstream connection while it trickles its body.
            body = await ctx.body.read()
        else:
            body, replayable = ctx.body, False
    rid_header = ctx.policy.server.request_id_header.encode()
    limit = route.max_response_body

    async def perform(attempt: TracedScope, claim: Claim,
                      retry_statuses: Container[int]) -> AttemptResult[None]:
        headers = forward_headers(ctx, attempt)
        async with pool.request(method, target, headers, body,
                                refresh=partial(forward_headers, ctx, attempt),
                                # Only a streamed upload's try waits for it to start
                                # its per_try_timeout: no callback on every request.
                                sent=None if claim.per_try_after_sent is None
                                else partial(claim.sent, attempt)) as response:
            status = response.status
            if status in retry_statuses:
                raise UpstreamStatusError(f"upstream {state.name!r} answered {status}",
                                          upstream_status=status, upstream=state.name)
            if limit is not None and method != "HEAD" and status not in (204, 304):
                declared = _declared_length(response.headers)
                if declared is not None and declared > limit:
                    # Refused before the head goes out: a clean 502, not a 200 cut off.
                    raise UpstreamProtocolError(
                        f"upstream {state.name!r} body of {declared} bytes exceeds {limit}",
                        upstream=state.name)
            if not claim.claim(attempt):
                return AttemptResult(None, status)
            held.answered()  # the upstream's part is done; relaying the body is not
            await ctx.start_response(status, downstream_response_headers(
                response.headers, rid_header, ctx.request_id, status))
            sent = 0
            finished = False
            async for chunk in response.aiter_body():
                sent += len(chunk)
                if limit is not None and sent > limit:
                    raise UpstreamProtocolError(
                        f"upstream {state.name!r} body exceeds {limit} bytes",
                        upstream=state.name)
                # The last chunk carries the end of the response when that is already
                # known, saving Hypercorn a write; a streamed body is never held back.
                finished = response.at_end()
                await ctx.send_body(chunk, more=not finished)
            if not finished:
                await ctx.send_body(b"", more=False)
        return AttemptResult(None, status)

    with call_span(ctx, ctx.request_scope, action.upstream, state, settings.timeout) as call:
        async with capacity_slot(ctx, call, action.upstream, state) as held:
            await run_attempts(ctx, call, state, settings, name=action.upstream,
                               method=method, replayable=replayable, perform=perform,
                               body_unread=None if replayable else _unread(ctx))


def _unread(ctx: RequestContext) -> Callable[[], bool]:
    """Whether none of a streamed body was read: the pool opens its connection before
    it reads the body, so a try that failed to connect leaves it whole for the next."""
    return lambda: ctx.body.unread


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The upstream's Content-Length (its framing was checked by the pool)."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None
