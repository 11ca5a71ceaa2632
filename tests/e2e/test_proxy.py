"""Proxy routes end to end: Hypercorn-served gateway, real upstream servers on loopback."""

import os

import trio

from tests.gateway_harness import live_tasks, run_gateway
from tests.process_harness import free_port as closed_port
from tests.upstream import start_upstream

POLICY = """
version: 1
server:
  trusted_proxies: [10.9.9.9/32]
upstreams:
  users: {{url: "{url}"}}
  dead: {{url: "http://127.0.0.1:{dead_port}", pool: {{connect_timeout: 500ms}}}}
routes:
  - path: /api/users/{{id}}
    methods: [GET]
    proxy: {{upstream: users, path: "/users/{{id}}"}}
  - path: /api/raw/{{id}}
    proxy: {{upstream: users, path: "/headers/{{id}}"}}
  - path: /api/up/{{rest*}}
    proxy: {{upstream: users, path: "/{{rest}}"}}
  - path: /api/dead
    proxy: {{upstream: dead, path: "/x"}}
"""


def policy_for(url: str) -> str:
    return POLICY.format(url=url, dead_port=closed_port())


async def test_request_ids_headers_and_forwarding():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(policy_for(upstream.url)) as gw, gw.client() as client:
            response = await client.get("/api/raw/1", headers={
                "x-request-id": "abc-123", "connection": "x-secret-hop, keep-alive",
                "x-secret-hop": "1", "keep-alive": "timeout=5", "te": "trailers",
                "x-forwarded-for": "6.6.6.6", "x-custom": "kept", "host": "public.example"})
            assert response.status_code == 200
            assert response.headers["x-request-id"] == "abc-123"
            seen = upstream.requests[-1]
            names = [name for name, _ in seen.headers]
            for hop in ("x-secret-hop", "keep-alive", "te"):
                assert hop not in names
            assert seen.header("x-custom") == "kept"
            # The client is not a trusted proxy: its X-Forwarded-For chain is dropped.
            assert seen.header_values("x-forwarded-for") == ["127.0.0.1"]
            assert seen.header("x-forwarded-proto") == "http"
            assert seen.header("x-forwarded-host") == "public.example"
            assert seen.header("x-request-id") == "abc-123"
            assert seen.header("host") != "public.example"

            insane = await client.get("/api/users/1", headers={"x-request-id": "bad id\t!"})
            generated = insane.headers["x-request-id"]
            assert generated != "bad id\t!" and len(generated) == 24
            assert upstream.requests[-1].header("x-request-id") == generated
        nursery.cancel_scope.cancel()


async def test_parameters_never_change_the_upstream_path():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(policy_for(upstream.url)) as gw, gw.client() as client:
            cases = {
                "/api/users/..%2F..%2Fadmin": "/users/..%2F..%2Fadmin",
                "/api/users/a%3Fq%3D1%23frag": "/users/a%3Fq%3D1%23frag",
                "/api/users/%2e%2e%2fsecret": "/users/..%2Fsecret",
            }
            for path, target in cases.items():
                response = await client.get(path)
                assert response.status_code == 200, path
                assert upstream.requests[-1].target == target
            # Dot segments resolve before routing: never a route the policy did not name.
            for path in ("/api/users/..", "/api/users/%2e%2e", "/api/users/%2e%2e/%2e%2e/%2e%2e/x"):
                response = await client.get(path)
                assert response.status_code in (400, 404), path
                assert response.json()["cause"] in ("no_route", "bad_request")
            # In a tail too, an encoded slash stays inside its segment, as sent.
            response = await client.get("/api/up/projects/group%2Fproject/raw")
            assert response.status_code == 200
            assert upstream.requests[-1].target == "/projects/group%2Fproject/raw"
            count = len(upstream.requests)
            response = await client.get("/api/up/a/%2e%2e/%2e%2e/x")
            assert response.status_code == 404
            assert len(upstream.requests) == count
        nursery.cancel_scope.cancel()


