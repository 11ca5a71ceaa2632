"""aiohttp's server with one shared aiohttp.ClientSession, on uvloop.
``GET /api/{path}`` -> upstream ``/{path}``.

The ``x-request-timeout-ms`` header shortens the 5 s deadline, enforced around the whole
upstream call with ``asyncio.timeout``; expiry answers 504. ``handler_cancellation`` keeps
aiohttp's default (off): a handler is not cancelled when its client disconnects.

Run: ``.venv/bin/python -m bench.peers.aiohttp_proxy --port 18093``
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

from bench.peers._common import (
    BACKLOG,
    DEADLINE_HEADER,
    POOL_CONNECTIONS,
    deadline_s,
    parse_args,
)

SESSION = web.AppKey("session", aiohttp.ClientSession)


def create_app(upstream: str) -> web.Application:
    """The proxy app; the session lives for the app's lifetime."""

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=POOL_CONNECTIONS, limit_per_host=0)
        async with aiohttp.ClientSession(upstream, connector=connector) as session:
            app[SESSION] = session
            yield

    async def proxy(request: web.Request) -> web.StreamResponse:
        timeout = deadline_s(request.headers.get(DEADLINE_HEADER))
        path = request.match_info["path"]
        try:
            async with (
                asyncio.timeout(timeout),
                request.app[SESSION].get(f"/{path}") as upstream_response,
            ):
                body = await upstream_response.read()
        except TimeoutError:
            return web.json_response({"error": "deadline exceeded"}, status=504)
        except aiohttp.ClientError as exc:
            return web.json_response({"error": f"upstream failed: {exc!r}"}, status=502)
        return web.Response(
            body=body,
            status=upstream_response.status,
            content_type=upstream_response.content_type,
        )

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/api/{path}", proxy)
    return app


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    web.run_app(
        create_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        backlog=BACKLOG,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
