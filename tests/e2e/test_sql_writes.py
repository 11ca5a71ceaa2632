"""Writes through SQL routes: what the client is told matches what was written."""

import httpx
import pytest
import trio

from gateway.upstreams._postgres import PostgresSettings, PostgresUpstream
from tests.gateway_harness import run_gateway, trace_of

POLICY = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
routes:
  - path: /batches/{n}
    methods: [POST]
    max_response_body: 1KiB
    sql:
      upstream: db
      query: >-
        INSERT INTO rfs_items (label)
        SELECT repeat('x', 40) FROM generate_series(1, $1) RETURNING id, label
      args: ["path.n:int"]
"""


@pytest.fixture
def database(database):  # the conftest one, with this file's table
    database.psql("DROP TABLE IF EXISTS rfs_items; "
                    "CREATE TABLE rfs_items (id serial PRIMARY KEY, label text)")
    return database


async def test_a_write_answered_502_for_its_size_wrote_nothing(database):
    """A write whose ``RETURNING`` rows are past ``max_response_body`` is answered 502
    (``upstream_query``, "larger than 1024 bytes") after it committed: the client is
    told the insert failed, retries it, and the rows are inserted twice. The same
    mismatch was fixed for ``one: true`` by rolling back; here the rows stay."""
    async with run_gateway(POLICY) as gw, gw.client() as client:
        small = await client.post("/batches/2")
        assert small.status_code == 200 and len(small.json()) == 2
        big = await client.post("/batches/50")
    count = int(database.psql("SELECT count(*) FROM rfs_items"))
    if big.status_code == 502:
        assert count == 2, f"answered {big.status_code} {big.text}; {count - 2} rows written"
    else:
        assert big.status_code == 200 and count == 52


CROSSING = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 2, max: 4}}
routes:
  - path: /cross/{first}/{second}
    methods: [POST]
    deadline: 10s
    sql:
      upstream: db
      retries: {attempts: 3}
      # Locks the row $1 first, waits at the test's barrier, then the row $2.
      query: >-
        WITH first AS (UPDATE rfs_pair SET v = v + 1 WHERE id = $1 RETURNING id),
             barrier AS (SELECT pg_advisory_xact_lock_shared(4343) FROM first)
        UPDATE rfs_pair SET v = v + 1 WHERE id = $2 AND EXISTS (SELECT FROM barrier)
        RETURNING id
      args: ["path.first:int", "path.second:int"]
      one: true
"""


async def test_two_writes_that_deadlock_are_both_written_once(database):
    """Two writes that lock two rows in opposite orders deadlock, and PostgreSQL rolls
    one of them back (SQLSTATE 40P01): nothing of it was committed, so it is retried
    under the route's retries, as a read would be. Its client was answered 502."""
    database.psql("DROP TABLE IF EXISTS rfs_pair; CREATE TABLE rfs_pair (id int PRIMARY KEY,"
                  " v int NOT NULL); INSERT INTO rfs_pair VALUES (1, 0), (2, 0)")
    holder = PostgresUpstream("holder", PostgresSettings(dsn=database.dsn, min_size=0,
                                                         max_size=2))
    async with run_gateway(CROSSING) as gw, gw.client() as client, \
            trio.open_nursery() as nursery:
        await nursery.start(holder.run)
        answers: dict[str, httpx.Response] = {}

        async def cross(path: str) -> None:
            answers[path] = await client.post(path)

        # Each write locks its first row and waits at the barrier; once both wait there,
        # the barrier lifts and each asks for the row the other holds.
        async with holder.transaction(timeout_s=5.0) as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(4343)", [])
            nursery.start_soon(cross, "/cross/1/2")
            nursery.start_soon(cross, "/cross/2/1")
            with trio.fail_after(5):
                while (await holder.fetchrow(
                        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = "
                        "'Lock' AND query LIKE '%rfs_pair%'", [], timeout_s=1.0)
                       or {}).get("n") != 2:
                    await trio.sleep(0.005)
        with trio.fail_after(8):
            while len(answers) < 2:
                await trio.sleep(0.005)
        await holder.aclose()
        for path, answer in answers.items():
            assert answer.status_code == 200, (path, answer.status_code, answer.text)
        # Each write committed once: the one rolled back left nothing behind.
        assert database.psql("SELECT v FROM rfs_pair ORDER BY id").split() == ["2", "2"]
        traces = [await trace_of(gw, answer.headers["x-request-id"])
                  for answer in answers.values()]
        tries = [[s for s in trace.root.walk() if s.kind == "attempt"] for trace in traces]
        retried = [attempts for attempts in tries if len(attempts) > 1]
        assert len(retried) == 1, [trace.to_json() for trace in traces]
        first, second = retried[0]
        assert first.outcome == "error" and "40P01" in (first.error or ""), first
        assert second.outcome == "ok", second
