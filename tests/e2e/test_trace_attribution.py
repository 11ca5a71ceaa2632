"""Cancellation traces and their attribution, through real requests.

Each test drives the real gateway (Hypercorn trio worker) against a real upstream
and reads the trace the gateway kept for the request.
"""

from __future__ import annotations

import contextlib

import trio

from gateway._metrics import render_metrics
from gateway._trace_view import render_traces_text
from tests.gateway_harness import RunningGateway, run_gateway, trace_of
from tests.metrics import metric_total
from tests.upstream import start_upstream

RETRIES = """
version: 1
upstreams:
  flip:
    url: "{url}"
    call: {{retries: {{attempts: 2, on: [503], backoff: 1ms..2ms, budget: 100%}}}}
  pertry:
    url: "{url}"
    call: {{retries: {{attempts: 2, on: [timeout], per_try_timeout: 100ms,
                      backoff: 1ms..2ms, budget: 100%}}}}
routes:
  - path: /flip
    deadline: 2s
    proxy: {{upstream: flip, path: "/first-fails"}}
  - path: /pertry
    deadline: 2s
    proxy: {{upstream: pertry, path: "/first-stalls"}}
"""


async def _first_fails_then_ok(nursery: trio.Nursery):
    """An upstream whose first answer per request id is bad (503, or none at all)."""
    seen: dict[str, int] = {}

    async def behaviour(request, respond) -> None:  # type: ignore[no-untyped-def]
        key = f"{request.path}:{request.header('x-request-id')}"
        seen[key] = seen.get(key, 0) + 1
        first = seen[key] == 1
        if request.path == "/first-fails":
            await respond.json({"n": seen[key]}, status=503 if first else 200)
        elif request.path == "/first-stalls":
            if first:
                await trio.sleep_forever()
            await respond.json({"n": seen[key]})
        else:
            await respond.fallback()

    return await start_upstream(nursery, behaviour=behaviour)


async def test_a_retried_attempt_is_not_said_to_be_cancelled_by_the_retry_that_followed_it():
    """A retry happens *after* the failed try ended; the failed try was never cancelled
    by it. Yet the trace stamps ``cancelled_by=<the retry>`` on the earlier attempt, so
    an SRE reads "attempt #1 error ... cancelled_by=#2" (or, after a per-try timeout,
    "cancelled cause=deadline ... cancelled_by=#2"): two contradicting initiators on
    one span, one of them false. ``cancelled_by`` belongs to hedge losers only."""
    async with trio.open_nursery() as nursery:
        upstream = await _first_fails_then_ok(nursery)
        async with run_gateway(RETRIES.format(url=upstream.url)) as gw, \
                gw.client() as client:
            bad: list[str] = []
            for path in ("/flip", "/pertry"):
                response = await client.get(path)
                assert response.status_code == 200, response.text
                trace = await trace_of(gw, response.headers["x-request-id"])
                first = next(s for s in trace.root.walk()
                             if s.kind == "attempt" and s.name.endswith("#1"))
                assert first.outcome in ("error", "cancelled")
                assert first.cause != "hedge_lost"
                if "cancelled_by" in first.attrs:
                    bad.append(render_traces_text([trace.to_json()], width=200))
            assert not bad, "\n".join(bad)
        nursery.cancel_scope.cancel()


DOOR = """
version: 1
server: {{max_inflight: 1}}
upstreams:
  users: {{url: "{url}"}}
routes:
  - path: /api/{{rest*}}
    deadline: 10s
    proxy: {{upstream: users, path: "/{{rest}}"}}
"""


