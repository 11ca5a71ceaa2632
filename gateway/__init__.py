"""A structured-concurrency API gateway on Trio.

Every request is a nursery; every deadline is a cancel scope; every cancellation is
attributed to its cause in the request's trace.
"""

from ._errors import GatewayError as GatewayError
from ._policy import Policy as Policy

__version__ = "0.1.0"

__all__ = ["GatewayError", "Policy", "__version__"]
