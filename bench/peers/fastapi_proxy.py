"""The well-known recipe: FastAPI on uvicorn (uvloop, httptools) with one shared
httpx.AsyncClient. ``GET /api/{path}`` -> upstream ``/{path}``.

The ``x-request-timeout-ms`` header shortens the 5 s deadline, enforced around the whole
upstream call (pool wait, connect, read) with ``asyncio.timeout``; expiry answers 504.
Everything else is the recipe's defaults: in particular Starlette does not cancel an
endpoint when its client disconnects.

Run: ``.venv/bin/python -m bench.peers.fastapi_proxy --port 18092``
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from bench.peers._common import (
    BACKLOG,
    DEADLINE_HEADER,
    POOL_CONNECTIONS,
    deadline_s,
    parse_args,
)


def create_app(upstream: str) -> FastAPI:
    """The proxy app; the client lives for the app's lifespan."""
    clients: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        limits = httpx.Limits(
            max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS
        )
        async with httpx.AsyncClient(base_url=upstream, limits=limits) as client:
            clients["origin"] = client
            yield

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/api/{path}")
    async def proxy(path: str, request: Request) -> Response:
        timeout = deadline_s(request.headers.get(DEADLINE_HEADER))
        try:
            async with asyncio.timeout(timeout):
                upstream_response = await clients["origin"].get(f"/{path}", timeout=timeout)
        except (TimeoutError, httpx.TimeoutException):
            return JSONResponse({"error": "deadline exceeded"}, status_code=504)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": f"upstream failed: {exc!r}"}, status_code=502)
        return Response(
            content=upstream_response.content,
            status_code=upstream_response.status_code,
            media_type=upstream_response.headers.get("content-type"),
        )

    return app


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    uvicorn.run(
        create_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        backlog=BACKLOG,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
