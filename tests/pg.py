"""The session-scoped ``pg_cluster`` fixture: a real, throwaway PostgreSQL.

When the binaries are missing the fixture skips, unless ``CI`` is set: CI must install
them (``.ci/install-system-deps.sh``), so there a missing PostgreSQL fails loudly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import trio

from gateway._throwaway_postgres import (
    PostgresCluster,
    PostgresUnavailable,
    start_cluster,
)

__all__ = ["PostgresCluster", "pg_cluster"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """A real PostgreSQL for the whole session (sync: it outlives every trio run)."""
    try:
        cluster = start_cluster()
    except PostgresUnavailable as exc:
        if os.environ.get("CI", "").lower() not in {"", "0", "false"}:
            pytest.fail(f"CI must provide PostgreSQL: {exc}", pytrace=False)
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.destroy()


async def statements_running(database: PostgresCluster, marker: str) -> int:
    """Statements of the server's other sessions running now whose text holds ``marker``
    (a comment the test's SQL carries), from ``pg_stat_activity``."""
    out = await trio.to_thread.run_sync(
        database.psql,
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
        f"AND pid <> pg_backend_pid() AND query LIKE '%{marker}%'")
    return int(out.strip())


async def wait_running(database: PostgresCluster, marker: str, timeout_s: float = 5.0) -> None:
    """Until a statement holding ``marker`` runs on the server."""
    with trio.fail_after(timeout_s):
        while not await statements_running(database, marker):
            await trio.sleep(0.02)


async def assert_stops(database: PostgresCluster, marker: str, within_s: float) -> None:
    """Fail unless no statement holding ``marker`` runs any more within ``within_s``."""
    with trio.move_on_after(within_s):
        while await statements_running(database, marker):
            await trio.sleep(0.02)
        return
    raise AssertionError(f"{marker}: still running on the server {within_s} s after the "
                         "gateway let go of it")
