"""The structured-concurrency core end to end: deadlines, disconnects, fan-out, shedding.

Timing assertions compare timestamps the upstream recorded (``trio.current_time()``
in the same process) with generous bounds; nothing sleeps and hopes.
"""

import time

import httpx
import pytest
import trio
import trio.lowlevel

from tests.gateway_harness import fire, live_tasks, run_gateway, trace_of, traces_with
from tests.upstream import proxy_policy, start_upstream

POLICY = """
version: 1
server:
  max_inflight: 1000
upstreams:
  a: {{url: "{a}", limit: {{concurrency: {concurrency}, queue: {queue}, queue_timeout: 5s}}}}
  b: {{url: "{b}"}}
  c: {{url: "{c}"}}
routes:
  - path: /proxy/{{rest*}}
    deadline: 300ms
    proxy: {{upstream: a, path: "/{{rest}}"}}
  - path: /long/{{rest*}}
    deadline: 10s
    proxy: {{upstream: a, path: "/{{rest}}"}}
  - path: /fast-fail
    deadline: 5s
    fanout:
      on_failure: fail_fast
      calls:
        slow_a: {{upstream: a, path: "/stall"}}
        slow_b: {{upstream: b, path: "/stall"}}
        broken: {{upstream: c, path: "/status/500"}}
  - path: /partial
    deadline: 2s
    fanout:
      on_failure: partial
      calls:
        user: {{upstream: a, path: "/users/7"}}
        orders: {{upstream: b, path: "/orders?user=7"}}
        late: {{upstream: c, path: "/stall", timeout: 200ms}}
  - path: /first
    deadline: 2s
    fanout:
      mode: first
      calls:
        quick: {{upstream: a, path: "/users/1"}}
        stuck: {{upstream: b, path: "/stall"}}
"""


def policy(a: str, b: str, c: str, concurrency: int = 100, queue: int = 100) -> str:
    return POLICY.format(a=a, b=b, c=c, concurrency=concurrency, queue=queue)


async def test_deadline_gives_504_and_cancels_the_upstream():
    async with trio.open_nursery() as nursery:
        a, b, c = [await start_upstream(nursery) for _ in range(3)]
        async with run_gateway(policy(a.url, b.url, c.url)) as gw, gw.client() as client:
            started = trio.current_time()
            response = await client.get("/proxy/slow?ms=5000")
            elapsed = trio.current_time() - started
            assert response.status_code == 504
            body = response.json()
            assert body["cause"] == "deadline" and body["scope"] == "request"
            assert 0.28 <= elapsed < 1.0
            await a.wait_cancelled()
            # The upstream saw its connection closed within 100 ms of the deadline.
            assert a.cancelled[0].at - (started + 0.3) < 0.1
            # The upstream was told the budget it had left.
            budget = int(a.requests[-1].header("x-request-timeout-ms"))
            assert 250 <= budget <= 300
            trace = await trace_of(gw, body["request_id"])
            assert trace.status == 504
            attempt = next(s for s in trace.root.walk() if s.kind == "attempt")
            assert (attempt.cause, attempt.fired_scope) == ("deadline", "request")
        nursery.cancel_scope.cancel()


async def test_client_shortens_deadline_but_cannot_extend_it():
    async with trio.open_nursery() as nursery:
        a, b, c = [await start_upstream(nursery) for _ in range(3)]
        async with run_gateway(policy(a.url, b.url, c.url)) as gw, gw.client() as client:
            started = trio.current_time()
            short = await client.get("/proxy/stall", headers={"x-request-timeout-ms": "100"})
            assert short.status_code == 504
            assert trio.current_time() - started < 0.29
            trace = await trace_of(gw, short.json()["request_id"])
            assert trace.deadline_source == "header"
            started = trio.current_time()
            extended = await client.get("/proxy/stall",
                                        headers={"x-request-timeout-ms": "60000"})
            assert extended.status_code == 504
            assert 0.28 <= trio.current_time() - started < 1.0
        nursery.cancel_scope.cancel()


