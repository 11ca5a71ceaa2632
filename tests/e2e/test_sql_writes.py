"""Writes through SQL routes: what the client is told matches what was written."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from gateway.upstreams._postgres import PostgresSettings, PostgresUpstream
from tests.gateway_harness import run_gateway, trace_of
from tests.pg import wait_running

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


TERMINATED = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 0, max: 4}}
routes:
  - path: /slow-write
    methods: [POST]
    deadline: 10s
    sql:
      upstream: db
      retries: {attempts: 3, on: [connect, reset], backoff: 1ms..5ms}
      query: >-
        /* rfs-terminated */ INSERT INTO rfs_items (label)
        SELECT 'once' FROM pg_sleep(1.5) RETURNING id
      one: true
  - path: /slow-read
    deadline: 10s
    sql:
      upstream: db
      retries: {attempts: 3, on: [connect, reset], backoff: 1ms..5ms}
      query: "/* rfs-terminated */ SELECT 1 AS one FROM pg_sleep(1.5)"
      one: true
"""


async def terminate_running(database, marker: str) -> None:
    """Terminate the backends running a statement holding ``marker`` (57P01, as a
    database shutting down or an operator does), once one runs."""
    await wait_running(database, marker)
    await trio.to_thread.run_sync(
        database.psql,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE pid <> pg_backend_pid() AND query LIKE '%{marker}%'")


async def test_a_write_whose_backend_is_terminated_mid_statement_is_not_retried(database):
    """A write's backend terminated while its statement runs (SQLSTATE 57P01) leaves its
    outcome unknown to the gateway: the same FATAL ends a session whose COMMIT was
    applied. It is a reset, never a connect failure: one 502 ``upstream_reset``, one try,
    at most one row, and the trace names the server's reason (it said only "connection
    lost mid-call"). A read hit the same way is still retried."""
    async with run_gateway(TERMINATED) as gw, gw.client() as client:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminate_running, database, "rfs-terminated")
            with trio.fail_after(8):
                write = await client.post("/slow-write")
        assert write.status_code == 502, (write.status_code, write.text)
        assert write.json()["cause"] == "upstream_reset", write.text
        assert int(database.psql("SELECT count(*) FROM rfs_items")) <= 1
        trace = await trace_of(gw, write.headers["x-request-id"])
        tries = [s for s in trace.root.walk() if s.kind == "attempt"]
        assert len(tries) == 1 and "57P01" in (tries[0].error or ""), trace.to_json()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(terminate_running, database, "rfs-terminated")
            with trio.fail_after(8):
                read = await client.get("/slow-read")
        assert read.status_code == 200 and read.json() == {"one": 1}, read.text
        trace = await trace_of(gw, read.headers["x-request-id"])
        tries = [s for s in trace.root.walk() if s.kind == "attempt"]
        assert len(tries) == 2 and "57P01" in (tries[0].error or ""), trace.to_json()


async def test_a_write_out_of_resources_is_not_taken_for_a_connect_failure(database,
                                                                          monkeypatch):
    """A write the database failed for want of resources once it ran (SQLSTATE 53400,
    temp_file_limit) was taken for a connect failure: sent again twice as if nothing had
    reached the database, then answered 502 ``upstream_connect``. It is one try, and a
    502 ``upstream_error`` naming the SQLSTATE."""
    monkeypatch.setenv("GATEWAY_TEST_DSN", database.dsn + "?temp_file_limit=64kB")
    policy = TERMINATED.replace(
        "SELECT 'once' FROM pg_sleep(1.5)",
        "SELECT max(g)::text FROM (SELECT g FROM generate_series(1, 300000) g"
        " ORDER BY g DESC OFFSET 0) AS s")
    async with run_gateway(policy) as gw, gw.client() as client:
        with trio.fail_after(8):
            write = await client.post("/slow-write")
        assert write.status_code == 502, (write.status_code, write.text)
        assert write.json()["cause"] == "upstream_error", write.text
        assert "53400" in write.json()["error"], write.text
        trace = await trace_of(gw, write.headers["x-request-id"])
    tries = [s for s in trace.root.walk() if s.kind == "attempt"]
    assert len(tries) == 1, trace.to_json()
    assert int(database.psql("SELECT count(*) FROM rfs_items")) == 0


#: The round trip that switches a write's session to read-write, as asyncpg sends it
#: (a simple Query message).
READ_WRITE = b"SET default_transaction_read_only = off\0"
READ_WRITE_QUERY = b"Q" + (len(READ_WRITE) + 4).to_bytes(4, "big") + READ_WRITE


def _error_response(sqlstate: bytes, message: bytes) -> bytes:
    """An ErrorResponse, then ReadyForQuery (idle): a statement the server failed."""
    fields = b"SERROR\0VERROR\0C" + sqlstate + b"\0M" + message + b"\0\0"
    return (b"E" + (len(fields) + 4).to_bytes(4, "big") + fields
            + b"Z" + (5).to_bytes(4, "big") + b"I")


