"""The admin surface: invisible on the public bind; behind a bearer token when the
policy names one (``server.admin_token_env``), all but the probes' two paths."""

import pytest
import trio

from tests.gateway_harness import run_gateway, traces_with
from tests.hostile import policy_for, stage
from tests.hostile.rawclient import exchange, request_bytes
from tests.upstream import start_upstream

ADMIN_PATHS = ["/healthz", "/readyz", "/metrics", "/traces", "/policy", "/traces/x"]
TOKEN_ENV = "HOSTILE_TEST_ADMIN_TOKEN"


async def test_admin_paths_are_404_on_the_public_bind():
    async with stage() as s:
        for path in ADMIN_PATHS:
            for host in ("gateway.test", f"127.0.0.1:{s.gw.admin_port}"):
                response, _ = await exchange(s.port, request_bytes("GET", path, [("Host", host)]))
                assert response is not None and response.status == 404, (path, response)
        assert s.upstream.requests == []
        await s.assert_serves()


@pytest.fixture
def admin_token(monkeypatch):
    token = "s3cret-token-for-tests"
    monkeypatch.setenv(TOKEN_ENV, token)
    return token


PROTECTED_PATHS = ["/metrics", "/traces", "/policy"]


async def test_admin_token_is_required(admin_token):
    async with stage(server=f"  admin_token_env: {TOKEN_ENV}\n") as s:
        async with s.gw.admin() as admin:
            for path in PROTECTED_PATHS:
                assert (await admin.get(path)).status_code == 401, path
                wrong = await admin.get(path, headers={"authorization": "Bearer nope"})
                assert wrong.status_code == 401, path
                basic = await admin.get(path, headers={"authorization": f"Basic {admin_token}"})
                assert basic.status_code == 401, path
                good = await admin.get(path, headers={"authorization": f"Bearer {admin_token}"})
                assert good.status_code == 200, path
                # The scheme is case-insensitive (RFC 9110, 11.1).
                lower = await admin.get(path, headers={"authorization": f"bearer {admin_token}"})
                assert lower.status_code == 200, path
            denied = await admin.get("/policy")
            assert denied.headers["www-authenticate"] == "Bearer"
            assert admin_token not in denied.text
        await s.assert_serves()


async def test_probes_need_no_token_and_learn_only_whether_the_gateway_is_ready(admin_token):
    # A load balancer's or an orchestrator's probe carries no secret; readiness tells
    # it yes or no, and names its checks (the upstreams) only to a holder of the token.
    async with stage(server=f"  admin_token_env: {TOKEN_ENV}\n") as s:
        async with s.gw.admin() as admin:
            assert (await admin.get("/healthz")).json() == {"status": "ok"}
            probe = await admin.get("/readyz")
            assert probe.status_code == 200 and probe.json() == {"ready": True}
            full = await admin.get("/readyz",
                                   headers={"authorization": f"Bearer {admin_token}"})
            assert full.status_code == 200 and full.json()["checks"]
            wrong = await admin.get("/readyz", headers={"authorization": "Bearer nope"})
            assert wrong.json() == {"ready": True}


