"""SQL routes against what clients send and what the database answers, on a real
PostgreSQL: arguments bound as their type or refused, errors blamed on the right side,
values kept out of answers, traces and logs."""

import logging
from urllib.parse import urlsplit

import pytest
import trio

from tests.gateway_harness import run_gateway, trace_of

POLICY = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
    limit: {concurrency: 4, queue: 50, queue_timeout: 2s}
    circuit: {consecutive_failures: 3, min_requests: 100, open_for: 10s}
    call: {retries: {attempts: 3, backoff: 1ms..2ms, budget: 100%}}
routes:
  - path: /api/scores/{id}
    deadline: 2s
    sql:
      upstream: db
      query: "SELECT user_id, score FROM gw_inputs WHERE user_id = $1"
      args: ["path.id:int"]
      one: true
  - path: /api/ratio
    deadline: 2s
    sql:
      upstream: db
      query: >-
        SELECT sum(score) / (SELECT count(*)::int FROM gw_inputs WHERE user_id < 0) AS r
        FROM gw_inputs
      one: true
  - path: /api/echo
    deadline: 2s
    sql: {upstream: db, query: "SELECT $1::text AS v", args: ["query.v:text"], one: true}
  - path: /api/echo-body
    methods: [POST]
    deadline: 2s
    sql: {upstream: db, query: "SELECT $1::text AS v", args: ["body.v:text"], one: true}
  - path: /api/both
    methods: [POST]
    deadline: 2s
    fanout:
      calls:
        a: {upstream: db, query: "SELECT $1::int AS a", args: ["body.a:int"], one: true}
        b: {upstream: db, query: "SELECT $1::int AS b", args: ["body.b:int"], one: true}
  - path: /api/search
    deadline: 2s
    sql:
      upstream: db
      query: "SELECT to_tsquery('simple', $1)::text AS q"
      args: ["query.q:text"]
      one: true
  - path: /api/missing
    deadline: 2s
    sql: {upstream: db, query: "SELECT x FROM gw_no_such_table", one: true}
  - path: /api/invites/{token}
    deadline: 2s
    sql:
      upstream: db
      query: "SELECT $1::text = 'never' AS valid"
      args: ["path.token:text"]
      one: true
  - path: /api/long
    deadline: 10s
    sql: {upstream: db, query: "SELECT pg_sleep(5) AS slept"}
  - path: /api/scores
    methods: [POST]
    deadline: 2s
    sql:
      upstream: db
      query: "INSERT INTO gw_inputs VALUES ($1, $2) RETURNING user_id"
      args: ["body.id:int", "body.score:int"]
      one: true
  - path: /api/pairs
    deadline: 2s
    sql: {upstream: db, query: "SELECT 1 AS id, 2 AS id, 3 AS n"}
  - path: /api/types
    sql:
      upstream: db
      query: >-
        SELECT B'1010' AS flags, '[(1,2),(3,4)]'::path AS route,
        '((0,0),(1,1),(1,0))'::polygon AS area,
        'infinity'::timestamptz AS until, '-infinity'::date AS since
      one: true