class PostgresRelay:
    """A TCP relay in front of PostgreSQL. ``refuse_next``: the next connection is
    answered as a server still starting up answers (SQLSTATE 57P03, before any
    statement). ``drop_open()``: the connections open now are dropped at the next bytes
    their client sends (a firewall or proxy that forgot an idle connection), which
    their client sees only as it uses them. ``fail_read_write``: that many switches of
    a session to read-write are answered as a server out of memory answers them
    (SQLSTATE 53200), the session staying usable; a real server cannot be made to fail
    that one statement so."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refuse_next = False
        self.refused = 0
        self.fail_read_write = 0
        self.connections = 0
        self.port = 0
        self._stale: set[object] = set()
        self._open: set[object] = set()

    def drop_open(self) -> None:
        self._stale |= self._open

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    @staticmethod
    async def _read(stream, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = await stream.receive_some(size - len(data))
            if not chunk:
                raise trio.BrokenResourceError
            data += chunk
        return data

    async def _refuse(self, client) -> None:
        length = int.from_bytes(await self._read(client, 4), "big")
        body = await self._read(client, length - 4)
        if body == (80877103).to_bytes(4, "big"):  # SSLRequest: no TLS here
            await client.send_all(b"N")
            length = int.from_bytes(await self._read(client, 4), "big")
            await self._read(client, length - 4)  # the startup message
        fields = b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0"
        await client.send_all(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)

    async def _handle(self, client) -> None:
        async with client:
            if self.refuse_next:
                self.refuse_next = False
                self.refused += 1
                await self._refuse(client)
                return
            self.connections += 1
            self._open.add(client)
            try:
                async with await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
                    to_client = trio.StrictFIFOLock()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, client, server, client, to_client)
                        nursery.start_soon(self._pump, server, client, None, to_client)
            finally:
                self._open.discard(client)

    async def _pump(self, source, sink, client, to_client: trio.StrictFIFOLock) -> None:
        try:
            async for data in source:
                if client is not None and client in self._stale:
                    return  # dropped: the client's bytes go nowhere, its socket closes
                if client is not None and data == READ_WRITE_QUERY and self.fail_read_write:
                    self.fail_read_write -= 1
                    async with to_client:
                        await client.send_all(_error_response(b"53200", b"out of memory"))
                    continue
                if client is None:
                    async with to_client:
                        await sink.send_all(data)
                else:
                    await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await sink.aclose()
                await source.aclose()


@asynccontextmanager
async def _writes_through_relay(database, monkeypatch) -> AsyncIterator[
        tuple[PostgresRelay, Any, httpx.AsyncClient]]:
    """The write routes of ``TERMINATED`` (their statement quick) on a gateway whose
    database connections pass through a :class:`PostgresRelay`."""
    relay = PostgresRelay(database.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.serve)
        monkeypatch.setenv("GATEWAY_TEST_DSN", database.dsn.replace(
            f":{database.port}/", f":{relay.port}/"))
        policy = TERMINATED.replace("pg_sleep(1.5)", "pg_sleep(0)")
        async with run_gateway(policy) as gw, gw.client() as client:
            yield relay, gw, client
        nursery.cancel_scope.cancel()


async def test_a_write_whose_connection_is_lost_before_it_was_sent_is_retried(
        database, monkeypatch):
    """Failures before the write's statement was sent are retried for a write, and it
    is written once: a connection the database refuses as it starts up (57P03), and a
    pooled connection dropped while idle (by a proxy or a firewall) that is found lost
    by the round trip switching the session to read-write. That second one was a 502
    ``upstream_reset`` and nothing written."""
    async with _writes_through_relay(database, monkeypatch) as (relay, gw, client):
        relay.refuse_next = True
        with trio.fail_after(8):
            refused = await client.post("/slow-write")
        assert refused.status_code == 200, (refused.status_code, refused.text)
        assert relay.refused == 1
        refused_trace = await trace_of(gw, refused.headers["x-request-id"])

        relay.drop_open()
        with trio.fail_after(8):
            dropped = await client.post("/slow-write")
        assert dropped.status_code == 200, (dropped.status_code, dropped.text)
        dropped_trace = await trace_of(gw, dropped.headers["x-request-id"])
    assert relay.connections >= 2
    assert int(database.psql("SELECT count(*) FROM rfs_items")) == 2
    tries = [s for s in refused_trace.root.walk() if s.kind == "attempt"]
    assert len(tries) == 2 and "57P03" in (tries[0].error or ""), refused_trace.to_json()
    tries = [s for s in dropped_trace.root.walk() if s.kind == "attempt"]
    assert len(tries) == 2, dropped_trace.to_json()
    assert "before the statement was sent" in (tries[0].error or ""), dropped_trace.to_json()


async def test_a_write_whose_session_switch_is_out_of_resources_is_retried(database,
                                                                         monkeypatch):
    """The round trip that switches a write's session to read-write, refused for want
    of resources (SQLSTATE class 53, here 53200 out of memory), comes before the write's
    statement is sent: nothing of it reached the database, so it is a ``connect``
    failure, retried for a write too, and the row is written once. It was a 502
    ``upstream_error``, never retried, and nothing written."""
    async with _writes_through_relay(database, monkeypatch) as (relay, gw, client):
        relay.fail_read_write = 1
        with trio.fail_after(8):
            write = await client.post("/slow-write")
        assert write.status_code == 200, (write.status_code, write.text)
        assert relay.fail_read_write == 0
        trace = await trace_of(gw, write.headers["x-request-id"])
    assert int(database.psql("SELECT count(*) FROM rfs_items")) == 1
    tries = [s for s in trace.root.walk() if s.kind == "attempt"]
    assert len(tries) == 2, trace.to_json()
    assert "53200" in (tries[0].error or ""), trace.to_json()
    assert "before the statement was sent" in (tries[0].error or ""), trace.to_json()
