"""SQL routes and mixed HTTP + SQL fan-out through the gateway, on a real PostgreSQL."""


import httpx
import pytest
import trio

from gateway._trace import Span, Trace
from gateway.upstreams._postgres import PostgresSettings, PostgresUpstream
from tests.gateway_harness import run_gateway, trace_of
from tests.metrics import metric_total
from tests.pg import assert_stops
from tests.upstream import start_upstream

POLICY = """
version: 1
upstreams:
  users: {{url: "{url}"}}
  db:
    postgres: {{dsn_env: GATEWAY_TEST_DSN, pool: {{min: 1, max: 4}}}}
    limit: {{concurrency: 4, queue: 50, queue_timeout: 2s}}
routes:
  - path: /api/scores/{{id}}
    deadline: 2s
    sql:
      upstream: db
      query: "SELECT user_id, score, note FROM gw_scores WHERE user_id = $1"
      args: ["path.id:int"]
      one: true
  - path: /api/sleep
    deadline: 300ms
    sql: {{upstream: db, query: "SELECT pg_sleep(5) AS slept /* mark-route-deadline */"}}
  - path: /api/users/{{id}}/summary
    deadline: 2s
    fanout:
      calls:
        user: {{upstream: users, path: "/users/{{id}}"}}
        score:
          upstream: db
          query: "SELECT score FROM gw_scores WHERE user_id = $1"
          args: ["path.id:int"]
          one: true
"""


@pytest.fixture
def database(pg_cluster, monkeypatch):
    pg_cluster.psql("DROP TABLE IF EXISTS gw_scores; "
                    "CREATE TABLE gw_scores (user_id int PRIMARY KEY, score numeric, note text); "
                    "INSERT INTO gw_scores VALUES (7, 12.50, 'x''); DROP TABLE y; --')")
    monkeypatch.setenv("GATEWAY_TEST_DSN", pg_cluster.dsn)
    return pg_cluster


async def test_sql_route_binds_parameters_and_answers_json(database):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            response = await client.get("/api/scores/7")
            assert response.status_code == 200
            assert response.json() == {"user_id": 7, "score": "12.50",
                                       "note": "x'); DROP TABLE y; --"}
            assert (await client.get("/api/scores/8")).status_code == 404
            bad = await client.get("/api/scores/1%20OR%201=1")
            assert bad.status_code == 400 and "not a valid int" in bad.json()["error"]
            summary = await client.get("/api/users/7/summary")
            assert summary.json() == {"user": {"id": "7", "name": "user-7"},
                                      "score": {"score": "12.50"}}
            async with gw.admin() as admin:
                assert (await admin.get("/readyz")).json()["checks"]["db"] == "ok"
                metrics = (await admin.get("/metrics")).text
                assert 'gateway_upstream_connections{state="idle",upstream="db"}' in metrics
                assert 'gateway_upstream_connections{state="waiting",upstream="db"} 0.0' \
                    in metrics
        nursery.cancel_scope.cancel()


async def test_one_row_route_refuses_a_statement_that_returns_several(database):
    """``one: true`` answers the only row: a statement that finds several (a missing
    condition) is a 502 naming why, never the first row picked by chance."""
    policy = """
version: 1
upstreams:
  db: {postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}}
routes:
  - path: /api/first/{n}
    deadline: 2s
    sql:
      upstream: db
      query: "SELECT g AS n FROM generate_series(1, $1) g"
      args: ["path.n:int"]
      one: true
"""
    async with run_gateway(policy) as gw, gw.client() as client:
        assert (await client.get("/api/first/1")).json() == {"n": 1}
        assert (await client.get("/api/first/0")).status_code == 404
        several = await client.get("/api/first/3")
        assert several.status_code == 502, several.text
        assert several.json()["cause"] == "upstream_query"
        assert "more than one row" in several.json()["error"]
        assert (await client.get("/api/first/1")).json() == {"n": 1}


