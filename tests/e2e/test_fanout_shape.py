"""The answer of a partial fan-out mixing HTTP and SQL calls (real servers)."""

import trio

from tests.gateway_harness import run_gateway
from tests.upstream import start_upstream

POLICY = """
version: 1
upstreams:
  web: {{url: "{url}"}}
  db:
    postgres: {{dsn_env: GATEWAY_TEST_DSN, pool: {{min: 1, max: 2}}}}
routes:
  - path: /dashboard
    deadline: 3s
    fanout:
      on_failure: partial
      calls:
        user: {{upstream: web, path: "/users/1"}}
        stats: {{upstream: db, query: "SELECT pg_sleep(0.3)::text AS s, 1/0 AS x"}}
        orders: {{upstream: web, path: "/status/503"}}
"""


async def test_the_errors_map_of_a_partial_answer_keeps_the_policy_order(database):
    """The answer's keys follow the policy's order of calls (policies/README.md), but
    the ``errors`` map follows the order failures happened to arrive in: the same
    request answers ``{"orders", "stats"}`` or ``{"stats", "orders"}`` by timing."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            response = await client.get("/dashboard")
        nursery.cancel_scope.cancel()
    body = response.json()
    assert response.status_code == 200 and list(body) == ["user", "errors"]
    assert list(body["errors"]) == ["stats", "orders"], body["errors"]


async def test_error_entries_name_their_upstream_whether_http_or_sql(database):
    """An HTTP call's entry in ``errors`` names its ``upstream``; an SQL call's entry
    does not, so a client (or a dashboard) cannot tell which database failed."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            response = await client.get("/dashboard")
        nursery.cancel_scope.cancel()
    errors = response.json()["errors"]
    assert errors["orders"]["upstream"] == "web"
    assert errors["stats"].get("upstream") == "db", errors
