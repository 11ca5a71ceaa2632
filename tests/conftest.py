import sys
from pathlib import Path

# Make `tests.*` helpers importable as a package from any test module.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.pg import pg_cluster  # noqa: F401  (session-scoped throwaway PostgreSQL)
