"""SQL calls at their limits: results past max_response_body, json values a double
cannot hold, and a database that stops answering (a partition) while a deadline runs."""

import json
from urllib.parse import urlsplit, urlunsplit

import trio

from tests.gateway_harness import run_gateway


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


class FreezableProxy:
    """A TCP relay in front of PostgreSQL that can stop relaying (a network partition:
    bytes sent are held, new connections are accepted and never answered)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.frozen = False
        self.thawed = trio.Event()
        self.port = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _pump(self, source, sink) -> None:
        try:
            async for data in source:
                if self.frozen:
                    await self.thawed.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await sink.aclose()

    async def _handle(self, client) -> None:
        if self.frozen:
            await self.thawed.wait()
        async with client, await trio.open_tcp_stream(*self.target) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server)
                nursery.start_soon(self._pump, server, client)


async def _partitionable(database, monkeypatch,  # type: ignore[no-untyped-def]
                         nursery: trio.Nursery) -> FreezableProxy:
    """A proxy in front of the test database, serving in ``nursery``, that the policy's
    ``GATEWAY_PROXIED_DSN`` goes through: freezing it partitions the database."""
    parts = urlsplit(database.dsn)
    proxy = FreezableProxy(parts.hostname, parts.port)
    await nursery.start(proxy.serve)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{proxy.port}"
    monkeypatch.setenv("GATEWAY_PROXIED_DSN", urlunsplit(parts._replace(netloc=netloc)))
    return proxy


async def _in_flight(admin) -> float:  # type: ignore[no-untyped-def]
    """The ``db`` upstream's slots taken, from the admin port's /metrics."""
    from tests.metrics import metric_total

    return metric_total((await admin.get("/metrics")).text, "gateway_upstream_in_flight",
                        upstream="db")


async def _shed_until_back(client, admin, proxy: FreezableProxy, *, out: int) -> None:  # type: ignore[no-untyped-def]
    """With ``out`` connections of cut calls still on their way back to the pool (the
    database unreachable), each keeps its slot: the next call is shed (503 with
    Retry-After). Bounded: the slots free once the connections are terminated, though
    the database is still unreachable; once it is reachable again a call is served."""
    assert await _in_flight(admin) == out
    after = await client.get("/one")
    assert after.status_code == 503, after.text
    assert after.json()["cause"] == "shed", after.text
    assert "retry-after" in after.headers
    while await _in_flight(admin):
        await trio.sleep(0.05)
    proxy.frozen = False
    proxy.thawed.set()
    assert (await client.get("/one")).status_code == 200


SQL = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
routes:
  - path: /capped
    deadline: 5s
    max_response_body: 1KiB
    sql:
      upstream: db
      query: "SELECT g AS n, repeat('x', 100) AS pad FROM generate_series(1, 2000) g"
  - path: /default-cap
    deadline: 10s
    sql:
      upstream: db
      query: "SELECT g AS n, repeat('x', 1000) AS pad FROM generate_series(1, 6000) g"
  - path: /fan-capped
    deadline: 5s
    max_response_body: 1KiB
    fanout:
      calls:
        rows:
          upstream: db
          query: "SELECT g AS n, repeat('x', 100) AS pad FROM generate_series(1, 2000) g"
  - path: /endless
    deadline: 5s
    max_response_body: 64KiB
    sql:
      upstream: db
      # A set-returning function in the select list streams: rows come as they are made.
      query: "SELECT generate_series(1, 100000000) AS n, repeat('x', 100) AS pad"
  - path: /many/{n}
    deadline: 5s
    sql:
      upstream: db
      query: "SELECT generate_series(1, $1) AS n"
      args: ["path.n:int"]
  - path: /json-number
    deadline: 2s
    sql: {upstream: db, query: "SELECT '{\\"x\\": 1e400}'::json AS j", one: true}
"""


