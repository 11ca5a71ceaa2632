"""The circuit breaker of one upstream, as a plain state machine without I/O.

A failing upstream is refused quickly (503 + ``Retry-After``, cause ``circuit_open``)
instead of being hit by calls that wait for their timeouts and pile up in its queue;
after ``open_for`` a few probe calls test whether it recovered::

    CLOSED ──(failure ratio over the window, or N failures in a row)──► OPEN
    OPEN ──(open_for elapsed; noticed lazily)──► HALF_OPEN
    HALF_OPEN ──(all probes succeed)──► CLOSED
    HALF_OPEN ──(any probe fails)──► OPEN

Times come in as ``now`` (seconds on the Trio clock); only the ``state`` property reads
the clock itself, through ``clock`` (``trio.current_time`` unless given).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from ._policy import CircuitPolicy

#: Buckets of the sliding outcome window: outcomes age out in steps of window / 10.
_BUCKETS = 10
#: A zero window would make zero-width buckets; it is read as this (ratio rule inert).
_MIN_WINDOW_S = 0.001


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


TransitionCallback = Callable[[str, BreakerState, BreakerState], None]


@dataclass(frozen=True)
class BreakerStatistics:
    name: str
    state: BreakerState
    failures: int
    total: int
    window_s: float
    consecutive_failures: int
    opened_total: int
    probes_in_flight: int
    retry_after_s: float


class _OutcomeWindow:
    """Failures and outcomes over the last ``window_s``, in ``_BUCKETS`` buckets.

    A count at ``t`` reads the buckets ``c - _BUCKETS + 1 .. c`` (``c`` holding ``t``):
    outcomes never older than ``window_s``, and none younger than
    ``window_s - window_s / _BUCKETS`` left out.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = max(window_s, _MIN_WINDOW_S)
        self.bucket_s = self.window_s / _BUCKETS
        self._failures = [0] * _BUCKETS
        self._totals = [0] * _BUCKETS
        self._current = 0
        self.failures = 0
        self.total = 0

    def add(self, now: float, *, failed: bool) -> None:
        slot = self.advance(now)
        self._totals[slot] += 1
        self.total += 1
        if failed:
            self._failures[slot] += 1
            self.failures += 1

    def advance(self, now: float) -> int:
        index = math.floor(now / self.bucket_s)
        if index > self._current:
            if index - self._current >= _BUCKETS:
                self.clear()
            else:
                for stale in range(self._current + 1, index + 1):
                    slot = stale % _BUCKETS
                    self.failures -= self._failures[slot]
                    self.total -= self._totals[slot]
                    self._failures[slot] = self._totals[slot] = 0
            self._current = index
        return self._current % _BUCKETS

    def clear(self) -> None:
        self._failures = [0] * _BUCKETS
        self._totals = [0] * _BUCKETS
        self.failures = self.total = 0

    def resized(self, window_s: float) -> _OutcomeWindow:
        """A window of the new length holding the counts still inside it.

        Each old bucket moves to the new bucket holding its start time; buckets that
        fall outside the new window are dropped.
        """
        new = _OutcomeWindow(window_s)
        new._current = math.floor(self._current * self.bucket_s / new.bucket_s)
        for index in range(self._current - _BUCKETS + 1, self._current + 1):
            slot = index % _BUCKETS
            if not self._totals[slot]:
                continue
            target = max(math.floor(index * self.bucket_s / new.bucket_s), 0)
            if target <= new._current - _BUCKETS:
                continue
            new_slot = min(target, new._current) % _BUCKETS
            new._failures[new_slot] += self._failures[slot]
            new._totals[new_slot] += self._totals[slot]
            new.failures += self._failures[slot]
            new.total += self._totals[slot]
        return new


