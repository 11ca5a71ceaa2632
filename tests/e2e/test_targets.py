"""How a client's request target becomes the upstream's (routing, tails, query).

Each test serves a policy under Hypercorn in front of two recording upstreams and sends
exact bytes with the raw client, then looks at what each upstream received.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from tests.gateway_harness import RunningGateway, run_gateway
from tests.hostile.rawclient import RawResponse, exchange, request_bytes
from tests.upstream import Upstream, start_upstream

POLICY = """
version: 1
upstreams:
  up: {{url: "{up}"}}
  other: {{url: "{other}"}}
routes:
  - path: /api/files/my%20docs
    proxy: {{upstream: up, path: "/docs"}}
  - path: /api/projects/group%2Fproject/info
    proxy: {{upstream: up, path: "/info"}}
  - path: /api/users/{{id}}/orders
    proxy: {{upstream: up, path: "/orders?user={{id}}"}}
  - path: /api/up/{{rest*}}
    proxy: {{upstream: up, path: "/{{rest}}"}}
  - path: /{{rest*}}
    proxy: {{upstream: other, path: "/fallback/{{rest}}"}}
"""


@dataclass
class Stage:
    gw: RunningGateway
    up: Upstream
    other: Upstream

    async def get(self, target: str) -> RawResponse:
        response, _ = await exchange(self.gw.port, request_bytes("GET", target))
        assert response is not None
        return response


@asynccontextmanager
async def stage() -> AsyncIterator[Stage]:
    async with trio.open_nursery() as nursery:
        up = await start_upstream(nursery)
        other = await start_upstream(nursery)
        async with run_gateway(POLICY.format(up=up.url, other=other.url)) as gw:
            yield Stage(gw, up, other)
        nursery.cancel_scope.cancel()


async def test_a_route_path_written_percent_encoded_matches_the_target_as_sent():
    """A route written as a request target (``/api/files/my%20docs``, the way the same
    file must write its upstream paths) is never reached by a client sending exactly
    that target: the gateway compares the *decoded* request segment ("my docs") with
    the *encoded* literal, so the request falls through to another route (here the
    catch-all, another upstream) or 404s — and the double-encoded target
    ``my%2520docs`` is the one that reaches it. ``check`` says ok and ``check
    --explain /api/files/my%20docs`` names the route."""
    async with stage() as s:
        for target, upstream_target in (("/api/files/my%20docs", "/docs"),
                                        ("/api/projects/group%2Fproject/info", "/info")):
            response = await s.get(target)
            assert response.status == 200, response
            assert [r.target for r in s.up.requests] == [upstream_target], (
                target, [r.target for r in s.other.requests])
            s.up.reset_records()
            s.other.reset_records()
        # The double-encoded form is another path: it must not reach the route.
        await s.get("/api/files/my%2520docs")
        assert s.up.requests == [], [r.target for r in s.up.requests]


async def test_a_tail_route_serves_its_bare_prefix():
    """``/api/up/{rest*}`` → ``up`` at ``/{rest}`` is the gateway's ``location /api/up/ {
    proxy_pass http://up/; }``, but ``GET /api/up/`` is not matched by it (a tail must be
    non-empty): the request leaks to a later route — here another upstream, which gets
    ``/fallback/api/up/`` — or 404s. nginx and Envoy (prefix ``/api/up/``) send it to
    ``up`` as ``/``."""
    async with stage() as s:
        response = await s.get("/api/up/")
        assert response.status == 200, response
        assert [r.target for r in s.other.requests] == []
        assert [r.target for r in s.up.requests] == ["/"]


async def test_a_client_query_cannot_smuggle_a_pinned_parameter_behind_a_semicolon():
    """The template ``/orders?user={id}`` pins ``user``: a client's own ``user=2`` is
    removed so that an upstream reading the last value cannot be steered to another
    user. Behind a ``;`` it goes through untouched (``user=7&page=1;user=2``), and
    upstreams that split queries on ``;`` as well as ``&`` (Rack 2 / Rails 6-7, Django
    before 3.2, Python before 3.9.2, Go before 1.17) read ``user=2``."""
    async with stage() as s:
        response = await s.get("/api/users/7/orders?page=1;user=2")
        assert response.status == 200, response
        (seen,) = s.up.requests
        pairs = [p for chunk in seen.target.partition("?")[2].split("&")
                 for p in chunk.split(";")]
        assert "user=2" not in pairs, seen.target
        assert pairs[0] == "user=7", seen.target
