"""Cancellation traces: every request/call/attempt scope records itself as a span.

A span is opened by :func:`traced_scope`, which is also the cancel scope of that unit
of work, so recording cannot be forgotten at a call site. When a span ends cancelled,
its cause is read from Trio's own record, never guessed from timing:

* ``Cancelled.source == "explicit"``: the gateway cancelled a scope through
  :meth:`TracedScope.cancel`, which always passes ``reason="<cause>|<scope>"``;
* ``"deadline"``: the outermost enclosing traced scope whose deadline passed fired;
  a deadline outside every traced scope is Hypercorn's graceful-shutdown deadline on
  its server nursery, so the cause is ``shutdown``;
* ``"nursery"``: a sibling task raised, so the nursery cancelled the rest.

Secrets never enter a span: callers pass upstream names, paths without query strings,
statuses and counters, never headers, bodies or SQL argument values.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import trio

from ._errors import GatewayError, UpstreamTimeout

if TYPE_CHECKING:
    from ._trace_context import TraceContext

SpanKind = Literal["request", "stage", "call", "attempt"]
Outcome = Literal["ok", "error", "cancelled"]

#: Causes of a cancelled span (see DESIGN.md, "Cancellation trace").
CAUSES = ("deadline", "client_disconnect", "sibling_failed", "hedge_lost", "quorum_reached",
          "shed", "circuit_open", "retry_budget", "shutdown")
#: Every cause a trace or one of its spans may carry, and so every value a ``cause``
#: filter can match: the cancellation causes, then the causes of the errors a request
#: may fail with (a 5xx, or any error once its answer had started).
TRACE_CAUSES = (*CAUSES, "upstream_error", "upstream_connect", "upstream_reset",
                "upstream_protocol", "upstream_status", "upstream_query", "statement_writes",
                "internal", "bad_request", "no_route", "not_found", "method_not_allowed",
                "conflict")
#: Gateway errors that are refusals (a cancellation before work), not failures; so is
#: an error raised with ``refused=True`` (a call whose budget is below the floor).
_REFUSAL_CAUSES = frozenset({"shed", "circuit_open", "retry_budget"})


@dataclass(slots=True)
class Span:
    kind: SpanKind
    name: str
    start_ms: float
    end_ms: float | None = None
    outcome: Outcome = "ok"
    cause: str | None = None
    fired_scope: str | None = None
    budget_ms: float | None = None
    error: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    children: list[Span] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.kind if self.kind == "request" else f"{self.kind} {self.name}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind, "name": self.name,
            "start_ms": round(self.start_ms, 3),
            "end_ms": None if self.end_ms is None else round(self.end_ms, 3),
            "outcome": self.outcome,
        }
        if self.cause is not None:
            out["cause"] = self.cause
            out["scope"] = self.fired_scope
        if self.budget_ms is not None:
            out["budget_ms"] = round(self.budget_ms, 3)
        if self.error is not None:
            out["error"] = self.error
        if self.attrs:
            out.update(self.attrs)
        if self.children:
            out["children"] = [child.to_json() for child in self.children]
        return out

    def walk(self) -> Iterator[Span]:
        yield self
        for child in self.children:
            yield from child.walk()


class Trace:
    """One request's tree of spans, plus what the access log needs."""

    __slots__ = ("cause", "context", "deadline_source", "end_ms", "method", "path",
                 "request_id", "root", "route", "started_at", "status", "t0")

    def __init__(self, request_id: str, method: str, path: str, route: str | None) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.route = route
        self.started_at = time.time()
        self.t0 = trio.current_time()
        self.status: int | None = None
        self.cause: str | None = None
        self.deadline_source: str | None = None
        self.root: Span | None = None
        #: Set when the request is over (``finish``): a trace read later keeps it.
        self.end_ms: float | None = None
        #: The W3C trace the request belongs to (None: tracing or trace context off).
        self.context: TraceContext | None = None

    def offset_ms(self) -> float:
        return (trio.current_time() - self.t0) * 1000

    @property
    def duration_ms(self) -> float:
        if self.end_ms is not None:
            return self.end_ms
        if self.root is not None and self.root.end_ms is not None:
            return self.root.end_ms
        return self.offset_ms()

    def finish(self) -> None:
        """Fix the duration: a request refused before any span (shed at the door, no
        route) has no root span to end, and its duration would grow each time it is read."""
        if self.end_ms is None:
            self.end_ms = self.duration_ms

    def cancelled_spans(self) -> list[Span]:
        return [] if self.root is None else [s for s in self.root.walk()
                                             if s.outcome == "cancelled"]

    def to_json(self) -> dict[str, Any]:
        context = self.context
        return {
            "request_id": self.request_id,
            "trace_id": None if context is None else context.trace_id,
            "parent_span_id": None if context is None else context.parent_id,
            "method": self.method, "path": self.path,
            "route": self.route, "status": self.status, "cause": self.cause,
            "deadline_source": self.deadline_source,
            "started_at": round(self.started_at, 6),
            "duration_ms": round(self.duration_ms, 3),
            "spans": None if self.root is None else self.root.to_json(),
        }