async def test_a_request_shed_at_the_door_is_found_by_its_route():
    """``GET /traces?route=/api/{rest*}&cause=shed`` is how an SRE asks why clients of a
    route got 503s. A request shed at the door (``max_inflight``) is kept with
    ``route: null``, so the filter (and the per-route metrics, ``route="(none)"``)
    never shows it: only the upstream sheds of that route are found."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(DOOR.format(url=upstream.url)) as gw, gw.client() as client:
            async with trio.open_nursery() as holders:
                holders.start_soon(client.get, "/api/slow?ms=500")
                await upstream.wait_for(lambda: upstream.in_flight >= 1)
                shed = await client.get("/api/users/1")
                assert shed.status_code == 503 and shed.json()["cause"] == "shed"
            rid = shed.headers["x-request-id"]
            trace = await trace_of(gw, rid)
            assert trace.cause == "shed"
            async with gw.admin() as admin:
                found = (await admin.get("/traces", params={"route": "/api/{rest*}",
                                                            "cause": "shed"})).json()
            assert [t["request_id"] for t in found["traces"]] == [rid], found
        nursery.cancel_scope.cancel()


async def test_a_response_cut_by_shutdown_keeps_the_status_the_client_was_sent():
    """A download in progress when the graceful timeout ends: the client got
    ``200`` and a truncated body. The trace (and access log and
    ``gateway_requests_total``) record ``503``, a status nobody was sent, while a
    response cut mid-body by a deadline or an upstream failure keeps the ``200`` it
    started with (the handler's own "too late for a status" rule)."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = DOOR.format(url=upstream.url).replace("max_inflight: 1", "max_inflight: 10")
        async with run_gateway(policy, graceful_timeout=0.3) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(b"GET /api/endless-body HTTP/1.1\r\nhost: t\r\n"
                                  b"x-request-id: cut-by-shutdown\r\n\r\n")
            head = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive_some(65536)

            async def drain() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while await stream.receive_some(65536):
                        pass

            nursery.start_soon(drain)
            assert head.startswith(b"HTTP/1.1 200")
            gw.shutdown.set()
            trace = await trace_of(gw, "cut-by-shutdown", timeout_s=5)
            assert trace.cause == "shutdown"
            assert trace.status == 200, (trace.status, trace.to_json())
        nursery.cancel_scope.cancel()


SQL_WRITES = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 4}}
routes:
  - path: /api/log/{id}
    deadline: 2s
    sql:
      upstream: db
      query: "SELECT gw_traced_log($1) AS v"
      args: ["path.id:int"]
      one: true
"""


async def test_attempts_of_one_call_have_distinct_names(pg_cluster, monkeypatch):
    """A ``SELECT f()`` whose function writes is first run as a read (refused by the
    read-only session), then run again as a write. Both runs number their attempts
    from 1, so the call shows two different ``attempt db#1`` spans (one failed, one
    ok): a scope named in a trace, in ``cancelled_by`` or in the metrics' ``scope``
    label no longer says which attempt it was."""
    monkeypatch.setenv("GATEWAY_TEST_DSN", pg_cluster.dsn)
    pg_cluster.psql("DROP TABLE IF EXISTS gw_traced_log; CREATE TABLE gw_traced_log (v int);"
                    " CREATE OR REPLACE FUNCTION gw_traced_log(x int) RETURNS int "
                    "LANGUAGE sql AS 'INSERT INTO gw_traced_log VALUES (x) RETURNING v'")
    async with run_gateway(SQL_WRITES) as gw, gw.client() as client:
        response = await client.get("/api/log/5")
        assert response.status_code == 200 and response.json() == {"v": 5}
        trace = await trace_of(gw, response.headers["x-request-id"])
        names = [s.name for s in trace.root.walk() if s.kind == "attempt"]
        assert len(names) == 2  # the refused read, then the write
        assert len(set(names)) == len(names), render_traces_text([trace.to_json()], 200)


SLOW_READER = """
version: 1
server: {{send_timeout: 200ms}}
upstreams:
  users: {{url: "{url}"}}
routes:
  - path: /api/{{rest*}}
    deadline: 30s
    proxy: {{upstream: users, path: "/{{rest}}"}}
"""


async def test_a_client_dropped_by_send_timeout_is_not_traced_as_having_left():
    """A client that stays connected but stops reading its answer is dropped by the
    gateway after ``server.send_timeout`` (the gateway's decision). The trace says
    ``499 cause=client_disconnect`` — "the client left" — so an SRE hunting a slow
    consumer, or a gateway cutting healthy clients with too short a send_timeout,
    is sent looking at clients that never hung up."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(SLOW_READER.format(url=upstream.url)) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(b"GET /api/endless-body HTTP/1.1\r\nhost: t\r\n"
                                  b"x-request-id: never-reads\r\n\r\n")
            # Connected all along, reading nothing.
            trace = await trace_of(gw, "never-reads", timeout_s=10)
            assert trace.cause != "client_disconnect", trace.to_json()
            await stream.aclose()
        nursery.cancel_scope.cancel()


