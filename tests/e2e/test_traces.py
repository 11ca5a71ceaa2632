"""One real request driven into each cancellation cause; the trace names the cause and
the scope that fired, and the Prometheus counter on the admin bind counts it."""

import contextlib
import json
import logging
import os
import subprocess
import sys

import httpx
import pytest
import trio

from gateway._trace_view import _follow, render_traces_text
from tests.gateway_harness import RunningGateway, run_gateway, trace_of, traces_with
from tests.metrics import metric_total
from tests.upstream import start_upstream

POLICY = """
version: 1
server: {{max_inflight: 50}}
upstreams:
  a: {{url: "{url}", limit: {{concurrency: 1, queue: 0, queue_timeout: 10ms}}}}
  b: {{url: "{url}"}}
  hedged: {{url: "{url}", call: {{hedge_after: 50ms, retries: {{budget: 100%}}}}}}
  stingy:
    url: "{url}"
    call: {{retries: {{attempts: 3, on: [503], backoff: 1ms..2ms, budget: 0%,
                      min_per_second: 0}}}}
  fragile:
    url: "{url}"
    circuit: {{consecutive_failures: 1, min_requests: 100, open_for: 10s}}
routes:
  - path: /request-deadline
    deadline: 200ms
    proxy: {{upstream: b, path: "/stall"}}
  - path: /call-deadline
    deadline: 2s
    proxy: {{upstream: b, path: "/stall", timeout: 150ms}}
  - path: /stall
    deadline: 10s
    proxy: {{upstream: b, path: "/stall"}}
  - path: /one-slot
    deadline: 10s
    proxy: {{upstream: a, path: "/slow?ms=500"}}
  - path: /fail-fast
    deadline: 5s
    fanout:
      calls:
        slow: {{upstream: b, path: "/stall"}}
        broken: {{upstream: b, path: "/status/500"}}
  - path: /first
    deadline: 5s
    fanout:
      mode: first
      calls:
        quick: {{upstream: b, path: "/users/1"}}
        stuck: {{upstream: b, path: "/stall"}}
  - path: /hedged
    deadline: 5s
    proxy: {{upstream: hedged, path: "/slow-once"}}
  - path: /stingy
    deadline: 5s
    proxy: {{upstream: stingy, path: "/status/503"}}
  - path: /fragile
    deadline: 5s
    proxy: {{upstream: fragile, path: "/status/502"}}
"""


async def metric(gw: RunningGateway, cause: str, scope: str) -> float:
    async with gw.admin() as admin:
        text = (await admin.get("/metrics")).text
    return metric_total(text, "gateway_cancellations_total", cause=cause, scope=scope)


def spans_with(trace, cause: str) -> list:
    return [s for s in trace.root.walk() if s.cause == cause]


async def start(nursery: trio.Nursery):
    slow_once = {"count": 0}

    async def behaviour(request, respond) -> None:
        if request.path == "/slow-once":
            slow_once["count"] += 1
            await trio.sleep(5 if slow_once["count"] == 1 else 0)
            await respond.json({"attempt": slow_once["count"]})
        else:
            await respond.fallback()

    return await start_upstream(nursery, behaviour=behaviour)


