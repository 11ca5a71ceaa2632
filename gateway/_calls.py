"""One call to an upstream: budget floor → capacity limiter → traced attempt.

The call's cancel scope is nested in the request's, so no call timeout can outlive
the request deadline; the budget left is announced upstream in the deadline header
so a chain of services shares one deadline.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Container, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from . import _upstream_json as upstream_json
from ._deadlines import call_deadline, propagated_budget_ms
from ._errors import (
    BadRequest,
    GatewayError,
    NoRow,
    StatementWrites,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from ._headers import upstream_request_headers
from ._policy import CallSettings, FanoutCall, sql_reads_only
from ._routing import target_authority
from ._trace import TracedScope, only_cancelled, traced_scope
from ._trace_context import TRACEPARENT, TRACESTATE

if TYPE_CHECKING:
    from ._attempts import Perform
    from ._limits import HeldSlot
    from ._request import RequestContext
    from ._runtime import UpstreamState
    from .upstreams._postgres import PostgresUpstream

log = logging.getLogger("gateway.calls")

#: Default cap on an upstream body the gateway parses itself (fan-out, SQL routes).
DEFAULT_PARSED_BODY_LIMIT = 4 * 1024 * 1024


def call_span(ctx: RequestContext, parent: TracedScope, call_name: str,
              state: UpstreamState, timeout_s: float | None,
              **attrs: Any) -> traced_scope:
    """The traced cancel scope of one call, its deadline nested in the request's: what
    the call does before it takes a slot (binding its arguments) is traced too."""
    # Within the parent's own deadline too: a partial fan-out stops waiting for its
    # calls before the request's deadline, and each call announces that budget upstream.
    deadline = call_deadline(trio.current_time(), min(ctx.deadline.at, parent.deadline),
                             timeout_s)
    return traced_scope(ctx.trace, parent, "call", call_name, deadline=deadline,
                        upstream=state.name, **attrs)


class capacity_slot:  # named as the function it replaces: ``async with capacity_slot(...)``
    """One of the upstream's capacity slots for ``call``, checked against its floor.

    A class, not a generator: one is entered on every proxied request."""

    __slots__ = ("_call", "_call_name", "_ctx", "_held", "_slot")

    def __init__(self, ctx: RequestContext, call: TracedScope, call_name: str,
                 state: UpstreamState) -> None:
        self._ctx = ctx
        self._call = call
        self._call_name = call_name
        now = trio.current_time()
        _check_budget_floor(ctx, call, call_name, now)
        # Queue wait counts against the deadline: wait no longer than would leave the
        # call the floor it needs once it has a slot.
        server = ctx.policy.server
        max_wait = call.deadline - now - server.deadline_margin - server.min_call_budget
        self._slot = state.limiter.slot(max_wait)
        self._held: HeldSlot | None = None

    async def __aenter__(self) -> HeldSlot:
        held = self._held = await self._slot.__aenter__()
        try:
            _check_budget_floor(self._ctx, self._call, self._call_name,
                                trio.current_time())  # after a wait
        except UpstreamTimeout as refused:
            held.unmeasured = True
            await self._slot.__aexit__(type(refused), refused, refused.__traceback__)
            raise
        return held

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> bool:
        held = self._held
        assert held is not None
        if isinstance(exc, UpstreamConnectError):
            held.unmeasured = True  # nothing was sent: no latency to learn
        elif only_cancelled(exc) is not None:  # bare, or a retrying call's group of them
            held.unmeasured = self._ctx.deadline.passed_by_client(trio.current_time())
        return await self._slot.__aexit__(exc_type, exc, tb)


@asynccontextmanager
async def upstream_call(ctx: RequestContext, parent: TracedScope, call_name: str,
                        state: UpstreamState, timeout_s: float | None,
                        **attrs: Any) -> AsyncIterator[TracedScope]:
    """A traced call scope holding one of the upstream's capacity slots."""
    with call_span(ctx, parent, call_name, state, timeout_s, **attrs) as call:
        async with capacity_slot(ctx, call, call_name, state):
            yield call