async def test_error_statuses_are_json_with_request_id():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(policy_for(upstream.url)) as gw, gw.client() as client:
            missing = await client.get("/nope")
            assert missing.status_code == 404
            assert missing.json()["request_id"] == missing.headers["x-request-id"]

            wrong = await client.post("/api/users/1")
            assert wrong.status_code == 405 and "GET" in wrong.headers["allow"]

            refused = await client.get("/api/dead")
            assert refused.status_code == 502
            assert refused.json()["cause"] == "upstream_connect"

            for path, cause in (("/api/up/reset", "upstream_reset"),
                                ("/api/up/garbage", "upstream_protocol")):
                response = await client.get(path)
                assert response.status_code == 502, path
                assert response.json()["cause"] == cause

            timed_out = await client.get("/api/up/stall",
                                         headers={"x-request-timeout-ms": "200"})
            assert timed_out.status_code == 504
            assert timed_out.json()["cause"] == "deadline"

            bad_deadline = await client.get("/api/users/1",
                                            headers={"x-request-timeout-ms": "-5"})
            assert bad_deadline.status_code == 400
            assert "x-request-timeout-ms" in bad_deadline.json()["error"]

            # The gateway still serves normally after all of that.
            assert (await client.get("/api/users/9")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_admin_endpoints_only_on_admin_bind():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(policy_for(upstream.url)) as gw:
            async with gw.client() as client:
                for path in ("/healthz", "/readyz", "/metrics", "/traces", "/policy"):
                    assert (await client.get(path)).status_code == 404, path
            async with gw.admin() as admin:
                assert (await admin.get("/healthz")).json() == {"status": "ok"}
                assert (await admin.get("/readyz")).status_code == 200
                policy = (await admin.get("/policy")).json()
                assert len(policy["version"]) == 12
        nursery.cancel_scope.cancel()


async def test_graceful_shutdown_lets_in_flight_request_finish():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(policy_for(upstream.url), graceful_timeout=5) as gw:
            result = {}

            async def slow_request() -> None:
                async with gw.client() as client:
                    result["response"] = await client.get("/api/up/slow?ms=400")

            async with trio.open_nursery() as clients:
                clients.start_soon(slow_request)
                await upstream.wait_requests(1)
                gw.shutdown.set()  # stop accepting; in-flight work gets the grace period
            assert result["response"].status_code == 200
            assert upstream.cancelled == []
        nursery.cancel_scope.cancel()


async def test_closed_client_connections_end_at_once():
    """A closed connection's task and socket do not wait for the keep-alive timer."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(policy_for(upstream.url), keep_alive_timeout=30) as gw, \
                gw.client() as client:
            assert (await client.get("/api/users/1")).status_code == 200
            await trio.sleep(0.05)
            baseline = live_tasks()
            fds = len(os.listdir("/proc/self/fd"))
            for index in range(50):
                stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
                if index % 2:  # a full exchange, then the client closes
                    await stream.send_all(
                        f"GET /api/users/{index} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
                    assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
                else:  # an idle connection (a pre-connecting proxy) closed unused
                    await trio.sleep(0.001)
                await stream.aclose()
            with trio.fail_after(2):  # far below the 30 s keep-alive timeout
                while live_tasks() > baseline or len(os.listdir("/proc/self/fd")) > fds:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_the_budget_announced_upstream_is_what_is_left_when_the_request_is_sent():
    # One pooled connection, so one slot: the second request waits ~400 ms for it in the
    # limit's queue; the budget it announces must be what is left then.
    policy = """
version: 1
upstreams:
  up:
    url: "{url}"
    pool: {{max_connections: 1}}
    limit: {{concurrency: 1, queue_timeout: 1s}}
routes:
  - path: /api/{{rest*}}
    deadline: 1s
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(policy.format(url=upstream.url)) as gw, gw.client() as client:
            assert (await client.get("/api/ok")).status_code == 200  # warm the connection
            results: dict[str, float] = {}

            async def slow() -> None:
                await client.get("/api/slow?ms=400")

            async def second() -> None:
                await upstream.wait_for(lambda: upstream.in_flight >= 1)
                results["sent"] = trio.current_time()
                response = await client.get("/api/headers")
                assert response.status_code == 200, response.text

            with trio.fail_after(5):
                async with trio.open_nursery() as inner:
                    inner.start_soon(slow)
                    inner.start_soon(second)
            seen = next(r for r in upstream.requests if r.path == "/headers")
            announced = int(seen.header("x-request-timeout-ms"))
            left_ms = (results["sent"] + 1.0 - seen.started_at) * 1000
            assert seen.started_at - results["sent"] > 0.3  # it did wait for the connection
            assert announced <= left_ms + 20, (announced, left_ms)
        nursery.cancel_scope.cancel()


POOL = """
version: 1
upstreams:
  up:
    url: "{url}"
    pool: {{max_connections: 1, idle_timeout: 200ms}}
    limit: {{concurrency: 10, queue: 10, queue_timeout: 50ms}}
routes:
  - path: /api/{{rest*}}
    deadline: 2s
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""


async def test_a_call_beyond_the_pool_s_connections_is_shed_after_queue_timeout():
    """With ``max_connections: 1`` under ``concurrency: 10``, a call beyond the busy
    connection passed the limit and waited in the pool, unbounded and never shed, until
    the route's deadline: a 504 after 2 s. The slots are the pool's connections, so it
    waits in the limit's queue and is shed (503, Retry-After) after ``queue_timeout``."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POOL.format(url=upstream.url)) as gw, gw.client() as client, \
                gw.client() as holder, trio.open_nursery() as holding:
            holding.start_soon(holder.get, "/api/stall")
            await upstream.wait_requests(1)
            started = trio.current_time()
            response = await client.get("/api/ok")
            waited = trio.current_time() - started
            assert (response.status_code, response.json()["cause"]) == (503, "shed")
            assert "retry-after" in response.headers
            assert waited < 1.0, waited
            holding.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_an_idle_upstream_connection_is_closed_at_idle_timeout_without_traffic():
    """``idle_timeout: 200ms``: an idle pooled connection was closed only when another
    request to that upstream came, so after a burst its sockets stayed open (or in
    CLOSE_WAIT once the upstream closed them) for as long as it got no traffic."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POOL.format(url=upstream.url)) as gw, gw.client() as client:
            assert (await client.get("/api/ok")).status_code == 200
            assert upstream.connections_opened == 1
            with trio.fail_after(1.0):  # 200 ms idle, then a sweep within 100 ms
                await upstream.wait_connections_closed(1)
            assert gw.gateway.runtime.snapshot.upstreams["up"].pool.statistics().idle == 0
        nursery.cancel_scope.cancel()


LEAKS = """
version: 1
upstreams:
  users: {{url: "{url}"}}
  dead: {{url: "http://127.0.0.1:{dead_port}", pool: {{connect_timeout: 500ms}}}}
  unnamed: {{url: "http://nonexistent.invalid:{dead_port}", pool: {{connect_timeout: 2s}}}}
routes:
  - path: /refused
    proxy: {{upstream: dead, path: "/x"}}
  - path: /unresolved
    proxy: {{upstream: unnamed, path: "/x"}}
  - path: /garbage
    proxy: {{upstream: users, path: "/garbage"}}
  - path: /reset
    proxy: {{upstream: users, path: "/reset"}}
  - path: /partial
    fanout:
      on_failure: partial
      calls:
        user: {{upstream: users, path: "/users/1"}}
        refused: {{upstream: dead, path: "/x"}}
        unresolved: {{upstream: unnamed, path: "/x"}}
"""


async def test_an_upstream_failure_tells_the_client_its_cause_not_the_upstream_s_address():
    """A 502 said "cannot connect to upstream 'dead': all attempts to connect to
    127.0.0.1:PORT failed": the OS's words, with the upstream's internal address, reached
    every client. The client is told the cause, a short reason and the upstream's name in
    the policy; the address, the host that did not resolve and the OS's words stay in the
    trace (admin ``/traces/{id}``) and the access log, for whoever runs the gateway."""
    dead_port = closed_port()
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(LEAKS.format(url=upstream.url, dead_port=dead_port)) as gw, \
                gw.client() as client, gw.admin() as admin:
            internal = ("127.0.0.1", str(dead_port), str(upstream.port), "nonexistent",
                        ".invalid", "Errno", "attempts to connect", "service not known",
                        "NOT HTTP", "Error(")
            traced = {"/refused": f"127.0.0.1:{dead_port}",
                      "/unresolved": f"nonexistent.invalid:{dead_port}"}
            for path, cause, status in (("/refused", "upstream_connect", 502),
                                        ("/unresolved", "upstream_connect", 502),
                                        ("/garbage", "upstream_protocol", 502),
                                        ("/reset", "upstream_reset", 502),
                                        ("/partial", None, 200)):
                response = await client.get(path)
                assert response.status_code == status, (path, response.text)
                for word in internal:
                    assert word not in response.text, (path, word, response.text)
                body = response.json()
                if cause is not None:
                    assert body["cause"] == cause and body["error"], body
                    assert set(body) <= {"error", "cause", "request_id", "upstream"}, body
                else:
                    assert {name: error["cause"] for name, error in body["errors"].items()} \
                        == {"refused": "upstream_connect", "unresolved": "upstream_connect"}
                trace = await admin.get(f"/traces/{response.headers['x-request-id']}")
                assert trace.status_code == 200
                if path in traced:
                    assert traced[path] in trace.text, trace.text
                if path == "/partial":
                    for where in traced.values():
                        assert where in trace.text, trace.text
        nursery.cancel_scope.cancel()