async def test_admin_token_env_unset_fails_closed(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    async with stage(server=f"  admin_token_env: {TOKEN_ENV}\n") as s:
        async with s.gw.admin() as admin:
            assert (await admin.get("/metrics")).status_code == 401
            bare = await admin.get("/metrics", headers={"authorization": "Bearer"})
            assert bare.status_code == 401
            assert "checks" not in (await admin.get("/readyz")).json()


async def test_bad_admin_requests_get_a_json_4xx():
    async with stage() as s, s.gw.admin() as admin:
        for method, path, status in (("GET", "/traces?limit=0", 400),
                                     ("GET", "/traces?limit=-5", 400),
                                     ("GET", "/traces?limit=x", 400),
                                     ("GET", "/traces?min_ms=nan", 400),
                                     ("GET", "/traces?min_ms=inf", 400),
                                     ("POST", "/healthz", 405),
                                     ("DELETE", "/traces", 405)):
            response = await admin.request(method, path)
            assert response.status_code == status, (method, path, response.text)
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["cause"]


async def test_a_traces_filter_that_can_never_match_is_a_400_naming_what_it_takes():
    """``/traces?cause=bogus`` (a typo, a cause in the wrong case, a status no answer
    has) answered 200 with no traces, which reads as "no such trace"; ``gateway traces``
    refuses the same filters. The admin endpoint answers 400, naming the values the
    filter takes, in its JSON error shape."""
    from gateway._trace import TRACE_CAUSES

    async with stage() as s, s.gw.admin() as admin:
        await s.assert_serves()  # one trace to find
        for query, named in (("cause=bogus", "client_disconnect"),
                             ("cause=Deadline", "upstream_connect"),
                             ("cause=", "deadline"),
                             ("status=0", "100 to 599"),
                             ("status=99", "100 to 599"),
                             ("status=600", "100 to 599"),
                             ("route=api/users", "'/'")):
            response = await admin.get(f"/traces?{query}")
            assert response.status_code == 400, (query, response.text)
            assert response.headers["content-type"].startswith("application/json")
            body = response.json()
            assert body["cause"] == "bad_request", body
            assert body["request_id"] == response.headers["x-request-id"], body
            assert named in body["error"], (query, body)
            if query.startswith("cause="):
                assert body["causes"] == list(TRACE_CAUSES), body
        for query in ("cause=deadline", "status=200", "status=599", "route=/api/x"):
            response = await admin.get(f"/traces?{query}")
            assert response.status_code == 200, (query, response.text)
        await traces_with(s.gw, status=200)  # recorded once its answer was sent
        found = (await admin.get("/traces?status=200")).json()["traces"]
        assert found and all(trace["status"] == 200 for trace in found)


async def test_admin_errors_have_the_public_listener_s_shape_and_request_id(admin_token):
    """An admin error answered ``{"error", "cause"}`` without the request id every public
    error carries (in its body and ``x-request-id``), so an operator could not match it
    to a log line; an OPTIONS got Quart's empty ``text/html`` 200, and a 405 named no
    allowed methods (RFC 9110 15.5.6)."""
    async with stage(server=f"  admin_token_env: {TOKEN_ENV}\n") as s, \
            s.gw.admin() as admin, s.gw.client() as public:
        auth = {"authorization": f"Bearer {admin_token}"}
        shape = {"error", "cause", "request_id"}
        public_error = (await public.get("/nowhere")).json()
        assert set(public_error) == shape
        for method, path, headers, status in (
                ("GET", "/nowhere", auth, 404),
                ("HEAD", "/nowhere", auth, 404),
                ("OPTIONS", "/healthz", {}, 405),
                ("OPTIONS", "/traces", auth, 405),
                ("POST", "/healthz", {}, 405),
                ("DELETE", "/traces", auth, 405),
                ("GET", "/traces?limit=0", auth, 400),
                ("GET", "/traces?min_ms=nan", auth, 400),
                ("GET", "/policy", {}, 401)):
            response = await admin.request(method, path, headers=headers)
            assert response.status_code == status, (method, path, response.text)
            assert response.headers["content-type"].startswith("application/json"), (
                method, path, response.headers)
            request_id = response.headers.get("x-request-id")
            assert request_id, (method, path, response.headers)
            if method == "HEAD":
                continue
            body = response.json()
            assert set(body) == shape, (method, path, body)
            assert body["request_id"] == request_id, (method, path, body)
            if status == 405:
                assert response.headers["allow"] == ("GET, HEAD"), (method, path)
        # A client's own request id is kept, as on the public listener.
        response = await admin.get("/nowhere", headers={**auth, "x-request-id": "op-42"})
        assert response.headers["x-request-id"] == "op-42"
        assert response.json()["request_id"] == "op-42"
        missing = await admin.get("/traces/nope", headers=auth)
        assert missing.status_code == 404
        assert missing.json()["request_id"] == missing.headers["x-request-id"]
        assert missing.json()["cause"] == "not_found"


async def test_an_admin_endpoint_that_fails_answers_json_and_the_gateway_serves_on(
        monkeypatch, caplog):
    async with stage() as s, s.gw.admin() as admin:
        def broken(**query: object) -> None:
            raise RuntimeError("trace buffer broken")  # stands for a bug in the gateway

        monkeypatch.setattr(s.gw.gateway.runtime.traces, "query", broken)
        response = await admin.get("/traces")
        assert response.status_code == 500
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["cause"] == "internal"
        assert "trace buffer broken" in caplog.text
        assert (await admin.get("/healthz")).status_code == 200
        await s.assert_serves()


def test_the_traces_command_says_plainly_when_the_admin_is_unreachable():
    from click.testing import CliRunner

    from gateway._cli import main

    result = CliRunner().invoke(main, ["traces", "--admin", "http://127.0.0.1:1"])
    assert result.exit_code == 1
    assert "cannot reach the admin endpoint http://127.0.0.1:1" in result.output
    assert "Traceback" not in result.output


async def test_requests_an_upstream_limiter_sheds_are_counted_as_shed():
    from tests.metrics import metric_total
    from tests.upstream import start_upstream

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = (f'version: 1\nupstreams:\n  up: {{url: "{upstream.url}", '
                  "limit: {concurrency: 1, queue: 0}}\nroutes:\n  - path: /x/{rest*}\n"
                  '    proxy: {upstream: up, path: "/{rest}"}\n')
        async with stage(policy) as s, s.gw.admin() as admin, s.gw.client() as client:
            before = metric_total((await admin.get("/metrics")).text,
                                  "gateway_shed_total", where="upstream")
            async with trio.open_nursery() as clients:
                clients.start_soon(client.get, "/x/slow?ms=300")
                await upstream.wait_requests(1)  # the one slot is taken
                refused = await client.get("/x/ok")
            assert refused.status_code == 503 and refused.json()["cause"] == "shed"
            after = metric_total((await admin.get("/metrics")).text,
                                 "gateway_shed_total", where="upstream")
            assert after == before + 1
        nursery.cancel_scope.cancel()


async def test_a_token_read_from_a_file_with_its_newline_still_matches(monkeypatch):
    # A secret mounted from a file (Kubernetes, Docker) ends in a newline, which no
    # Authorization header carries: the admin could never be reached.
    monkeypatch.setenv(TOKEN_ENV, "s3cret-from-a-file\n")
    async with stage(server=f"  admin_token_env: {TOKEN_ENV}\n") as s, \
            s.gw.admin() as admin:
        good = await admin.get("/policy", headers={"authorization": "Bearer s3cret-from-a-file"})
        assert good.status_code == 200
        assert (await admin.get("/policy")).status_code == 401


async def test_the_admin_listener_s_limits_follow_a_reload(tmp_path):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        text = policy_for(upstream.url)
        async with run_gateway(text, policy_path=path) as gw, gw.admin() as admin:
            assert gw.gateway.admin.config["RESPONSE_TIMEOUT"] == 3600
            path.write_text(text.replace("body_timeout: 1s",
                                         "body_timeout: 1s\n    response_timeout: 90s"))
            assert await gw.gateway.reload()
            assert (await admin.get("/healthz")).status_code == 200
            # Quart's limit of admin responses was set once, at start-up.
            assert gw.gateway.admin.config["RESPONSE_TIMEOUT"] == 90
        nursery.cancel_scope.cancel()