async def test_every_cause_is_traced_and_counted():
    async with trio.open_nursery() as nursery:
        upstream = await start(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:

            async def check(path: str, status: int, cause: str, scope: str,
                            headers: dict | None = None) -> None:
                before = await metric(gw, cause, scope.split("#")[0])
                response = await client.get(path, headers=headers or {})
                assert response.status_code == status, (path, response.text)
                trace = await trace_of(gw, response.headers["x-request-id"])
                found = spans_with(trace, cause)
                assert found, (path, trace.to_json())
                assert any(s.fired_scope == scope for s in found), (path, trace.to_json())
                assert await metric(gw, cause, scope.split("#")[0]) > before

            # deadline of the request (policy) vs of a call, and from the client header
            await check("/request-deadline", 504, "deadline", "request")
            await check("/call-deadline", 504, "deadline", "call b")
            trace = (await traces_with(gw, route="/request-deadline"))[0]
            assert trace.deadline_source == "policy"
            response = await client.get("/call-deadline",
                                        headers={"x-request-timeout-ms": "80"})
            header_trace = await trace_of(gw, response.headers["x-request-id"])
            assert header_trace.deadline_source == "header"
            assert spans_with(header_trace, "deadline")[0].fired_scope == "request"
            # a failing sibling in a fail-fast fan-out, naming the sibling
            await check("/fail-fast", 502, "sibling_failed", "call broken")
            # the remaining calls once `first` has its answer
            await check("/first", 200, "quorum_reached", "call quick")
            # the losing hedge
            await check("/hedged", 200, "hedge_lost", "attempt hedged#1")  # won by #2
            # a retry the budget refused
            await check("/stingy", 503, "retry_budget", "attempt stingy#2")
            # an open circuit refuses the next call at once
            assert (await client.get("/fragile")).status_code == 502
            await check("/fragile", 503, "circuit_open", "attempt fragile#1")
            # shed by a full queue (concurrency 1, queue 0)
            async with trio.open_nursery() as holders:
                holders.start_soon(client.get, "/one-slot")
                await upstream.wait_for(lambda: upstream.in_flight >= 1)
                await check("/one-slot", 503, "shed", "call a")

            # client_disconnect: the client leaves while the upstream stalls
            before = await metric(gw, "client_disconnect", "request")
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            await stream.send_all(b"GET /stall HTTP/1.1\r\nhost: t\r\n\r\n")
            await upstream.wait_for(lambda: upstream.in_flight >= 1)
            await stream.aclose()
            trace = (await traces_with(gw, route="/stall", status=499))[0]
            assert trace.cause == "client_disconnect"
            assert spans_with(trace, "client_disconnect")[0].fired_scope == "request"
            assert await metric(gw, "client_disconnect", "request") > before

            # the terminal view renders the cancelled scopes and their causes
            text = render_traces_text([t.to_json() for t in
                                       gw.gateway.runtime.traces.query(limit=3)])
            assert "cause=client_disconnect" in text and "GET /stall" in text
            # ... and so does the CLI, reading the admin endpoint
            result = await trio.run_process(
                [sys.executable, "-m", "gateway", "traces", "--admin", gw.admin_url,
                 "--cause", "deadline", "--limit", "5"],
                capture_stdout=True, env={**os.environ, "COLUMNS": "200"})
            output = result.stdout.decode()
            assert "GET /request-deadline" in output and "cause=deadline" in output
            assert "GET /stall" not in output
        nursery.cancel_scope.cancel()


async def test_shutdown_cancels_what_outlives_the_grace_period():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url), graceful_timeout=0.3) as gw:
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as client:

                async def stalled() -> None:
                    # The connection is closed by the shutdown.
                    with contextlib.suppress(httpx.TransportError):
                        await client.get("/stall")

                async with trio.open_nursery() as clients:
                    clients.start_soon(stalled)
                    await upstream.wait_for(lambda: upstream.in_flight >= 1)
                    gw.shutdown.set()
                trace = (await traces_with(gw, route="/stall"))[0]
                assert trace.cause == "shutdown"
                assert trace.root.cause == "shutdown"
                assert trace.root.fired_scope == "server"
                await upstream.wait_cancelled()
        nursery.cancel_scope.cancel()


async def test_secrets_never_enter_traces_or_logs(caplog):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            with caplog.at_level("INFO", logger="gateway.access"):
                response = await client.get(
                    "/request-deadline?token=s3cret-query",
                    headers={"authorization": "Bearer s3cret-token",
                             "cookie": "session=s3cret-cookie"})
                assert response.status_code == 504
                trace = await trace_of(gw, response.headers["x-request-id"])
            # The upstream did get them: redaction is about what the gateway records.
            assert upstream.requests[-1].header("authorization") == "Bearer s3cret-token"
            recorded = str(trace.to_json()) + caplog.text
            assert "access" in caplog.text or trace.request_id in caplog.text
            assert "s3cret" not in recorded
            async with gw.admin() as admin:
                assert "s3cret" not in (await admin.get("/traces")).text
        nursery.cancel_scope.cancel()


def _trace_json(request_id: str, path: str, started_at: float) -> dict[str, object]:
    return {"request_id": request_id, "method": "GET", "path": path, "route": path,
            "status": 504, "cause": "deadline", "deadline_source": "policy",
            "started_at": started_at, "duration_ms": 300.0, "worker_pid": 1,
            "spans": {"kind": "request", "name": path, "start_ms": 0.0, "end_ms": 300.0,
                      "outcome": "error", "cause": "deadline", "scope": "request"}}


