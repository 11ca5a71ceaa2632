"""Retry arithmetic without I/O: backoff delays, the per-upstream retry budget, and the
rules that say whether a failed try may be tried again.

The call path asks, in order: is this outcome retryable at all (:func:`is_retryable`),
is there time left for a delay plus one more try (:func:`may_retry_within`), and does
the upstream's budget allow one more retry now (:meth:`RetryBudget.try_spend`). A "no"
from the budget is the trace cause ``retry_budget``.

Nothing here sleeps or reads a clock of its own: times come in as ``now`` (seconds on
the Trio clock), so tests drive them with plain numbers or a ``MockClock``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ._policy import IDEMPOTENT_METHODS, RetryPolicy

#: Outcomes of a try that are not an HTTP status.
TRANSPORT_OUTCOMES = frozenset({"connect", "reset", "timeout"})

#: Float slack in the budget's comparison, so that e.g. 10% of 30 first tries grants 3
#: retries although ``0.1 * 30 == 3.0000000000000004``. Far below one retry.
_BUDGET_EPSILON = 1e-9


def backoff_delay(attempt: int, low_s: float, high_s: float, rng: random.Random) -> float:
    """Delay before retry number ``attempt`` (1 = the first retry), in seconds.

    Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff
    and Jitter")::

        cap   = min(high_s, low_s * 2 ** (attempt - 1))
        delay = uniform(0, cap)                      # clamped to [0, high_s]

    Full jitter spreads retries of many clients that failed together over the whole
    interval, so they do not hit a recovering upstream in waves. The cap grows as
    ``low_s, 2·low_s, 4·low_s, …`` until it reaches ``high_s``.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more (1 = first retry), got {attempt}")
    if low_s < 0 or high_s < 0:
        raise ValueError(f"backoff bounds must be non-negative, got {low_s}..{high_s}")
    try:
        grown = math.ldexp(low_s, attempt - 1)
    except OverflowError:
        grown = math.inf
    cap = min(high_s, grown)
    return min(high_s, max(0.0, rng.uniform(0.0, cap)))


@dataclass(frozen=True)
class RetryBudgetStatistics:
    """What a :class:`RetryBudget` counts at one instant (see its docstring for "window")."""

    requests: int
    retries: int
    allowed_now: int
    denied_total: int


