"""Capacity limits: a per-upstream limiter with a bounded queue, and the door's gate.

Overload is refused early and cheaply. A call that finds every slot taken waits in a
queue of bounded length for at most ``queue_timeout``; past either bound it is shed
(503 + Retry-After, cause ``shed``). The limits can be resized in place when a reload
changes them, without dropping the calls that hold or wait for a slot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio

from ._adaptive import GradientLimit
from ._errors import CircuitOpen, Shed
from ._trace import only_cancelled


@dataclass(frozen=True)
class LimiterStatistics:
    concurrency: int
    in_flight: int
    queued: int
    queue_limit: int
    shed_total: int


class HeldSlot:
    """A slot being held: the holder marks when the upstream answered, so that the time
    it then spends relaying the answer (to a slow client, say) is not counted as the
    upstream's latency."""

    __slots__ = ("_back", "_give_back", "_kept", "_token", "answered_at", "unmeasured")

    def __init__(self) -> None:
        self.answered_at: float | None = None
        #: The time the slot was held says nothing of the upstream's latency: nothing
        #: was sent (too little time left once it was had, a connection refused), or the
        #: client's own shorter deadline cut the call.
        self.unmeasured = False
        self._kept = 0
        self._back: trio.Event | None = None
        self._give_back: Callable[[], None] | None = None
        #: The limiter's token, for a slot taken with :meth:`UpstreamLimiter.try_hold`.
        self._token: object | None = None

    def answered(self) -> None:
        if self.answered_at is None:
            self.answered_at = trio.current_time()

    def keep(self) -> Callable[[], None]:
        """Keep the slot taken, past the end of its block if need be, until the returned
        function is called (once; calling it again does nothing). For what a cancelled
        call leaves behind that still occupies the upstream (a PostgreSQL connection on
        its way back to its pool): the next caller waits in the limit's queue, or is
        shed, instead of waiting for it unseen behind the limit."""
        self._kept += 1
        if self._back is None:
            self._back = trio.Event()
        back = self._back
        done = False

        def returned() -> None:
            nonlocal done
            if done:
                return
            done = True
            self._kept -= 1
            if self._kept:
                return
            self._back = None
            back.set()
            give_back, self._give_back = self._give_back, None
            if give_back is not None:
                give_back()

        return returned

    async def returned(self) -> None:
        """Until what the slot keeps (:meth:`keep`) is back: a retry under the same slot
        does not take a second connection while the first is still out."""
        if self._back is not None:
            await self._back.wait()