async def test_traces_follow_prints_a_later_request_that_reuses_a_request_id(
        capsys: pytest.CaptureFixture[str]) -> None:
    # The request id is the client's x-request-id when it is sane, so ids repeat (a
    # client retrying with its id, a fixed id from a test rig). `gateway traces
    # --follow` remembers printed traces by request id alone, so a later request with
    # an id seen before is never shown: the retry that also hit its deadline is missing.
    first = _trace_json("client-id-1", "/api/first", 1000.0)
    second = _trace_json("client-id-1", "/api/second", 1010.0)
    polls = [0]

    async def admin(request, respond) -> None:  # type: ignore[no-untyped-def]
        polls[0] += 1
        await respond.json({"traces": [first] if polls[0] == 1 else [second, first],
                            "unreachable_workers": [], "worker_pid": 1})

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            upstream = await start_upstream(nursery, behaviour=admin)
            async with trio.open_nursery() as follower:
                follower.start_soon(_follow, upstream.url, None, None, None, 20, True, 0.01)
                await upstream.wait_for(lambda: polls[0] >= 3)
                follower.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    output = capsys.readouterr().out
    assert "/api/first" in output
    assert "/api/second" in output, output


async def test_traces_min_ms_shows_only_the_requests_that_took_at_least_that_long():
    # SREs want the slow requests only; `gateway traces` had no duration filter.
    policy = """
version: 1
upstreams:
  b: {{url: "{url}"}}
routes:
  - path: /quick
    proxy: {{upstream: b, path: "/users/1"}}
  - path: /slow
    proxy: {{upstream: b, path: "/slow?ms=300"}}
"""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(policy.format(url=upstream.url)) as gw, gw.client() as client:
            for path in ("/quick", "/slow", "/quick"):
                assert (await client.get(path)).status_code == 200
            await traces_with(gw, route="/slow")
            result = await trio.run_process(
                [sys.executable, "-m", "gateway", "traces", "--admin", gw.admin_url,
                 "--min-ms", "250"], capture_stdout=True, capture_stderr=True,
                check=False, env={**os.environ, "COLUMNS": "200"})
        nursery.cancel_scope.cancel()
    output = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-1500:]
    assert "GET /slow" in output and "GET /quick" not in output, output


@pytest.mark.parametrize(("option", "value", "named"), [
    ("--cause", "bogus", "deadline"),
    ("--cause", "Deadline", "client_disconnect"),
    ("--status", "0", "100<=x<=599"),
    ("--status", "1000", "100<=x<=599"),
    ("--route", "api/users/{id}", "'/'"),
    ("--trace-id", "4BF92F3577B34DA6A3CE929D0E0E4736", "lower-case hex"),
    ("--trace-id", "0" * 32, "not all zero"),
    ("--min-ms", "-1", "x>=0"),
    ("--min-ms", "nan", "not a valid integer"),
])
def test_a_traces_filter_that_can_never_match_is_a_usage_error(
        option: str, value: str, named: str) -> None:
    # `gateway traces --cause bogus` asked the admin endpoint, found nothing and
    # exited 0: a typo read as "no such trace". It is refused before any request,
    # naming what the option takes.
    from click.testing import CliRunner

    from gateway._cli import main

    result = CliRunner().invoke(main, ["traces", "--admin", "http://127.0.0.1:1",
                                       option, value])
    assert result.exit_code == 2, result.output
    assert named in result.output, result.output
    assert "cannot reach" not in result.output  # refused before asking the admin


def test_every_cause_a_trace_can_carry_is_a_choice_of_gateway_traces() -> None:
    # A cause the CLI does not list could never be asked for: every cancellation cause
    # and every error's cause (an upstream's 502, the gateway's own 500) is a choice.
    import gateway._app  # noqa: F401  (defines the errors of every module)
    from gateway._errors import GatewayError
    from gateway._trace import CAUSES, TRACE_CAUSES

    def subclasses(cls: type) -> list[type]:
        return [cls, *(sub for child in cls.__subclasses__() for sub in subclasses(child))]

    causes = {error.cause for error in subclasses(GatewayError)} - {"error"}
    assert causes | set(CAUSES) <= set(TRACE_CAUSES)


@pytest.mark.parametrize("answer", [b"<html>an nginx page</html>", b'{"status": "ok"}'])
async def test_traces_from_an_address_that_is_no_admin_endpoint_is_one_line(
        answer: bytes) -> None:
    # `gateway traces --admin` pointed at another service (a typo in the port) that
    # answers 200 printed a JSONDecodeError or KeyError traceback.
    async def other(request, respond) -> None:  # type: ignore[no-untyped-def]
        await respond.respond(200, answer)

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=other)
        result = await trio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "gateway", "traces", "--admin", upstream.url],
            capture_output=True, text=True, timeout=60))
        nursery.cancel_scope.cancel()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert f"{upstream.url} answered no traces" in result.stderr, result.stderr


