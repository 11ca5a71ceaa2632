"""What operators are told about a request: one access-log line for each that failed,
was cancelled or was slow, whatever ``server.tracing`` says; nothing a client wrote
replayed to their terminal; nothing private in a trace; each trace bounded."""

from __future__ import annotations

import contextlib
import json
import logging

import httpx
import pytest
import trio

from gateway._trace_view import render_traces_text
from tests.gateway_harness import RunningGateway, run_gateway, trace_of
from tests.h2client import H2Client
from tests.upstream import proxy_policy, start_upstream

POLICY = """
version: 1
server: {{tracing: {tracing}}}
upstreams:
  users: {{url: "{url}"}}
routes:
  - path: /api/{{rest*}}
    deadline: 10s
    proxy: {{upstream: users, path: "/{{rest}}"}}
"""


async def _access_lines(caplog: pytest.LogCaptureFixture, request_id: str,
                        at_least: int = 1) -> list[dict[str, object]]:
    """The access-log lines of one request, once ``at_least`` of them were written."""
    with trio.fail_after(5):
        while True:
            lines = [json.loads(record.getMessage()) for record in caplog.records
                     if record.name == "gateway.access"]
            mine = [line for line in lines if line["request_id"] == request_id]
            if len(mine) >= at_least:
                return mine
            await trio.sleep(0.01)


async def test_a_response_cut_mid_body_by_its_upstream_is_logged(caplog):
    """The client got a truncated 200; the trace said ``upstream_reset``; no log line."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url, tracing="true")) as gw:
            async with gw.client() as client:
                with contextlib.suppress(httpx.HTTPError):  # a short body
                    await client.get("/api/reset-mid-body",
                                     headers={"x-request-id": "cut-mid-body"})
            trace = await trace_of(gw, "cut-mid-body")
            assert trace.cause == "upstream_reset"
            lines = await _access_lines(caplog, "cut-mid-body")
            assert len(lines) == 1, lines
        nursery.cancel_scope.cancel()


async def test_a_5xx_is_logged_with_tracing_off(caplog):
    """``server.tracing: false`` keeps no traces; it silenced the access log too."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url, tracing="false")) as gw:
            async with gw.client() as client:
                response = await client.get("/api/reset",
                                            headers={"x-request-id": "reset-no-trace"})
            assert response.status_code == 502
            assert len(await _access_lines(caplog, "reset-no-trace")) == 1
        nursery.cancel_scope.cancel()


PRIVATE = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
routes:
  - path: /api/invites/{token}
    deadline: 2s
    sql: {upstream: db, query: "SELECT $1::text = 'never' AS valid", args: ["path.token:text"],
          one: true}
"""


async def test_a_wrong_method_on_a_private_route_keeps_the_value_out_of_traces(database):
    """A CORS preflight or a POST to /api/invites/<token> is a 405; its trace kept the
    raw path, token included, where a GET's shows the template."""
    async with run_gateway(PRIVATE) as gw, gw.client() as client:
        for method in ("OPTIONS", "POST"):
            response = await client.request(method, "/api/invites/s3cret-invite-token",
                                            headers={"x-request-id": f"private-{method}"})
            assert response.status_code == 405
            trace = await trace_of(gw, f"private-{method}")
            assert trace.path == "/api/invites/{token}", trace.to_json()
            assert trace.route == "/api/invites/{token}"


ESCAPES = "\x1b[2J\x1b]0;owned\x1b\\\x1b[32m"


async def _h2_request(port: int, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = H2Client(stream)
        await client.start()
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, headers, end_stream=True)
        await client.flush()
        with trio.fail_after(5):
            return await client.response(stream_id)


async def _rendered(gw: RunningGateway, request_id: str) -> str:
    return render_traces_text([(await trace_of(gw, request_id)).to_json()])


@pytest.mark.parametrize(("method", "path"), [("GET", f"/api/x{ESCAPES}ok"),
                                              (f"GET{ESCAPES}", "/api/x")])
async def test_the_traces_view_does_not_replay_terminal_escapes(method, path):
    """HTTP/2 lets ESC through in ``:path`` and ``:method`` (h2 refuses NUL, CR, LF):
    the trace kept them and ``gateway traces`` wrote them to the operator's terminal
    (a cleared screen, a retitled window, forged lines). Such a request is a 400."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            status, _ = await _h2_request(gw.port, [
                (":method", method), (":path", path), (":scheme", "http"),
                (":authority", "gw"), ("x-request-id", "escapes")])
            assert status == 400
            rendered = await _rendered(gw, "escapes")
            assert "\x1b" not in rendered and "\\x1b" in rendered, repr(rendered)
        nursery.cancel_scope.cancel()


async def test_a_huge_h2_method_is_refused_and_not_kept_whole():
    """A 60 KB ``:method`` (pseudo-headers are not counted in ``max_header_bytes``) was
    a 405 echoing it whole, and kept whole in the trace buffer."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            status, body = await _h2_request(gw.port, [
                (":method", "X" * 60_000), (":path", "/api/x"), (":scheme", "http"),
                (":authority", "gw"), ("x-request-id", "huge-method")])
            assert status == 400 and len(body) < 1024, (status, len(body))
            trace = await trace_of(gw, "huge-method")
            assert len(trace.method) <= 32
        nursery.cancel_scope.cancel()
