"""Hostile input and faults against a running gateway: what the tests here share.

Every test serves the gateway under Hypercorn (``tests.gateway_harness.run_gateway``)
in front of the recording upstream of ``tests.upstream`` and talks to it over real
loopback sockets, with ``tests.hostile.rawclient`` for bytes no polite client sends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from tests.gateway_harness import RunningGateway, run_gateway
from tests.hostile.rawclient import connect, request_bytes
from tests.process_harness import free_port as closed_port
from tests.upstream import SeenRequest, Upstream, start_upstream

#: Limits below Hypercorn's own (h11_max_incomplete_size is 16 KiB), so that the
#: gateway's checks, not the server's, answer the requests that pass them.
POLICY = """
version: 1
server:
  limits:
    max_header_count: 50
    max_header_bytes: 8KiB
    max_uri_bytes: 2048
    max_body: 256KiB
    body_timeout: 1s
    max_upstream_header_bytes: 16KiB
upstreams:
  up: {{url: "{url}"}}
  dead: {{url: "http://127.0.0.1:{dead_port}", pool: {{connect_timeout: 500ms}}}}
routes:
  - path: /api/up/{{rest*}}
    proxy: {{upstream: up, path: "/{{rest}}"}}
  - path: /api/small/{{rest*}}
    max_body: 1KiB
    proxy: {{upstream: up, path: "/{{rest}}"}}
  - path: /api/capped/{{rest*}}
    max_response_body: 256KiB
    proxy: {{upstream: up, path: "/{{rest}}"}}
  - path: /api/item/{{id}}
    methods: [GET]
    proxy: {{upstream: up, path: "/items/{{id}}"}}
  - path: /api/long/{{rest*}}
    deadline: 30s
    proxy: {{upstream: up, path: "/{{rest}}"}}
  - path: /api/dead
    proxy: {{upstream: dead, path: "/x"}}
{extra}"""

NORMAL = request_bytes("GET", "/api/up/ok")
SETTLE_TIMEOUT_S = 5.0


def policy_for(url: str, *, server: str = "", extra: str = "") -> str:
    text = POLICY.format(url=url, dead_port=closed_port(), extra=extra)
    if server:
        text = text.replace("server:\n", "server:\n" + server, 1)
    return text


@dataclass
class Stage:
    gw: RunningGateway
    upstream: Upstream

    @property
    def port(self) -> int:
        return self.gw.port

    def pool_statistics(self, name: str = "up") -> Any:
        pool = self.gw.gateway.runtime.snapshot.upstreams[name].pool
        assert pool is not None
        return pool.statistics()

    def queued(self, name: str = "up") -> int:
        """Calls waiting in the upstream's limit queue for a slot."""
        return self.gw.gateway.runtime.snapshot.upstreams[name].limiter.statistics().queued

    async def settle(self, quiet_s: float = 0.05) -> None:
        """Wait until no request is in flight and no pooled connection is checked out,
        continuously for ``quiet_s`` (a request the server only just handed to the app
        may not have entered it yet)."""
        runtime = self.gw.gateway.runtime
        with trio.fail_after(SETTLE_TIMEOUT_S):
            quiet_since: float | None = None
            while True:
                busy = runtime.gate.in_flight > 0 or any(
                    state.pool is not None and state.pool.statistics().active > 0
                    for state in runtime.snapshot.upstreams.values())
                now = trio.current_time()
                if busy:
                    quiet_since = None
                elif quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= quiet_s:
                    return
                await trio.sleep(0.01)

    def complete_since(self, count: int) -> list[SeenRequest]:
        """Requests after the first ``count`` that the upstream received whole and
        answered (every built-in route reads the whole body before answering)."""
        return [r for r in self.upstream.requests[count:] if r.status is not None]

    async def assert_serves(self) -> None:
        """A normal request still gets a normal answer, and reaches the upstream."""
        before = len(self.upstream.requests)
        async with connect(self.port) as conn:
            await conn.send(NORMAL)
            response = await conn.read_response()
        assert response is not None, "the gateway no longer answers"
        assert response.status == 200, response
        assert response.complete
        assert len(self.upstream.requests) == before + 1
        assert self.upstream.requests[-1].target == "/ok"


@asynccontextmanager
async def stage(policy: str | None = None, *, server: str = "", extra: str = "",
                **gateway_options: Any) -> AsyncIterator[Stage]:
    """An upstream and a gateway in front of it, for one test."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        text = policy if policy is not None else policy_for(upstream.url, server=server,
                                                             extra=extra)
        async with run_gateway(text, **gateway_options) as gw:
            yield Stage(gw, upstream)
        nursery.cancel_scope.cancel(reason="test finished")
