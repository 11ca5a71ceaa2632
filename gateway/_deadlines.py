"""Deadline arithmetic: one request deadline, shortened by the client, shared upstream.

Pure functions over trio's clock values (seconds, ``trio.current_time()``), so the
rules run under ``MockClock`` in tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ._errors import BadRequest

DeadlineSource = Literal["policy", "header"]
#: Longest deadline a client header may ask for; anything longer is clamped by the policy
#: anyway, this only bounds the parsing.
_MAX_HEADER_MS = 86_400_000


@dataclass(frozen=True)
class RequestDeadline:
    """The effective deadline of one request and where it came from."""

    at: float  # absolute, in trio.current_time() seconds
    budget_s: float  # the budget granted at the start
    source: DeadlineSource

    def remaining(self, now: float) -> float:
        return max(0.0, self.at - now)

    def passed_by_client(self, now: float) -> bool:
        """The client's own, shorter deadline has passed: what fired says nothing of how
        slow an upstream is (the policy's deadlines do)."""
        return self.source == "header" and now >= self.at


def parse_deadline_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> float | None:
    """The client's deadline in seconds, or None when absent.

    Malformed, negative, repeated-and-different or absurdly large values are a 400:
    a client that tries to set a deadline must learn that it did not work.
    """
    # A proxy may join repeated lines into one (RFC 9110 5.3): "100, 100" is two.
    lines = [value for header, value in headers if header == name]
    if not lines:
        return None
    # Empty list elements are ignored (RFC 9110 5.6.1): "100," is 100; a header with
    # nothing else is a malformed value, below.
    values = {item.strip() for value in lines for item in value.split(b",")} - {b""} or {b""}
    if len(values) > 1:
        raise BadRequest(f"{name.decode()} is given more than once with different values")
    text = values.pop()
    if not text.isdigit():
        raise BadRequest(
            f"{name.decode()} must be a whole number of milliseconds, got {text[:32]!r}")
    # Too many digits is too large, and int() refuses more than 4,300 of them.
    digits = text.lstrip(b"0") or b"0"
    millis = int(digits) if len(digits) <= len(str(_MAX_HEADER_MS)) else _MAX_HEADER_MS + 1
    if millis > _MAX_HEADER_MS:
        raise BadRequest(f"{name.decode()} must be at most {_MAX_HEADER_MS} ms")
    return millis / 1000


def effective_deadline(now: float, policy_s: float, header_s: float | None) -> RequestDeadline:
    """min(policy, header): a client may shorten its deadline, never extend it."""
    if header_s is not None and header_s < policy_s:
        return RequestDeadline(now + header_s, header_s, "header")
    return RequestDeadline(now + policy_s, policy_s, "policy")


def call_deadline(now: float, request_at: float, timeout_s: float | None) -> float:
    """A call's deadline: its own timeout, never past the request's deadline."""
    if timeout_s is None:
        return request_at
    return min(request_at, now + timeout_s)


def propagated_budget_ms(now: float, deadline_at: float, margin_s: float) -> int:
    """Budget to announce upstream, in whole ms, after the safety margin (floor, ≥ 0)."""
    if math.isinf(deadline_at):
        return _MAX_HEADER_MS
    return max(0, math.floor((deadline_at - now - margin_s) * 1000))
