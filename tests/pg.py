"""The session-scoped ``pg_cluster`` fixture: a real, throwaway PostgreSQL.

When the binaries are missing the fixture skips, unless ``CI`` is set: CI must install
them (``.ci/install-system-deps.sh``), so there a missing PostgreSQL fails loudly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

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
