"""PostgresUpstream against a real, throwaway PostgreSQL (``pg_cluster`` from tests/pg.py).

Timing bounds are generous: they tell "cancelled on the server" from "ran to the end"
(5 s sleeps), and "failed fast" from "hung on a connect timeout".
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import asyncpg.exceptions
import pytest
import trio
import trio_asyncio

from gateway._errors import (
    BadRequest,
    Conflict,
    StatementWrites,
    TransactionRolledBack,
    UpstreamConnectError,
    UpstreamError,
    UpstreamQueryError,
    UpstreamResetError,
    UpstreamTimeout,
)
from gateway.upstreams._postgres import (
    CLIENT_CHECK,
    PostgresSettings,
    PostgresStatistics,
    PostgresUpstream,
    _ConnectFailed,
    _Connector,
    _LostBeforeSent,
    _RefusedBeforeSent,
    _translate,
    cancelled_elsewhere,
    to_json,
)
from tests.pg import TRANSLATED

pytestmark = pytest.mark.postgres

CONNECT_TIMEOUT_S = 1.0


def settings(dsn: str, **overrides: object) -> PostgresSettings:
    values: dict = {
        "dsn": dsn,
        "min_size": 2,
        "max_size": 10,
        "connect_timeout_s": CONNECT_TIMEOUT_S,
        "close_timeout_s": 1.0,
    }
    values.update(overrides)
    return PostgresSettings(**values)


@pytest.fixture
def cluster(pg_cluster):
    """The session cluster, started again if an earlier test left it stopped."""
    if not pg_cluster.running:
        pg_cluster.start()
    return pg_cluster


@pytest.fixture
async def upstream(cluster, nursery) -> AsyncIterator[PostgresUpstream]:
    up = PostgresUpstream("db", settings(cluster.dsn))
    await nursery.start(up.run)
    yield up
    await up.aclose()


@pytest.fixture
async def monitor(cluster, nursery) -> AsyncIterator[PostgresUpstream]:
    """A second pool, one connection, for watching pg_stat_activity."""
    up = PostgresUpstream("monitor", settings(cluster.dsn, min_size=1, max_size=1))
    await nursery.start(up.run)
    yield up
    await up.aclose()


async def active_with(monitor: PostgresUpstream, marker: str) -> int:
    row = await monitor.fetchrow(
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE state = 'active' AND pid <> pg_backend_pid() AND position($1 in query) > 0",
        [marker],
        timeout_s=1.0,
    )
    assert row is not None
    return int(row["n"])  # type: ignore[arg-type]


async def poll_until(check: Callable[[], Awaitable[bool]], *, within_s: float) -> float:
    """Poll an external system until ``check()`` holds; returns when it first did."""
    with trio.fail_after(within_s):
        while not await check():
            await trio.sleep(0.005)
    return trio.current_time()


async def test_cancel_from_trio_scope_cancels_on_the_server(upstream, monitor) -> None:
    assert await upstream.ready()
    before = upstream.statistics()
    marker = f"cancel-{uuid.uuid4().hex}"
    returned_at: list[float] = []

    async def victim() -> None:
        with trio.move_on_after(0.3) as scope:
            await upstream.fetch(f"SELECT pg_sleep(5) /* {marker} */", [], timeout_s=10)
        assert scope.cancelled_caught
        returned_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        nursery.start_soon(victim)

        async def running() -> bool:
            return await active_with(monitor, marker) == 1

        await poll_until(running, within_s=0.25)

    deadline = started + 0.3
    back_after = returned_at[0] - started

    async def gone() -> bool:
        return await active_with(monitor, marker) == 0

    gone_at = await poll_until(gone, within_s=1.0)
    gone_after_deadline = gone_at - deadline
    print(
        f"\ncancel: control back {back_after * 1000:.0f} ms after start (deadline 300 ms);"
        f" query gone from pg_stat_activity {max(gone_after_deadline, 0) * 1000:.0f} ms"
        " after the deadline"
    )
    assert back_after < 0.3 + 0.2
    assert gone_after_deadline < 0.2

    assert await upstream.fetchrow("SELECT 1 AS one", [], timeout_s=1.0) == {"one": 1}
    after = upstream.statistics()
    assert after.size == before.size
    assert after.in_use == 0


async def test_own_timeout_raises_upstream_timeout_and_cancels_on_the_server(
    upstream, monitor
) -> None:
    marker = f"timeout-{uuid.uuid4().hex}"
    with trio.fail_after(2):
        with pytest.raises(UpstreamTimeout):
            await upstream.fetch(f"SELECT pg_sleep(5) /* {marker} */", [], timeout_s=0.2)

    async def gone() -> bool:
        return await active_with(monitor, marker) == 0

    await poll_until(gone, within_s=0.2)
    assert await upstream.fetchrow("SELECT 2 AS two", [], timeout_s=1.0) == {"two": 2}


def test_a_server_cancel_is_told_from_statement_timeout_by_the_time_it_ran() -> None:
    """SQLSTATE 57014: another session's cancel, or statement_timeout. Before the
    statement can have run statement_timeout, it is not the timeout, whatever the
    words; past it (or with the time unknown) only English words say otherwise."""
    german_cancel = "Anweisung wegen Benutzeranforderung abgebrochen"
    german_timeout = "Anfrage wurde wegen Zeitüberschreitung abgebrochen"
    assert cancelled_elsewhere(0.5, 30.0, german_cancel)
    assert cancelled_elsewhere(0.5, 30.0, german_timeout)  # cannot be the timeout yet
    assert cancelled_elsewhere(50.0, 0.0, german_timeout)  # no statement_timeout at all
    assert not cancelled_elsewhere(30.0, 30.0, german_timeout)
    assert not cancelled_elsewhere(29.8, 30.0, german_cancel)  # within clock drift: words
    assert cancelled_elsewhere(30.0, 30.0, "canceling statement due to user request")
    assert not cancelled_elsewhere(None, 30.0, german_cancel)
    assert cancelled_elsewhere(None, 30.0, "canceling statement due to user request")
    assert not cancelled_elsewhere(30.0, 30.0, "canceling statement due to statement timeout")


async def test_server_cancels_are_told_apart_in_another_language(
        pg_cluster_translated, nursery) -> None:
    """With ``lc_messages`` in German an operator's ``pg_cancel_backend`` read as a
    statement_timeout (only the English words were looked at)."""
    dsn = f"{pg_cluster_translated.dsn}?lc_messages={TRANSLATED}"
    up = PostgresUpstream("db", settings(dsn, min_size=1, statement_timeout_s=0.3))
    await nursery.start(up.run)
    assert await up.fetchrow("SHOW lc_messages", [], timeout_s=1.0) == {
        "lc_messages": TRANSLATED}
    with trio.fail_after(3), pytest.raises(UpstreamTimeout):  # the server's timeout
        await up.fetch("SELECT pg_sleep(5)", [], timeout_s=2.0)

    marker = f"operator-{uuid.uuid4().hex}"

    async def cancel_it() -> None:
        cancelled = "0"
        while cancelled != "1":
            await trio.sleep(0.02)
            cancelled = await trio.to_thread.run_sync(
                pg_cluster_translated.psql,
                "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity "
                f"WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()")

    long = PostgresUpstream("long", settings(dsn, min_size=1, statement_timeout_s=30.0))
    await nursery.start(long.run)
    async with trio.open_nursery() as inner:
        inner.start_soon(cancel_it)
        with trio.fail_after(4), pytest.raises(UpstreamError) as failed:
            await long.fetch(f"SELECT pg_sleep(5) /* {marker} */", [], timeout_s=4.0)
    assert not isinstance(failed.value, UpstreamTimeout)
    assert "another session" in str(failed.value)
    await up.aclose()
    await long.aclose()


async def test_500_concurrent_fetches_through_10_connections(upstream) -> None:
    latencies: list[float] = []
    results: dict[int, object] = {}
    peak = PostgresStatistics(size=0, in_use=0, idle=0, waiting=0)

    async def one(i: int) -> None:
        started = trio.current_time()
        row = await upstream.fetchrow(
            "SELECT $1::int AS n, pg_sleep(0.002)::text AS slept", [i], timeout_s=10
        )
        latencies.append(trio.current_time() - started)
        results[i] = row["n"] if row else None

    async def watch() -> None:
        nonlocal peak
        while True:
            stats = upstream.statistics()
            if stats.waiting > peak.waiting or stats.size > peak.size:
                peak = stats
            await trio.sleep(0.005)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as calls:
                for i in range(500):
                    calls.start_soon(one, i)
            nursery.cancel_scope.cancel(reason="load finished")

    assert results == {i: i for i in range(500)}
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[math.ceil(len(latencies) * 0.99) - 1]
    print(
        f"\n500 fetches, pool max 10: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms,"
        f" max {latencies[-1] * 1000:.1f} ms; peak {peak}"
    )
    assert peak.waiting > 0  # the pool queued callers rather than failing them
    assert upstream.statistics().size <= 10
    assert upstream.statistics().in_use == 0


async def test_outage_mid_load_fails_fast_and_recovers(cluster, upstream) -> None:
    assert await upstream.ready()
    # (started, finished, outcome) for every call
    calls: list[tuple[float, float, BaseException | None]] = []
    marks: dict[str, float] = {}

    async def worker() -> None:
        while True:
            started = trio.current_time()
            try:
                await upstream.fetchrow("SELECT 1 AS one", [], timeout_s=3.0)
            except UpstreamError as exc:
                calls.append((started, trio.current_time(), exc))
            else:
                calls.append((started, trio.current_time(), None))
            await trio.sleep(0.01)

    try:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(worker)
                await trio.sleep(0.3)
                marks["stopping"] = trio.current_time()
                await trio.to_thread.run_sync(cluster.stop)
                marks["down"] = trio.current_time()
                await trio.sleep(0.5)
                marks["starting"] = trio.current_time()
                await trio.to_thread.run_sync(cluster.start)
                marks["up"] = trio.current_time()
                await trio.sleep(1.0)
                nursery.cancel_scope.cancel(reason="outage test finished")
    finally:
        if not cluster.running:
            cluster.start()

    while_down = [c for c in calls if marks["down"] <= c[0] and c[1] <= marks["starting"]]
    assert while_down, "no call ran while the database was down"
    assert all(isinstance(c[2], UpstreamConnectError) for c in while_down), {
        type(c[2]).__name__ for c in while_down
    }
    slowest = max(c[1] - c[0] for c in while_down)
    assert slowest < CONNECT_TIMEOUT_S + 0.25
    # Calls in flight when the server went away may fail in other ways, but only as
    # upstream errors (the worker lets anything else escape and fail the test).
    recovered = [c for c in calls if c[0] >= marks["up"] + 0.3]
    assert recovered
    assert all(c[2] is None for c in recovered)
    print(
        f"\noutage: {len(while_down)} calls while down, slowest {slowest * 1000:.1f} ms;"
        f" {len(recovered)} calls after recovery, all ok"
    )

    assert await upstream.ready()
    rows = cluster.psql(
        "SELECT state FROM pg_stat_activity"
        " WHERE application_name = 'trio-gateway' AND pid <> pg_backend_pid()"
    ).split()
    assert len(rows) <= 10
    assert "active" not in rows
    assert "idle in transaction" not in rows


async def test_type_conversion(upstream) -> None:
    row = await upstream.fetchrow(
        """
        SELECT 12.50::numeric AS price,
               42::numeric AS total,
               9007199254740992::numeric AS beyond_safe,
               123456789012345678901234567890::numeric AS huge,
               'NaN'::numeric AS nan,
               1e30::numeric AS exp,
               'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS id,
               '2026-01-02 03:04:05.123456+02'::timestamptz AS ts,
               '2026-01-02 03:04:05'::timestamp AS naive,
               '2026-01-02'::date AS day,
               '03:04:05'::time AS clock,
               '{"a": [1, 2.5, null, true]}'::json AS j,
               '{"b": {"c": "d"}}'::jsonb AS jb,
               true AS flag,
               7 AS i,
               9007199254740993::bigint AS big,
               'héllo'::text AS t,
               '\\x00ff10'::bytea AS raw,
               ARRAY[1, 2, 3] AS ints,
               ARRAY['a', NULL] AS texts,
               ARRAY[1.5, 2]::numeric[] AS nums,
               ARRAY['{"x": 1}'::jsonb] AS docs,
               '1 day 2 hours'::interval AS span,
               'Infinity'::float8 AS inf,
               0.25::float8 AS quarter,
               NULL::text AS nothing
        """,
        [],
        timeout_s=2.0,
    )
    assert row == {
        "price": "12.50",
        "total": 42,
        "beyond_safe": "9007199254740992",
        "huge": "123456789012345678901234567890",
        "nan": "NaN",
        "exp": "1000000000000000000000000000000",
        "id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "ts": "2026-01-02T01:04:05.123456+00:00",
        "naive": "2026-01-02T03:04:05",
        "day": "2026-01-02",
        "clock": "03:04:05",
        "j": {"a": [1, 2.5, None, True]},
        "jb": {"b": {"c": "d"}},
        "flag": True,
        "i": 7,
        "big": 9007199254740993,
        "t": "héllo",
        "raw": "AP8Q",
        "ints": [1, 2, 3],
        "texts": ["a", None],
        "nums": ["1.5", 2],
        "docs": [{"x": 1}],
        "span": 93600.0,
        "inf": "Infinity",
        "quarter": 0.25,
        "nothing": None,
    }
    assert json.loads(json.dumps(row, allow_nan=False)) == row

    doc = {"k": [1, "two", None]}
    echoed = await upstream.fetchrow("SELECT $1::jsonb AS doc", [doc], timeout_s=1.0)
    assert echoed == {"doc": doc}
    assert await upstream.fetchrow("SELECT 1 WHERE false", [], timeout_s=1.0) is None
    assert await upstream.fetch("SELECT 1 WHERE false", [], timeout_s=1.0) == []


def test_to_json_numeric_rules() -> None:
    from decimal import Decimal

    assert to_json(Decimal("5")) == 5
    assert to_json(Decimal("5.00")) == "5.00"
    assert to_json(Decimal(-(2**53) + 1)) == -(2**53) + 1
    assert to_json(Decimal(2**53)) == "9007199254740992"
    assert to_json(Decimal("-Infinity")) == "-Infinity"
    assert to_json(float("nan")) == "NaN"


async def test_query_errors_are_translated(upstream) -> None:
    with pytest.raises(UpstreamError) as info:
        await upstream.fetch("SELEC 1", [], timeout_s=1.0)
    assert info.value.detail["sqlstate"] == "42601"
    secret = "not-a-uuid-secret"
    with pytest.raises(BadRequest) as bad:
        await upstream.fetch("SELECT $1::text::uuid", [secret], timeout_s=1.0)
    assert secret not in str(bad.value)
    with pytest.raises(BadRequest) as bad:
        await upstream.fetch("SELECT $1::int", [secret], timeout_s=1.0)
    assert secret not in str(bad.value)
    with pytest.raises(ValueError, match="timeout_s"):
        await upstream.fetch("SELECT 1", [], timeout_s=0)
    assert await upstream.ready()


async def test_a_json_value_json_cannot_carry_is_a_query_error_not_a_reset(upstream) -> None:
    """A json number beyond a double, a jsonb integer of 5,001 digits, and nesting deeper
    than the parser's stack are the same on every call: a permanent ``upstream_query``
    502 (not a retryable upstream failure), and the connection keeps serving."""
    deep = "[" * 5000 + "]" * 5000
    for query in ("SELECT '1e5000'::json AS j", "SELECT '{\"x\": 1e5000}'::jsonb AS j",
                  f"SELECT '{deep}'::json AS j"):
        with pytest.raises(UpstreamQueryError, match="cannot be answered as JSON"):
            await upstream.fetch(query, [], timeout_s=5.0)
    assert await upstream.fetch("SELECT '{\"x\": 1e400}'::jsonb AS j", [], timeout_s=5.0) == [
        {"j": {"x": 10**400}}]


async def test_constraint_errors_do_not_quote_row_values(upstream) -> None:
    table = f"t_{uuid.uuid4().hex[:12]}"
    await upstream.execute(f"CREATE TABLE {table} (email text PRIMARY KEY, age int "
                           "CHECK (age >= 0))", [], timeout_s=5.0)
    secret = "carol@secret.example"
    await upstream.execute(f"INSERT INTO {table} VALUES ($1, 1)", [secret], timeout_s=5.0)
    # A duplicate key is the client's conflict (409); a CHECK or NOT NULL its arguments
    # break is its bad input (400); the same broken by the statement alone is a 502.
    for query, args, error in (
            (f"INSERT INTO {table} VALUES ($1, 2)", [secret], Conflict),
            (f"INSERT INTO {table} VALUES ($1, -7)", ["bob@secret.example"], BadRequest),
            (f"INSERT INTO {table} VALUES ($1, NULL)", [None], BadRequest),
            (f"INSERT INTO {table} VALUES ('x@secret.example', -7)", [], UpstreamQueryError)):
        with pytest.raises(error) as failed:
            await upstream.execute(query, args, timeout_s=5.0)
        assert "secret.example" not in str(failed.value)  # the server's DETAIL quotes it
        assert "violates" in str(failed.value)  # the primary message stays


async def test_a_write_rolled_back_for_a_serialization_failure_says_so(upstream) -> None:
    """A write fails with SQLSTATE 40001 after it inserted: the transaction the gateway
    opened for it was rolled back whole, which ``TransactionRolledBack`` promises (a
    write may be retried on it). A statement run on its own (``execute``, in
    autocommit) promises nothing of the kind: a procedure it calls may have committed."""
    table = f"t_{uuid.uuid4().hex[:12]}"
    await upstream.execute(
        f"CREATE TABLE {table} (v int); CREATE FUNCTION {table}_fail() RETURNS int "
        "LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'could not serialize access' "
        "USING ERRCODE = '40001'; END$$", [], timeout_s=5.0)
    query = (f"WITH w AS (INSERT INTO {table} VALUES (1) RETURNING v) "
             f"SELECT v, {table}_fail() AS f FROM w")
    for run in (lambda: upstream.fetch(query, [], timeout_s=5.0, writes=True, max_bytes=1024),
                lambda: upstream.fetch_one(query, [], timeout_s=5.0, writes=True)):
        with pytest.raises(TransactionRolledBack) as failed:
            await run()
        assert failed.value.detail["sqlstate"] == "40001"
        assert failed.value.status == 502 and failed.value.cause == "upstream_error"
    with pytest.raises(UpstreamError) as failed:
        await upstream.execute(query, [], timeout_s=5.0)
    assert not isinstance(failed.value, TransactionRolledBack)
    assert await upstream.fetch(f"SELECT count(*) AS n FROM {table}", [], timeout_s=5.0) \
        == [{"n": 0}]


async def test_a_read_that_writes_is_refused_and_writes_nothing(cluster, nursery) -> None:
    """Reads run in read-only sessions, so a read whose text hides a write (a function
    with side effects) fails before writing; a call marked ``writes`` runs it, and its
    connection goes back to the pool read-only again."""
    up = PostgresUpstream("db", settings(cluster.dsn, min_size=1, max_size=1))
    await nursery.start(up.run)
    table = f"t_{uuid.uuid4().hex[:12]}"
    await up.execute(f"CREATE TABLE {table} (v int)", [], timeout_s=5.0)
    await up.execute(f"CREATE FUNCTION {table}_add(x int) RETURNS int LANGUAGE sql AS "
                     f"'INSERT INTO {table} VALUES (x) RETURNING v'", [], timeout_s=5.0)
    query = f"SELECT {table}_add($1) AS v"

    async def count() -> object:
        row = await up.fetchrow(f"SELECT count(*) AS n FROM {table}", [], timeout_s=5.0)
        return row and row["n"]

    with pytest.raises(StatementWrites) as refused:
        await up.fetchrow(query, [1], timeout_s=5.0)
    assert refused.value.detail["sqlstate"] == "25006"
    assert refused.value.status == 502
    assert await count() == 0
    assert await up.fetchrow(query, [2], timeout_s=5.0, writes=True) == {"v": 2}
    assert await count() == 1
    # One connection in the pool: the write's session was reset on release.
    assert await up.fetchrow("SHOW default_transaction_read_only", [], timeout_s=5.0) \
        == {"default_transaction_read_only": "on"}
    async with up.transaction(timeout_s=5.0) as tx:
        assert await tx.fetchrow(query, [3]) == {"v": 3}
    assert await count() == 2
    await up.aclose()


async def test_cancels_while_connecting_leave_the_upstream_serving(cluster, nursery) -> None:
    """A call cancelled while its connection is being opened makes asyncio report a
    lost connection; that report must not end the upstream."""
    up = PostgresUpstream("db", settings(cluster.dsn, min_size=0, max_size=5))
    await nursery.start(up.run)
    for i in range(120):
        with trio.move_on_after((i % 40) * 0.0005):  # 0-20 ms: somewhere in a connect
            await up.fetch("SELECT 1", [], timeout_s=5.0)
        if up._pool is not None:  # no idle connection: the next call connects again
            await up._bridge(up._loop, up._pool.expire_connections)
    assert await up.fetch("SELECT 41 + 1 AS n", [], timeout_s=5.0) == [{"n": 42}]
    await up.aclose()


async def test_transactions(upstream, monitor) -> None:
    table = f"t_{uuid.uuid4().hex[:12]}"
    await upstream.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)", [], timeout_s=2)

    async def ids() -> list[int]:
        rows = await upstream.fetch(f"SELECT id FROM {table} ORDER BY id", [], timeout_s=1)
        return [r["id"] for r in rows]  # type: ignore[misc]

    # commit
    async with upstream.transaction(timeout_s=2) as tx:
        assert await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", [1, "a"]) == "INSERT 0 1"
        assert await tx.fetchrow(f"SELECT v FROM {table} WHERE id = $1", [1]) == {"v": "a"}
        budget = await tx.fetchrow("SHOW statement_timeout")
        assert budget == {"statement_timeout": "2s"}
    assert await ids() == [1]

    # a failing statement rolls the whole transaction back
    async def insert_then_duplicate() -> None:
        async with upstream.transaction(timeout_s=2) as tx:
            await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", [2, "b"])
            await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", [1, "duplicate"])

    with pytest.raises(Conflict) as failed:
        await insert_then_duplicate()
    assert failed.value.detail["sqlstate"] == "23505"
    assert await ids() == [1]

    # an error in the block rolls back too
    async def insert_then_raise() -> None:
        async with upstream.transaction(timeout_s=2) as tx:
            await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", [3, "c"])
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await insert_then_raise()
    assert await ids() == [1]

    # cancelled by the caller mid-statement: rolled back, cancelled on the server,
    # connection usable again
    marker = f"txcancel-{uuid.uuid4().hex}"
    started = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        async with upstream.transaction(timeout_s=5) as tx:
            await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", [4, "d"])
            await tx.fetch(f"SELECT pg_sleep(5) /* {marker} */")
    assert scope.cancelled_caught
    assert trio.current_time() - started < 0.2 + 0.3
    assert await active_with(monitor, marker) == 0
    assert await ids() == [1]

    # the transaction's own deadline
    with trio.fail_after(2), pytest.raises(UpstreamTimeout):
        async with upstream.transaction(timeout_s=0.2) as tx:
            await tx.fetch("SELECT pg_sleep(5)")

    stats = upstream.statistics()
    assert stats.in_use == 0
    assert stats.size <= 10
    leftover = await monitor.fetchrow(
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE application_name = 'trio-gateway' AND state LIKE 'idle in transaction%'",
        [],
        timeout_s=1,
    )
    assert leftover == {"n": 0}
    async with upstream.transaction(timeout_s=2) as tx:
        await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", [5, "e"])
    assert await ids() == [1, 5]


async def test_ready_follows_the_database(cluster, upstream) -> None:
    assert await upstream.ready()
    try:
        await trio.to_thread.run_sync(cluster.stop)
        with trio.fail_after(CONNECT_TIMEOUT_S + 0.5):
            assert not await upstream.ready()
    finally:
        await trio.to_thread.run_sync(cluster.start)
    assert await upstream.ready()


async def test_starts_while_the_database_is_down_and_connects_later(cluster, nursery) -> None:
    await trio.to_thread.run_sync(cluster.stop)
    try:
        up = PostgresUpstream("db", settings(cluster.dsn))
        with trio.fail_after(1):
            await nursery.start(up.run)
        assert not await up.ready()
        with pytest.raises(UpstreamConnectError):
            await up.fetch("SELECT 1", [], timeout_s=2)
    finally:
        await trio.to_thread.run_sync(cluster.start)
    assert await up.ready()

    async def floor_restored() -> bool:
        return up.statistics().size >= 2

    await poll_until(floor_restored, within_s=4)
    await up.aclose()
    with pytest.raises(UpstreamConnectError, match="closed"):
        await up.fetch("SELECT 1", [], timeout_s=1)
    assert up.statistics().size == 0


async def test_cancelling_run_closes_the_pool(cluster) -> None:
    up = PostgresUpstream("db", settings(cluster.dsn))
    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        assert await up.ready()
        nursery.cancel_scope.cancel(reason="app shutting down")
    with pytest.raises(UpstreamConnectError):
        await up.fetch("SELECT 1", [], timeout_s=1)

    async def all_closed() -> bool:
        count = await trio.to_thread.run_sync(
            cluster.psql,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'trio-gateway'",
        )
        return count == "0"

    await poll_until(all_closed, within_s=2)


@pytest.mark.parametrize("check_s", [0.2, 0.0], ids=["client-check", "no-client-check"])
async def test_a_query_left_by_a_terminated_pool_stops_within_the_client_check(
    cluster, monitor, check_s: float
) -> None:
    """A pool cut at close with a query running (so no cancel request can be sent, as
    when a worker dies) leaves nothing behind on the server when the backend checks its
    client: it stops the query within ``client_check_interval_s``. Without the check
    (the control) the query runs on towards ``statement_timeout``."""
    up = PostgresUpstream("db", settings(
        cluster.dsn, min_size=0, max_size=1, close_timeout_s=0.3, statement_timeout_s=60,
        client_check_interval_s=check_s))
    marker = f"orphan-{uuid.uuid4().hex}"
    failures: list[BaseException] = []

    async def running() -> bool:
        return await active_with(monitor, marker) == 1

    async def gone() -> bool:
        return await active_with(monitor, marker) == 0

    async with trio.open_nursery() as nursery:
        await nursery.start(up.run)
        # The connection first goes back to the pool once: asyncpg's RESET ALL on
        # release must not drop the setting.
        assert await up.fetchrow(f"SHOW {CLIENT_CHECK}", [], timeout_s=2) == {
            CLIENT_CHECK: f"{round(check_s * 1000)}ms" if check_s else "0"}

        async def victim() -> None:
            try:
                await up.fetch(f"SELECT pg_sleep(30) /* {marker} */", [], timeout_s=60)
            except UpstreamError as exc:
                failures.append(exc)

        nursery.start_soon(victim)
        await poll_until(running, within_s=2)
        await up.aclose()  # waits close_timeout_s for the query, then terminates
    assert len(failures) == 1, "the cut query must fail for its caller"
    try:
        if check_s:
            await poll_until(gone, within_s=3)
        else:
            await trio.sleep(5 * 0.2)
            assert await running(), "without the check the backend cannot know"
    finally:
        await monitor.fetch(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND position($1 in query) > 0",
            [marker], timeout_s=1.0)


async def test_a_server_that_refuses_the_client_check_is_used_without_it(cluster, caplog) -> None:
    """The setting is sent in the startup packet, which a server older than 14 (or on a
    platform without the check) refuses; the pool then connects without it, and says so
    once. PostgreSQL 15 refuses a malformed value the same way (SQLSTATE 22023)."""
    connect = _Connector("db")
    server_settings = {"application_name": "trio-gateway", CLIENT_CHECK: "soon"}

    async def connect_and_show() -> str:
        con = await connect(cluster.dsn, server_settings=server_settings, timeout=5)
        try:
            return str(await con.fetchval(f"SHOW {CLIENT_CHECK}"))
        finally:
            await con.close()

    async def two_at_once() -> list[str]:
        # Both send the setting before either refusal comes back.
        return list(await asyncio.gather(connect_and_show(), connect_and_show()))

    async with trio_asyncio.open_loop() as loop:
        first = await trio_asyncio.aio_as_trio(two_at_once, loop=loop)()
        second = await trio_asyncio.aio_as_trio(connect_and_show, loop=loop)()
    assert (first, second) == (["0", "0"], "0")
    assert not connect.client_check
    warnings = [r for r in caplog.records if CLIENT_CHECK in r.getMessage()]
    assert len(warnings) == 1 and "statement_timeout" in warnings[0].getMessage()


@pytest.mark.parametrize("raw", [1e400, -math.inf, math.nan, 3.5, True, "7x"])
def test_a_bad_int_argument_is_a_400_that_does_not_quote_it(raw: object) -> None:
    from gateway._calls import _convert

    with pytest.raises(BadRequest) as refused:
        _convert("n", raw, "int")
    assert str(raw) not in str(refused.value)  # argument values stay out of traces
    assert _convert("n", 7.0, "int") == 7 and _convert("n", "7", "int") == 7


def test_only_a_failure_before_the_statement_is_a_connect_failure() -> None:
    """SQLSTATE classes 08, 53 and 57 are a connect failure (``connect``, which a write
    is retried after: nothing was sent) only while connecting, or answered to the round
    trip that switches a write's session to read-write, before its statement. Past it
    the statement or its COMMIT was sent and may have been applied: a session the
    server ends is a reset, and a statement out of resources a database failure."""
    exceptions = asyncpg.exceptions
    terminated = exceptions.AdminShutdownError(
        "terminating connection due to administrator command")
    for refusal in (exceptions.CannotConnectNowError("the database system is starting up"),
                    exceptions.TooManyConnectionsError("sorry, too many clients already"),
                    terminated, ConnectionRefusedError(111, "Connection refused")):
        assert type(_translate("db", _ConnectFailed(refusal))) is UpstreamConnectError
    lost = exceptions.ConnectionDoesNotExistError(
        "connection was closed in the middle of operation")
    lost.__cause__ = terminated
    assert type(_translate("db", _LostBeforeSent(lost))) is UpstreamConnectError
    # A write's switch to read-write out of resources: its statement was not sent.
    refused = _translate("db", _RefusedBeforeSent(exceptions.OutOfMemoryError("out of memory")))
    assert type(refused) is UpstreamConnectError, refused
    assert "53200" in refused.public and "before the statement was sent" in refused.public
    for mid_call in (terminated, exceptions.CrashShutdownError("crash of another process"),
                     exceptions.ConnectionFailureError("connection failure"), lost):
        error = _translate("db", mid_call)
        assert type(error) is UpstreamResetError, (mid_call, error)
    for ended in (terminated, lost):  # the server's reason is in the trace, not the answer
        error = _translate("db", ended)
        assert "57P01" in error.message and "administrator" not in error.public, error
    for exhausted in (exceptions.OutOfMemoryError("out of memory"),
                      exceptions.ConfigurationLimitExceededError("temp_file_limit")):
        error = _translate("db", exhausted)
        assert type(error) is UpstreamError, (exhausted, error)
        assert error.detail["sqlstate"] == exhausted.sqlstate