async def test_a_one_row_write_that_changes_several_is_rolled_back(database):
    """``one: true`` on ``UPDATE … RETURNING``: a statement that changed several rows
    was answered 502 after it had committed them, so the client was told it failed
    while the rows were changed. It is rolled back; a one-row write is kept."""
    database.psql("DROP TABLE IF EXISTS gw_tags; CREATE TABLE gw_tags (k int, v text); "
                  "INSERT INTO gw_tags VALUES (1, 'a'), (1, 'b'), (2, 'c')")
    policy = """
version: 1
upstreams:
  db: {postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}}
routes:
  - path: /api/tags/{k}
    methods: [PUT]
    deadline: 2s
    sql:
      upstream: db
      query: "UPDATE gw_tags SET v = 'x' WHERE k = $1 RETURNING v"
      args: ["path.k:int"]
      one: true
"""
    async with run_gateway(policy) as gw, gw.client() as client:
        several = await client.put("/api/tags/1")
        assert several.status_code == 502, several.text
        assert "rolled back" in several.json()["error"]
        assert (await client.put("/api/tags/2")).json() == {"v": "x"}
    rows = database.psql("SELECT k, v FROM gw_tags ORDER BY k, v")
    assert rows.split() == ["1|a", "1|b", "2|x"], rows


async def test_a_one_row_write_without_returning_is_not_answered_404_once_written(database):
    """``one: true`` on a write without ``RETURNING`` (``check`` warns): it returns no
    row whatever it changed, so every call was answered 404, "no row found", after its
    write had committed. One that changed rows is rolled back and answered 502 naming
    why; one that changed none wrote nothing, and its 404 is true."""
    database.psql("DROP TABLE IF EXISTS gw_tags; CREATE TABLE gw_tags (k int, v text); "
                  "INSERT INTO gw_tags VALUES (1, 'a'), (2, 'b')")
    policy = """
version: 1
upstreams:
  db: {postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}}
routes:
  - path: /api/tags/{k}
    methods: [PUT]
    deadline: 2s
    sql:
      upstream: db
      query: "UPDATE gw_tags SET v = 'x' WHERE k = $1"
      args: ["path.k:int"]
      one: true
"""
    async with run_gateway(policy) as gw, gw.client() as client:
        written = await client.put("/api/tags/1")
        assert written.status_code == 502, written.text
        assert written.json()["cause"] == "upstream_query"
        assert "RETURNING" in written.json()["error"]
        assert "rolled back" in written.json()["error"]
        missing = await client.put("/api/tags/9")
        assert missing.status_code == 404, missing.text
    rows = database.psql("SELECT k, v FROM gw_tags ORDER BY k, v")
    assert rows.split() == ["1|a", "2|b"], rows


async def test_deadline_cancels_the_query_on_the_server(database):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            started = trio.current_time()
            response = await client.get("/api/sleep")
            elapsed = trio.current_time() - started
            assert response.status_code == 504
            assert 0.28 <= elapsed < 1.0
            # Its own marker: a statement another test left running must not count.
            await assert_stops(database, "mark-route-deadline", within_s=0.2)
            trace = await trace_of(gw, response.json()["request_id"])
            call = next(s for s in trace.root.walk() if s.kind == "call")
            assert call.outcome == "cancelled" or call.cause == "deadline"
            pool = gw.gateway.runtime.snapshot.upstreams["db"].postgres
            size_before = pool.statistics().size
            assert (await client.get("/api/scores/7")).status_code == 200
            assert pool.statistics().size == size_before
        nursery.cancel_scope.cancel()



SQL_ONLY = """
version: 1
upstreams:
  db:
    postgres: {{dsn_env: GATEWAY_TEST_DSN, pool: {{min: 2, max: {max}}}}}
    limit: {{concurrency: 20, queue: 100, queue_timeout: 2s}}
routes:
  - path: /api/one
    deadline: 2s
    sql: {{upstream: db, query: "SELECT 1 AS one", one: true}}
"""


async def test_reloading_a_postgres_upstream_under_load_answers_every_request(
        database, tmp_path):
    """A changed PostgreSQL upstream gets a new pool; it connects before the policy
    that uses it serves, so no request finds it missing."""
    path = tmp_path / "policy.yaml"
    statuses: list[int] = []
    async with run_gateway(SQL_ONLY.format(max=4), policy_path=path) as gw, \
            gw.client() as client:
        stop = trio.Event()

        async def loop() -> None:
            while not stop.is_set():
                statuses.append((await client.get("/api/one")).status_code)

        async with trio.open_nursery() as clients:
            for _ in range(6):
                clients.start_soon(loop)
            for size in (5, 6, 7):
                before = len(statuses)
                await trio.Path(path).write_text(SQL_ONLY.format(max=size))
                assert await gw.gateway.reload()
                with trio.fail_after(10):
                    while len(statuses) < before + 30:  # the new pool serves
                        await trio.sleep(0.01)
            stop.set()
        assert gw.gateway.runtime.snapshot.upstreams["db"].postgres.settings.max_size == 7
    assert statuses and set(statuses) == {200}, sorted(set(statuses))