def _check_budget_floor(ctx: RequestContext, call: TracedScope, call_name: str,
                        now: float) -> None:
    """Refuse a call whose budget, after the margin kept back from the upstream, is below
    the floor: the upstream would be told it has (almost) no time and answer too late."""
    server = ctx.policy.server
    budget = call.deadline - now - server.deadline_margin
    if budget < server.min_call_budget:
        # The scope whose deadline this is: the outermost with it (the request's, when
        # the call has no shorter timeout of its own), as a deadline firing is named.
        bounding = call
        for node in call.chain():
            if node.deadline == call.deadline:
                bounding = node
        raise UpstreamTimeout(
            f"call {call_name}: {max(0.0, budget) * 1000:.0f}ms left after the "
            f"{server.deadline_margin * 1000:g}ms margin, below the floor; not sent",
            scope=bounding.span.label, call=call_name, refused=True)


@functools.lru_cache(maxsize=64)
def _forwarding_names(deadline_header: str, request_id_header: str,
                      traced: bool) -> tuple[bytes, bytes, frozenset[bytes]]:
    """The deadline and request-id header names as sent, and the client's headers the
    gateway writes itself: once per policy, not per try."""
    deadline = deadline_header.encode()
    dropped = {deadline, TRACEPARENT, TRACESTATE} if traced else {deadline}
    return deadline, request_id_header.encode(), frozenset(dropped)


def forward_headers(ctx: RequestContext, call: TracedScope,
                    base: list[tuple[bytes, bytes]] | None = None) -> list[tuple[bytes, bytes]]:
    """Request headers for an upstream attempt, with the remaining budget announced and,
    when the request has a W3C trace, the attempt's ``traceparent``."""
    server = ctx.policy.server
    context = ctx.trace.context
    deadline_header, request_id_header, dropped = _forwarding_names(
        server.deadline_header, server.request_id_header, context is not None)
    if base is None:
        client = ctx.scope.get("client")
        base = upstream_request_headers(
            ctx.scope["headers"], peer=client[0] if client else None,
            scheme=ctx.scope.get("scheme", "http"), trusted=server.trusted_proxies,
            request_id=ctx.request_id, request_id_header=request_id_header, drop=dropped,
            target_authority=_target_authority(ctx))
    budget = propagated_budget_ms(trio.current_time(), call.deadline, server.deadline_margin)
    if context is None:
        return [*base, (deadline_header, str(budget).encode())]
    return [*base, (deadline_header, str(budget).encode()), *context.headers(call)]


async def http_json_call(ctx: RequestContext, parent: TracedScope, name: str,
                         call: FanoutCall, state: UpstreamState,
                         settings: CallSettings) -> Any:
    """GET (or another method) an upstream and return its JSON; failures raise."""
    from ._attempts import AttemptResult, Claim, run_attempts

    pool = state.pool
    assert pool is not None
    assert call.path is not None
    target = ctx.match.target(call.path)
    limit = ctx.match.route.max_response_body or DEFAULT_PARSED_BODY_LIMIT
    base = _fanout_base_headers(ctx)

    async def perform(attempt: TracedScope, claim: Claim,
                      retry_statuses: Container[int]) -> AttemptResult[Any]:
        def headers_now() -> list[tuple[bytes, bytes]]:
            return [*forward_headers(ctx, attempt, base), (b"accept", b"application/json")]

        async with pool.request(call.method, target, headers_now(), None,
                                refresh=headers_now) as response:
            body = await response.read(max_bytes=limit)
        if not 200 <= response.status < 300:  # a redirect's body is not the data asked for
            raise UpstreamStatusError(f"upstream {state.name!r} answered {response.status}",
                                      upstream_status=response.status, upstream=state.name,
                                      retry_after_s=retry_after_s(response.headers))
        try:
            value = upstream_json.loads(body) if body else None
        except (ValueError, RecursionError):  # nesting deeper than the parser's stack
            raise UpstreamProtocolError(f"upstream {state.name!r} answered invalid JSON",
                                        upstream=state.name) from None
        return AttemptResult(value, response.status)

    async with upstream_call(ctx, parent, name, state, settings.timeout) as scope:
        return await run_attempts(ctx, scope, state, settings, name=name, method=call.method,
                                  replayable=True, perform=perform)


