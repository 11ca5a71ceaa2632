import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

# Make `tests.*` helpers importable as a package from any test module.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.pg import (  # noqa: F401  (session-scoped throwaway PostgreSQL clusters)
    pg_cluster,
    pg_cluster_translated,
)

# As `serve` does at start-up: the open-file limit raised to the hard limit, so that the
# gateways these tests run in-process keep their room for the sockets they open.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft != _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


@pytest.fixture
def database(pg_cluster, monkeypatch) -> Iterator:  # noqa: F811
    """The session's PostgreSQL, running, its DSN in ``GATEWAY_TEST_DSN`` (the variable
    the SQL tests' policies name); started again after a test that stopped it."""
    if not pg_cluster.running:
        pg_cluster.start()
    monkeypatch.setenv("GATEWAY_TEST_DSN", pg_cluster.dsn)
    yield pg_cluster
    if not pg_cluster.running:
        pg_cluster.start()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A test certificate authority, for HTTPS upstreams (``tests.tls``)."""
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)