class RetryBudget:
    """Per upstream: retries may add at most ``ratio`` on top of first attempts over a
    sliding window, plus a floor of ``min_per_second`` retries per second (Envoy's
    ``retry_budget``, Linkerd's ``retryRatio``/``minRetriesPerSecond``).

    Without a budget, retries multiply load exactly when an upstream is failing: with
    three attempts a struggling upstream sees three times the traffic. The budget caps
    retries (and hedges) at a fraction of the first attempts, and the floor keeps
    retries possible for an upstream with little traffic.

    **Buckets.** Time is cut into buckets of ``b = window_s / buckets`` seconds; bucket
    ``k`` holds the events with ``floor(now / b) == k``. A decision at ``t`` (in bucket
    ``c``) reads buckets ``c - buckets .. c``: all of the last ``window_s`` seconds and
    at most one bucket more, since the oldest of those buckets may have begun up to
    ``b`` before ``t - window_s``. Memory is ``buckets + 1`` pairs of counters,
    whatever the traffic.

    **Rule.** A retry is granted at ``t`` iff, with ``R`` and ``Q`` the first attempts
    and retries counted in those buckets, ``Q + 1 <= ratio * R + min_per_second *
    window_s``.

    **Bound.** Write ``F = min_per_second * window_s``. For every granted retry at time
    ``t``::

        retries granted in [t - window_s, t]
            <= ratio * first attempts recorded in (t - window_s - b, t] + F

    and, the other way round, a retry refused at ``t`` means::

        retries granted in (t - window_s - b, t] + 1
            > ratio * first attempts recorded in [t - window_s, t] + F

    The granularity ``b`` is the only slack: first attempts up to ``b`` older than the
    window still give credit, and a spent retry gives its room back between
    ``window_s`` and ``window_s + b`` later. Smaller buckets shrink the slack and cost
    memory. No "+1" is needed: the rule never grants past the allowance.

    Why not "in *any* window of length ``window_s``, retries <= ratio * first attempts
    in that same window + F"? No budget that spends earlier credit can promise that:
    100 first attempts at ``t = 0`` make 20 retries at ``t = 9.9`` legitimate, and the
    window ``[9.5, 19.5]`` then holds 20 retries and no first attempt. What follows from
    the bound above is that any window ``[s, s + window_s]`` holds at most
    ``ratio * (first attempts in (s - window_s - b, s + window_s]) + F`` retries.

    Times must not go backwards; a smaller ``now`` than seen before counts as the
    latest time seen (the Trio clock is monotonic, so this only guards misuse).
    """

    def __init__(self, ratio: float, min_per_second: float, window_s: float = 10.0,
                 *, buckets: int = 10) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        if buckets < 1:
            raise ValueError(f"buckets must be 1 or more, got {buckets}")
        self.reconfigure(ratio, min_per_second)
        self.window_s = window_s
        self.bucket_s = window_s / buckets
        size = buckets + 1
        self._requests = [0] * size
        self._retries = [0] * size
        self._current = 0  # index of the newest bucket; slot = index % size
        self._requests_sum = 0
        self._retries_sum = 0
        self.denied_total = 0

    def reconfigure(self, ratio: float, min_per_second: float) -> None:
        """New ratio and floor, applied from the next decision; counts are kept."""
        if ratio < 0:
            raise ValueError(f"ratio must be non-negative, got {ratio}")
        if min_per_second < 0:
            raise ValueError(f"min_per_second must be non-negative, got {min_per_second}")
        self.ratio = ratio
        self.min_per_second = min_per_second

    def record_request(self, now: float) -> None:
        """A first attempt was sent: it earns ``ratio`` retries for the window."""
        slot = self._advance(now)
        self._requests[slot] += 1
        self._requests_sum += 1

    def try_spend(self, now: float) -> bool:
        """May a retry (or hedge) be sent now? If yes, it is counted against the budget."""
        slot = self._advance(now)
        if self._retries_sum + 1 > self._allowance() + _BUDGET_EPSILON:
            self.denied_total += 1
            return False
        self._retries[slot] += 1
        self._retries_sum += 1
        return True

    def statistics(self, now: float) -> RetryBudgetStatistics:
        self._advance(now)
        room = math.floor(self._allowance() - self._retries_sum + _BUDGET_EPSILON)
        return RetryBudgetStatistics(
            requests=self._requests_sum,
            retries=self._retries_sum,
            allowed_now=max(0, room),
            denied_total=self.denied_total,
        )

    def __repr__(self) -> str:
        return (f"<RetryBudget [{self.ratio:.0%} + {self.min_per_second:g}/s over "
                f"{self.window_s:g}s | {self._retries_sum} retries / "
                f"{self._requests_sum} requests, {self.denied_total} denied]>")

    def _allowance(self) -> float:
        return self.ratio * self._requests_sum + self.min_per_second * self.window_s

    def _advance(self, now: float) -> int:
        """Expire buckets that left the window; return the slot of the current bucket."""
        size = len(self._requests)
        index = math.floor(now / self.bucket_s)
        if index > self._current:
            if index - self._current >= size:
                self._requests = [0] * size
                self._retries = [0] * size
                self._requests_sum = self._retries_sum = 0
            else:
                for stale in range(self._current + 1, index + 1):
                    slot = stale % size
                    self._requests_sum -= self._requests[slot]
                    self._retries_sum -= self._retries[slot]
                    self._requests[slot] = self._retries[slot] = 0
            self._current = index
        return self._current % size


def is_retryable(*, method: str, outcome: str | int, policy: RetryPolicy,
                 body_replayable: bool, body_unread: bool = False,
                 undone: bool = False) -> bool:
    """May a try that ended in ``outcome`` be tried again, policy and method allowing?

    ``outcome`` is ``"connect"``, ``"reset"``, ``"timeout"`` or an HTTP status; it must
    be listed in ``policy.on``. Only idempotent methods are retried, unless
    ``policy.non_idempotent``: a POST that reached the upstream may have taken effect.
    The exceptions are a ``connect`` failure, where no byte of the request left the
    gateway (nginx's ``proxy_next_upstream`` makes the same distinction; for SQL, the
    statement was not sent, while a session the database ended once it was is a
    ``reset``), and a try the upstream says it ``undone`` (a SQL transaction the
    database rolled back for a serialization failure or a deadlock, whose answer says
    nothing was committed): sending either again cannot repeat an effect. A body that
    streams from the client cannot be sent twice, so it is not retried, but after a
    ``connect`` failure while none of it was read yet (``body_unread``): it then goes
    whole to the next try, as Envoy retries a connect failure. Attempt counts and time
    are checked elsewhere.
    """
    if isinstance(outcome, bool) or outcome not in policy.on:
        return False
    if outcome == "connect":
        return body_replayable or body_unread
    if not body_replayable:
        return False
    if undone:
        return True
    return policy.non_idempotent or method.upper() in IDEMPOTENT_METHODS


def may_retry_within(remaining_s: float, per_try_timeout_s: float | None, delay_s: float,
                     min_call_budget_s: float) -> bool:
    """Is there time left for the backoff delay plus one more try?

    One more try needs ``per_try_timeout_s`` when the policy sets one; otherwise no try
    is worth starting with less than ``min_call_budget_s`` left. A retry that cannot
    finish before the deadline only adds load to the upstream and delays the 504.
    """
    try_s = per_try_timeout_s if per_try_timeout_s is not None else min_call_budget_s
    return remaining_s > 0 and remaining_s >= delay_s + try_s