def retry_after_s(headers: list[tuple[bytes, bytes]]) -> float | None:
    """An upstream's ``Retry-After`` (seconds or an HTTP date), passed on with its
    status when the gateway answers it as its own error."""
    for name, value in headers:
        if name != b"retry-after":
            continue
        text = value.decode("latin-1").strip()
        if text.isdigit():
            return float(text)
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return None


def _fanout_base_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    server = ctx.policy.server
    _, request_id_header, dropped = _forwarding_names(
        server.deadline_header, server.request_id_header, False)
    client = ctx.scope.get("client")
    kept = [(n, v) for n, v in ctx.scope["headers"]
            if n in (b"authorization", b"user-agent", b"x-forwarded-for", b"x-forwarded-proto",
                     b"x-forwarded-host", b"forwarded", b"host")]
    return upstream_request_headers(
        kept, peer=client[0] if client else None, scheme=ctx.scope.get("scheme", "http"),
        trusted=server.trusted_proxies, request_id=ctx.request_id,
        request_id_header=request_id_header, drop=dropped,
        target_authority=_target_authority(ctx))


def _target_authority(ctx: RequestContext) -> bytes | None:
    raw_path = ctx.scope.get("raw_path")
    return target_authority(raw_path) if raw_path else None


# --------------------------------------------------------------------------- SQL


#: An ``:int`` argument given as text: plain ASCII digits (``int()`` also takes ``+7``,
#: `` 7 ``, ``0_7`` and other scripts' digits, all of which would reach the same row).
_PLAIN_INT = re.compile(r"-?[0-9]{1,20}")


def _convert(name: str, raw: Any, kind: str) -> Any:
    if raw is None:
        raise BadRequest(f"argument {name!r} is missing")
    try:
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            if isinstance(raw, str) and not _PLAIN_INT.fullmatch(raw):
                raise ValueError
            return int(raw)
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError
        if kind == "uuid":
            return uuid.UUID(str(raw))
        if not isinstance(raw, str):  # a JSON true or list is no text (str() is Python's)
            raise ValueError
        return raw
    except (ValueError, TypeError, OverflowError):  # OverflowError: int(1e400)
        # Not the value itself: argument values never enter traces or logs.
        raise BadRequest(f"argument {name!r} is not a valid {kind}") from None


async def bind_sql_args(ctx: RequestContext, args: Sequence[str]) -> list[Any]:
    """Values for ``$1..$n`` from path, query string or JSON body; typed, never spliced."""
    from urllib.parse import parse_qs

    query: dict[str, list[str]] | None = None
    body: Any = None
    values: list[Any] = []
    for spec in args:
        source, _, rest = spec.partition(".")
        name, _, kind = rest.partition(":")
        kind = kind or "text"
        if source == "path":
            raw: Any = ctx.match.params.get(name)
        elif source == "query":
            if query is None:
                try:
                    query = parse_qs(ctx.scope.get("query_string", b"").decode("latin-1"),
                                     keep_blank_values=True, errors="strict")
                except UnicodeDecodeError:  # not bound as U+FFFD, a value never sent
                    raise BadRequest("the query string is not valid UTF-8") from None
            found = query.get(name)
            raw = found[0] if found else None
        else:
            if body is None:
                body = await ctx.json_body()
            if name in body and body[name] is None:
                values.append(None)  # a JSON null binds SQL NULL; only an absent key is missing
                continue
            raw = body.get(name)
        values.append(_convert(name, raw, kind))
    return values


