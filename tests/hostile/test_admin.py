"""The admin surface: invisible on the public bind; behind a bearer token when the
policy names one (``server.admin_token_env``)."""

import pytest

from tests.hostile import stage
from tests.hostile.rawclient import exchange, request_bytes

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


async def test_admin_token_is_required(admin_token):
    async with stage(server=f"  admin_token_env: {TOKEN_ENV}\n") as s:
        async with s.gw.admin() as admin:
            for path in ADMIN_PATHS[:-1]:
                assert (await admin.get(path)).status_code == 401, path
                wrong = await admin.get(path, headers={"authorization": "Bearer nope"})
                assert wrong.status_code == 401, path
                basic = await admin.get(path, headers={"authorization": f"Basic {admin_token}"})
                assert basic.status_code == 401, path
                good = await admin.get(path, headers={"authorization": f"Bearer {admin_token}"})
                assert good.status_code == 200, path
            denied = await admin.get("/healthz")
            assert denied.headers["www-authenticate"] == "Bearer"
            assert admin_token not in denied.text
        await s.assert_serves()


async def test_admin_token_env_unset_fails_closed(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    async with stage(server=f"  admin_token_env: {TOKEN_ENV}\n") as s:
        async with s.gw.admin() as admin:
            assert (await admin.get("/healthz")).status_code == 401
            bare = await admin.get("/healthz", headers={"authorization": "Bearer"})
            assert bare.status_code == 401