async def test_an_sql_result_above_max_response_body_is_a_502(database):
    # policies/README.md, routes[].max_response_body: "4 MiB for JSON parsed by fanout
    # and sql ... Upstream body cap (502)". SQL results are fetched and answered whole:
    # 240 KB under a 1 KiB cap, 6 MB under the default 4 MiB cap, all held in memory.
    async with run_gateway(SQL) as gw, gw.client() as client:
        with trio.fail_after(30):
            capped = await client.get("/capped")
            fan = await client.get("/fan-capped")
            default = await client.get("/default-cap")
        assert capped.status_code == 502, (capped.status_code, len(capped.content))
        assert fan.status_code == 502, (fan.status_code, len(fan.content))
        assert default.status_code == 502, (default.status_code, len(default.content))


async def test_a_result_past_the_cap_is_refused_without_reading_it_all(database):
    """A statement that returns 100 million rows under a 64 KiB cap is refused once its
    rows pass the cap: a 502 at once, not a worker reading gigabytes into memory until
    the 5 s deadline (a 504). Results of several read chunks under the cap stay whole."""
    async with run_gateway(SQL) as gw, gw.client() as client:
        with trio.fail_after(20):
            endless = await client.get("/endless")
            assert endless.status_code == 502, endless.text
            assert endless.json()["cause"] == "upstream_query"
            assert "max_response_body" in endless.json()["error"]
            for n in (9_999, 10_000, 10_001, 25_000):
                rows = await client.get(f"/many/{n}")
                assert rows.json() == [{"n": i} for i in range(1, n + 1)], n


async def test_a_json_column_number_beyond_a_double_is_not_turned_into_a_string(database):
    # A json column holding 1e400 (valid JSON, RFC 8259 sets no range) is decoded with
    # json.loads into float('inf') and answered as the *string* "Infinity": a number
    # silently becomes a different value of another type. The HTTP fan-out refuses such
    # a number (502, _finite_float); the SQL path should keep the number or refuse it.
    async with run_gateway(SQL) as gw, gw.client() as client:
        with trio.fail_after(10):
            response = await client.get("/json-number")
        if response.status_code == 200:
            value = strict_json(response.text)["j"]["x"]
            assert not isinstance(value, str), response.text
        else:
            assert response.status_code == 502, response.text


FROZEN = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_PROXIED_DSN, pool: {min: 1, max: 2}}
routes:
  - path: /one
    deadline: 300ms
    sql: {upstream: db, query: "SELECT 1 AS one", one: true}
"""


async def test_a_query_cut_by_the_deadline_is_answered_then_when_the_database_is_unreachable(
        database, monkeypatch):
    # README: "504 | the request deadline (route, or shorter client header) ... fired".
    # When the database stops answering (a partition), the deadline cancels the query,
    # but the call waits for asyncpg to release the connection (cancel acknowledged, or
    # close_timeout_s = 2 s) before the 504 goes out: a 300 ms deadline is answered
    # after more than 2 s.
    async with trio.open_nursery() as nursery:
        proxy = await _partitionable(database, monkeypatch, nursery)
        async with run_gateway(FROZEN) as gw, gw.client() as client:
            with trio.fail_after(20):
                assert (await client.get("/one")).status_code == 200
                proxy.frozen = True
                started = trio.current_time()
                response = await client.get("/one")
                elapsed = trio.current_time() - started
                proxy.frozen = False
                proxy.thawed.set()
            assert response.status_code == 504, response.text
            assert elapsed < 1.0, f"504 after {elapsed:.2f}s for a 300ms deadline"
        nursery.cancel_scope.cancel()


SLOW_AFTER_10000 = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_PROXIED_DSN, pool: {min: 1, max: 2}}
routes:
  - path: /rows
    deadline: 1500ms
    sql:
      upstream: db
      # Rows 1..10000 come at once; each row after them takes 300 ms.
      query: "SELECT g AS n FROM generate_series(1, 10100) g
              WHERE g <= 10000 OR (SELECT g > 0 FROM pg_sleep(0.3 + g * 0))"
"""