async def test_reloads_asked_together_apply_a_change_once(database, tmp_path):
    """The file watcher and SIGHUP may ask at once; two builds of the same change would
    start two pools and leave one behind."""
    path = tmp_path / "policy.yaml"
    async with run_gateway(SQL_ONLY.format(max=4), policy_path=path) as gw:
        runtime = gw.gateway.runtime
        await trio.Path(path).write_text(SQL_ONLY.format(max=5))
        async with trio.open_nursery() as both:
            both.start_soon(gw.gateway.reload)
            both.start_soon(gw.gateway.reload)
        assert runtime.reloads == 1


HEDGED = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 2, max: 4}}
routes:
  - path: /api/read/{id}
    deadline: 2s
    sql:
      upstream: db
      query: "SELECT $1::int AS v FROM pg_sleep(0.2)"
      args: ["path.id:int"]
      one: true
      hedge_after: 20ms
  - path: /api/write/{id}
    deadline: 2s
    sql:
      upstream: db
      query: "INSERT INTO gw_log (v) SELECT $1 FROM pg_sleep(0.2) RETURNING v"
      args: ["path.id:int"]
      one: true
      hedge_after: 20ms
  - path: /api/log/{id}
    deadline: 2s
    sql:
      upstream: db
      query: "SELECT gw_log_after_lock($1) AS v"
      args: ["path.id:int"]
      one: true
      hedge_after: 20ms
"""


async def test_a_statement_that_may_write_is_never_hedged(database):
    database.psql("DROP TABLE IF EXISTS gw_log; CREATE TABLE gw_log (v int)")
    async with run_gateway(HEDGED) as gw, gw.client() as client:
        warnings = [str(w) for w in gw.gateway.runtime.snapshot.loaded.warnings]
        assert any("sql.hedge_after: warning: ignored: the statement may write" in w
                   for w in warnings), \
            warnings
        for kind, expected_attempts in (("read", 2), ("write", 1)):
            response = await client.get(f"/api/{kind}/5")
            assert response.status_code == 200 and response.json() == {"v": 5}
            trace = await trace_of(gw, response.headers["x-request-id"])
            attempts = [s for s in trace.root.walk() if s.kind == "attempt"]
            assert len(attempts) == expected_attempts, (kind, trace.to_json())


async def test_a_read_whose_function_writes_is_run_once_and_never_hedged_again(database):
    """``SELECT f()`` reads by its text. When f writes and a hedge runs it twice at
    once, both copies used to commit; now the read-only session refuses the write in
    both, the call runs once as a write, and later calls are not hedged."""
    database.psql("DROP TABLE IF EXISTS gw_log; CREATE TABLE gw_log (v int); "
                  "CREATE OR REPLACE FUNCTION gw_log_after_lock(x int) RETURNS int "
                  "LANGUAGE sql AS 'SELECT pg_advisory_xact_lock_shared(4242); "
                  "INSERT INTO gw_log VALUES (x) RETURNING v'")

    def logged() -> list[str]:
        return database.psql("SELECT v FROM gw_log ORDER BY v").split()

    def attempts_of(trace: Trace) -> list[Span]:
        return [s for s in trace.root.walk() if s.kind == "attempt"]

    holder = PostgresUpstream("holder", PostgresSettings(dsn=database.dsn, min_size=0,
                                                         max_size=2))
    async with run_gateway(HEDGED) as gw, gw.client() as client, \
            trio.open_nursery() as nursery:
        await nursery.start(holder.run)
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await client.get("/api/log/5"))

        # Both the attempt and its hedge wait on the lock, then run at the same moment.
        async with holder.transaction(timeout_s=5.0) as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(4242)", [])
            nursery.start_soon(ask)
            with trio.fail_after(5):
                while (await holder.fetchrow(
                        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = "
                        "'Lock' AND query LIKE '%gw_log_after_lock%'", [], timeout_s=1.0)
                       or {}).get("n") != 2:
                    await trio.sleep(0.005)
        with trio.fail_after(5):
            while not answers:
                await trio.sleep(0.005)
        first = answers[0]
        assert first.status_code == 200 and first.json() == {"v": 5}
        assert logged() == ["5"]  # before read-only reads, the hedge wrote it again
        trace = await trace_of(gw, first.headers["x-request-id"])
        assert any(a.attrs.get("statement_writes") for a in attempts_of(trace)), \
            trace.to_json()

        second = await client.get("/api/log/6")
        assert second.status_code == 200 and second.json() == {"v": 6}
        assert logged() == ["5", "6"]
        trace = await trace_of(gw, second.headers["x-request-id"])
        assert len(attempts_of(trace)) == 1, trace.to_json()
        # A statement that does only read is still hedged.
        read = await client.get("/api/read/7")
        trace = await trace_of(gw, read.headers["x-request-id"])
        assert len(attempts_of(trace)) == 2, trace.to_json()
        await holder.aclose()


REWRITTEN = """
version: 1
upstreams:
  rw_once:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
  rw_retried:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
    call: {retries: {attempts: 3}}