TRACE_CONTEXT_POLICY = """
version: 1
server: {{tracing: {tracing}, trace_context: {trace_context}, log_sample: 100%}}
upstreams:
  up: {{url: "{url}"}}
  retried:
    url: "{url}"
    call: {{retries: {{attempts: 2, on: [503], backoff: 1ms..2ms, budget: 100%}}}}
routes:
  - path: /plain
    proxy: {{upstream: up, path: "/headers"}}
  - path: /flaky
    proxy: {{upstream: retried, path: "/flaky"}}
  - path: /summary
    fanout:
      calls:
        one: {{upstream: up, path: "/headers"}}
"""
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"


async def start_flaky(nursery: trio.Nursery):
    """``/flaky`` answers 503 to its first request, 200 after; the rest as usual."""
    tries = {"count": 0}

    async def behaviour(request, respond) -> None:
        if request.path == "/flaky":
            tries["count"] += 1
            await respond.json({"try": tries["count"]},
                               status=503 if tries["count"] == 1 else 200)
        else:
            await respond.fallback()

    return await start_upstream(nursery, behaviour=behaviour)


def attempt_span_ids(trace) -> list[str]:
    return [s.attrs["span_id"] for s in trace.root.walk() if s.kind == "attempt"]


def split_traceparent(value: str) -> list[str]:
    version, trace_id, parent_id, flags = value.split("-")
    assert version == "00" and len(trace_id) == 32 and len(parent_id) == 16
    return [trace_id, parent_id, flags]


async def test_a_valid_traceparent_joins_the_client_trace_and_each_try_its_own_span(caplog):
    """The upstream is sent the client's trace-id with the span id of the try that
    reached it; the trace (admin JSON, access log) names the trace and the client's span."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with trio.open_nursery() as nursery:
        upstream = await start_flaky(nursery)
        policy = TRACE_CONTEXT_POLICY.format(url=upstream.url, tracing="true",
                                             trace_context="w3c")
        async with run_gateway(policy) as gw, gw.client() as client:
            sent = {"traceparent": CLIENT_TRACEPARENT, "tracestate": "vendor=abc,other=1"}
            response = await client.get("/plain", headers=sent)
            assert response.status_code == 200
            seen = upstream.requests[-1]
            trace_id, parent_id, flags = split_traceparent(seen.header("traceparent"))
            assert (trace_id, flags) == (CLIENT_TRACE_ID, "01")
            assert parent_id != CLIENT_SPAN_ID
            assert seen.header_values("traceparent") == [seen.header("traceparent")]
            assert seen.header_values("tracestate") == ["vendor=abc,other=1"]
            request_id = response.headers["x-request-id"]
            trace = await trace_of(gw, request_id)
            assert attempt_span_ids(trace) == [parent_id]
            async with gw.admin() as admin:
                shown = (await admin.get(f"/traces/{request_id}")).json()
            assert shown["trace_id"] == CLIENT_TRACE_ID
            assert shown["parent_span_id"] == CLIENT_SPAN_ID
            assert shown["spans"]["children"][0]["children"][0]["span_id"] == parent_id
            with trio.fail_after(5):
                while not (lines := [json.loads(r.getMessage()) for r in caplog.records
                                     if r.name == "gateway.access"
                                     and request_id in r.getMessage()]):
                    await trio.sleep(0.01)
            assert lines[0]["trace_id"] == CLIENT_TRACE_ID
            assert lines[0]["parent_span_id"] == CLIENT_SPAN_ID
            assert f"trace={CLIENT_TRACE_ID}" in render_traces_text([shown])

            # A retry is a try of its own: another span id, the same trace.
            response = await client.get("/flaky", headers=sent)
            assert response.status_code == 200
            tries = [r for r in upstream.requests if r.path == "/flaky"]
            assert len(tries) == 2
            parents = [split_traceparent(r.header("traceparent")) for r in tries]
            assert [p[0] for p in parents] == [CLIENT_TRACE_ID] * 2
            assert parents[0][1] != parents[1][1]
            assert all(r.header("tracestate") == "vendor=abc,other=1" for r in tries)
            trace = await trace_of(gw, response.headers["x-request-id"])
            assert attempt_span_ids(trace) == [p[1] for p in parents]

            # A fan-out call (which forwards only a few of the client's headers) too.
            response = await client.get("/summary", headers=sent)
            assert response.status_code == 200
            seen = upstream.requests[-1]
            trace_id, parent_id, _ = split_traceparent(seen.header("traceparent"))
            assert trace_id == CLIENT_TRACE_ID
            assert seen.header("tracestate") == "vendor=abc,other=1"
            trace = await trace_of(gw, response.headers["x-request-id"])
            assert attempt_span_ids(trace) == [parent_id]

            # The SRE holding the client's trace-id finds the gateway's traces of it.
            await client.get("/plain")  # another trace
            async with gw.admin() as admin:
                found = (await admin.get("/traces", params={"trace_id": CLIENT_TRACE_ID}))
                assert {t["path"] for t in found.json()["traces"]} == {
                    "/plain", "/flaky", "/summary"}
                refused = await admin.get("/traces", params={"trace_id": "XYZ"})
                assert refused.status_code == 400
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("traceparent", [
    None,
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # upper-case hex
    f"00-{'0' * 32}-{CLIENT_SPAN_ID}-01",  # all-zero trace-id
    f"00-{CLIENT_TRACE_ID}-{'0' * 16}-01",  # all-zero parent-id
    f"ff-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01",  # the forbidden version
    f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01-extra",  # version 00 has four fields
    f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-1",  # short flags
    f"00_{CLIENT_TRACE_ID}_{CLIENT_SPAN_ID}_01",  # other separators
    f"00-{CLIENT_TRACE_ID[:-1]}g-{CLIENT_SPAN_ID}-01",  # not hex
    f"{CLIENT_TRACEPARENT}, {CLIENT_TRACEPARENT}",  # two of them on one line
])
async def test_a_missing_or_malformed_traceparent_starts_a_trace(traceparent):
    """Ignored, never refused: the request starts a trace (sampled) and the client's
    tracestate, meaningless without its traceparent, is dropped."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = TRACE_CONTEXT_POLICY.format(url=upstream.url, tracing="true",
                                             trace_context="w3c")
        async with run_gateway(policy) as gw, gw.client() as client:
            headers = {"tracestate": "vendor=abc"}
            if traceparent is not None:
                headers["traceparent"] = traceparent
            response = await client.get("/plain", headers=headers)
            assert response.status_code == 200
            seen = upstream.requests[-1]
            trace_id, parent_id, flags = split_traceparent(seen.header("traceparent"))
            assert trace_id not in (CLIENT_TRACE_ID, CLIENT_TRACE_ID.upper(), "0" * 32)
            assert flags == "01"
            assert seen.header("tracestate") is None
            trace = await trace_of(gw, response.headers["x-request-id"])
            assert trace.to_json()["trace_id"] == trace_id
            assert trace.to_json()["parent_span_id"] is None
            assert attempt_span_ids(trace) == [parent_id]
        nursery.cancel_scope.cancel()