class TracedScope:
    """A ``trio.CancelScope`` that is also a span; cancel it only with a cause."""

    __slots__ = ("_cancel_cause", "_fired", "cancel_scope", "ended", "parent", "span", "trace")

    def __init__(self, trace: Trace | None, span: Span, cancel_scope: trio.CancelScope,
                 parent: TracedScope | None) -> None:
        self.trace = trace
        self.span = span
        self.cancel_scope = cancel_scope
        self.parent = parent
        self._cancel_cause: str | None = None
        self._fired = span.label
        #: The span has ended: a cancellation now (a retry that won claiming the answer
        #: after this attempt failed) would record a cause that did not end it.
        self.ended = False

    def cancel(self, cause: str, detail: str | None = None, *, scope: str | None = None) -> None:
        """Cancel this scope, recording why (and, e.g., which sibling failed). ``scope``:
        what fired, when it is not this scope (the connection's ``send_timeout``)."""
        if self.ended:
            return
        if self._cancel_cause is None:
            self._cancel_cause = cause
            self._fired = scope or self.span.label
            if detail is not None:
                self.span.attrs["cancelled_by"] = detail
        self.cancel_scope.cancel(reason=f"{cause}|{scope or self.span.label}")

    @property
    def cancel_cause(self) -> str | None:
        return self._cancel_cause

    @property
    def deadline(self) -> float:
        return self.cancel_scope.deadline

    def fail(self, error: str, **attrs: Any) -> None:
        """Mark the span failed without raising (e.g. a partial fan-out call)."""
        self.span.outcome = "error"
        self.span.error = error
        self.span.attrs.update(attrs)

    def note(self, **attrs: Any) -> None:
        self.span.attrs.update(attrs)

    def chain(self) -> Iterator[TracedScope]:
        """This scope, then the scopes it is nested in, out to the request."""
        node: TracedScope | None = self
        while node is not None:
            yield node
            node = node.parent


def only_cancelled(exc: BaseException | None) -> trio.Cancelled | None:
    """The ``Cancelled`` that ``exc`` is, bare or as a group made of nothing else (a
    nursery's, cancelled from outside), else None."""
    if isinstance(exc, trio.Cancelled):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(trio.Cancelled)
        if rest is None and matched is not None:
            first = matched.exceptions[0]
            return only_cancelled(first)
    return None


def _attribute(ts: TracedScope, cancelled: trio.Cancelled, now: float) -> tuple[str, str | None]:
    """(cause, scope that fired) of a cancellation reaching ``ts`` from outside it.

    The ``Cancelled`` that unwinds a span may come from a library's inner scope (trio's
    ``open_tcp_stream`` cancels its own attempts "successfully found a socket" just as
    an outer cancel lands). The reason Trio recorded on *this* span's scope when the
    outer cancellation reached it is the one that explains the span, so it is read
    first (Trio keeps it in ``CancelScope._cancel_reason``; absent, the exception's own
    reason is used).
    """
    inherited = getattr(ts.cancel_scope, "_cancel_reason", None)
    for source, reason in ((getattr(inherited, "source", None),
                            getattr(inherited, "reason", None)),
                           (cancelled.source, cancelled.reason)):
        if source == "explicit" and reason and "|" in reason:
            cause, _, scope = reason.partition("|")
            return cause, scope
    # The record on this span's scope first: the exception may come from a library's
    # own inner scope that was cancelled (or timed out) at the same moment.
    source = getattr(inherited, "source", None) or cancelled.source
    if source == "deadline":
        fired: TracedScope | None = None
        for node in ts.chain():
            if node.cancel_scope.cancel_called and node.cancel_scope.deadline <= now:
                fired = node
        if fired is None:
            return "shutdown", "server"
        return "deadline", fired.span.label
    if source == "nursery":
        return "sibling_failed", None
    if source in ("shutdown", "KeyboardInterrupt"):
        return "shutdown", "server"
    return source, None