routes:
  - path: /api/once/{id}
    sql:
      upstream: rw_once
      query: "SELECT gw_log_add($1) AS v"
      args: ["path.id:int"]
      one: true
  - path: /api/retried/{id}
    sql:
      upstream: rw_retried
      query: "SELECT gw_log_add($1) AS v"
      args: ["path.id:int"]
      one: true
"""


async def test_a_read_run_again_as_a_write_is_one_first_try(database):
    """A read whose function writes is refused by its read-only session and run again
    as a write: that second try was counted as a second first try, in
    gateway_upstream_attempts_total{kind="first"} and in the retry budget (which it
    earned retries for). It is the call's retry: one call, one first try."""
    database.psql("DROP TABLE IF EXISTS gw_log; CREATE TABLE gw_log (v int); "
                  "CREATE OR REPLACE FUNCTION gw_log_add(x int) RETURNS int "
                  "LANGUAGE sql AS 'INSERT INTO gw_log VALUES (x) RETURNING v'")
    async with run_gateway(REWRITTEN) as gw, gw.client() as client:
        for upstream, path in (("rw_once", "/api/once"), ("rw_retried", "/api/retried")):
            for n in (1, 2):  # refused as a read then written; then written at once
                response = await client.get(f"{path}/{n}")
                assert response.status_code == 200 and response.json() == {"v": n}
            async with gw.admin() as admin:
                text = (await admin.get("/metrics")).text
            assert metric_total(text, "gateway_upstream_attempts_total",
                                upstream=upstream, kind="first") == 2, (upstream, text)
            assert metric_total(text, "gateway_upstream_attempts_total",
                                upstream=upstream, kind="retry") == 1, (upstream, text)
            budget = gw.gateway.runtime.snapshot.upstreams[upstream].retry_budget
            spent = budget.statistics(trio.current_time())
            assert (spent.requests, spent.retries) == (2, 1), (upstream, spent)
    assert database.psql("SELECT v FROM gw_log ORDER BY v").split() == ["1", "1", "2", "2"]