async def sql_call(ctx: RequestContext, parent: TracedScope, name: str, call: FanoutCall,
                   state: UpstreamState, settings: CallSettings) -> Any:
    """Run a policy's SQL with bound arguments; rows (or one row) as JSON values."""
    with call_span(ctx, parent, name, state, settings.timeout, protocol="sql") as scope:
        postgres = state.postgres
        if postgres is None:
            raise UpstreamError(f"postgres upstream {state.name!r} is not running",
                                upstream=state.name)
        # Bound inside the call's span, before it takes a slot: a refused argument is
        # the call's failure in the trace, and holds no capacity.
        args = await bind_sql_args(ctx, call.args)
        try:
            async with capacity_slot(ctx, scope, name, state) as held:
                result = await _run_sql(ctx, scope, name, call, state, settings, postgres,
                                        args, held)
        except GatewayError as error:  # named as an HTTP call's failure is
            error.detail.setdefault("upstream", state.name)
            raise
        upstream_json.check_size(result if isinstance(result, list) else [result],
                                 _sql_result_limit(ctx), name)
        return result


def _sql_result_limit(ctx: RequestContext) -> int:
    return ctx.match.route.max_response_body or DEFAULT_PARSED_BODY_LIMIT



async def _run_sql(ctx: RequestContext, scope: TracedScope, name: str, call: FanoutCall,
                   state: UpstreamState, settings: CallSettings, postgres: PostgresUpstream,
                   args: list[Any], held: HeldSlot) -> Any:
    """The call's attempts, as reads while PostgreSQL agrees the statement only reads.
    ``held``: the call's slot, kept taken while a cancelled try's connection is on its
    way back to the pool; a hedge's connection keeps the hedge's own slot, so that each
    connection out holds one."""
    from ._attempts import AttemptResult, Claim, run_attempts

    query = call.query
    assert query is not None

    def attempt_of(writes: bool) -> Perform[Any]:
        async def perform(attempt: TracedScope, claim: Claim,
                          retry_statuses: Container[int]) -> AttemptResult[Any]:
            remaining = max(0.001, attempt.deadline - trio.current_time())
            slot = claim.slot_of(attempt) or held
            try:
                if call.one:
                    row = await postgres.fetch_one(query, args, timeout_s=remaining,
                                                   writes=writes, slot=slot)
                    if row is None:
                        raise NoRow(f"{name}: no row found", call=name)
                    return AttemptResult(row)
                return AttemptResult(await postgres.fetch(
                    query, args, timeout_s=remaining, writes=writes,
                    max_bytes=_sql_result_limit(ctx), slot=slot))
            except StatementWrites:
                # Nothing was written (the session was read-only). Claiming the call
                # stops its hedges and retries; the caller runs it again as a write.
                claim.claim(attempt)
                attempt.note(statement_writes=True)
                raise
        return perform

    # Retried and hedged like a GET only when the statement only reads, as its text
    # tells and PostgreSQL confirms (reads run in read-only sessions); one that may
    # write follows a POST's rules (retried only when nothing was sent, or when the
    # database rolled it back for a serialization failure or a deadlock).
    wrote: StatementWrites | None = None
    if sql_reads_only(query) and query not in postgres.writing_statements:
        try:
            return await run_attempts(ctx, scope, state, settings, name=name,
                                      method="GET", replayable=True,
                                      perform=attempt_of(writes=False))
        except StatementWrites as refused:
            wrote = refused
            if query not in postgres.writing_statements:
                postgres.writing_statements.add(query)
                log.warning("upstream %r: a statement that reads by its text wrote "
                            "(a function with side effects?); it now runs as a write, "
                            "never hedged or retried after a timeout: %s",
                            state.name, query)
    attempts = [span for span in scope.span.children if span.kind == "attempt"]
    # Tries sent, not spans: a retry or hedge the budget refused, and a hedge whose race
    # was won as it started, have spans and sent nothing.
    sent = sum(1 for span in attempts if span.cause != "retry_budget"
               and "hedge_not_sent" not in span.attrs)
    # Run again, the write is the call's retry: paid from the upstream's retry budget,
    # or not sent (the call then fails as the read did).
    return await run_attempts(ctx, scope, state, settings, name=name, method="POST",
                              replayable=True, perform=attempt_of(writes=True),
                              first_number=len(attempts) + 1, tries_sent=sent,
                              again_after=wrote)
