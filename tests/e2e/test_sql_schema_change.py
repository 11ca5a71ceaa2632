"""SQL routes across a schema migration (real PostgreSQL)."""

import pytest

from tests.gateway_harness import run_gateway

POLICY = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 1}}
    limit: {concurrency: 1}
routes:
  - path: /notes/{id}
    methods: [PUT]
    sql:
      upstream: db
      query: "INSERT INTO rfs_notes (id) VALUES ($1) RETURNING *"
      args: ["path.id:int"]
      one: true
  - path: /notes
    sql: {upstream: db, query: "SELECT * FROM rfs_notes ORDER BY id"}
"""


@pytest.fixture
def database(database):  # the conftest one, with this file's table
    database.psql("DROP TABLE IF EXISTS rfs_notes; CREATE TABLE rfs_notes (id int PRIMARY KEY)")
    return database


async def test_a_one_row_write_keeps_working_after_a_column_is_added(database):
    """After ``ALTER TABLE … ADD COLUMN`` a read route goes on answering (asyncpg
    prepares it again), but the next ``one: true`` write (run in a transaction) is a
    502 ``upstream_query`` "cached plan must not change result type": a migration that
    adds a column fails client writes, and nothing retries them."""
    async with run_gateway(POLICY) as gw, gw.client() as client:
        assert (await client.put("/notes/1")).json() == {"id": 1}
        database.psql("ALTER TABLE rfs_notes ADD COLUMN body text")
        assert (await client.get("/notes")).status_code == 200  # the read recovers
        database.psql("ALTER TABLE rfs_notes ADD COLUMN tag text")
        response = await client.put("/notes/2")
        assert response.status_code == 200, response.text
        assert response.json() == {"id": 2, "body": None, "tag": None}
