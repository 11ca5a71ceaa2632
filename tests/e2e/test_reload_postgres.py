"""Reloads that rebuild a PostgreSQL pool while statements are in flight: a route's
deadline changed, so the session statement_timeout that follows it changed too."""

import contextlib
from pathlib import Path

import httpx
import trio

from tests.gateway_harness import RunningGateway, run_gateway
from tests.pg import wait_running

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
    sql: {{upstream: db, query: "SELECT pg_sleep(1.5)::text AS slept /* mark-reload */",
          one: true}}
"""


def _sessions(database) -> int:  # type: ignore[no-untyped-def]
    return int(database.psql("SELECT count(*) FROM pg_stat_activity "
                             "WHERE application_name = 'trio-gateway'").strip())


async def _wait_sessions(database, expected: int, timeout_s: float = 8.0) -> int:  # type: ignore[no-untyped-def]
    """The gateway's sessions on the server, once they are ``expected`` (or the timeout)."""
    with trio.move_on_after(timeout_s):
        while await trio.to_thread.run_sync(_sessions, database) != expected:
            await trio.sleep(0.1)
    return await trio.to_thread.run_sync(_sessions, database)


async def _reload_under_a_statement(database, gw: RunningGateway, path: Path,  # type: ignore[no-untyped-def]
                                    deadlines: list[str]) -> list[httpx.Response]:
    """Reload to each of ``deadlines`` while a 1.5 s statement runs on the first pool;
    the statement's answer (if it got one)."""
    answers: list[httpx.Response] = []
    async with gw.client() as client, trio.open_nursery() as clients:

        async def slow() -> None:
            with contextlib.suppress(httpx.HTTPError):
                answers.append(await client.get("/sleep"))

        clients.start_soon(slow)
        await wait_running(database, "mark-reload")
        for deadline in deadlines:
            await trio.Path(path).write_text(POLICY.format(deadline=deadline))
            assert await gw.gateway.reload()
    return answers


async def test_a_deadline_reload_drains_the_old_pool_and_closes_its_sessions(
        database, tmp_path: Path):
    path = tmp_path / "policy.yaml"
    assert await _wait_sessions(database, 0) == 0
    async with run_gateway(POLICY.format(deadline="10s"), policy_path=path) as gw, \
            gw.client() as client:
        assert (await client.get("/timeout")).json() == {"t": "30s"}
        (answer,) = await _reload_under_a_statement(database, gw, path, ["60s"])
        assert answer.status_code == 200, answer.text
        assert (await client.get("/timeout")).json() == {"t": "65s"}
        # The old pool closed once its statement ended: only the new pool's session.
        assert await _wait_sessions(database, 1) == 1
        assert gw.gateway.runtime.snapshot.upstreams["db"].postgres.statistics().size == 1
    assert await _wait_sessions(database, 0) == 0


async def test_two_quick_reloads_with_a_statement_in_flight_leave_one_pool(
        database, tmp_path: Path):
    path = tmp_path / "policy.yaml"
    assert await _wait_sessions(database, 0) == 0
    async with run_gateway(POLICY.format(deadline="10s"), policy_path=path) as gw, \
            gw.client() as client:
        (answer,) = await _reload_under_a_statement(database, gw, path, ["60s", "20s"])
        assert answer.status_code == 200, answer.text
        assert (await client.get("/timeout")).json() == {"t": "30s"}
        assert await _wait_sessions(database, 1) == 1
        assert gw.gateway.runtime.retiring == []
    assert await _wait_sessions(database, 0) == 0


async def test_shutdown_while_an_old_pool_drains_closes_its_sessions(database, tmp_path: Path):
    path = tmp_path / "policy.yaml"
    assert await _wait_sessions(database, 0) == 0
    async with run_gateway(POLICY.format(deadline="10s"), policy_path=path,
                           graceful_timeout=0.3) as gw, trio.open_nursery() as nursery:

        async def reload_then_stop() -> None:
            await _reload_under_a_statement(database, gw, path, ["60s"])

        nursery.start_soon(reload_then_stop)
        await wait_running(database, "mark-reload")
        with trio.fail_after(5):
            while gw.gateway.runtime.snapshot.policy.routes[0].deadline != 60.0:
                await trio.sleep(0.01)
        gw.shutdown.set()
    assert await _wait_sessions(database, 0, timeout_s=5) == 0
