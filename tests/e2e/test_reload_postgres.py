"""Reloads that rebuild a PostgreSQL pool while statements are in flight."""

import contextlib
from pathlib import Path

import httpx
import pytest
import trio

from tests.gateway_harness import run_gateway

POLICY = """
version: 1
upstreams:
  db:
    postgres: {{dsn_env: GATEWAY_TEST_DSN, pool: {{min: 1, max: 2}}}}
routes:
  - path: /timeout
    deadline: {deadline}
    sql: {{upstream: db, query: "SELECT current_setting('statement_timeout') AS t", one: true}}
  - path: /sleep
    deadline: {deadline}
    sql: {{upstream: db, query: "SELECT pg_sleep(1.5)::text AS slept", one: true}}
"""


@pytest.fixture
def database(pg_cluster, monkeypatch):
    monkeypatch.setenv("GATEWAY_TEST_DSN", pg_cluster.dsn)
    return pg_cluster


def sessions(database) -> int:
    out = database.psql("SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = 'trio-gateway'")
    return int(str(out).strip().split()[-1]) if not isinstance(out, int) else out


async def wait_sessions(database, expected: int, timeout_s: float = 8.0) -> int:
    with trio.move_on_after(timeout_s):
        while await trio.to_thread.run_sync(sessions, database) != expected:
            await trio.sleep(0.1)
    return await trio.to_thread.run_sync(sessions, database)


async def test_a_deadline_reload_drains_the_old_pool_and_closes_its_sessions(
        database, tmp_path: Path):
    path = tmp_path / "policy.yaml"
    assert await wait_sessions(database, 0) == 0
    async with run_gateway(POLICY.format(deadline="10s"), policy_path=path) as gw, \
            gw.client() as client:
        assert (await client.get("/timeout")).json() == {"t": "30s"}
        answers: list[httpx.Response] = []

        async def slow() -> None:
            answers.append(await client.get("/sleep"))

        async with trio.open_nursery() as clients:
            clients.start_soon(slow)
            await trio.sleep(0.4)
            await trio.Path(path).write_text(POLICY.format(deadline="60s"))
            assert await gw.gateway.reload()
            assert (await client.get("/timeout")).json() == {"t": "65s"}
        (answer,) = answers
        assert answer.status_code == 200, answer.text
        # the old pool closed once its statement ended: only the new pool's sessions
        assert await wait_sessions(database, 1) == 1
        stats = gw.gateway.runtime.snapshot.upstreams["db"].postgres.statistics()
        assert stats.size == 1
    assert await wait_sessions(database, 0) == 0


async def test_two_quick_reloads_with_a_statement_in_flight_leave_one_pool(
        database, tmp_path: Path):
    path = tmp_path / "policy.yaml"
    assert await wait_sessions(database, 0) == 0
    async with run_gateway(POLICY.format(deadline="10s"), policy_path=path) as gw, \
            gw.client() as client:
        assert (await client.get("/timeout")).json() == {"t": "30s"}
        answers: list[httpx.Response] = []

        async def slow() -> None:
            answers.append(await client.get("/sleep"))

        async with trio.open_nursery() as clients:
            clients.start_soon(slow)
            await trio.sleep(0.4)
            await trio.Path(path).write_text(POLICY.format(deadline="60s"))
            assert await gw.gateway.reload()
            await trio.Path(path).write_text(POLICY.format(deadline="20s"))
            assert await gw.gateway.reload()
            assert (await client.get("/timeout")).json() == {"t": "30s"}
        (answer,) = answers
        assert answer.status_code == 200, answer.text
        assert await wait_sessions(database, 1) == 1
        assert gw.gateway.runtime.retiring == []
    assert await wait_sessions(database, 0) == 0


async def test_shutdown_while_an_old_pool_drains_closes_its_sessions(database, tmp_path: Path):
    path = tmp_path / "policy.yaml"
    assert await wait_sessions(database, 0) == 0
    async with run_gateway(POLICY.format(deadline="10s"), policy_path=path,
                           graceful_timeout=0.3) as gw, gw.client() as client:
        async def slow() -> None:
            with contextlib.suppress(httpx.HTTPError):
                await client.get("/sleep")

        async with trio.open_nursery() as clients:
            clients.start_soon(slow)
            await trio.sleep(0.4)
            await trio.Path(path).write_text(POLICY.format(deadline="60s"))
            assert await gw.gateway.reload()
            gw.shutdown.set()
    assert await wait_sessions(database, 0, timeout_s=5) == 0
