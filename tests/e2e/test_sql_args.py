"""How SQL arguments are taken from the request (real PostgreSQL)."""

import pytest

from tests.gateway_harness import run_gateway

POLICY = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
routes:
  - path: /by-path/{name}
    sql: {upstream: db, query: "SELECT $1::text AS v", args: ["path.name:text"], one: true}
  - path: /by-query
    sql: {upstream: db, query: "SELECT $1::text AS v", args: ["query.name:text"], one: true}
  - path: /profiles/{id}
    methods: [PATCH]
    sql:
      upstream: db
      query: "UPDATE rfs_profiles SET nickname = $2 WHERE id = $1 RETURNING id, nickname"
      args: ["path.id:int", "body.nickname:text"]
      one: true
"""


@pytest.fixture
def database(database):  # the conftest one, with this file's table
    database.psql("DROP TABLE IF EXISTS rfs_profiles; "
                    "CREATE TABLE rfs_profiles (id int PRIMARY KEY, nickname text); "
                    "INSERT INTO rfs_profiles VALUES (1, 'bob')")
    return database


async def test_a_query_argument_that_is_not_utf8_is_refused_as_a_path_one_is(database):
    """``/by-path/%FF`` is a 400 ("not valid UTF-8"), but ``/by-query?name=%FF`` is bound
    as U+FFFD and answered 200: a lookup by that text silently searches for another
    value than the one the client sent (and several bad bytes all map to one value)."""
    async with run_gateway(POLICY) as gw, gw.client() as client:
        assert (await client.get("/by-path/%FF")).status_code == 400
        response = await client.get("/by-query?name=%FF")
        assert response.status_code == 400, response.text


async def test_a_json_null_body_argument_is_bound_as_sql_null(database):
    """A client clearing a nullable column (``{"nickname": null}``) is answered 400
    "argument 'nickname' is missing" although it sent it: no SQL route can ever write
    or compare a NULL that comes from a request."""
    async with run_gateway(POLICY) as gw, gw.client() as client:
        response = await client.patch("/profiles/1", json={"nickname": None})
        assert response.status_code == 200, response.text
        assert response.json() == {"id": 1, "nickname": None}

