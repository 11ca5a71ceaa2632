import resource
import sys
from pathlib import Path

# Make `tests.*` helpers importable as a package from any test module.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.pg import pg_cluster  # noqa: F401  (session-scoped throwaway PostgreSQL)

# As `serve` does at start-up: the open-file limit raised to the hard limit, so that the
# gateways these tests run in-process keep their room for the sockets they open.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft != _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))