async def test_a_read_run_again_as_a_write_is_paid_from_the_retry_budget(database):
    """The second run of a read whose function writes is a retry: it was sent whatever
    the upstream's retry budget said, so calls that find their statement writes sent a
    second try each to a struggling database. With the budget spent it is not sent: the
    call fails as a retry the budget refused does (the first try's failure, and a
    ``retry_budget`` span), nothing is written, and the statement, known to write, is a
    first try from then on."""
    database.psql("DROP TABLE IF EXISTS gw_log; CREATE TABLE gw_log (v int); "
                  "CREATE OR REPLACE FUNCTION gw_log_add(x int) RETURNS int "
                  "LANGUAGE sql AS 'INSERT INTO gw_log VALUES (x) RETURNING v'")
    policy = REWRITTEN.replace(
        "pool: {min: 1, max: 2}}\n  rw_retried",
        "pool: {min: 1, max: 2}}\n    call: {retries: {budget: 0%, min_per_second: 0}}"
        "\n  rw_retried").replace(
        "{retries: {attempts: 3}}", "{retries: {attempts: 3, budget: 0%, min_per_second: 0}}")
    async with run_gateway(policy) as gw, gw.client() as client:
        async def retries_sent(upstream: str) -> float:  # the metrics are the process's
            async with gw.admin() as admin:
                text = (await admin.get("/metrics")).text
            return metric_total(text, "gateway_upstream_attempts_total",
                                upstream=upstream, kind="retry")

        for upstream, path in (("rw_once", "/api/once"), ("rw_retried", "/api/retried")):
            retries_before = await retries_sent(upstream)
            refused = await client.get(f"{path}/1")
            assert refused.status_code == 502, (upstream, refused.text)
            assert refused.json()["cause"] == "statement_writes", (upstream, refused.text)
            trace = await trace_of(gw, refused.headers["x-request-id"])
            attempts = [(a.cause, a.attrs.get("statement_writes"))
                        for a in trace.root.walk() if a.kind == "attempt"]
            assert attempts == [(None, True), ("retry_budget", None)], (
                upstream, trace.to_json())
            written = await client.get(f"{path}/2")
            assert written.status_code == 200 and written.json() == {"v": 2}, upstream
            assert await retries_sent(upstream) == retries_before, upstream
            budget = gw.gateway.runtime.snapshot.upstreams[upstream].retry_budget
            spent = budget.statistics(trio.current_time())
            assert (spent.requests, spent.retries, spent.denied_total) == (2, 0, 1), (
                upstream, spent)
    assert database.psql("SELECT v FROM gw_log ORDER BY v").split() == ["2", "2"]


FLAKY = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 2, max: 6}}
    call:
      retries: {attempts: 3, on: [connect, reset], backoff: 1ms..5ms,
                budget: 50%, min_per_second: 0}
routes:
  - path: /flaky
    deadline: 10s
    sql:
      upstream: db
      hedge_after: 50ms
      query: "SELECT gw_flaky() AS n"
      one: true
  - path: /plain
    deadline: 10s
    sql: {upstream: db, query: "SELECT 1 AS one", one: true}
"""


async def test_a_hedge_the_budget_refused_is_not_one_of_the_tries_of_a_write_run_again(
        database):
    """``attempts: 3``: a read whose function writes is tried once as a read (its hedge
    refused by the retry budget: never sent), then run again as a write, which the
    database rolls back for a serialization failure (40001). One try was sent, so the
    write has two left, and its retry writes the row once the budget has room. The
    refused hedge's span was counted as a try: the write got one, no retry, and its
    client a 502 for a transaction PostgreSQL asks to be run again."""
    database.psql(
        "DROP TABLE IF EXISTS gw_flaky_log; DROP SEQUENCE IF EXISTS gw_flaky_seq; "
        "CREATE TABLE gw_flaky_log (n bigint); CREATE SEQUENCE gw_flaky_seq; "
        "CREATE OR REPLACE FUNCTION gw_flaky() RETURNS bigint LANGUAGE plpgsql AS $$ "
        "DECLARE n bigint; BEGIN PERFORM pg_sleep(1); "
        # nextval is refused in a read-only session (25006) before it counts
        "n := nextval('gw_flaky_seq'); IF n = 1 THEN "
        "RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001'; END IF; "
        "INSERT INTO gw_flaky_log VALUES (n); RETURN n; END $$")
    async with run_gateway(FLAKY) as gw, gw.client() as client:
        budget = gw.gateway.runtime.snapshot.upstreams["db"].retry_budget
        answers = {}

        async def flaky() -> None:
            answers["flaky"] = await client.get("/flaky")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flaky)
            with trio.fail_after(5):  # the hedge refused: 50 % of one first try < 1
                while budget.denied_total == 0:
                    await trio.sleep(0.01)
            for _ in range(3):  # other calls' first tries give the budget room again
                assert (await client.get("/plain")).status_code == 200
        response = answers["flaky"]
        trace = await trace_of(gw, response.headers["x-request-id"])
    attempts = [(a.name, a.cause, a.error) for a in trace.root.walk() if a.kind == "attempt"]
    assert any(cause == "retry_budget" for _, cause, _ in attempts), attempts
    assert response.status_code == 200, (response.text, attempts)
    assert database.psql("SELECT n FROM gw_flaky_log").split() == ["2"]