async def test_a_large_read_cut_by_its_deadline_is_answered_when_the_database_is_unreachable(
        database, monkeypatch):
    """The partition test above, for a result over 10,000 rows (read through a cursor,
    in a transaction). The deadline cancelled the cursor's fetch, and the ROLLBACK that
    followed waited for the server to acknowledge the cancel: with the database
    unreachable the 504 never went out until the partition healed."""
    async with trio.open_nursery() as nursery:
        proxy = await _partitionable(database, monkeypatch, nursery)
        async with run_gateway(SLOW_AFTER_10000) as gw, gw.client() as client:

            async def freeze_soon() -> None:
                await trio.sleep(0.9)  # the cursor is then waiting on row 10,001
                proxy.frozen = True

            elapsed = None
            status = None
            with trio.move_on_after(6):
                async with trio.open_nursery() as inner:
                    inner.start_soon(freeze_soon)
                    started = trio.current_time()
                    response = await client.get("/rows")
                    elapsed = trio.current_time() - started
                    status = response.status_code
            proxy.frozen = False
            proxy.thawed.set()
            assert elapsed is not None, "no answer 6 s after a 1.5 s deadline"
            assert status == 504 and elapsed < 2.5, (status, elapsed)
        nursery.cancel_scope.cancel()


DOUBLE_RUN = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
routes:
  - path: /report
    deadline: 1800ms
    sql:
      upstream: db
      # A report that takes 1 s to compute, then returns 1,500 small rows.
      query: "SELECT g AS n FROM (SELECT pg_sleep(1)) s, generate_series(1, 1500) g"
"""


async def test_a_read_of_up_to_10000_rows_runs_its_statement_once(database, monkeypatch):
    """A 1 s statement returning 1,500 rows under a 1.8 s deadline is run once (with a
    1,000-row first read it ran twice: 2 s, a 504 for a query that finishes in 1 s)."""
    monkeypatch.setenv("GATEWAY_PROXIED_DSN", database.dsn)
    async with run_gateway(DOUBLE_RUN) as gw, gw.client() as client:
        with trio.fail_after(10):
            started = trio.current_time()
            response = await client.get("/report")
            elapsed = trio.current_time() - started
        assert response.status_code == 200, (response.status_code, response.text[:200],
                                             f"{elapsed:.2f}s")
        assert len(response.json()) == 1500


BREAKER = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
    circuit: {consecutive_failures: 3, open_for: 30s}
routes:
  - path: /many/{n}
    deadline: 5s
    max_response_body: 8KiB
    sql:
      upstream: db
      query: "SELECT generate_series(1, $1) AS n"
      args: ["path.n:int"]
  - path: /one
    deadline: 5s
    sql: {upstream: db, query: "SELECT 1 AS one", one: true}
"""


async def test_results_past_max_response_body_do_not_open_the_database_circuit(database):
    """A client asking for a large result (``/many/20000`` under an 8 KiB cap) gets its
    502, refused inside the attempt as its rows come: the database answered, so it is no
    circuit-breaker failure (three of them opened the circuit for every client)."""
    async with run_gateway(BREAKER) as gw, gw.client() as client:
        with trio.fail_after(20):
            for _ in range(3):
                big = await client.get("/many/20000")
                assert big.status_code == 502 and big.json()["cause"] == "upstream_query"
            other = await client.get("/one")
        assert other.status_code == 200, other.text


ONE = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
    circuit: {consecutive_failures: 3, open_for: 30s}
routes:
  - path: /tag/{n}
    deadline: 5s
    sql:
      upstream: db
      # tag 0 matches two rows (a duplicate in the data), every other tag one
      query: "SELECT t FROM (VALUES (0), (0), (1), (2)) v(t) WHERE t = $1"
      args: ["path.n:int"]
      one: true
"""


async def test_one_true_rows_a_client_picks_do_not_open_the_database_circuit(database):
    """``one: true`` refuses several rows (502 upstream_query): the database answered,
    so it is no circuit-breaker failure (a client asking three times for the one key
    that has a duplicate opened the circuit for every client)."""
    async with run_gateway(ONE) as gw, gw.client() as client:
        with trio.fail_after(20):
            for _ in range(3):
                dup = await client.get("/tag/0")
                assert dup.status_code == 502 and dup.json()["cause"] == "upstream_query"
            other = await client.get("/tag/1")
        assert other.status_code == 200, other.text


HELD_SLOT = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_PROXIED_DSN, pool: {min: 1, max: 1}, client_check_interval: 0s}
    limit: {concurrency: 1, queue: 0}
routes:
  - path: /slow-write
    methods: [POST]
    deadline: 1s
    sql:
      upstream: db
      query: "INSERT INTO held_marks (n) SELECT 1 FROM pg_sleep(5) /* mark-held-slot */
              RETURNING n"
  - path: /one
    deadline: 1s
    sql: {upstream: db, query: "SELECT 1 AS one", one: true}
"""


