"""Upstream clients: the gateway's own HTTP/1.1 pool (and, beside it, other bridges)."""

from ._http import HttpUpstreamPool as HttpUpstreamPool
from ._http import PoolLimits as PoolLimits
from ._http import PoolStatistics as PoolStatistics
from ._http import UpstreamResponse as UpstreamResponse

__all__ = ["HttpUpstreamPool", "PoolLimits", "PoolStatistics", "UpstreamResponse"]
