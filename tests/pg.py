"""The session-scoped ``pg_cluster`` fixture: a real, throwaway PostgreSQL.

When the binaries are missing the fixture skips, unless ``CI`` is set: CI must install
them (``.ci/install-system-deps.sh``), so there a missing PostgreSQL fails loudly.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gateway._throwaway_postgres import (
    PostgresCluster,
    PostgresUnavailable,
    start_cluster,
)

__all__ = ["TRANSLATED", "PostgresCluster", "pg_cluster", "pg_cluster_translated"]


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


#: The locale of ``pg_cluster_translated``'s messages: the server's words in German.
TRANSLATED = "de_DE.UTF-8"


@pytest.fixture(scope="session")
def pg_cluster_translated() -> Iterator[PostgresCluster]:
    """A second throwaway PostgreSQL whose sessions can set ``lc_messages`` to
    :data:`TRANSLATED` (a DSN ending ``?lc_messages=de_DE.UTF-8``): the locale is
    compiled with ``localedef`` into a directory the server finds through ``LOCPATH``,
    as the machine may have no locale but C. Skips where it cannot be had."""
    if shutil.which("localedef") is None or not glob.glob(
            "/usr/share/locale/de/LC_MESSAGES/postgres-*.mo"):
        pytest.skip("no localedef, or no German message catalog for PostgreSQL")
    locales = Path(tempfile.mkdtemp(prefix="gateway-locales-"))
    try:
        done = subprocess.run(["localedef", "-i", "de_DE", "-f", "UTF-8",
                               str(locales / TRANSLATED)],
                              capture_output=True, text=True, check=False, timeout=60)
        if done.returncode != 0 or not (locales / TRANSLATED).is_dir():
            pytest.skip(f"localedef could not compile {TRANSLATED}: {done.stderr[-300:]}")
        for path in (locales, *locales.rglob("*")):  # readable by the server's user
            path.chmod(0o755 if path.is_dir() else 0o644)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("LOCPATH", str(locales))
            try:
                cluster = start_cluster()
            except PostgresUnavailable as exc:
                pytest.skip(str(exc))
        try:
            yield cluster
        finally:
            cluster.destroy()
    finally:
        shutil.rmtree(locales, ignore_errors=True)


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