class CircuitBreaker:
    """closed → open on failure ratio over a sliding window with a minimum request count
    (or N consecutive failures); open for ``open_for``; then half-open admitting
    ``half_open_probes`` probe calls; all probes succeed → closed; any probe fails →
    open again.

    The caller asks :meth:`allow` before a call and reports exactly one outcome for
    every admitted call: :meth:`record_success`, :meth:`record_failure`, or
    :meth:`record_ignored` for calls that say nothing about the upstream's health
    (shed, cancelled by the client).

    Outcomes arriving while OPEN come from calls admitted before it opened and are
    not counted. While HALF_OPEN an outcome is taken as a probe's only if a probe is
    in flight; otherwise it is such a late outcome and is dropped too. (``allow``
    returns a bool, so a late outcome that arrives while probes are out cannot be told
    apart from a probe's; with call timeouts shorter than ``open_for`` this does not
    happen.)
    """

    def __init__(self, name: str, policy: CircuitPolicy, *,
                 on_transition: TransitionCallback | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.name = name
        self._policy = policy
        self._on_transition = on_transition
        self._clock = clock
        self._window = _OutcomeWindow(policy.window)
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._consecutive_failures = 0
        self._probes_in_flight = 0
        self._probes_succeeded = 0
        self.opened_total = 0

    @property
    def policy(self) -> CircuitPolicy:
        return self._policy

    def reconfigure(self, policy: CircuitPolicy) -> None:
        """Apply a reloaded policy; the state, its timer and the counts are kept.

        New thresholds take effect at the next outcome (an open breaker uses the new
        ``open_for`` from the time it opened; a half-open one whose probes already
        meet a lowered ``half_open_probes`` closes at once); a new window length keeps
        the counts that fall inside it.
        """
        if policy.window != self._policy.window:
            self._window = self._window.resized(policy.window)
        self._policy = policy
        if (self._state is BreakerState.HALF_OPEN and not self._probes_in_flight
                and self._probes_succeeded >= policy.half_open_probes):
            # Fewer probes are now enough and they have all succeeded: no outcome is
            # left to close it, and a half-open breaker would refuse every call.
            self._close()

    @property
    def state(self) -> BreakerState:
        """The state now; an OPEN breaker whose ``open_for`` has passed turns HALF_OPEN."""
        return self._state_at(self._clock())

    def allow(self, now: float) -> bool:
        """May a call go to the upstream now? A True while HALF_OPEN takes a probe slot."""
        state = self._state_at(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        if self._probes_in_flight + self._probes_succeeded >= self._policy.half_open_probes:
            return False
        self._probes_in_flight += 1
        return True

    def retry_after(self, now: float) -> float:
        """Seconds until the breaker may half-open (for ``Retry-After``); 0 unless OPEN."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        open_for = self._policy.open_for
        return max(0.0, min(open_for, self._opened_at + open_for - now))

    def record_success(self, now: float) -> None:
        state = self._state_at(now)
        if state is BreakerState.CLOSED:
            self._window.add(now, failed=False)
            self._consecutive_failures = 0
        elif state is BreakerState.HALF_OPEN and self._probes_in_flight:
            self._probes_in_flight -= 1
            self._probes_succeeded += 1
            if self._probes_succeeded >= self._policy.half_open_probes:
                self._close()

    def record_failure(self, now: float) -> None:
        state = self._state_at(now)
        if state is BreakerState.CLOSED:
            self._window.add(now, failed=True)
            self._consecutive_failures += 1
            if self._should_trip():
                self._open(now)
        elif state is BreakerState.HALF_OPEN and self._probes_in_flight:
            self._consecutive_failures += 1
            self._open(now)

    def failure_would_refuse(self, now: float) -> bool:
        """Would :meth:`allow` refuse the next call once a failure is recorded now (it
        opens the circuit, or the circuit is not closed)? Asked before retrying."""
        state = self._state_at(now)
        if state is not BreakerState.CLOSED:
            return True
        self._window.advance(now)
        return self._trips(self._consecutive_failures + 1, self._window.total + 1,
                           self._window.failures + 1)

    def record_ignored(self, now: float) -> None:
        """A call that says nothing about health ended: not counted; frees its probe slot."""
        if self._state_at(now) is BreakerState.HALF_OPEN and self._probes_in_flight:
            self._probes_in_flight -= 1

    def statistics(self, now: float) -> BreakerStatistics:
        state = self._state_at(now)
        self._window.advance(now)
        return BreakerStatistics(
            name=self.name,
            state=state,
            failures=self._window.failures,
            total=self._window.total,
            window_s=self._window.window_s,
            consecutive_failures=self._consecutive_failures,
            opened_total=self.opened_total,
            probes_in_flight=self._probes_in_flight,
            retry_after_s=self.retry_after(now),
        )

    def __repr__(self) -> str:
        # No clock read here: a repr must work anywhere, so counts are as of the last call.
        return (f"<CircuitBreaker {self.name} [{self._state.value}, "
                f"{self._window.failures}/{self._window.total} failed in "
                f"{self._window.window_s:g}s]>")

    # ------------------------------------------------------------------ transitions

    def _state_at(self, now: float) -> BreakerState:
        if (self._state is BreakerState.OPEN
                and now >= self._opened_at + self._policy.open_for):
            self._probes_in_flight = self._probes_succeeded = 0
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    def _should_trip(self) -> bool:
        return self._trips(self._consecutive_failures, self._window.total,
                           self._window.failures)

    def _trips(self, consecutive: int, total: int, failures: int) -> bool:
        policy = self._policy
        if policy.consecutive_failures is not None and consecutive >= policy.consecutive_failures:
            return True
        return total >= policy.min_requests and failures >= policy.failure_ratio * total

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._probes_in_flight = self._probes_succeeded = 0
        self.opened_total += 1
        self._transition(BreakerState.OPEN)

    def _close(self) -> None:
        # A fresh start: the failures that opened it must not trip it again at once.
        self._window.clear()
        self._consecutive_failures = 0
        self._probes_in_flight = self._probes_succeeded = 0
        self._transition(BreakerState.CLOSED)

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if self._on_transition is not None and old is not new:
            self._on_transition(self.name, old, new)
