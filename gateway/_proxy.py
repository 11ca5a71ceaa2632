"""Proxy routes: stream the request to one upstream and its answer back.

Bodies stream both ways through bounded buffers, so memory stays flat whatever the
size. Once the response has started, a broken upstream can only be reported by
dropping the client connection (see ``_request``).
"""

from __future__ import annotations

from ._calls import forward_headers, upstream_call
from ._errors import UpstreamProtocolError
from ._headers import downstream_response_headers
from ._policy import resolve_call_settings
from ._request import RequestContext
from ._trace import traced_scope


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-length":
            return value.strip() != b"0"
        if name == b"transfer-encoding":
            return True
    return False


async def proxy(ctx: RequestContext) -> None:
    route = ctx.match.route
    action = route.proxy
    assert action is not None and ctx.request_scope is not None
    state = ctx.snapshot.upstreams[action.upstream]
    assert state.pool is not None
    settings = ctx.snapshot.call_settings(action, resolve_call_settings)
    target = ctx.match.target(action.path, ctx.scope.get("query_string", b""))
    method: str = ctx.scope["method"]
    body = ctx.body if _has_body(ctx.scope["headers"]) else None
    rid_header = ctx.policy.server.request_id_header.encode()
    limit = route.max_response_body
    async with upstream_call(ctx, ctx.request_scope, action.upstream, state,
                             settings.timeout) as call:
        with traced_scope(ctx.trace, call, "attempt", f"{action.upstream}#1",
                          attempt=1) as attempt:
            headers = forward_headers(ctx, call)
            async with state.pool.request(method, target, headers, body) as response:
                attempt.note(status=response.status)
                await ctx.start_response(response.status, downstream_response_headers(
                    response.headers, rid_header, ctx.request_id))
                sent = 0
                async for chunk in response.aiter_body():
                    sent += len(chunk)
                    if limit is not None and sent > limit:
                        raise UpstreamProtocolError(
                            f"upstream {state.name!r} body exceeds {limit} bytes",
                            upstream=state.name)
                    await ctx.send_body(chunk, more=True)
                await ctx.send_body(b"", more=False)
