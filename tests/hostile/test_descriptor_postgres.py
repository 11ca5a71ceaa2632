"""README: "An upstream connect that still finds no descriptor is a 503 ``shed``, not a
failure of that upstream for its circuit breaker." Only the HTTP pool does so: a
PostgreSQL upstream that must open a connection while the worker is out of descriptors
answers 502 ``upstream_connect``, and three such requests open the database's circuit,
so a healthy database is refused (503 ``circuit_open``) for ``open_for`` once
descriptors are free again."""

from __future__ import annotations

import json

import pytest

from tests.gateway_harness import run_gateway
from tests.hostile.child_processes import descriptors_used_up
from tests.hostile.rawclient import connect, request_bytes

pytestmark = pytest.mark.postgres

SQL = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 0, max: 2}}
    circuit: {consecutive_failures: 3, open_for: 30s}
routes:
  - path: /one
    deadline: 5s
    sql: {upstream: db, query: "SELECT 1 AS n", one: true}
"""


async def test_postgres_connect_without_descriptors_is_shed_not_a_breaker_failure(database):
    async with run_gateway(SQL) as gw, connect(gw.port) as client:
        during = []
        with descriptors_used_up():
            for _ in range(3):
                await client.send(request_bytes("GET", "/one"))
                response = await client.read_response(timeout_s=5)
                assert response is not None
                during.append((response.status, json.loads(response.body).get("cause")))
        await client.send(request_bytes("GET", "/one"))
        after = await client.read_response(timeout_s=5)
        assert after is not None
        assert (during, after.status) == ([(503, "shed")] * 3, 200), (
            during, after.status, after.body)