FANOUT = """
version: 1
upstreams:
  users: {{url: "{url}"}}
routes:
  - path: /api/fan
    deadline: 10s
    fanout:
      calls:
        one: {{upstream: users, path: "/stall"}}
        two: {{upstream: users, path: "/stall"}}
        three: {{upstream: users, path: "/stall"}}
"""


async def test_one_client_disconnect_counts_as_one_cancellation():
    """``gateway_cancellations_total`` is documented as counting cancellations "by
    route, cause and scope". One client leaving one fan-out request (one scope fired:
    ``request``) adds 8 to ``{cause="client_disconnect", scope="request"}``: one per
    span it reached (request, stage, 3 calls, 3 attempts), so the rate of a cause
    depends on the shape of the route, not on how often it happens."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(FANOUT.format(url=upstream.url)) as gw:

            async def counted() -> float:
                async with gw.admin() as admin:
                    text = (await admin.get("/metrics")).text
                return metric_total(text, "gateway_cancellations_total", route="/api/fan",
                                    cause="client_disconnect", scope="request")

            before = await counted()
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(b"GET /api/fan HTTP/1.1\r\nhost: t\r\n"
                                  b"x-request-id: leaves\r\n\r\n")
            await upstream.wait_for(lambda: upstream.in_flight >= 3)
            await stream.aclose()
            trace = await trace_of(gw, "leaves")
            assert trace.status == 499 and trace.cause == "client_disconnect"
            assert await counted() - before == 1
        nursery.cancel_scope.cancel()


PLAIN = """
version: 1
upstreams:
  users: {{url: "{url}"}}
routes:
  - path: /api/{{rest*}}
    deadline: 10s
    proxy: {{upstream: users, path: "/{{rest}}"}}
"""


async def test_a_call_refused_for_the_clients_short_deadline_names_the_request_deadline():
    """A client asks for ``x-request-timeout-ms: 5``; the route's call has no timeout of
    its own, so its budget is the request's. The call is not sent (below the floor) and
    the 504, the trace and the CLI all say ``cause=deadline scope=call users``: the SRE
    is pointed at a call timeout that does not exist, instead of the request deadline
    the client set (``deadline_source=header``)."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(PLAIN.format(url=upstream.url)) as gw, gw.client() as client:
            response = await client.get("/api/users/1", headers={"x-request-timeout-ms": "5"})
            assert response.status_code == 504
            trace = await trace_of(gw, response.headers["x-request-id"])
            assert trace.cause == "deadline" and trace.deadline_source == "header"
            assert not upstream.requests  # never sent
            scopes = {s.label: s.fired_scope for s in trace.root.walk() if s.cause}
            assert response.json().get("scope") == "request", response.json()
            assert set(scopes.values()) == {"request"}, scopes
        nursery.cancel_scope.cancel()


QUEUE = """
version: 1
upstreams:
  a: {{url: "{url}", limit: {{concurrency: 1, queue: 0, queue_timeout: 10ms}}}}
routes:
  - path: /one-slot
    deadline: 10s
    proxy: {{upstream: a, path: "/slow?ms=500"}}
"""


async def test_an_upstream_shed_names_the_call_that_was_refused_on_every_span():
    """Upstream ``a``'s queue is full, so the call is refused: the scope that fired is
    ``call a``. The call span says so, but the request span above it says
    ``cause=shed scope=request`` — as if the gateway's door (``max_inflight``) had shed
    it — and ``gateway_cancellations_total{cause="shed",scope="request"}`` counts it so,
    although nothing was shed at the request's level."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(QUEUE.format(url=upstream.url)) as gw, gw.client() as client:
            async with trio.open_nursery() as holders:
                holders.start_soon(client.get, "/one-slot")
                await upstream.wait_for(lambda: upstream.in_flight >= 1)
                response = await client.get("/one-slot")
                assert response.status_code == 503 and response.json()["cause"] == "shed"
            trace = await trace_of(gw, response.headers["x-request-id"])
            fired = {s.label: s.fired_scope for s in trace.root.walk() if s.cause == "shed"}
            assert fired.get("call a") == "call a"
            assert set(fired.values()) == {"call a"}, fired
        nursery.cancel_scope.cancel()


PLAIN = """
version: 1
upstreams:
  users: {{url: "{url}"}}
  one: {{url: "{url}", limit: {{concurrency: 1, queue: 5, queue_timeout: 5s}}}}
