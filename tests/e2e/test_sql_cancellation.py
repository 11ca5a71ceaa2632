"""SQL statements the gateway stops: once it has answered (a deadline, a client leaving),
the statement must stop on the server too, not only be abandoned, and a deadline the
policy gives a route must not be cut short by the server's own backstop.

Each test watches the server's own view (``pg_stat_activity``) through ``psql``, with
``client_check_interval: 0`` so that only a cancel request can stop a statement early
(the server's check of a dropped socket would otherwise stop it within a second).
"""

from __future__ import annotations

import httpx
import pytest
import trio

from tests.gateway_harness import run_gateway
from tests.pg import TRANSLATED, assert_stops, wait_running

#: Long enough to tell a stopped statement from one running to its end (5 s or more).
STOPPED_WITHIN_S = 2.0

STATEMENTS = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 4}, client_check_interval: 0s}
  reports:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
routes:
  - path: /slow-write
    methods: [POST]
    deadline: 300ms
    sql:
      upstream: db
      query: "INSERT INTO cancel_marks (n) SELECT 1 FROM pg_sleep(5) /* mark-write-deadline */
              RETURNING n"
  - path: /slow-write-left
    methods: [POST]
    deadline: 10s
    sql:
      upstream: db
      query: "INSERT INTO cancel_marks (n) SELECT 2 FROM pg_sleep(5) /* mark-write-left */
              RETURNING n"
  - path: /big-read
    deadline: 1500ms
    sql:
      upstream: db
      # 10,000 rows at once, then 300 ms a row: read through a cursor, in a transaction.
      query: "SELECT g AS n FROM generate_series(1, 10100) g
              WHERE g <= 10000 OR (SELECT g > 0 FROM pg_sleep(0.3 + g * 0)) /* mark-big-read */"
  - path: /operator
    deadline: 10s
    sql: {upstream: db, query: "SELECT 3 AS n FROM pg_sleep(4) /* mark-operator */", one: true}
  - path: /report-timeout
    deadline: 45s
    sql: {upstream: reports, query: "SELECT current_setting('statement_timeout') AS v",
          one: true}
  - path: /db-timeout
    sql: {upstream: db, query: "SELECT current_setting('statement_timeout') AS v", one: true}
"""


def _table(database) -> None:  # type: ignore[no-untyped-def]
    database.psql("DROP TABLE IF EXISTS cancel_marks; CREATE TABLE cancel_marks (n int)")


async def test_a_write_cut_by_its_deadline_stops_on_the_server(database):
    """A write runs in a transaction; cut by its deadline, its connection was closed at
    once, which dropped asyncpg's cancel request: the client had its 504 while the
    INSERT ran on (with its locks) until the server noticed, or to statement_timeout.
    Nothing of it is committed either way."""
    _table(database)
    async with run_gateway(STATEMENTS) as gw, gw.client() as client:
        response = await client.post("/slow-write")
        assert response.status_code == 504, response.text
        await assert_stops(database, "mark-write-deadline", STOPPED_WITHIN_S)
    assert database.psql("SELECT count(*) FROM cancel_marks").strip() == "0"


async def test_a_write_whose_client_left_stops_on_the_server(database):
    _table(database)
    async with run_gateway(STATEMENTS) as gw:
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
                    await client.post("/slow-write-left")

            nursery.start_soon(write)
            await wait_running(database, "mark-write-left")
            nursery.cancel_scope.cancel()  # the client leaves mid-write
        await assert_stops(database, "mark-write-left", STOPPED_WITHIN_S)
    assert database.psql("SELECT count(*) FROM cancel_marks").strip() == "0"


async def test_a_large_read_cut_by_its_deadline_stops_on_the_server(database):
    async with run_gateway(STATEMENTS) as gw, gw.client() as client:
        response = await client.get("/big-read")
        assert response.status_code == 504, response.text
        await assert_stops(database, "mark-big-read", STOPPED_WITHIN_S)


async def test_the_servers_statement_timeout_leaves_a_route_its_deadline(database):
    """The pool's session statement_timeout (the server's backstop) was a fixed 30 s: a
    45 s report route was cut at 30 s with a 504 ``deadline``. It is now past the
    longest deadline of the routes calling the upstream (and 30 s at least)."""
    async with run_gateway(STATEMENTS) as gw, gw.client() as client:
        assert (await client.get("/report-timeout")).json() == {"v": "50s"}
        assert (await client.get("/db-timeout")).json() == {"v": "30s"}


@pytest.mark.parametrize("messages", ["english", "german"])
async def test_a_statement_an_operator_cancels_is_not_reported_as_the_deadline(
        request, database, monkeypatch, messages):
    """A DBA's ``pg_cancel_backend`` early in a 10 s deadline was answered 504 ``cause:
    deadline`` although no deadline fired: every SQLSTATE 57014 was taken for a
    statement timeout. Then only the server's English words told them apart: with
    ``lc_messages`` in another language the operator's cancel was a 504 again. The
    statement had run far less than the session's statement_timeout: it cannot be it."""
    if messages == "german":
        database = request.getfixturevalue("pg_cluster_translated")
        monkeypatch.setenv("GATEWAY_TEST_DSN", f"{database.dsn}?lc_messages={TRANSLATED}")
    async with run_gateway(STATEMENTS) as gw, gw.client() as client:

        async def cancel_it() -> None:
            await wait_running(database, "mark-operator")
            await trio.to_thread.run_sync(
                database.psql,
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                "WHERE query LIKE '%mark-operator%' AND pid <> pg_backend_pid()")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_it)
            with trio.fail_after(8):  # well inside the 4 s statement and 10 s deadline
                response = await client.get("/operator")
        assert response.status_code == 502, response.text
        assert response.json()["cause"] != "deadline", response.text
        assert "another session" in response.json()["error"]


RELOADED = """
version: 1
upstreams:
  db:
    postgres: {{dsn_env: GATEWAY_TEST_DSN, pool: {{min: 1, max: 1}}}}
routes:
  - path: /timeout
    deadline: {deadline}
    sql: {{upstream: db, query: "SELECT current_setting('statement_timeout') AS t", one: true}}
"""


async def test_the_servers_statement_timeout_follows_a_reload(database, tmp_path):
    """A reload raising a route's deadline from 10 s to 60 s kept the pool (its own
    settings were unchanged) and with it the sessions' 30 s statement_timeout."""
    path = tmp_path / "policy.yaml"
    async with run_gateway(RELOADED.format(deadline="10s"), policy_path=path) as gw, \
            gw.client() as client:
        assert (await client.get("/timeout")).json() == {"t": "30s"}
        await trio.Path(path).write_text(RELOADED.format(deadline="60s"))
        assert await gw.gateway.reload()
        assert (await client.get("/timeout")).json() == {"t": "65s"}
