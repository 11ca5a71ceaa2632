"""PostgreSQL upstreams: an asyncpg pool driven from Trio through trio-asyncio.

asyncpg speaks asyncio only, so this is the one module that imports asyncio, asyncpg
and trio_asyncio. Each ``PostgresUpstream`` owns one trio-asyncio loop, opened by its
``run()`` task in the app nursery, and one asyncpg pool living in that loop. Every call
crosses the bridge with ``aio_as_trio(fn, loop=...)``: the loop is passed explicitly
because Hypercorn's connection tasks do not inherit the loop opened by another task.

Deadlines and cancellation
    A call runs inside the caller's cancel scopes and inside its own ``timeout_s``
    scope. When any of them fires, trio-asyncio cancels the asyncio task and asyncpg,
    seeing its query cancelled, sends a CancelRequest to the server: the backend stops
    the statement within milliseconds. The call returns at once; its connection is
    released in the background once asyncpg has seen the server acknowledge the cancel,
    so it goes back to the pool usable (or is terminated if the server stays silent
    past ``close_timeout_s``: a partitioned database does not hold the answer up by
    that long). Until it is back, the caller's capacity slot (``slot``) stays taken:
    the next caller waits in the gateway's queue, within its bound and timeout, or is
    shed, instead of waiting in asyncpg's pool where nothing bounds or counts it (and
    a retry under the same slot waits for it). A call whose own ``timeout_s`` fired raises
    ``UpstreamTimeout``; a call cancelled by the caller's scope raises
    ``trio.Cancelled``.

    That cancel request is what really stops work on the server, but it needs a live
    gateway that can still reach the server. ``statement_timeout`` is the server's own
    backstop for when it cannot: a session ceiling (``statement_timeout_s``, sent in
    the startup packet, so it costs nothing per query) bounds single statements, and
    ``SET LOCAL statement_timeout`` to the transaction's budget (sent with ``BEGIN`` in
    one round trip) bounds every statement inside ``transaction()``. A per-query
    ``SET`` outside a transaction would cost two extra round trips on the hot path.

Reads that cannot write
    Sessions are read-only by default (``default_transaction_read_only``, sent in the
    startup packet): a statement called with ``writes=False`` that tries to write fails
    with ``StatementWrites`` and changes nothing. That is what makes hedging and
    retrying a read safe even when its text hides a write (``SELECT f()`` of a function
    that inserts). A call with ``writes=True`` switches its session to read-write first
    (one more round trip; the pool's ``RESET ALL`` on release switches it back), and
    ``transaction()`` opens ``BEGIN READ WRITE``.

    When the gateway's end of a connection is gone (a worker killed, a pool terminated
    on close with a query still running) nobody is left to send a cancel. PostgreSQL 14
    and later then notice the closed socket themselves if
    ``client_connection_check_interval`` is set: it is sent in the startup packet
    (``client_check_interval_s``, default 1 s), so the backend stops such a query within
    that interval instead of at ``statement_timeout``. A server that refuses the
    setting (older than 14, or a platform without the check) is connected to without
    it, with one warning.

Errors, translated once, in ``_translate``::

    cannot connect (refused, unreachable, connect timeout,
      server starting or shutting down, too many connections),
      or a pooled connection found lost, or a session out of
      resources (class 53), by a write's switch to read-write,
      before its statement was sent                             UpstreamConnectError
    connection lost in the middle of a call, or the session
      ended by the server once connected (SQLSTATE class 08,
      57: admin or crash shutdown) while a statement or its
      COMMIT ran, which may have been applied                   UpstreamResetError
    ``timeout_s`` spent, or statement_timeout fired on server   UpstreamTimeout
    statement cancelled by another session (pg_cancel_backend) UpstreamError
    bad argument value (SQLSTATE class 22, argument encoding,
      a NOT NULL or CHECK constraint broken by the arguments)   BadRequest
    unique, foreign-key, restrict or exclusion constraint
      broken by the arguments                                    Conflict
    a write in a read-only session (SQLSTATE 25006)              StatementWrites
    serialization failure or deadlock (40001, 40P01) in a
      transaction the gateway opened (every write's), so that
      nothing of it was committed                                TransactionRolledBack
    a statement out of resources (class 53: memory, disk,
      temp_file_limit)                                          UpstreamError
    a json value of the result that JSON cannot carry here      UpstreamQueryError
    any other failure                                           UpstreamError

No row is not an error: ``fetchrow`` returns None and the caller decides (``NotFound``).
Messages never carry argument values or the DSN.

Values come back JSON-ready; ``to_json`` documents each conversion.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import asyncpg
import asyncpg.exceptions
import trio
import trio_asyncio

from .. import _upstream_json as upstream_json
from .._connections import out_of_resources
from .._errors import (
    BadRequest,
    Conflict,
    GatewayError,
    InternalError,
    Shed,
    StatementWrites,
    TransactionRolledBack,
    UpstreamConnectError,
    UpstreamError,
    UpstreamQueryError,
    UpstreamResetError,
    UpstreamResultRefused,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from .._limits import HeldSlot

__all__ = [
    "JSON",
    "PostgresSettings",
    "PostgresStatistics",
    "PostgresUpstream",
    "Transaction",
    "to_json",
]

JSON: TypeAlias = "bool | int | float | str | list[JSON] | dict[str, JSON] | None"
Row: TypeAlias = "dict[str, JSON]"

_T = TypeVar("_T")

logger = logging.getLogger("gateway.upstreams.postgres")

#: Integral numerics up to this magnitude become JSON integers: beyond 2**53 a JSON
#: number loses digits in JavaScript and in any float-based parser.
MAX_SAFE_INTEGER = 2**53 - 1

#: The background task that keeps ``min_size`` connections open retries after this
#: delay, doubling up to ``_RETRY_MAX_S`` while the database is unreachable, and checks
#: the floor every ``_FLOOR_CHECK_S`` while it is reachable.
_RETRY_MIN_S = 0.1
_RETRY_MAX_S = 2.0
_FLOOR_CHECK_S = 1.0
#: Readiness holds this long after a statement succeeded, without a probe of its own.
READY_FRESH_S = 5.0


@dataclass(frozen=True)
class PostgresSettings:
    """How to reach one database and how big its pool is.

    ``dsn``: a libpq URI, ``postgresql://user@host:port/db``; never logged.
    ``min_size``: connections kept open while the database is reachable (default 2).
    ``max_size``: connections at most; further callers wait their turn (default 10).
    ``statement_cache_size``: prepared statements cached per connection (default 100).
    ``connect_timeout_s``: bound on opening one connection, so a down database fails
    calls fast instead of hanging them (default 2 s).
    ``close_timeout_s``: bound on every cleanup step (release after a cancel, commit,
    rollback, pool close); past it the connection is terminated (default 2 s).
    ``statement_timeout_s``: server-side ceiling on any single statement, the backstop
    for a cancel request that never reaches the server (default 30 s; 0 disables; the
    gateway sets it past its routes' deadlines, ``_policy.statement_timeout``).
    ``client_check_interval_s``: how often a backend running a query checks that the
    gateway's end of its connection is still there, and stops the query if not
    (PostgreSQL 14+, default 1 s; 0 disables).
    """

    dsn: str
    min_size: int = 2
    max_size: int = 10
    statement_cache_size: int = 100
    connect_timeout_s: float = 2.0
    close_timeout_s: float = 2.0
    statement_timeout_s: float = 30.0
    client_check_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.dsn:
            raise ValueError("dsn must not be empty")
        if self.max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {self.max_size}")
        if not 0 <= self.min_size <= self.max_size:
            raise ValueError(
                f"min_size must be between 0 and max_size ({self.max_size}), got {self.min_size}"
            )
        if self.statement_cache_size < 0:
            raise ValueError(
                f"statement_cache_size must be non-negative, got {self.statement_cache_size}"
            )
        for field in ("connect_timeout_s", "close_timeout_s"):
            value = getattr(self, field)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{field} must be positive and finite, got {value}")
        for field in ("statement_timeout_s", "client_check_interval_s"):
            value = getattr(self, field)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{field} must be non-negative and finite, got {value}")


@dataclass(frozen=True)
class PostgresStatistics:
    """Pool state: open connections, those lent out, those idle, callers queued."""

    size: int
    in_use: int
    idle: int
    waiting: int


# --------------------------------------------------------------------------------------
# Values


def to_json(value: object) -> JSON:
    """Turn one asyncpg value into a JSON-ready value.

    - ``numeric``: an integral value (no fractional digits, as from ``sum(int)`` or
      ``numeric(p, 0)``) within ±(2**53 - 1) becomes an int; anything else a string
      in plain notation that keeps every digit and the scale (``"12.50"``,
      ``"NaN"``), because a float would lose digits.
    - ``real``/``double``: floats (``real`` with the digits PostgreSQL prints); NaN and
      ±Infinity, which JSON cannot carry, become the strings PostgreSQL prints
      (``"NaN"``, ``"Infinity"``, ``"-Infinity"``).
    - ``int2/4/8``, ``bool``, ``text``: unchanged (int8 is not clamped).
    - ``uuid``, ``inet``/``cidr`` and anything unknown: ``str()``.
    - ``timestamp[tz]``, ``date``: ISO 8601 text, decoded by the connection's codecs
      (``_init_connection``); PostgreSQL's ``infinity`` and ``-infinity`` as those
      words; a year before 1 or after 9999 cannot be answered (502). ``time[tz]``:
      ISO 8601 (``isoformat()``).
    - ``bit``/``varbit``: the bits as a string of 0 and 1.
    - geometric types: points as ``[x, y]``, a box, segment, path or polygon as its
      points, a circle as ``[[x, y], r]``.
    - ``interval``: seconds as a float.
    - ``json``/``jsonb``: parsed JSON (codecs set on each new connection).
    - ``bytea``: base64 (standard alphabet, padded).
    - arrays: lists; composite types: objects; ranges: ``{"lower", "upper",
      "lower_inc", "upper_inc", "empty"}``.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        if (
            value.is_finite()
            and isinstance(exponent, int)
            and exponent >= 0
            and abs(value) <= MAX_SAFE_INTEGER
        ):
            return int(value)
        return format(value, "f")
    if isinstance(value, (datetime.datetime, datetime.date)):
        # asyncpg decodes PostgreSQL's infinity as the largest (smallest) Python value.
        bare = value.replace(tzinfo=None) if isinstance(value, datetime.datetime) else value
        if bare in (datetime.datetime.max, datetime.date.max):
            return "infinity"
        if bare in (datetime.datetime.min, datetime.date.min):
            return "-infinity"
        return value.isoformat()
    if isinstance(value, datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, asyncpg.BitString):
        return str(value.as_string())
    if isinstance(value, asyncpg.Path):  # and Polygon: the points, [x, y] each
        return [to_json(point) for point in value.points]
    if isinstance(value, (list, tuple)):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        return {str(key): to_json(item) for key, item in value.items()}
    if isinstance(value, asyncpg.Record):
        return _row(value)
    if isinstance(value, asyncpg.Range):
        return {
            "lower": to_json(value.lower),
            "upper": to_json(value.upper),
            "lower_inc": value.lower_inc,
            "upper_inc": value.upper_inc,
            "empty": value.isempty,
        }
    return str(value)


def _row(record: asyncpg.Record) -> Row:
    row = {key: to_json(item) for key, item in record.items()}
    if len(row) != len(record):
        raise _duplicate_columns(list(record.keys()))
    return row


def _duplicate_columns(names: list[str]) -> InternalError:
    """Two columns of one name (``SELECT u.id, o.id``) would leave one value in the JSON
    object: the statement is refused instead of answering with a value missing."""
    twice = sorted({name for name in names if names.count(name) > 1})
    return InternalError(
        "the statement's result names column " + ", ".join(repr(n) for n in twice)
        + " more than once; give each column its own name in the policy (AS)")


# --------------------------------------------------------------------------------------
# Error translation


#: SQLSTATE of a write refused by a read-only transaction.
READ_ONLY_SQL_TRANSACTION = "25006"


class _ConnectFailed(Exception):
    """Opening a connection failed; raised inside the pool so the cause stays known."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.kind = type(cause).__name__
        self.cause = cause


class _LostBeforeSent(_ConnectFailed):
    """A pooled connection was found lost (closed by the server, a proxy or a firewall
    while idle) by the round trip that switches a write's session to read-write: the
    write itself was never sent, so it is as safe to send again as after a connect
    failure."""


class _RefusedBeforeSent(_ConnectFailed):
    """The round trip that switches a write's session to read-write failed for want of
    resources (SQLSTATE class 53: out of memory, disk full): the write itself was never
    sent, so it is as safe to send again as after a connect failure."""


#: The SQLSTATE class of a statement the server had not the resources for.
_OUT_OF_RESOURCES = "53"


#: SQLSTATE classes whose primary message speaks of the schema or the statement, never
#: of data (``relation "x" does not exist``, a constraint's name): it is kept. Others
#: can quote values (``invalid input syntax for type integer: "..."``, a PL/pgSQL
#: RAISE, a tsquery that does not parse), which must reach no answer, trace or log.
_MESSAGE_KEPT = frozenset({"08", "0A", "23", "25", "40", "42", "53", "55", "57"})
#: A syntax error in something the statement parses at run time from its input.
_SYNTAX_ERROR = "42601"
#: Integrity violations a client's input causes: unique (23505), foreign key (23503),
#: restrict (23001) and exclusion (23P01) are conflicts with what the database holds;
#: PostgREST answers them 409 too.
_CONFLICTS = frozenset({"23505", "23503", "23001", "23P01"})
#: A value the table refuses whatever it holds: NOT NULL (23502) and CHECK (23514).
#: With arguments it is the client's input that is invalid (400, as PostgREST answers).
_REFUSED_VALUES = frozenset({"23502", "23514"})


def _query_error_message(exc: asyncpg.PostgresError, state: str) -> str:
    kind = type(exc).__name__
    if state[:2] in _MESSAGE_KEPT and state != _SYNTAX_ERROR:
        # The primary message only: the DETAIL line can quote row values
        # ("Key (email)=(...) already exists").
        return f"{kind} (SQLSTATE {state}): {getattr(exc, 'message', None) or kind}"
    return f"{kind} (SQLSTATE {state})"


def _failed(error: type[GatewayError], where: str, exc: asyncpg.PostgresError, state: str,
            ) -> GatewayError:
    """A 5xx for a statement the database refused: the trace and the log get the
    server's primary message (it names tables, roles, constraints), the client only the
    error's kind and SQLSTATE; a client cannot act on the database's schema, and
    should not learn it."""
    return error(f"{where}: {_query_error_message(exc, state)}",
                 public=f"{where}: {type(exc).__name__} (SQLSTATE {state})", sqlstate=state)


def _connect_reason(failed: _ConnectFailed) -> str:
    """Why a connect failed, for the trace and the log: the OS's words (the address
    refused, the host that did not resolve), a refusal's kept message; never told to
    the client, which gets the kind of failure alone."""
    cause = failed.cause
    if isinstance(cause, asyncpg.PostgresError):
        return _query_error_message(cause, cause.sqlstate or "")
    if isinstance(cause, OSError):
        return f"{failed.kind}: {cause}"
    return failed.kind


#: SQLSTATE classes of a session the server ends (connection exception, operator
#: intervention: admin or crash shutdown). At connect they are a refusal; past it the
#: statement or COMMIT running may have been applied.
_SESSION_ENDED = frozenset({"08", "57"})


def _lost_reason(exc: BaseException) -> str:
    """What the server said as it ended the session (asyncpg keeps its FATAL, 57P01 say,
    as the cause of a connection lost mid-operation), or the error's kind."""
    cause = exc.__cause__ if isinstance(exc.__cause__, asyncpg.PostgresError) else exc
    if isinstance(cause, asyncpg.PostgresError):
        return _query_error_message(cause, cause.sqlstate or "")
    return type(cause).__name__


