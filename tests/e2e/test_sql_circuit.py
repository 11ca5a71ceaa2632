"""One row a client picks must not open the database's circuit for everyone."""

import pytest
import trio

from tests.gateway_harness import run_gateway

POLICY = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
    circuit: {consecutive_failures: 3, open_for: 30s}
routes:
  - path: /events/{id}
    deadline: 5s
    sql:
      upstream: db
      query: "SELECT id, happened FROM rfs_events WHERE id = $1"
      args: ["path.id:int"]
      one: true
"""


@pytest.fixture
def database(database):  # the conftest one, with this file's table
    # Valid PostgreSQL dates, one before year 1 and one after 9999.
    database.psql("DROP TABLE IF EXISTS rfs_events; "
                    "CREATE TABLE rfs_events (id int PRIMARY KEY, happened timestamp); "
                    "INSERT INTO rfs_events VALUES (1, '2026-01-01'), "
                    "(2, '0044-03-15 BC'), (3, '12000-01-01')")
    return database


@pytest.mark.parametrize("bad", [2, 3])
async def test_a_row_whose_value_cannot_be_answered_does_not_open_the_circuit(database, bad):
    """A client asking three times for the one event whose date Python cannot hold
    (each a 502) opens the database's circuit: every other client is then refused 503
    ``circuit_open`` for 30 s, although the database answered every time. The same
    rule is already kept for ``one: true`` duplicates and results past the size cap."""
    async with run_gateway(POLICY) as gw, gw.client() as client:
        with trio.fail_after(20):
            for _ in range(3):
                response = await client.get(f"/events/{bad}")
                assert response.status_code == 502, response.text
            other = await client.get("/events/1")
        assert other.status_code == 200, other.text