"""


@pytest.fixture
def database(pg_cluster, monkeypatch):
    if not pg_cluster.running:
        pg_cluster.start()
    pg_cluster.psql("DROP TABLE IF EXISTS gw_inputs; "
                    "CREATE TABLE gw_inputs (user_id int PRIMARY KEY, score int); "
                    "INSERT INTO gw_inputs VALUES (7, 12), (10, 99)")
    monkeypatch.setenv("GATEWAY_TEST_DSN", pg_cluster.dsn)
    yield pg_cluster
    if not pg_cluster.running:
        pg_cluster.start()


async def test_arguments_are_bound_as_their_type_or_refused(database):
    async with run_gateway(POLICY) as gw, gw.client() as client:
        # int() would take all of these as 7, and answer user 7's row.
        for raw in ("0_7", "+7", "%207%20", "%D9%A7"):
            response = await client.get(f"/api/scores/{raw}")
            assert response.status_code == 400, (raw, response.text)
        assert (await client.get("/api/scores/7")).json() == {"user_id": 7, "score": 12}
        # A JSON true or list is no text (it arrived as Python's 'True').
        for value in (True, ["a", "b"], {"k": None}, 7):
            response = await client.post("/api/echo-body", json={"v": value})
            assert response.status_code == 400, (value, response.text)
        assert (await client.post("/api/echo-body", json={"v": "x"})).json() == {"v": "x"}
        # ?v= is an empty text, not a missing argument.
        assert (await client.get("/api/echo", params={"v": ""})).json() == {"v": ""}
        # Two SQL calls of a fan-out share the one body.
        both = await client.post("/api/both", json={"a": 1, "b": 2})
        assert both.status_code == 200 and both.json() == {"a": {"a": 1}, "b": {"b": 2}}
        # A body nested too deep to parse is a 400, not a crash traced as a shutdown.
        depth = 50_000
        deep = await client.post("/api/echo-body",
                                 content=b'{"v":' + b"[" * depth + b"]" * depth + b"}")
        assert deep.status_code == 400 and deep.json()["cause"] == "bad_request"
        trace = await trace_of(gw, deep.headers["x-request-id"])
        assert (trace.status, trace.cause) == (400, None)
        # No row is a missing record, not a missing route.
        missing = await client.get("/api/scores/8")
        assert missing.status_code == 404 and missing.json()["cause"] == "not_found"


async def test_errors_are_blamed_on_the_side_that_caused_them(database, caplog):
    async with run_gateway(POLICY) as gw, gw.client() as client:
        # Division by zero in a statement without arguments: the data's fault, a 502.
        ratio = await client.get("/api/ratio")
        assert ratio.status_code == 502 and ratio.json()["cause"] == "upstream_query"
        # A search the client wrote badly: its fault, a 400 that quotes nothing of it
        # (the server's message does), anywhere; and three of them open no circuit.
        with caplog.at_level(logging.DEBUG, logger="gateway"):
            for _ in range(3):
                bad = await client.get("/api/search", params={"q": "s3cret-value &"})
                assert bad.status_code == 400 and bad.json()["cause"] == "bad_request"
                trace = await trace_of(gw, bad.headers["x-request-id"])
                assert "s3cret" not in bad.text + str(trace.to_json())
        above_debug = [r.getMessage() for r in caplog.records
                       if r.name.startswith("gateway") and r.levelno > logging.DEBUG]
        assert not any("s3cret" in line for line in above_debug), above_debug
        good = await client.get("/api/search", params={"q": "cat & dog"})
        assert good.status_code == 200 and good.json() == {"q": "'cat' & 'dog'"}
        # A statement that fails for good is not retried (it would fail the same way).
        failing = await client.get("/api/missing")
        assert failing.status_code == 502 and failing.json()["cause"] == "upstream_query"
        assert "UndefinedTableError" in failing.json()["error"]
        trace = await trace_of(gw, failing.headers["x-request-id"])
        assert len([s for s in trace.root.walk() if s.kind == "attempt"]) == 1


async def test_a_path_value_bound_as_an_argument_stays_out_of_traces_and_logs(database,
                                                                               caplog):
    async with run_gateway(POLICY) as gw, gw.client() as client:
        with caplog.at_level(logging.INFO, logger="gateway.access"):
            response = await client.get("/api/invites/s3cret-invite-token")
            trace = await trace_of(gw, response.headers["x-request-id"])
        async with gw.admin() as admin:
            listed = (await admin.get("/traces")).text
        assert trace.path == "/api/invites/{token}"
        assert "s3cret" not in str(trace.to_json()) + caplog.text + listed


async def test_readiness_holds_while_traffic_holds_every_connection(database):
    async with run_gateway(POLICY) as gw, gw.client() as client, \
            trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(client.get, "/api/long")
        pool = gw.gateway.runtime.snapshot.upstreams["db"].postgres
        with trio.fail_after(2):
            while pool.statistics().in_use < 2:
                await trio.sleep(0.005)
        async with gw.admin() as admin:
            ready = await admin.get("/readyz")
        nursery.cancel_scope.cancel()
        assert ready.status_code == 200, ready.json()


async def test_values_postgresql_has_and_python_lacks_keep_their_meaning(database):
    async with run_gateway(POLICY) as gw, gw.client() as client:
        response = await client.get("/api/types")
        assert response.json() == {
            "flags": "1010", "route": [[1.0, 2.0], [3.0, 4.0]],
            "area": [[0.0, 0.0], [1.0, 1.0], [1.0, 0.0]],
            "until": "infinity", "since": "-infinity"}


async def test_a_down_database_is_not_described_to_clients(database):
    port = str(urlsplit(database.dsn).port)
    async with run_gateway(POLICY) as gw, gw.client() as client:
        assert (await client.get("/api/scores/7")).status_code == 200
        await trio.to_thread.run_sync(database.stop)
        try:
            down = await client.get("/api/scores/7")
        finally:
            await trio.to_thread.run_sync(database.start)
        assert down.status_code == 502 and down.json()["cause"] == "upstream_connect"
        assert port not in down.text and "127.0.0.1" not in down.text, down.text
        # The operator's trace says which address refused (it said only the
        # exception's name): the OS's words, which the client never gets.
        async with gw.admin() as admin:
            trace = await admin.get(f"/traces/{down.headers['x-request-id']}")
        assert port in trace.text and "Connect call failed" in trace.text, trace.text


async def test_a_statement_the_database_refuses_is_told_without_the_database_s_words(
        database):
    """A 502 quoted the server's message ("relation \"gw_no_such_table\" does not
    exist"): the database's schema, told to any client. The client learns the cause and
    the error's kind and SQLSTATE; the server's words are in the trace."""
    async with run_gateway(POLICY) as gw, gw.client() as client:
        failing = await client.get("/api/missing")
        assert failing.status_code == 502 and failing.json()["cause"] == "upstream_query"
        assert failing.json()["error"] == (
            "postgres upstream 'db': UndefinedTableError (SQLSTATE 42P01)"), failing.text
        async with gw.admin() as admin:
            trace = await admin.get(f"/traces/{failing.headers['x-request-id']}")
        assert "gw_no_such_table" in trace.text, trace.text


async def test_a_call_refused_for_its_arguments_is_in_the_trace(database):
    async with run_gateway(POLICY) as gw, gw.client() as client:
        response = await client.post("/api/both", json={"a": 1, "b": "two"})
        assert response.status_code == 400 and response.json()["call"] == "b", response.text
        trace = await trace_of(gw, response.headers["x-request-id"])
        calls = {span.name: span for span in trace.root.walk() if span.kind == "call"}
        assert calls["b"].outcome == "error" and "'b'" in calls["b"].error, calls
        assert not calls["b"].children  # refused before any attempt
        # The sibling it stopped says why, naming it.
        assert (calls["a"].outcome, calls["a"].cause) == ("cancelled", "sibling_failed")


async def test_columns_of_one_name_are_refused_not_merged(database):
    async with run_gateway(POLICY) as gw, gw.client() as client:
        response = await client.get("/api/pairs")
        # Answered as {"id": 2, "n": 3}, the first id was lost without a word.
        assert response.status_code == 500, response.text
        body = response.json()
        assert body["cause"] == "internal" and "'id'" in body["error"], body
        trace = await trace_of(gw, response.headers["x-request-id"])
        assert trace.status == 500 and trace.cause == "internal"
        assert (await client.get("/api/scores/7")).status_code == 200


async def test_a_write_its_input_makes_conflict_is_a_409_that_opens_no_circuit(database):
    async with run_gateway(POLICY) as gw, gw.client() as client:
        created = await client.post("/api/scores", json={"id": 40, "score": 1})
        assert created.status_code == 200 and created.json() == {"user_id": 40}
        # A duplicate key is the client's to resolve (409, as PostgREST answers it), not
        # a failing database: three of them (the circuit's consecutive_failures) used to
        # be 502s that opened the circuit for every route on it.
        for _ in range(3):
            duplicate = await client.post("/api/scores", json={"id": 7, "score": 1})
            assert duplicate.status_code == 409, duplicate.text
            assert duplicate.json()["cause"] == "conflict"
            assert "UniqueViolationError" in duplicate.json()["error"]
            assert "(7)" not in duplicate.text  # the DETAIL line quotes the key: not sent
        trace = await trace_of(gw, duplicate.headers["x-request-id"])
        assert len([s for s in trace.root.walk() if s.kind == "attempt"]) == 1  # no retry
        assert (await client.get("/api/scores/7")).status_code == 200