#: SQLSTATEs after which PostgreSQL's advice is to run the transaction again: the server
#: rolled it back whole to let another go on (serialization failure, deadlock).
_TRY_AGAIN = frozenset({"40001", "40P01"})


class _RolledBack(Exception):
    """A :data:`_TRY_AGAIN` failure of a transaction ``_in_transaction`` opened, its
    statement's or its COMMIT's: the server answered that it rolled the transaction back,
    so nothing of it was committed (a COMMIT whose answer never came is not this)."""

    def __init__(self, cause: asyncpg.PostgresError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _CancelledOnServer(Exception):
    """A statement the server cancelled (SQLSTATE 57014), and how long it had run at
    most: the time since the gateway sent it, which the server's run cannot exceed."""

    def __init__(self, cause: asyncpg.exceptions.QueryCanceledError, ran_s: float) -> None:
        super().__init__(f"{type(cause).__name__} after {ran_s:.3f} s: {cause}")
        self.message = getattr(cause, "message", None) or ""
        self.sqlstate = cause.sqlstate
        self.ran_s = ran_s


async def _timed(run: Awaitable[_T]) -> _T:
    """``await run``, a statement the server cancels raising :class:`_CancelledOnServer`."""
    started = time.monotonic()
    try:
        return await run
    except asyncpg.exceptions.QueryCanceledError as exc:
        raise _CancelledOnServer(exc, time.monotonic() - started) from exc


#: The gateway's clock and the server's may run apart a little (NTP slews one by up to
#: 0.05 %): a cancel in the last 1 % of statement_timeout is not told from it by time.
_CLOCKS_AGREE = 0.99


def cancelled_elsewhere(ran_s: float | None, statement_timeout_s: float, message: str) -> bool:
    """Did another session (an operator's ``pg_cancel_backend``) stop a statement the
    server cancelled (SQLSTATE 57014), rather than its ``statement_timeout``?

    PostgreSQL tells the two apart only in words, in the session's ``lc_messages``.
    What holds in any language: the statement had run ``ran_s`` at most, and
    ``statement_timeout`` (the session's, or ``transaction()``'s ``SET LOCAL``; 0 is
    none) fires only once it has run that long, so a cancel before then is not it. The
    gateway's own deadlines never end in a 57014: they cancel the call (asyncpg's cancel
    request is its own). Past the timeout, or with ``ran_s`` unknown, the English words
    decide and any other reads as the timeout.
    """
    if ran_s is not None and (
            not statement_timeout_s or ran_s < statement_timeout_s * _CLOCKS_AGREE):
        return True
    return "user request" in message


def _translate(name: str, exc: BaseException, *, input_bound: bool = False,
               statement_timeout_s: float = 0.0) -> GatewayError:
    """Map an asyncio/asyncpg failure to the gateway's error tree (module docstring).

    ``input_bound``: the statement had arguments, so a data error or a syntax error in
    something parsed at run time (``to_tsquery($1)``) is the client's input (400); with
    none it is the statement's or the data's (502). ``statement_timeout_s``: the
    server's statement_timeout for it (0: none), see :func:`cancelled_elsewhere`. The
    server's own words go to the debug log only (they may quote argument values), but
    for a primary message that speaks of the schema alone (``_MESSAGE_KEPT``) and a
    connect's reason (the address refused): those are the trace's and the log's, and
    the client gets the error's kind and SQLSTATE.
    """
    if isinstance(exc, GatewayError):  # raised by the gateway's own code on the way
        return exc
    where = f"postgres upstream {name!r}"
    logger.debug("%s: %s", where, exc)
    if isinstance(exc, _LostBeforeSent):
        return UpstreamConnectError(
            f"{where}: connection lost before the statement was sent "
            f"({_lost_reason(exc.cause)})",
            public=f"{where}: connection lost before the statement was sent")
    if isinstance(exc, _RefusedBeforeSent):
        return UpstreamConnectError(
            f"{where}: {_connect_reason(exc)} before the statement was sent",
            public=f"{where}: {exc.kind} (SQLSTATE {getattr(exc.cause, 'sqlstate', '')}) "
                   "before the statement was sent")
    if isinstance(exc, _ConnectFailed):
        if out_of_resources(exc) is not None:
            # The worker's own shortage, not the database failing: shed, and no
            # failure for the circuit breaker.
            return Shed(f"{where}: no socket for a connection, the worker is out of "
                        "descriptors", reason="no_descriptors", retry_after_s=1.0)
        return UpstreamConnectError(f"{where}: cannot connect ({_connect_reason(exc)})",
                                    public=f"{where}: cannot connect ({exc.kind})")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(f"{where}: timed out")
    if isinstance(exc, _RolledBack):
        return _failed(TransactionRolledBack, where, exc.cause, exc.cause.sqlstate or "")
    if isinstance(exc, _CancelledOnServer | asyncpg.exceptions.QueryCanceledError):
        # 57014 is a statement_timeout and a cancel from elsewhere alike.
        ran_s = exc.ran_s if isinstance(exc, _CancelledOnServer) else None
        if cancelled_elsewhere(ran_s, statement_timeout_s, getattr(exc, "message", "") or ""):
            return UpstreamError(f"{where}: statement cancelled on the server by another "
                                 "session (pg_cancel_backend)", sqlstate=exc.sqlstate)
        return UpstreamTimeout(f"{where}: statement cancelled on the server "
                               "(statement_timeout)")
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        kind = type(exc).__name__
        if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
            # The statement (or its COMMIT) was sent: it may have been applied.
            return UpstreamResetError(f"{where}: connection lost mid-call"
                                      f" ({_lost_reason(exc)})",
                                      public=f"{where}: connection lost mid-call",
                                      sqlstate=state)
        if state[:2] in _SESSION_ENDED:
            # Once connected, these end the session while a statement or its COMMIT
            # runs: its outcome is unknown, as for any connection lost mid-call. Only a
            # refusal while connecting (``_ConnectFailed``) is a connect failure.
            return _failed(UpstreamResetError, where, exc, state)
        if state == READ_ONLY_SQL_TRANSACTION:
            return StatementWrites(f"{where}: the statement writes, and ran as a read",
                                   sqlstate=state)
        if input_bound and (state.startswith("22") or (
                state == _SYNTAX_ERROR and not getattr(exc, "position", None))):
            return BadRequest(f"{where}: invalid query argument ({kind})", sqlstate=state)
        if input_bound and state in _CONFLICTS:
            # The client's input broke a constraint (a duplicate, a missing parent): a
            # 409 it can act on, and no sign of a failing database (no breaker failure,
            # no retry). Without arguments it is the statement's own doing: a 502.
            return Conflict(f"{where}: {_query_error_message(exc, state)}", sqlstate=state)
        if input_bound and state in _REFUSED_VALUES:
            return BadRequest(f"{where}: {_query_error_message(exc, state)}", sqlstate=state)
        if state.startswith("40") or state.startswith("53"):
            # A serialization failure or a deadlock, a statement out of memory, disk or
            # temp_file_limit: the database failed it (a read tries again, a write only
            # as _RolledBack says); past connecting, so no connect failure.
            return _failed(UpstreamError, where, exc, state)
        return _failed(UpstreamQueryError, where, exc, state)
    if isinstance(exc, asyncpg.exceptions._base.DataError):
        # The argument could not be encoded for its parameter type; the message would
        # quote the value, which must not reach logs or traces.
        return BadRequest(f"{where}: invalid query argument")
    if isinstance(exc, ValueError | RecursionError | ArithmeticError):
        # A value the result holds cannot be answered as JSON (a json number beyond a
        # double, an integer of more digits than Python converts, nesting deeper than
        # the parser's stack, a date before year 1 or after 9999): the same every time,
        # so not retried, and no sign of a failing database.
        return UpstreamResultRefused(
            f"{where}: a value in the result cannot be answered as JSON ({type(exc).__name__})")
    if isinstance(exc, OSError):
        return UpstreamResetError(f"{where}: connection lost mid-call: {type(exc).__name__}")
    return UpstreamError(f"{where}: {type(exc).__name__}")


def _check_timeout(timeout_s: float) -> None:
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be positive and finite, got {timeout_s}")


# --------------------------------------------------------------------------------------
# The asyncio side. Everything below until PostgresUpstream runs as asyncio tasks on
# the upstream's trio-asyncio loop.


#: The server setting that lets a backend notice its client is gone (PostgreSQL 14+).
CLIENT_CHECK = "client_connection_check_interval"
#: How a server refuses it in the startup packet: unknown before 14 (undefined_object),
#: or a platform without the check (invalid_parameter_value).
_CLIENT_CHECK_REFUSED = frozenset({"42704", "22023"})


class _Connector:
    """``asyncpg.connect`` for one pool: failures become connect failures, and a server
    that refuses :data:`CLIENT_CHECK` is connected to without it from then on."""

    def __init__(self, upstream_name: str) -> None:
        self._name = upstream_name
        self.client_check = True

    async def __call__(self, *args: Any, **kwargs: Any) -> asyncpg.Connection:
        if not self.client_check:
            kwargs = _without_client_check(kwargs)
        try:
            return await asyncpg.connect(*args, **kwargs)
        except asyncpg.PostgresError as exc:
            # Judged by what this attempt sent: connects started before the first
            # refusal came back fail the same way and are retried too.
            if not _refuses_client_check(exc, kwargs):
                raise _ConnectFailed(exc) from exc
            if self.client_check:
                self.client_check = False
                logger.warning("postgres upstream %r: the server refused %s (%s); queries "
                               "of a connection that dies run on until statement_timeout",
                               self._name, CLIENT_CHECK, exc)
            return await self(*args, **_without_client_check(kwargs))
        except Exception as exc:
            raise _ConnectFailed(exc) from exc


def _refuses_client_check(exc: asyncpg.PostgresError, kwargs: dict[str, Any]) -> bool:
    return (CLIENT_CHECK in (kwargs.get("server_settings") or {})
            and getattr(exc, "sqlstate", None) in _CLIENT_CHECK_REFUSED
            and CLIENT_CHECK in str(exc))


def _without_client_check(kwargs: dict[str, Any]) -> dict[str, Any]:
    server_settings = dict(kwargs.get("server_settings") or {})
    server_settings.pop(CLIENT_CHECK, None)
    return {**kwargs, "server_settings": server_settings}


#: PostgreSQL's epoch (dates and timestamps on the wire count from it) and its
#: infinities there: asyncpg's own codecs turn ``infinity`` into ``date.max``, which
#: ``9999-12-31`` (the usual "valid until further notice") is too.
_PG_EPOCH = datetime.datetime(2000, 1, 1)
_PG_EPOCH_UTC = _PG_EPOCH.replace(tzinfo=datetime.UTC)
_DAY_INFINITY, _US_INFINITY = 2**31 - 1, 2**63 - 1


def _infinity(count: int, infinity: int) -> str | None:
    if count == infinity:
        return "infinity"
    if count == -infinity - 1:
        return "-infinity"
    return None


def _date_text(value: tuple[int]) -> str:
    days = value[0]
    return _infinity(days, _DAY_INFINITY) or (
        _PG_EPOCH.date() + datetime.timedelta(days=days)).isoformat()


def _timestamp_text(epoch: datetime.datetime) -> Callable[[tuple[int]], str]:
    def decode(value: tuple[int]) -> str:
        microseconds = value[0]
        return _infinity(microseconds, _US_INFINITY) or (
            epoch + datetime.timedelta(microseconds=microseconds)).isoformat()
    return decode


def _date_tuple(value: datetime.date) -> tuple[int]:
    return ((value - _PG_EPOCH.date()).days,)


def _timestamp_tuple(epoch: datetime.datetime) -> Callable[[datetime.datetime], tuple[int]]:
    def encode(value: datetime.datetime) -> tuple[int]:
        return ((value - epoch) // datetime.timedelta(microseconds=1),)
    return encode


async def _init_connection(con: asyncpg.Connection) -> None:
    """Codecs for what the gateway answers as JSON: json/jsonb parsed (and Python values
    encoded as JSON); dates and timestamps as ISO 8601 text straight from the wire, so
    that ``infinity`` and ``9999-12-31`` stay apart (a year past 9999 cannot be
    answered); ``real`` as the digits PostgreSQL prints (``0.1``, not the double
    ``0.10000000149011612``)."""
    for typename in ("json", "jsonb"):
        await con.set_type_codec(
            typename, schema="pg_catalog", encoder=json.dumps, decoder=upstream_json.loads
        )
    await con.set_type_codec("date", schema="pg_catalog", format="tuple",
                             encoder=_date_tuple, decoder=_date_text)
    for typename, epoch in (("timestamp", _PG_EPOCH), ("timestamptz", _PG_EPOCH_UTC)):
        await con.set_type_codec(typename, schema="pg_catalog", format="tuple",
                                 encoder=_timestamp_tuple(epoch), decoder=_timestamp_text(epoch))
    await con.set_type_codec("float4", schema="pg_catalog", format="text",
                             encoder=str, decoder=_real)


def _real(text: str) -> float | str:
    value = float(text)
    return value if math.isfinite(value) else text  # NaN, Infinity: as PostgreSQL prints


async def _create_pool(settings: PostgresSettings, name: str) -> asyncpg.Pool:
    """An asyncpg pool that opens no connection yet.

    ``init_size=0`` lets the gateway start while the database is down; the floor of
    ``min_size`` connections is kept by ``PostgresUpstream._keep_floor``, because
    asyncpg requires ``init_size >= min_size`` and would fail start-up otherwise.
    ``create_pool()`` returns an awaitable, not a coroutine: awaiting it here, inside
    a coroutine, is what lets trio-asyncio run it.
    """
    server_settings = {"application_name": "trio-gateway",
                       "default_transaction_read_only": "on"}
    if settings.statement_timeout_s:
        server_settings["statement_timeout"] = str(math.ceil(settings.statement_timeout_s * 1000))
    if settings.client_check_interval_s:
        server_settings[CLIENT_CHECK] = str(math.ceil(settings.client_check_interval_s * 1000))
    return await asyncpg.create_pool(
        settings.dsn,
        init_size=0,
        min_size=0,
        max_size=settings.max_size,
        connect=_Connector(name),
        init=_init_connection,
        timeout=settings.connect_timeout_s,
        statement_cache_size=settings.statement_cache_size,
        server_settings=server_settings,
    )


class _Waiting:
    """Callers queued for a connection (asyncpg does not count them)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


async def _acquire(pool: asyncpg.Pool, waiting: _Waiting) -> Any:
    waiting.count += 1
    try:
        return await pool.acquire()
    finally:
        waiting.count -= 1


async def _release(pool: asyncpg.Pool, con: Any, timeout_s: float) -> None:
    """Give a connection back; asyncpg waits for a pending cancel to be acknowledged
    first and terminates the connection when that or the reset fails."""
    try:
        await pool.release(con, timeout=timeout_s)
    except Exception:
        # The connection was terminated; the caller's own outcome stands.
        logger.debug("postgres connection dropped on release", exc_info=True)


#: What ``_run_on_pool`` does with the connection it holds: ``(con, query, args)``.
Operation: TypeAlias = Callable[[Any, str, Sequence[object]], Awaitable[Any]]


async def _fetch_all(con: Any, query: str, args: Sequence[object]) -> Any:
    return await con.fetch(query, *args)


async def _fetch_first(con: Any, query: str, args: Sequence[object]) -> Any:
    return await con.fetchrow(query, *args)


async def _execute(con: Any, query: str, args: Sequence[object]) -> Any:
    return await con.execute(query, *args)


async def _fetch_two(con: Any, query: str, args: Sequence[object]) -> Any:
    # A row limit on the portal, as asyncpg's own fetchrow asks for one: the rows after
    # the second are never produced or sent.
    return await con._execute(query, args, 2, None)


async def _in_transaction(con: Any, run: Callable[[], Awaitable[Any]],
                          keep: Callable[[Any], bool]) -> Any:
    """Run ``run`` in a transaction, committed when ``keep(result)``, else rolled back
    (a write the gateway refuses to answer with leaves nothing behind). Run again once
    when a schema change made its cached plan stale (asyncpg re-prepares it outside a
    transaction only). Cancelled, the caller is answered at once: the ROLLBACK is left
    to :func:`_run_on_pool`'s release in the background, as it waits for the server to
    acknowledge asyncpg's cancel (terminating the connection at once would drop the
    cancel request, and the statement would run on, holding its locks). A serialization
    failure or a deadlock, of a statement or of the COMMIT, raises :class:`_RolledBack`:
    the server undid the transaction, and it may be run again."""
    try:
        return await _transaction_of(con, run, keep)
    except asyncpg.PostgresError as exc:
        if exc.sqlstate in _TRY_AGAIN:
            raise _RolledBack(exc) from exc
        raise


async def _transaction_of(con: Any, run: Callable[[], Awaitable[Any]],
                               keep: Callable[[Any], bool]) -> Any:
    for last in (False, True):
        transaction = con.transaction()
        await transaction.start()
        try:
            result = await run()
        except asyncio.CancelledError:
            _CANCELLED_IN_TRANSACTION[con] = transaction
            raise
        except asyncpg.exceptions.InvalidCachedStatementError:
            with suppress(Exception):
                await transaction.rollback()
            if last:
                raise
            continue
        except BaseException:
            with suppress(Exception):
                await transaction.rollback()
            raise
        if keep(result):
            await transaction.commit()
        else:
            await transaction.rollback()
        return result
    raise AssertionError("unreachable")


#: The command tags that end with the count of rows a statement changed.
_CHANGES_ROWS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})


def _rows_changed(status: bytes) -> int:
    """Rows an ``INSERT``, ``UPDATE``, ``DELETE`` or ``MERGE`` changed, by its command
    tag (``b"UPDATE 3"``, ``b"INSERT 0 3"``); 0 for any other."""
    words = status.split()
    if len(words) >= 2 and words[0].decode("ascii", "replace") in _CHANGES_ROWS:
        with suppress(ValueError):
            return int(words[-1])
    return 0


def _write_one(name: str) -> Operation:
    """A write whose ``one: true`` asks for one row: rolled back when it returns several
    (a statement missing a condition changed rows it was not meant to), or when it
    changed rows and returned none (no ``RETURNING``: every call would be answered 404,
    no row found, after its write), so that the 502 the client gets is the truth. One
    that changed nothing wrote nothing, and is answered 404."""

    async def write(con: Any, query: str, args: Sequence[object]) -> Any:
        unanswerable = 0

        def answerable(result: tuple[Any, bytes, bool]) -> bool:
            nonlocal unanswerable
            records, status, _ = result
            if not records:
                unanswerable = _rows_changed(status)
            return len(records) <= 1 and not unanswerable

        records, _, _ = await _in_transaction(
            con, lambda: con._execute(query, args, 2, None, return_status=True), answerable)
        if unanswerable:
            raise UpstreamResultRefused(
                f"{name}: the statement changed {unanswerable} row"
                f"{'' if unanswerable == 1 else 's'} and returned none where one is "
                "expected (one: true; give it a RETURNING clause); what it wrote was "
                "rolled back")
        return records

    return write


def _write_within(max_bytes: int, name: str) -> Operation:
    """A write whose rows are held to ``max_bytes`` as JSON: rolled back when they are
    past it, so that the 502 the client gets is the truth (a client told the write
    failed may send it again)."""

    async def write(con: Any, query: str, args: Sequence[object]) -> Any:
        too_large = False

        def small(records: Any) -> bool:
            nonlocal too_large
            try:
                upstream_json.check_size(map(_row, records), max_bytes, name)
            except UpstreamResultRefused:
                too_large = True
            return not too_large

        records = await _in_transaction(con, lambda: con.fetch(query, *args), small)
        if too_large:
            raise UpstreamResultRefused(
                f"{name}: the rows it returned are larger than {max_bytes} bytes as JSON "
                "(max_response_body); what it wrote was rolled back", max_bytes=max_bytes)
        return records

    return write


#: ``_fetch_two`` and ``_fetch_within`` reach ``Connection._execute`` (asyncpg's own
#: ``fetch`` and ``fetchrow`` call it) for its row limit and its "completed" flag; the
#: asyncpg range pinned in pyproject.toml is the one they are tested with.
#: Rows a read takes in one go: all of a result this size or smaller, in one round
#: trip; a larger one (rare for an API, and most often past the size cap) is read again
#: in chunks of this many, its size counted as it comes.
CHUNK_ROWS = 10_000


def _fetch_within(max_bytes: int, name: str) -> Operation:
    """A read whose rows stop being read once past ``max_bytes`` as JSON, so a statement
    that returns millions of rows costs a chunk of memory, not all of them."""

    async def fetch(con: Any, query: str, args: Sequence[object]) -> Any:
        records, _, completed = await con._execute(query, args, CHUNK_ROWS, None,
                                                   return_status=True)
        if completed:
            return records
        upstream_json.check_size(map(_row, records), max_bytes, name)
        # More rows than one chunk: read them again through a cursor, which needs a
        # transaction (the session's, read-only); a read can run twice.

        async def read_in_chunks() -> list[Any]:
            records: list[Any] = []
            counted = 0
            cursor = await con.cursor(query, *args)
            while chunk := await cursor.fetch(CHUNK_ROWS):
                records.extend(chunk)
                counted = upstream_json.check_size(map(_row, chunk), max_bytes, name,
                                                   counted=counted)
                if len(chunk) < CHUNK_ROWS:
                    break
            return records

        return await _in_transaction(con, read_in_chunks, lambda _: True)

    return fetch


async def _read_write(con: Any) -> None:
    """Switch a write's session to read-write, before its statement is sent: a pooled
    connection found lost here (its loss not yet seen while it was idle) raises
    :class:`_LostBeforeSent`, a session out of resources :class:`_RefusedBeforeSent`;
    a write may be retried after either."""
    try:
        await con.execute("SET default_transaction_read_only = off")
    except (asyncpg.exceptions.PostgresConnectionError, asyncpg.InterfaceError,
            OSError) as exc:
        raise _LostBeforeSent(exc) from exc
    except asyncpg.PostgresError as exc:
        state = (exc.sqlstate or "")[:2]
        if state in _SESSION_ENDED and not isinstance(
                exc, asyncpg.exceptions.QueryCanceledError):
            raise _LostBeforeSent(exc) from exc
        if state == _OUT_OF_RESOURCES:
            raise _RefusedBeforeSent(exc) from exc
        raise


async def _run_on_pool(
    pool: asyncpg.Pool,
    waiting: _Waiting,
    release_timeout_s: float,
    operate: Operation,
    query: str,
    args: Sequence[object],
    writes: bool,
    releasing: Callable[[asyncio.Task[None]], None] | None,
) -> Any:
    """``releasing``: told of the background release of a cancelled call's connection
    (while the call still holds its slot), so that the slot stays taken until it ends."""
    con = await _acquire(pool, waiting)
    try:
        if writes:
            await _read_write(con)
        result = await _timed(operate(con, query, args))
    except asyncio.CancelledError:
        # Cut by a deadline or a client leaving: the caller is answered now. Releasing
        # waits for the server to acknowledge asyncpg's cancel (or close_timeout_s, when
        # the server cannot be reached), so it goes on without the caller.
        task = _in_background(_release_after_cancel(pool, con, release_timeout_s))
        if releasing is not None:
            releasing(task)
        raise
    except BaseException:
        await _release(pool, con, release_timeout_s)
        raise
    await _release(pool, con, release_timeout_s)
    return result


#: Releases running after their callers were cancelled (a reference keeps each alive).
_RELEASING: set[asyncio.Task[None]] = set()
#: The transaction a cancelled statement was running in, by connection, to roll back
#: before release (every ``_in_transaction`` runs inside ``_run_on_pool``, which pops it).
_CANCELLED_IN_TRANSACTION: dict[Any, Any] = {}


async def _release_after_cancel(pool: asyncpg.Pool, con: Any, timeout_s: float) -> None:
    """Roll back the transaction a cancelled statement ran in, if any, then release.
    asyncpg sends the ROLLBACK once the server has acknowledged its cancel, so the
    statement is stopped on the server, not only abandoned; a server silent past
    ``timeout_s`` gets the connection terminated instead. Done within twice
    ``timeout_s`` in any case (the caller's slot waits for it)."""
    try:
        await asyncio.wait_for(_roll_back_and_release(pool, con, timeout_s), 2 * timeout_s)
    except TimeoutError:
        with suppress(Exception):
            con.terminate()
        logger.debug("postgres connection dropped: its release outlasted %g s", 2 * timeout_s)


async def _roll_back_and_release(pool: asyncpg.Pool, con: Any, timeout_s: float) -> None:
    transaction = _CANCELLED_IN_TRANSACTION.pop(con, None)
    if transaction is not None:
        try:
            await asyncio.wait_for(transaction.rollback(), timeout_s)
        except BaseException:
            con.terminate()
            logger.debug("postgres connection dropped after a cancelled write",
                         exc_info=True)
    await _release(pool, con, timeout_s)


def _in_background(release: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(release)
    _RELEASING.add(task)
    task.add_done_callback(_RELEASING.discard)
    return task


async def _touch(pool: asyncpg.Pool, count: int) -> None:
    """Acquire ``count`` connections at once (opening what is missing), then release."""

    async def one() -> None:
        async with pool.acquire():
            pass

    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def _begin(
    pool: asyncpg.Pool, waiting: _Waiting, release_timeout_s: float, statement_timeout_ms: int
) -> Any:
    con = await _acquire(pool, waiting)
    try:
        await con.execute(
            f"BEGIN READ WRITE; SET LOCAL statement_timeout = {statement_timeout_ms:d}")
    except BaseException:
        await _release(pool, con, release_timeout_s)
        raise
    return con


async def _con_call(con: Any, method: str, query: str, args: Sequence[object]) -> Any:
    return await _timed(getattr(con, method)(query, *args))


async def _finish(pool: asyncpg.Pool, con: Any, statement: str, timeout_s: float) -> None:
    """COMMIT or ROLLBACK, then release; a connection left in an unknown state
    (statement failed and still in a transaction, or cancelled) is terminated."""
    try:
        await con.execute(statement, timeout=timeout_s)
    except BaseException as exc:
        if not isinstance(exc, asyncpg.PostgresError) or con.is_in_transaction():
            con.terminate()
        raise
    finally:
        await _release(pool, con, timeout_s)


async def _probe_alone(settings: PostgresSettings) -> None:
    """``SELECT 1`` on a connection opened for it and closed after."""
    con = await asyncpg.connect(settings.dsn, timeout=settings.connect_timeout_s,
                                server_settings={"application_name": "trio-gateway"})
    try:
        await con.fetchval("SELECT 1")
    finally:
        await con.close(timeout=settings.close_timeout_s)


async def _close_pool(pool: asyncpg.Pool) -> None:
    await pool.close()


async def _terminate_pool(pool: asyncpg.Pool) -> None:
    pool.terminate()


# --------------------------------------------------------------------------------------
# The Trio side.


class Transaction:
    """One connection inside ``BEGIN … COMMIT``, lent out by ``transaction()``.

    Statements share the transaction's deadline; ``timeout_s`` can only shorten it
    for one statement. Statements run one at a time (a lock serialises them), since
    one connection runs one statement at a time.
    """

    def __init__(self, upstream: PostgresUpstream, loop: Any, con: Any,
                 statement_timeout_s: float) -> None:
        self._upstream = upstream
        self._loop = loop
        self._con = con
        self._lock = trio.Lock()
        #: The transaction's ``SET LOCAL statement_timeout``.
        self._statement_timeout_s = statement_timeout_s

    async def fetch(
        self, query: str, args: Sequence[object] = (), *, timeout_s: float | None = None
    ) -> list[Row]:
        records = await self._call("fetch", query, args, timeout_s)
        return [_row(record) for record in records]

    async def fetchrow(
        self, query: str, args: Sequence[object] = (), *, timeout_s: float | None = None
    ) -> Row | None:
        record = await self._call("fetchrow", query, args, timeout_s)
        return None if record is None else _row(record)

    async def execute(
        self, query: str, args: Sequence[object] = (), *, timeout_s: float | None = None
    ) -> str:
        status: str = await self._call("execute", query, args, timeout_s)
        return status

    async def _call(
        self, method: str, query: str, args: Sequence[object], timeout_s: float | None
    ) -> Any:
        if self._con is None:
            raise RuntimeError("the transaction is over")
        async with self._lock:
            if timeout_s is None:
                return await self._upstream._bridge(
                    self._loop, _con_call, self._con, method, query, args,
                    input_bound=bool(args), statement_timeout_s=self._statement_timeout_s,
                )
            return await self._upstream._bounded(
                timeout_s, self._loop, _con_call, self._con, method, query, args,
                input_bound=bool(args), statement_timeout_s=self._statement_timeout_s,
            )


class PostgresUpstream:
    """A named PostgreSQL database: one pool, callable from any Trio task.

    Start it in the app nursery with ``await nursery.start(pg.run)``; it comes up even
    when the database is down (``ready()`` says so) and connects when it can.
    """

    def __init__(self, name: str, settings: PostgresSettings) -> None:
        self.name = name
        self.settings = settings
        self._loop: Any = None
        self._pool: asyncpg.Pool | None = None
        self._waiting = _Waiting()
        #: Statements whose text reads but which PostgreSQL caught writing
        #: (``StatementWrites``); callers run them as writes from then on.
        self.writing_statements: set[str] = set()
        self._last_ok: float | None = None
        #: Slots kept for connections of cancelled calls on their way back to the pool,
        #: each given back when its release ends (or when the pool is gone).
        self._kept: set[Callable[[], None]] = set()
        self._started = False
        self._closing = trio.Event()
        self._stopped = trio.Event()

    def __repr__(self) -> str:
        stats = self.statistics()
        return (
            f"<PostgresUpstream {self.name!r} [Connections: {stats.size} open, "
            f"{stats.in_use} in use, {stats.idle} idle | Waiting: {stats.waiting}]>"
        )

    # ---- lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the trio-asyncio loop and the pool until cancelled or ``aclose()``.

        Reports started after one attempt to open ``min_size`` connections, bounded by
        ``connect_timeout_s``, whether or not it succeeded: a down database never blocks
        the gateway's start-up, and ``_keep_floor`` keeps trying in the background.
        """
        if self._started:
            raise RuntimeError(f"postgres upstream {self.name!r} was already started")
        self._started = True
        try:
            async with trio_asyncio.open_loop() as loop:
                # trio-asyncio's default handler re-raises what asyncio only reports (a
                # connection lost while a cancelled connect unwinds, say) into the loop's
                # nursery, which would end this upstream for good; log it as asyncio does.
                loop.set_exception_handler(self._report_asyncio_error)
                pool = await self._bridge(loop, _create_pool, self.settings, self.name)
                self._loop, self._pool = loop, pool
                try:
                    # Warm the pool before reporting started, so the first requests
                    # find open connections; a down database only costs this attempt.
                    reachable = await self._warm_up()
                    if not reachable:
                        logger.warning(
                            "postgres upstream %r unreachable at start; retrying", self.name
                        )
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._keep_floor, reachable)
                        task_status.started()
                        await self._closing.wait()
                        nursery.cancel_scope.cancel(
                            reason=f"postgres upstream {self.name!r} closed"
                        )
                finally:
                    # New calls fail fast from here on; calls in flight still hold the
                    # pool and get ``close_timeout_s`` to finish.
                    self._pool = None
                    with trio.CancelScope(shield=True):
                        await self._close_pool(loop, pool)
                    self._loop = None
        finally:
            # The pool is closed or terminated: no connection of it is out any more.
            for returned in list(self._kept):
                returned()
            self._kept.clear()
            self._stopped.set()

    def _report_asyncio_error(self, loop: Any, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        logger.warning("postgres upstream %r: %s", self.name, context.get("message"),
                       exc_info=exc if isinstance(exc, BaseException) else None)

    async def aclose(self) -> None:
        """Stop ``run()`` and wait until the pool is closed."""
        self._closing.set()
        if self._started:
            await self._stopped.wait()

    async def _close_pool(self, loop: Any, pool: asyncpg.Pool) -> None:
        """Close gracefully within ``close_timeout_s``, else terminate.

        asyncpg's own close can wait forever on a cancel the server never acknowledges
        (asyncpg#1356), so the bound is ours; terminating aborts every socket, which
        also wakes anything still waiting on them.
        """
        with trio.move_on_after(self.settings.close_timeout_s) as scope:
            try:
                await trio_asyncio.aio_as_trio(_close_pool, loop=loop)(pool)
            except Exception:
                logger.warning("postgres upstream %r: pool close failed", self.name, exc_info=True)
            else:
                return
        if scope.cancelled_caught:
            logger.warning(
                "postgres upstream %r: pool close exceeded %.1f s, terminating",
                self.name,
                self.settings.close_timeout_s,
            )
        with trio.move_on_after(self.settings.close_timeout_s):
            await trio_asyncio.aio_as_trio(_terminate_pool, loop=loop)(pool)

    async def _warm_up(self) -> bool:
        """Open connections up to ``min_size``; False when the database is unreachable.

        Holding ``min_size - in_use`` connections at once leaves at least ``min_size``
        open afterwards, without waiting for the busy ones.
        """
        pool = self._pool
        if pool is None:
            return False
        size = pool.get_size()
        wanted = self.settings.min_size - (size - pool.get_idle_size())
        if size >= self.settings.min_size or wanted <= 0:
            return True
        try:
            await self._bounded(self.settings.connect_timeout_s, self._loop, _touch, pool, wanted)
        except GatewayError as exc:
            logger.debug("postgres upstream %r: warm-up failed: %s", self.name, exc)
            return False
        return True

    async def _keep_floor(self, reachable: bool) -> None:
        """Keep ``min_size`` connections open: retry with backoff while the database is
        unreachable, and re-open connections lost to an outage or idle expiry.

        Calls never wait for this task: they connect on their own (asyncpg re-connects
        on acquire), so recovery is as fast as the database.
        """
        delay = _RETRY_MIN_S
        while self._pool is not None:
            if reachable:
                delay = _RETRY_MIN_S
                await trio.sleep(_FLOOR_CHECK_S)
            else:
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
            was_reachable, reachable = reachable, await self._warm_up()
            if reachable != was_reachable:
                logger.warning(
                    "postgres upstream %r %s",
                    self.name,
                    "reachable again" if reachable else "unreachable; retrying",
                )

    # ---- the bridge

    def _open(self) -> tuple[Any, asyncpg.Pool]:
        loop, pool = self._loop, self._pool
        if loop is None or pool is None:
            state = "closed" if self._closing.is_set() else "not started"
            raise UpstreamConnectError(f"postgres upstream {self.name!r} is {state}")
        return loop, pool

    async def _bridge(self, loop: Any, fn: Callable[..., Awaitable[_T]], *args: object,
                      input_bound: bool = False, statement_timeout_s: float | None = None,
                      ) -> _T:
        """Run ``fn(*args)`` as an asyncio task; Trio cancellation cancels it.
        ``input_bound``: the statement has arguments; ``statement_timeout_s``: the
        server's for it, the session's unless given (see :func:`_translate`)."""
        try:
            result: _T = await trio_asyncio.aio_as_trio(fn, loop=loop)(*args)
        except asyncio.CancelledError as exc:
            # The asyncio side was cancelled while no Trio scope of ours was: the
            # loop is shutting down under us.
            raise UpstreamConnectError(f"postgres upstream {self.name!r} is closing") from exc
        except Exception as exc:
            # Not chained: the driver's exception can quote argument values.
            raise _translate(self.name, exc, input_bound=input_bound,
                             statement_timeout_s=self.settings.statement_timeout_s
                             if statement_timeout_s is None else statement_timeout_s,
                             ) from None
        return result

    async def _bounded(
        self, timeout_s: float, loop: Any, fn: Callable[..., Awaitable[_T]], *args: object,
        input_bound: bool = False, statement_timeout_s: float | None = None,
    ) -> _T:
        """``_bridge`` inside a ``timeout_s`` scope of its own → ``UpstreamTimeout``."""
        _check_timeout(timeout_s)
        with trio.move_on_after(timeout_s):
            return await self._bridge(loop, fn, *args, input_bound=input_bound,
                                      statement_timeout_s=statement_timeout_s)
        raise UpstreamTimeout(
            f"postgres upstream {self.name!r}: no answer within {timeout_s:g} s",
            timeout_s=timeout_s,
        )

    async def _query(
        self, operate: Operation, query: str, args: Sequence[object], timeout_s: float,
        writes: bool, slot: HeldSlot | None,
    ) -> Any:
        loop, pool = self._open()
        if slot is not None and not await self._returned(slot, timeout_s):
            raise UpstreamTimeout(
                f"postgres upstream {self.name!r}: the connection of the call's cancelled "
                f"try was not back within {timeout_s:g} s", timeout_s=timeout_s)
        result = await self._bounded(
            timeout_s,
            loop,
            _run_on_pool,
            pool,
            self._waiting,
            self.settings.close_timeout_s,
            operate,
            query,
            tuple(args),
            writes,
            None if slot is None else self._keeper(slot),
            input_bound=bool(args),
        )
        self._last_ok = trio.current_time()
        return result

    @staticmethod
    async def _returned(slot: HeldSlot, timeout_s: float) -> bool:
        """Wait (within ``timeout_s``) for the connection a cancelled try under the same
        slot left: a retry does not take a second connection while the first is out."""
        with trio.move_on_after(timeout_s):
            await slot.returned()
            return True
        return False

    def _keeper(self, slot: HeldSlot) -> Callable[[asyncio.Task[None]], None]:
        """Keep ``slot`` taken while a cancelled call's connection is released in the
        background: the next caller waits in the gateway's queue (or is shed) rather
        than in asyncpg's, which no queue bound, timeout or gauge sees."""

        def releasing(task: asyncio.Task[None]) -> None:
            returned = slot.keep()
            self._kept.add(returned)

            def back(_: object) -> None:
                self._kept.discard(returned)
                returned()

            task.add_done_callback(back)

        return releasing

    # ---- queries

    async def fetch(
        self, query: str, args: Sequence[object], *, timeout_s: float, writes: bool = False,
        max_bytes: int | None = None, slot: HeldSlot | None = None,
    ) -> list[dict[str, JSON]]:
        """All rows, as JSON-ready dicts. ``writes``: the statement may write (a read
        that tries raises ``StatementWrites``). ``max_bytes``: a read stops once its
        rows are past that as JSON (``UpstreamResultRefused``); a write, read whole as
        it ran whole, is rolled back when they are. ``slot``: the caller's capacity
        slot, kept taken while the connection of a cancelled call is on its way back to
        the pool (module docstring)."""
        where = f"postgres upstream {self.name!r}"
        operate = (_fetch_all if max_bytes is None
                   else _write_within(max_bytes, where) if writes
                   else _fetch_within(max_bytes, where))
        records = await self._query(operate, query, args, timeout_s, writes, slot)
        return [_row(record) for record in records]

    async def fetchrow(
        self, query: str, args: Sequence[object], *, timeout_s: float, writes: bool = False,
        slot: HeldSlot | None = None,
    ) -> dict[str, JSON] | None:
        """The first row, or None when there is none."""
        record = await self._query(_fetch_first, query, args, timeout_s, writes, slot)
        return None if record is None else _row(record)

    async def fetch_one(
        self, query: str, args: Sequence[object], *, timeout_s: float, writes: bool = False,
        slot: HeldSlot | None = None,
    ) -> dict[str, JSON] | None:
        """The only row, or None when there is none. Several rows are an
        ``UpstreamQueryError``: answering the first of them would hand a client a row
        picked by chance (a statement missing a condition can pick another user's)."""
        where = f"postgres upstream {self.name!r}"
        records = await self._query(_write_one(where) if writes else _fetch_two, query, args,
                                    timeout_s, writes, slot)
        if len(records) > 1:
            raise UpstreamResultRefused(
                f"postgres upstream {self.name!r}: the statement returned more than one "
                "row where one is expected (one: true)"
                + ("; what it wrote was rolled back" if writes else ""))
        return _row(records[0]) if records else None

    async def execute(self, query: str, args: Sequence[object], *, timeout_s: float,
                      writes: bool = True, slot: HeldSlot | None = None) -> str:
        """Run a statement; returns its status tag (``"UPDATE 3"``)."""
        status: str = await self._query(_execute, query, args, timeout_s, writes, slot)
        return status

    @asynccontextmanager
    async def transaction(self, *, timeout_s: float) -> AsyncIterator[Transaction]:
        """One connection inside a transaction that lasts at most ``timeout_s``.

        Commits when the block ends normally, rolls back when it raises or is
        cancelled; both run shielded with their own ``close_timeout_s`` bound. The
        deadline covers the whole block (the connection is held throughout): when it
        fires, the block is cancelled, rolled back and ``UpstreamTimeout`` raised.
        """
        _check_timeout(timeout_s)
        loop, pool = self._open()
        bound = self.settings.close_timeout_s
        statement_timeout_ms = math.ceil(timeout_s * 1000)
        with trio.move_on_after(timeout_s) as scope:
            con = await self._bridge(
                loop, _begin, pool, self._waiting, bound, statement_timeout_ms
            )
            tx = Transaction(self, loop, con, statement_timeout_ms / 1000)
            try:
                yield tx
            except BaseException:
                tx._con = None
                with trio.CancelScope(shield=True) as cleanup:
                    cleanup.relative_deadline = bound
                    try:
                        await self._bridge(loop, _finish, pool, con, "ROLLBACK", bound)
                    except GatewayError:
                        logger.debug("postgres rollback failed", exc_info=True)
                raise
            tx._con = None
            with trio.CancelScope(shield=True) as cleanup:
                cleanup.relative_deadline = bound
                await self._bridge(loop, _finish, pool, con, "COMMIT", bound)
            if cleanup.cancelled_caught:
                raise UpstreamTimeout(
                    f"postgres upstream {self.name!r}: COMMIT unanswered within {bound:g} s;"
                    " its outcome is unknown"
                )
            return
        if scope.cancelled_caught:
            raise UpstreamTimeout(
                f"postgres upstream {self.name!r}: transaction exceeded {timeout_s:g} s",
                timeout_s=timeout_s,
            )

    # ---- health

    async def ready(self) -> bool:
        """True when ``SELECT 1`` answers within the connect timeout. A pool whose
        connections are all lent out to traffic is busy, not down, and a probe would only
        wait for one: it is ready while a statement succeeded in the last
        :data:`READY_FRESH_S`."""
        stats = self.statistics()
        if stats.idle == 0 and stats.in_use >= self.settings.max_size:
            if (self._last_ok is not None
                    and trio.current_time() - self._last_ok < READY_FRESH_S):
                return True
            try:  # on a connection of its own, outside the pool's queue
                loop, _ = self._open()
                await self._bounded(self.settings.connect_timeout_s, loop, _probe_alone,
                                    self.settings)
            except (UpstreamError, UpstreamTimeout):
                return False
            return True
        try:
            await self.fetchrow("SELECT 1", (), timeout_s=self.settings.connect_timeout_s)
        except (UpstreamError, UpstreamTimeout):
            return False
        return True

    def statistics(self) -> PostgresStatistics:
        pool = self._pool
        if pool is None:
            return PostgresStatistics(size=0, in_use=0, idle=0, waiting=self._waiting.count)
        size, idle = pool.get_size(), pool.get_idle_size()
        return PostgresStatistics(
            size=size, in_use=size - idle, idle=idle, waiting=self._waiting.count
        )
