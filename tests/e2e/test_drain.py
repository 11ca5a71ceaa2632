"""Stopping the gateway while it works, as an operator deploying a new version sees it."""

from __future__ import annotations

import h2.events
import trio

from gateway._metrics import render_metrics
from tests.gateway_harness import run_gateway, trace_of
from tests.h2client import H2Client
from tests.metrics import metric_total
from tests.pg import assert_stops, wait_running
from tests.upstream import proxy_policy, start_upstream

SQL = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 4}, client_check_interval: 0s}
routes:
  - path: /sleepy
    deadline: 30s
    sql: {upstream: db, query: "SELECT 1 AS n FROM pg_sleep(8) /* mark-drain-read */", one: true}
  - path: /sleepy-write
    methods: [POST]
    deadline: 30s
    sql:
      upstream: db
      query: "INSERT INTO drain_marks (n) SELECT 1 FROM pg_sleep(8) /* mark-drain-write */
              RETURNING n"
"""


async def _sql_cut_by_drain(database, path: str, method: str, marker: str):  # type: ignore[no-untyped-def]
    async with run_gateway(SQL, graceful_timeout=0.5) as gw:
        stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n"
                              f"x-request-id: sql-cut\r\n\r\n".encode())
        await wait_running(database, marker)
        gw.shutdown.set()
        received = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
        trace = await trace_of(gw, "sql-cut", timeout_s=5)
    # The gateway has stopped: the statement must not run on to its 8 s end.
    await assert_stops(database, marker, within_s=2.0)
    return trace, received


async def test_a_sql_read_cut_by_the_graceful_deadline_stops_on_the_server(database):
    """A deploy stops the gateway while a long SQL read runs: past graceful_timeout the
    request is cancelled (cause shutdown) and its statement must be stopped on the
    server, not left running there with its snapshot and locks."""
    trace, received = await _sql_cut_by_drain(database, "/sleepy", "GET", "mark-drain-read")
    assert trace.cause == "shutdown", trace.to_json()
    assert received == b"", received[:300]


async def test_a_sql_write_cut_by_the_graceful_deadline_stops_and_commits_nothing(database):
    database.psql("DROP TABLE IF EXISTS drain_marks; CREATE TABLE drain_marks (n int)")
    trace, _received = await _sql_cut_by_drain(database, "/sleepy-write", "POST",
                                              "mark-drain-write")
    assert trace.cause == "shutdown", trace.to_json()
    await trio.sleep(8)
    assert database.psql("SELECT count(*) FROM drain_marks").strip() == "0"


async def test_an_http2_stream_cut_by_the_graceful_deadline_is_traced_and_counted():
    """An HTTP/2 request still waiting on its upstream at the graceful deadline: cause
    shutdown, no status, counted under status 0 and as a shutdown cancellation."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url), graceful_timeout=0.3) as gw:
            before = render_metrics(gw.gateway.runtime).decode()
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            sid = await client.get("/api/slow?ms=5000")
            await upstream.wait_for(lambda: upstream.in_flight >= 1)
            gw.shutdown.set()
            with trio.move_on_after(5):
                while data := await client.stream.receive_some(65536):
                    client.events.extend(client.conn.receive_data(data))
            got = [e for e in client.events
                   if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid]
            with trio.fail_after(5):
                while not (found := gw.gateway.runtime.traces.query(route="/api/{rest*}")):
                    await trio.sleep(0.01)
            cut = [t for t in found if t.cause == "shutdown"]
            assert cut and cut[0].status is None, [t.to_json() for t in found]
            after = render_metrics(gw.gateway.runtime).decode()
            assert (metric_total(after, "gateway_requests_total", route="/api/{rest*}", status="0")
                    - metric_total(before, "gateway_requests_total", route="/api/{rest*}",
                                   status="0")) == 1, after
            assert (metric_total(after, "gateway_cancellations_total", route="/api/{rest*}",
                                 cause="shutdown")
                    - metric_total(before, "gateway_cancellations_total", route="/api/{rest*}",
                                   cause="shutdown")) == 1, after
            # Its client got no answer: the stream is reset or the connection closed,
            # never a 500 the gateway did not give (and did not record).
            assert got == [], client.events
        nursery.cancel_scope.cancel()


async def test_an_http11_request_cut_by_the_graceful_deadline_counts_a_shutdown_cancellation():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url), graceful_timeout=0.3) as gw:
            before = render_metrics(gw.gateway.runtime).decode()
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(b"GET /api/slow?ms=5000 HTTP/1.1\r\nhost: t\r\n"
                                  b"x-request-id: h1-cut\r\n\r\n")
            await upstream.wait_for(lambda: upstream.in_flight >= 1)
            gw.shutdown.set()
            trace = await trace_of(gw, "h1-cut", timeout_s=5)
            assert trace.cause == "shutdown"
            after = render_metrics(gw.gateway.runtime).decode()
            assert (metric_total(after, "gateway_cancellations_total", route="/api/{rest*}",
                                 cause="shutdown")
                    - metric_total(before, "gateway_cancellations_total", route="/api/{rest*}",
                                   cause="shutdown")) == 1, after
            # The upstream saw its call cancelled (connection closed), not left running.
            with trio.fail_after(3):
                while upstream.in_flight:
                    await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_the_admin_listener_closes_when_the_public_drain_ends_not_at_its_deadline():
    """The admin bind answers through the drain (/readyz 503, /healthz 'draining') over a kept-alive
    connection and new ones alike, and closes as soon as the last public request has
    finished: neither it nor an idle admin connection holds the worker to the
    graceful deadline."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url), graceful_timeout=30) as gw:
            async with gw.admin() as admin, gw.client() as client:
                assert (await admin.get("/healthz")).json() == {"status": "ok"}
                done = trio.Event()

                async def slow() -> None:
                    assert (await client.get("/api/slow?ms=600")).status_code == 200
                    done.set()

                nursery.start_soon(slow)
                await upstream.wait_for(lambda: upstream.in_flight >= 1)
                started = trio.current_time()
                gw.shutdown.set()
                with trio.fail_after(2):
                    while (await admin.get("/healthz")).json() != {"status": "draining"}:
                        await trio.sleep(0.01)
                async with gw.admin() as fresh:
                    ready = await fresh.get("/readyz")
                assert (ready.status_code, ready.json()["draining"]) == (503, True)
                assert not done.is_set()
                await done.wait()
                with trio.fail_after(2):
                    while True:
                        try:
                            stream = await trio.open_tcp_stream("127.0.0.1", gw.admin_port)
                        except OSError:
                            break
                        await stream.aclose()
                        await trio.sleep(0.01)
        # The worker ended with its drain (the kept-alive admin connection included).
        assert trio.current_time() - started < 5
        nursery.cancel_scope.cancel()