class UpstreamLimiter:
    """``trio.CapacityLimiter`` plus a bounded, time-limited queue."""

    def __init__(self, name: str, *, concurrency: int, queue: int, queue_timeout_s: float,
                 retry_after_s: float = 1.0, adaptive: GradientLimit | None = None,
                 on_shed: Callable[[], None] | None = None) -> None:
        self.name = name
        #: Told of every call shed (the metrics count them).
        self.on_shed = on_shed
        #: When set, ``concurrency`` is the most slots, and the slots follow the latency.
        self.adaptive = adaptive
        self._limiter = trio.CapacityLimiter(concurrency if adaptive is None else adaptive.slots)
        self._queue_limit = queue
        self._queue_timeout_s = queue_timeout_s
        self._retry_after_s = retry_after_s
        self.shed_total = 0

    def resize(self, *, concurrency: int, queue: int, queue_timeout_s: float,
               retry_after_s: float | None = None,
               adaptive: tuple[int, float] | None = None) -> None:
        """Apply new limits in place; holders keep their slots, waiters keep waiting.
        ``adaptive``: (minimum, tolerance) when the slots follow the latency."""
        if adaptive is None:
            self.adaptive = None
        elif self.adaptive is None:
            self.adaptive = GradientLimit(maximum=concurrency, minimum=adaptive[0],
                                          tolerance=adaptive[1])
            self._limiter.total_tokens = self.adaptive.slots
        else:
            self.adaptive.resize(maximum=concurrency, minimum=adaptive[0],
                                 tolerance=adaptive[1])
        self._limiter.total_tokens = (concurrency if self.adaptive is None
                                      else self.adaptive.slots)
        self._queue_limit = queue
        self._queue_timeout_s = queue_timeout_s
        if retry_after_s is not None:
            self._retry_after_s = retry_after_s

    def slot(self, max_wait_s: float = math.inf) -> _Slot:
        """``async with limiter.slot(max_wait_s) as held``: hold one slot for the
        duration of the block, or raise :class:`Shed`.

        ``max_wait_s``: the most the caller can wait (its deadline, less what the call
        itself needs). A call that would wait longer than its deadline allows is shed
        (503, ``Retry-After``) when that time is spent, or at once if there is none,
        rather than queued to fail with a 504 later.
        """
        return _Slot(self, max_wait_s)

    async def _acquire(self, max_wait_s: float) -> object:
        """Take a slot (waiting in the queue if need be) and return its token."""
        token = object()
        try:
            self._limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            if max_wait_s <= 0:
                self._shed()
                raise Shed(f"upstream {self.name!r}: no free slot and no time left to wait "
                           "for one", retry_after_s=self._retry_after_s, upstream=self.name,
                           reason="deadline") from None
            if self.queued >= self._queue_limit:
                self._shed()
                raise Shed(f"upstream {self.name!r}: queue full ({self._queue_limit} waiting)",
                           retry_after_s=self._retry_after_s, upstream=self.name,
                           reason="queue_full") from None
            queue_timeout_s = self._queue_timeout_s  # as it was when the wait began
            wait_s = min(queue_timeout_s, max_wait_s)
            with trio.move_on_after(wait_s) as waited:
                await self._limiter.acquire_on_behalf_of(token)
            if waited.cancelled_caught:
                self._shed()
                raise Shed(f"upstream {self.name!r}: no slot within {wait_s * 1000:g}ms"
                           + ("" if wait_s == queue_timeout_s else
                              " (the time the call's deadline left to wait)"),
                           retry_after_s=self._retry_after_s, upstream=self.name,
                           reason="queue_timeout" if wait_s == queue_timeout_s
                           else "deadline") from None
        return token

    @property
    def queued(self) -> int:
        """Calls waiting for a slot: parked in the limiter, so that one a released slot
        was just handed to no longer counts before its task has even resumed (a call
        arriving then was refused as if the queue were full)."""
        return self._limiter.statistics().tasks_waiting

    def _shed(self) -> None:
        self.shed_total += 1
        if self.on_shed is not None:
            self.on_shed()

    def try_hold(self) -> HeldSlot | None:
        """A slot taken without waiting (a hedge's), or None when all are taken; give it
        back with :meth:`release`."""
        token = object()
        try:
            self._limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            return None
        held = HeldSlot()
        held._token = token
        return held

    def release(self, held: HeldSlot) -> None:
        """Give back a slot :meth:`try_hold` took, once what it keeps is back (a hedge's
        PostgreSQL connection still on its way back to its pool keeps it taken)."""
        token, held._token = held._token, None
        if token is None:
            return
        if held._kept:
            held._give_back = partial(self._limiter.release_on_behalf_of, token)
        else:
            self._limiter.release_on_behalf_of(token)

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(
            concurrency=int(self._limiter.total_tokens),
            in_flight=self._limiter.borrowed_tokens,
            queued=self.queued,
            queue_limit=self._queue_limit,
            shed_total=self.shed_total,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (f"<UpstreamLimiter {self.name} [{s.in_flight}/{s.concurrency} in flight, "
                f"{s.queued}/{s.queue_limit} queued, {s.shed_total} shed]>")


class _Slot:
    """The block of :meth:`UpstreamLimiter.slot`. A class, not a generator: one is
    entered on every proxied request."""

    __slots__ = ("_adaptive", "_held", "_in_flight", "_limiter", "_max_wait_s", "_started")

    def __init__(self, limiter: UpstreamLimiter, max_wait_s: float) -> None:
        self._limiter = limiter
        self._max_wait_s = max_wait_s
        self._held: HeldSlot | None = None
        self._adaptive: GradientLimit | None = None
        self._started = 0.0
        self._in_flight = 0

    async def __aenter__(self) -> HeldSlot:
        limiter = self._limiter
        token = await limiter._acquire(self._max_wait_s)
        held = self._held = HeldSlot()
        held._token = token
        adaptive = self._adaptive = limiter.adaptive
        if adaptive is not None:
            self._started = trio.current_time()
            self._in_flight = limiter._limiter.borrowed_tokens
        return held

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> bool:
        limiter, held, adaptive = self._limiter, self._held, self._adaptive
        assert held is not None
        limiter.release(held)  # or once what the slot keeps is back
        if adaptive is None:
            return False
        cancelled = only_cancelled(exc)  # a group of them, from a retrying call's nursery
        if cancelled is not None:
            # A deadline that fired shows the upstream took at least this long (the
            # very case the limit is for); a call cut for another reason (the client
            # left, a hedge won, a sibling failed) says nothing of its speed.
            measured = cancelled.source == "deadline"
        else:
            # An answer of any status, a timeout, a reset: all say how long. Refused
            # by the breaker: nothing was sent, no latency to learn.
            measured = not isinstance(exc, CircuitOpen)
        if measured and not held.unmeasured and limiter.adaptive is adaptive:
            now = trio.current_time()
            answered = held.answered_at if held.answered_at is not None else now
            slots = adaptive.sample(answered - self._started, self._started,
                                    self._in_flight, now)
            if slots != limiter._limiter.total_tokens:
                limiter._limiter.total_tokens = slots
        return False


class InflightGate:
    """The door: at most ``limit`` requests per worker; the rest are shed at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.shed_total = 0

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            self.shed_total += 1
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def __repr__(self) -> str:
        return f"<InflightGate [{self.in_flight}/{self.limit} in flight, {self.shed_total} shed]>"


class LoopLagMonitor:
    """Measures how late the event loop wakes a sleeping task: a direct read of overload.

    A worker whose loop runs behind answers every request late; shedding new requests
    at the door with a cheap 503 then keeps the ones it has within their deadlines
    (goodput) instead of letting all of them time out. The lag is a smoothed value
    (EWMA over recent samples) so that one slow tick does not flip the door.
    """

    #: Seconds between samples.
    INTERVAL_S = 0.01
    #: Weight of the newest sample in the moving average.
    ALPHA = 0.3

    def __init__(self) -> None:
        self.lag_s = 0.0

    def overloaded(self, threshold_s: float | None) -> bool:
        return threshold_s is not None and self.lag_s > threshold_s

    async def run(self) -> None:
        while True:
            expected = trio.current_time() + self.INTERVAL_S
            await trio.sleep(self.INTERVAL_S)
            lag = max(0.0, trio.current_time() - expected)
            self.lag_s += self.ALPHA * (lag - self.lag_s)