async def test_two_traceparent_lines_start_a_trace():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = TRACE_CONTEXT_POLICY.format(url=upstream.url, tracing="true",
                                             trace_context="w3c")
        async with run_gateway(policy) as gw, gw.client() as client:
            response = await client.get("/plain", headers=[
                ("traceparent", CLIENT_TRACEPARENT), ("traceparent", CLIENT_TRACEPARENT)])
            assert response.status_code == 200
            seen = upstream.requests[-1]
            assert len(seen.header_values("traceparent")) == 1
            assert split_traceparent(seen.header("traceparent"))[0] != CLIENT_TRACE_ID
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("tracing", "trace_context"), [("false", "w3c"), ("true", "off")])
async def test_trace_context_off_passes_the_headers_through_untouched(tracing, trace_context):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = TRACE_CONTEXT_POLICY.format(url=upstream.url, tracing=tracing,
                                             trace_context=trace_context)
        async with run_gateway(policy) as gw, gw.client() as client:
            response = await client.get("/plain", headers={
                "traceparent": CLIENT_TRACEPARENT, "tracestate": "vendor=abc"})
            assert response.status_code == 200
            seen = upstream.requests[-1]
            assert seen.header_values("traceparent") == [CLIENT_TRACEPARENT]
            assert seen.header_values("tracestate") == ["vendor=abc"]
            response = await client.get("/plain")
            assert upstream.requests[-1].header("traceparent") is None
            if tracing == "true":
                trace = await trace_of(gw, response.headers["x-request-id"])
                assert trace.to_json()["trace_id"] is None
                assert "span_id" not in trace.root.children[0].children[0].attrs
        nursery.cancel_scope.cancel()
