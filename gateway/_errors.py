"""The gateway's exception tree and how each maps to a status code.

Every failure a request can meet is translated once, here, into a ``GatewayError``
subclass that knows its HTTP status, its trace cause and whether it carries a
``Retry-After``. Library exceptions (h11, trio, OSError) never leave the layer that
caught them::

    GatewayError
    ├── BadRequest (400)               malformed input from the client
    │   ├── RequestTimeout (408)       the body did not arrive within body_timeout
    │   ├── PayloadTooLarge (413)
    │   ├── UriTooLong (414)
    │   └── HeadersTooLarge (431)
    ├── NotFound (404) / MethodNotAllowed (405)
    ├── UpstreamError (502)            the upstream failed or answered garbage
    │   ├── UpstreamConnectError       refused, unreachable, connect timeout
    │   │   └── UpstreamCertificateError   a TLS handshake no retry can mend
    │   ├── UpstreamResetError         closed or reset mid-exchange
    │   ├── TransactionRolledBack      SQL serialization failure or deadlock, undone
    │   └── UpstreamProtocolError      not HTTP/1.1, oversized or broken framing
    ├── UpstreamTimeout (504)          a call or request deadline fired
    ├── Shed (503 + Retry-After)       refused by a full queue, queue timeout, max_inflight
    └── CircuitOpen (503 + Retry-After)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class GatewayError(Exception):
    """Base of every error the gateway answers with; carries status and cause.

    ``message`` is the whole story, for the trace and the log: an upstream's address,
    the host that did not resolve, the words of the OS, the TLS library or the
    database. ``public`` is what the client is told, when that differs: a short reason
    in the gateway's own words, naming the upstream only by its name in the policy (a
    client has no use for the internal address, and should not learn it).
    """

    status: int = 500  # an instance may refine it (an upstream's own 5xx, say)
    cause: ClassVar[str] = "error"

    def __init__(self, message: str, *, retry_after_s: float | None = None,
                 public: str | None = None, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.public = message if public is None else public
        self.retry_after_s = retry_after_s
        self.detail = detail

    def retry_after_header(self) -> str | None:
        """``Retry-After`` in whole seconds (at least 1), or None when not applicable."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))


class BadRequest(GatewayError):
    status = 400
    cause = "bad_request"


class RequestTimeout(BadRequest):
    status = 408


class PayloadTooLarge(BadRequest):
    status = 413


class UriTooLong(BadRequest):
    status = 414


class HeadersTooLarge(BadRequest):
    status = 431


class Conflict(GatewayError):
    """The database refused a write for a constraint its input broke (a duplicate key, a
    missing referenced row): the client's to resolve, as PostgREST answers it."""

    status = 409
    cause = "conflict"


class NotFound(GatewayError):
    status = 404
    cause = "no_route"


class NoRow(NotFound):
    """A SQL call that answers one row found none: the route exists, the record not."""

    cause = "not_found"


class InternalError(GatewayError):
    """A fault of the gateway's own: answered as JSON, logged with its traceback."""

    status = 500
    cause = "internal"


class MethodNotAllowed(GatewayError):
    status = 405
    cause = "method_not_allowed"


#: Why a CONNECT is refused, over HTTP/1.1 and HTTP/2 alike (its ``Allow`` names the
#: policy's methods, ``gateway._policy.ALL_METHODS``).
NO_TUNNELS = "CONNECT is not served: the gateway opens no tunnels"


class UpstreamError(GatewayError):
    status = 502
    cause = "upstream_error"


class UpstreamConnectError(UpstreamError):
    cause = "upstream_connect"


class UpstreamCertificateError(UpstreamConnectError):
    """The TLS handshake failed over a certificate: the upstream's did not verify
    (another CA, another name, expired), or the upstream refused the gateway's client
    certificate, or its lack of one, with a TLS alert (under TLS 1.3 the alert comes
    after the client's side of the handshake, on the first read). A connect failure
    (nothing of the request reached the upstream's application), but never retried:
    every handshake with the same upstream ends the same way, so a retry would only
    spend the retry budget and delay the 502."""


class UpstreamResetError(UpstreamError):
    cause = "upstream_reset"


class UpstreamProtocolError(UpstreamError):
    cause = "upstream_protocol"


class StatementWrites(UpstreamError):
    """A SQL statement run as a read tried to write; its read-only session refused, so
    nothing was written."""

    cause = "statement_writes"


class TransactionRolledBack(UpstreamError):
    """The database rolled back a SQL call's transaction for a serialization failure or
    a deadlock (SQLSTATE 40001, 40P01) and said so: nothing of it was committed, and
    PostgreSQL's advice is to run it again. A write may then be retried too."""


class UpstreamQueryError(UpstreamError):
    """A statement the database refused for good (no such table, a constraint): the same
    statement would fail again, so it is never retried."""

    cause = "upstream_query"


class UpstreamResultRefused(UpstreamQueryError):
    """The database answered, with a result the gateway will not pass on (larger than
    ``max_response_body``, several rows where ``one: true`` wants one): the same again
    every time, and no sign of a failing database (no circuit breaker failure)."""


class UpstreamStatusError(UpstreamError):
    """An upstream answered a status the call treats as failure (fan-out, retries)."""

    cause = "upstream_status"

    def __init__(self, message: str, *, upstream_status: int, **detail: Any) -> None:
        super().__init__(message, upstream_status=upstream_status, **detail)
        self.upstream_status = upstream_status
        # A gateway-class 5xx the gateway could not retry away is reported as the upstream
        # said it (a 503 stays a 503 for the client's own retry logic), and so is a 4xx:
        # it is about the request (a 404 for a user who does not exist is no bad gateway,
        # and would page whoever watches 5xx). Any other 5xx is a 502.
        if upstream_status in (502, 503, 504) or 400 <= upstream_status < 500:
            self.status = upstream_status


class UpstreamTimeout(GatewayError):
    status = 504
    cause = "deadline"


class Shed(GatewayError):
    status = 503
    cause = "shed"


class CircuitOpen(GatewayError):
    status = 503
    cause = "circuit_open"


def collapse_group(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception that matters in a nursery's group, or the group itself.

    A request nursery holds the handler and helper tasks that only ever end by
    cancellation, so a group is normally one real error plus ``Cancelled`` siblings:
    that error is what the caller must see (a ``GatewayError`` keeps its status).
    """
    import trio

    _, rest = group.split(trio.Cancelled)
    if rest is None:
        return group
    leaves: list[BaseException] = []
    stack: list[BaseException] = [rest]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1:
        return leaves[0]
    for leaf in leaves:
        if isinstance(leaf, GatewayError):
            return leaf
    return group
