"""W3C Trace Context: the trace a request joins, and the ``traceparent`` each try sends.

A request whose ``traceparent`` is valid joins its client's trace: the trace keeps the
client's trace-id and parent-id, and each HTTP try upstream is sent the same trace-id
with a parent-id of its own, the span id its attempt has in the trace, so the
upstream's spans hang under the try that reached them. ``tracestate`` goes on
unchanged. A request without one (or with a malformed one, which is ignored, never
refused) starts a trace, as Envoy does with tracing on: its ``tracestate`` is dropped
(W3C: it means nothing without its ``traceparent``).

Per request this is one scan of the headers, slicing checks (no regex) and one draw of
random bits, from which the span ids of its tries are derived.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._trace import TracedScope

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
_HEX = b"0123456789abcdef"
_ZERO_TRACE_ID = b"0" * 32
_ZERO_SPAN_ID = b"0" * 16
_SPAN_ID_MASK = (1 << 64) - 1
#: Flags of a trace the gateway starts: sampled, since it records every request's trace.
_SAMPLED = "01"


def parse_traceparent(value: bytes) -> tuple[str, str, str] | None:
    """(trace-id, parent-id, flags) of a valid ``traceparent``, else None.

    Version 00 is exactly 55 characters; a later version (not ``ff``) may append fields
    after a dash, and its first four are read as version 00's (W3C's rule for versions a
    reader does not know). Hex is lower-case; an all-zero trace-id or parent-id is invalid.
    """
    size = len(value)
    if size < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version = value[:2]
    if size > 55 and (version == b"00" or value[55:56] != b"-"):
        return None
    trace_id = value[3:35]
    parent_id = value[36:52]
    flags = value[53:55]
    if (version + trace_id + parent_id + flags).translate(None, _HEX) or version == b"ff":
        return None
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_SPAN_ID:
        return None
    return trace_id.decode("ascii"), parent_id.decode("ascii"), flags.decode("ascii")


def is_trace_id(value: str) -> bool:
    """Whether ``value`` is a trace-id a trace may carry (what ``/traces`` filters on)."""
    return (len(value) == 32 and value.isascii()
            and not value.encode().translate(None, _HEX) and value != "0" * 32)


class TraceContext:
    """The W3C trace one request belongs to, and the span ids of its tries."""

    __slots__ = ("_next", "flags", "parent_id", "trace_id", "tracestate")

    def __init__(self, trace_id: str, parent_id: str | None, flags: str,
                 tracestate: tuple[bytes, ...], span_base: int) -> None:
        self.trace_id = trace_id
        #: The client's span this request is a child of (None: the gateway started it).
        self.parent_id = parent_id
        self.flags = flags
        #: The client's ``tracestate`` lines, sent on as they came.
        self.tracestate = tracestate
        self._next = span_base

    @classmethod
    def from_headers(cls, headers: Iterable[tuple[bytes, bytes]]) -> TraceContext:
        """The client's trace when its ``traceparent`` is valid (a single one), else a
        new trace."""
        parent: bytes | None = None
        several = False
        states: list[bytes] = []
        for name, value in headers:
            if name == TRACEPARENT:
                several = parent is not None
                parent = value
            elif name == TRACESTATE:
                states.append(value)
        parsed = None if parent is None or several else parse_traceparent(parent)
        if parsed is not None:
            trace_id, parent_id, flags = parsed
            return cls(trace_id, parent_id, flags, tuple(states), random.getrandbits(64))
        bits = random.getrandbits(192)
        return cls(f"{bits >> 64 or 1:032x}", None, _SAMPLED, (), bits & _SPAN_ID_MASK)

    def span_id(self, attempt: TracedScope) -> str:
        """The span id of ``attempt`` (recorded in its span), given it on first use: a try
        whose connection is opened again sends the same one."""
        attrs = attempt.span.attrs
        span_id: str | None = attrs.get("span_id")
        if span_id is None:
            self._next = (self._next + 1) & _SPAN_ID_MASK or 1
            span_id = attrs["span_id"] = f"{self._next:016x}"
        return span_id

    def headers(self, attempt: TracedScope) -> list[tuple[bytes, bytes]]:
        """``traceparent`` (and the client's ``tracestate``) for one try of ``attempt``."""
        parent = f"00-{self.trace_id}-{self.span_id(attempt)}-{self.flags}".encode()
        return [(TRACEPARENT, parent), *((TRACESTATE, state) for state in self.tracestate)]