routes:
  - path: /api/{{rest*}}
    deadline: 10s
    proxy: {{upstream: users, path: "/{{rest}}"}}
  - path: /one
    deadline: 10s
    proxy: {{upstream: one, path: "/stall"}}
"""


async def _metrics(gw: RunningGateway) -> str:
    async with gw.admin() as admin:
        return (await admin.get("/metrics")).text


async def test_a_call_refused_below_the_budget_floor_is_counted_as_a_deadline_cancellation():
    """A client sends ``x-request-timeout-ms: 1``: the call is not sent (below the
    floor) and the client gets ``504 cause=deadline scope=request``; the trace says
    ``cause=deadline scope=request`` and ``/traces?cause=deadline`` lists it. But
    ``gateway_cancellations_total{cause="deadline"}`` did not move: the refusal was
    recorded on its spans as an *error*, and only *cancelled* spans are counted, so a
    dashboard of deadline cancellations per route missed every such 504 (while a
    deadline firing one millisecond later, mid-call, is counted)."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(PLAIN.format(url=upstream.url)) as gw, gw.client() as client:
            before = metric_total(await _metrics(gw), "gateway_cancellations_total",
                                  route="/api/{rest*}", cause="deadline")
            response = await client.get("/api/users/1", headers={"x-request-timeout-ms": "1"})
            assert response.status_code == 504
            assert response.json()["cause"] == "deadline"
            assert response.json()["scope"] == "request"
            trace = await trace_of(gw, response.headers["x-request-id"])
            assert trace.cause == "deadline"
            async with gw.admin() as admin:
                listed = (await admin.get("/traces", params={"cause": "deadline"})).json()
            assert trace.request_id in [t["request_id"] for t in listed["traces"]]
            after = metric_total(await _metrics(gw), "gateway_cancellations_total",
                                 route="/api/{rest*}", cause="deadline")
            assert after - before == 1, trace.to_json()
        nursery.cancel_scope.cancel()


async def test_a_request_cut_by_shutdown_before_any_answer_is_recorded_without_a_status():
    """At the end of ``graceful_timeout`` a request still waiting on its upstream is
    cancelled and its connection closed: the client receives no response at all.
    The trace, the access log and ``gateway_requests_total`` recorded it as ``503``,
    a status nobody was sent, so an SRE read a burst of 503 answers during a deploy
    that clients never saw (they saw dropped connections). The trace has no status
    now (null), and the counter says ``0``."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(PLAIN.format(url=upstream.url), graceful_timeout=0.3) as gw:
            before = render_metrics(gw.gateway.runtime).decode()
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(b"GET /one HTTP/1.1\r\nhost: t\r\n"
                                  b"x-request-id: cut-before-answer\r\n\r\n")
            await upstream.wait_for(lambda: upstream.in_flight >= 1)
            gw.shutdown.set()
            received = b""
            with trio.move_on_after(5):
                while chunk := await stream.receive_some(65536):
                    received += chunk
            trace = await trace_of(gw, "cut-before-answer", timeout_s=5)
            assert trace.cause == "shutdown"
            assert received == b"", received[:200]  # no answer: the connection closed
            assert trace.status is None, trace.to_json()
            # The admin listener has closed too: the worker's own registry (one per test
            # process, so what this request added).
            after = render_metrics(gw.gateway.runtime).decode()
            for status, added in (("503", 0), ("0", 1)):
                assert (metric_total(after, "gateway_requests_total", route="/one",
                                     status=status)
                        - metric_total(before, "gateway_requests_total", route="/one",
                                       status=status)) == added, status
        nursery.cancel_scope.cancel()