async def _disconnecting_client(port: int, path: str, after_s: float,
                                method: str = "GET", body: bytes = b"") -> float:
    """Send a request on a raw socket and close it after ``after_s``; return the time."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    length = f"content-length: {len(body)}\r\n" if body else ""
    await stream.send_all(f"{method} {path} HTTP/1.1\r\nhost: t\r\n{length}\r\n".encode()
                          + body)
    await trio.sleep(after_s)
    closed_at = trio.current_time()
    await stream.aclose()
    return closed_at


@pytest.mark.parametrize(("method", "body"), [("GET", b""), ("POST", b"hello")],
                         ids=["without-body", "with-body"])
async def test_client_disconnect_cancels_upstream_work_and_leaks_nothing(method, body):
    # Without a body the server's stream-close callback notices; with one, the task
    # relaying the body does.
    async with trio.open_nursery() as nursery:
        a, b, c = [await start_upstream(nursery) for _ in range(3)]
        async with run_gateway(policy(a.url, b.url, c.url)) as gw, gw.client() as client:
            assert (await client.get("/long/users/1")).status_code == 200  # warm pools
            await trio.sleep(0.05)
            baseline = live_tasks()
            closed_at = await _disconnecting_client(gw.port, "/long/slow?ms=5000", 0.2,
                                                    method, body)
            with trio.fail_after(5):
                await a.wait_cancelled()
            assert a.cancelled[0].at - closed_at < 0.1
            # Nothing of that request is still running: tasks back to the baseline.
            with trio.fail_after(2):
                while live_tasks() > baseline:
                    await trio.sleep(0.01)
            traces = await traces_with(gw, status=499)
            assert traces[0].cause == "client_disconnect"
            call = next(s for s in traces[0].root.walk() if s.kind == "call")
            assert (call.cause, call.fired_scope) == ("client_disconnect", "request")
            assert gw.gateway.runtime.snapshot.upstreams["a"].limiter.statistics().in_flight == 0
        nursery.cancel_scope.cancel()


async def test_a_client_gone_before_its_request_starts_cancels_it():
    # Request and close in one go: the worker may see the close before the request's
    # task has run, and the request must still end as a disconnect, not be served.
    count = 20
    async with trio.open_nursery() as nursery:
        a, b, c = [await start_upstream(nursery) for _ in range(3)]
        async with run_gateway(policy(a.url, b.url, c.url)) as gw:
            for _ in range(count):
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                await stream.send_all(b"GET /long/slow?ms=5000 HTTP/1.1\r\nhost: t\r\n\r\n")
                await stream.aclose()
            runtime = gw.gateway.runtime
            # Served, each would hold its slot for 5 s.
            with trio.fail_after(2):
                while len(runtime.traces) < count or runtime.gate.in_flight:
                    await trio.sleep(0.01)
            statuses = [trace.status for trace in runtime.traces.query(limit=count)]
            assert statuses == [499] * count
        nursery.cancel_scope.cancel()


async def test_fail_fast_fanout_cancels_siblings():
    async with trio.open_nursery() as nursery:
        a, b, c = [await start_upstream(nursery) for _ in range(3)]
        async with run_gateway(policy(a.url, b.url, c.url)) as gw, gw.client() as client:
            response = await client.get("/fast-fail")
            assert response.status_code == 502
            assert response.json().get("call") == "broken", response.text
            await a.wait_cancelled()
            await b.wait_cancelled()
            trace = await trace_of(gw, response.json()["request_id"])
            calls = {s.name: s for s in trace.root.walk() if s.kind == "call"}
            for name in ("slow_a", "slow_b"):
                assert (calls[name].cause, calls[name].fired_scope) == \
                    ("sibling_failed", "call broken")
            assert calls["broken"].outcome == "error"
        nursery.cancel_scope.cancel()


async def test_partial_fanout_returns_what_arrived_with_errors():
    async with trio.open_nursery() as nursery:
        a, b, c = [await start_upstream(nursery) for _ in range(3)]
        async with run_gateway(policy(a.url, b.url, c.url)) as gw, gw.client() as client:
            response = await client.get("/partial")
            assert response.status_code == 200
            body = response.json()
            assert body["user"] == {"id": "7", "name": "user-7"}
            assert body["orders"]["user"] == "7"
            assert body["errors"]["late"]["cause"] == "deadline"
            assert body["errors"]["late"]["status"] == 504
            await c.wait_cancelled()

            first = await client.get("/first")
            assert first.status_code == 200 and list(first.json()) == ["quick"]
            await b.wait_cancelled()
            trace = await trace_of(gw, first.headers["x-request-id"])
            stuck = next(s for s in trace.root.walk() if s.label == "call stuck")
            assert stuck.cause == "quorum_reached"
        nursery.cancel_scope.cancel()


async def test_excess_over_concurrency_plus_queue_is_shed():
    concurrency, queue = 5, 5
    async with trio.open_nursery() as nursery:
        a, b, c = [await start_upstream(nursery) for _ in range(3)]
        text = policy(a.url, b.url, c.url, concurrency=concurrency, queue=queue)
        async with run_gateway(text) as gw:
            statuses: list[int] = []
            retry_after: list[str] = []
            limits = httpx.Limits(max_connections=100)
            async with gw.client(limits=limits) as client:

                async def one() -> None:
                    response = await client.get("/long/slow?ms=300")
                    statuses.append(response.status_code)
                    if response.status_code == 503:
                        retry_after.append(response.headers["retry-after"])
                        assert response.json()["cause"] == "shed"

                async with trio.open_nursery() as clients:
                    for _ in range(2 * (concurrency + queue)):
                        clients.start_soon(one)
            assert statuses.count(503) == concurrency + queue
            assert statuses.count(200) == concurrency + queue
            assert all(int(value) >= 1 for value in retry_after)
            assert a.max_in_flight <= concurrency
        nursery.cancel_scope.cancel()


async def test_door_sheds_beyond_max_inflight():
    async with trio.open_nursery() as nursery:
        a, b, c = [await start_upstream(nursery) for _ in range(3)]
        text = policy(a.url, b.url, c.url).replace("max_inflight: 1000", "max_inflight: 2")
        async with run_gateway(text) as gw, gw.client() as client:
            statuses = await fire(client, "/long/slow?ms=300", 5, 5)
            assert sorted(statuses) == [200, 200, 503, 503, 503]
            assert a.max_in_flight <= 2
        nursery.cancel_scope.cancel()


def test_task_count_helper_is_not_trivially_flat():
    # live_tasks() must see tasks a nursery starts, or the leak test above proves nothing.
    async def main() -> tuple[int, int]:
        before = live_tasks()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(trio.sleep_forever)
            await trio.lowlevel.checkpoint()
            during = live_tasks()
            nursery.cancel_scope.cancel()
        return before, during

    before, during = trio.run(main)
    assert during == before + 2



async def test_a_lagging_event_loop_sheds_at_the_door():
    async with trio.open_nursery() as nursery:
        a, b, c = [await start_upstream(nursery) for _ in range(3)]
        text = policy(a.url, b.url, c.url).replace(
            "max_inflight: 1000", "max_inflight: 1000\n  max_loop_lag: 20ms")
        async with run_gateway(text) as gw, gw.client() as client:
            assert (await client.get("/long/users/1")).status_code == 200
            hogging = trio.Event()
            stop = trio.Event()

            async def hog() -> None:
                """Block the loop on purpose, as CPU-bound overload would."""
                while not stop.is_set():
                    time.sleep(0.05)  # noqa: ASYNC251 - the blocking is the point
                    hogging.set()
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(hog)
            await hogging.wait()
            with trio.fail_after(5):
                while gw.gateway.runtime.loop_lag.lag_s <= 0.02:
                    await trio.sleep(0.01)
            shed = await client.get("/long/users/1")
            assert shed.status_code == 503
            assert shed.json()["cause"] == "shed"
            assert "overloaded" in shed.json()["error"]
            assert a.requests[-1].target == "/users/1" and len(a.requests) == 1
            stop.set()
            with trio.fail_after(5):
                while gw.gateway.runtime.loop_lag.lag_s > 0.02:
                    await trio.sleep(0.01)
            assert (await client.get("/long/users/2")).status_code == 200
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("leave", ["close", "half-close"])
async def test_a_client_that_pipelined_a_request_then_left_cancels_the_one_in_flight(leave):
    # README: a half-close is taken as leaving, "Requests it pipelined before the
    # half-close and that are not yet answered are cancelled"; a full close all the more.
    # With a second request pipelined behind the first, the departure is never seen:
    # the first request's upstream work runs to its end and is logged 200.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(b"GET /api/slow?ms=3000 HTTP/1.1\r\nhost: t\r\n\r\n"
                                  b"GET /api/ok HTTP/1.1\r\nhost: t\r\n\r\n")
            await upstream.wait_for(lambda: upstream.in_flight >= 1)
            left_at = trio.current_time()
            if leave == "close":
                await stream.aclose()
            else:
                await stream.send_eof()
            with trio.fail_after(5):
                await upstream.wait_for(lambda: upstream.requests[0].ended_at is not None)
            assert upstream.cancelled, (
                f"the upstream ran on for {upstream.requests[0].ended_at - left_at:.2f}s "
                f"and answered {upstream.requests[0].status}")
            assert upstream.cancelled[0].at - left_at < 0.5
            (trace,) = await traces_with(gw, route="/api/{rest*}")
            assert (trace.status, trace.cause) == (499, "client_disconnect")
            await stream.aclose()
        nursery.cancel_scope.cancel()