class traced_scope:  # named as the function it replaces: ``with traced_scope(...) as s``
    """Open a cancel scope recorded as a span of ``trace`` under ``parent``.

    If this scope's own deadline fires, :class:`UpstreamTimeout` is raised once the
    scope has unwound, naming the scope. If the scope was cancelled through
    :meth:`TracedScope.cancel`, the block simply ends and ``cancel_cause`` says why.

    A class, not a generator: three of these open on every proxied request, and a
    generator-based context manager costs several times as much to enter and leave.
    """

    __slots__ = ("_scope",)

    def __init__(self, trace: Trace | None, parent: TracedScope | None, kind: SpanKind,
                 name: str, *, deadline: float = math.inf, **attrs: Any) -> None:
        now = trio.current_time()
        start_ms = 0.0 if trace is None else (now - trace.t0) * 1000
        budget_ms = None if math.isinf(deadline) else (deadline - now) * 1000
        span = Span(kind, name, start_ms, budget_ms=budget_ms, attrs=attrs)
        if parent is not None:
            parent.span.children.append(span)
        elif trace is not None:
            trace.root = span
        self._scope = TracedScope(trace, span, trio.CancelScope(deadline=deadline), parent)

    def __enter__(self) -> TracedScope:
        self._scope.cancel_scope.__enter__()
        return self._scope

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> bool:
        scope = self._scope
        try:
            swallowed = scope.cancel_scope.__exit__(exc_type, exc, tb)  # type: ignore[arg-type]
        except BaseException as left:  # what Trio left of an exception group
            _record_failure(scope, left)
            raise
        if exc is not None and not swallowed:
            _record_failure(scope, exc)
            return False
        span = scope.span
        scope.ended = True
        trace = scope.trace
        span.end_ms = None if trace is None else trace.offset_ms()
        if scope.cancel_cause is not None:
            # Cancelled on purpose (a lost hedge, say) even if the work ended before its
            # next checkpoint: its result is discarded, so the span is a cancellation.
            span.outcome = "cancelled"
            span.cause, span.fired_scope = scope.cancel_cause, scope._fired
            return swallowed
        if scope.cancel_scope.cancelled_caught:
            span.outcome = "cancelled"
            span.cause, span.fired_scope = "deadline", span.label
            error = UpstreamTimeout(f"{span.label}: deadline exceeded", scope=span.label)
            try:
                raise error
            finally:
                # Not chained to the Cancelled it replaces: that traceback would hold
                # the request's frames alive in a reference cycle.
                error.__context__ = None
                del error
        return swallowed


def _record_failure(scope: TracedScope, exc: BaseException) -> None:
    """End ``scope``'s span with the exception leaving it: a cancellation (and why),
    a refusal, or an error."""
    span = scope.span
    scope.ended = True
    span.end_ms = None if scope.trace is None else scope.trace.offset_ms()
    cancelled = only_cancelled(exc)
    if cancelled is not None:
        span.outcome = "cancelled"
        span.cause, span.fired_scope = _attribute(scope, cancelled, trio.current_time())
    elif isinstance(exc, GatewayError):
        if exc.cause in _REFUSAL_CAUSES or exc.detail.get("refused"):
            # Refused where it was raised (a call's upstream, the door): the spans
            # it passes through on the way out name that scope, not their own.
            span.outcome = "cancelled"
            span.cause = exc.cause
            span.fired_scope = exc.detail.setdefault("scope", span.label)
        else:
            span.outcome = "error"
            if isinstance(exc, UpstreamTimeout) and "scope" in exc.detail:
                span.cause, span.fired_scope = "deadline", exc.detail["scope"]
        span.error = exc.message
    else:
        span.outcome = "error"
        span.error = type(exc).__name__


class TraceBuffer:
    """The last N traces of this worker, newest last."""

    def __init__(self, size: int) -> None:
        self._traces: deque[Trace] = deque(maxlen=max(size, 0) or None)
        self._enabled = size > 0

    def resize(self, size: int) -> None:
        """Keep at most ``size`` traces (the newest); 0 turns tracing off and forgets
        the traces kept, as an operator turning it off (for memory, for privacy) means."""
        if size <= 0:
            self._traces = deque()
        elif size != self._traces.maxlen:
            self._traces = deque(self._traces, maxlen=size)
        self._enabled = size > 0

    def add(self, trace: Trace) -> None:
        """Keep a finished trace (its duration fixed from now on)."""
        trace.finish()
        if self._enabled:
            self._traces.append(trace)

    def get(self, request_id: str) -> Trace | None:
        for trace in reversed(self._traces):
            if trace.request_id == request_id:
                return trace
        return None

    def query(self, *, route: str | None = None, cause: str | None = None,
              status: int | None = None, min_ms: float | None = None,
              trace_id: str | None = None, limit: int = 50) -> list[Trace]:
        out: list[Trace] = []
        for trace in reversed(self._traces):
            if route is not None and trace.route != route:
                continue
            if trace_id is not None and (trace.context is None
                                         or trace.context.trace_id != trace_id):
                continue
            if status is not None and trace.status != status:
                continue
            if min_ms is not None and trace.duration_ms < min_ms:
                continue
            if cause is not None and trace.cause != cause and not any(
                    s.cause == cause for s in trace.cancelled_spans()):
                continue
            out.append(trace)
            if len(out) >= limit:
                break
        return out

    def __len__(self) -> int:
        return len(self._traces)