async def test_a_cancelled_statement_keeps_its_slot_until_its_connection_is_back(
        database, monkeypatch):
    """A statement cut by its deadline is answered at once, and its connection goes
    back to the pool in the background (once the server acknowledges the cancel, or
    terminated after close_timeout_s when it cannot be reached). Its capacity slot was
    freed with the answer: the next call passed the limit (queue 0) and waited in
    asyncpg's pool for the one connection, unseen by the queue gauge and never shed,
    until its deadline. It is now shed (503) while the connection is on its way back,
    and the slot frees once it is back, even with the database still unreachable."""
    from tests.pg import assert_stops, wait_running

    database.psql("DROP TABLE IF EXISTS held_marks; CREATE TABLE held_marks (n int)")
    async with trio.open_nursery() as nursery:
        proxy = await _partitionable(database, monkeypatch, nursery)
        async with run_gateway(HELD_SLOT) as gw, gw.client() as client, \
                gw.admin() as admin:

            with trio.fail_after(20):
                assert (await client.get("/one")).status_code == 200

                async def partition_once_running() -> None:
                    await wait_running(database, "mark-held-slot")
                    proxy.frozen = True  # the cancel and the ROLLBACK go unanswered

                nursery.start_soon(partition_once_running)
                write = await client.post("/slow-write")
                assert write.status_code == 504, write.text
                await _shed_until_back(client, admin, proxy, out=1)
        nursery.cancel_scope.cancel()
    # The partition left the statement running on the server, where nothing could reach
    # it; it is stopped here so that it neither commits later nor counts in other tests.
    database.psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                  "WHERE query LIKE '%mark-held-slot%' AND pid <> pg_backend_pid()")
    await assert_stops(database, "mark-held-slot", within_s=5)
    assert database.psql("SELECT count(*) FROM held_marks").strip() == "0"


HEDGED_HELD = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_PROXIED_DSN, pool: {min: 2, max: 2}, client_check_interval: 0s}
    limit: {concurrency: 2, queue: 0}
routes:
  - path: /slow
    deadline: 1s
    sql:
      upstream: db
      query: "SELECT pg_sleep(5) AS s /* mark-hedged-held */"
      hedge_after: 200ms
  - path: /one
    deadline: 1s
    sql: {upstream: db, query: "SELECT 1 AS one", one: true}
"""


async def test_a_hedged_call_cut_by_its_deadline_keeps_a_slot_per_connection_out(
        database, monkeypatch):
    """A hedged read (the first try and its hedge, each on a connection of a pool of 2)
    cut by its deadline while the database is unreachable leaves both connections on
    their way back to the pool. The hedge's own slot was freed at once, so the next call
    passed the limit (concurrency 2, queue 0) and waited unseen in asyncpg's pool until
    its deadline (504) instead of being shed; each connection out now keeps a slot, and
    both slots free once the connections are back (or terminated)."""
    from tests.pg import statements_running

    async with trio.open_nursery() as nursery:
        proxy = await _partitionable(database, monkeypatch, nursery)
        async with run_gateway(HEDGED_HELD) as gw, gw.client() as client, \
                gw.admin() as admin:

            with trio.fail_after(30):
                assert (await client.get("/one")).status_code == 200

                async def partition_once_both_run() -> None:
                    while await statements_running(database, "mark-hedged-held") < 2:
                        await trio.sleep(0.02)
                    proxy.frozen = True  # the cancels and releases go unanswered

                nursery.start_soon(partition_once_both_run)
                slow = await client.get("/slow")
                assert slow.status_code == 504, slow.text
                assert proxy.frozen, "the hedge was not sent"
                await _shed_until_back(client, admin, proxy, out=2)
        nursery.cancel_scope.cancel()
    database.psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                  "WHERE query LIKE '%mark-hedged-held%' AND pid <> pg_backend_pid()")
