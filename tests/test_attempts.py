"""run_attempts under virtual time: hedges, retries, per-try timeouts, the breaker.

The call scope, limiter, retry budget and breaker are the real ones; only the upstream
exchange is a scripted ``perform`` that sleeps on the mock clock, then answers or fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container
from types import SimpleNamespace
from typing import Any

import pytest
import trio

import gateway._attempts
from gateway._attempts import AttemptResult, Claim, run_attempts
from gateway._breaker import BreakerState, CircuitBreaker
from gateway._calls import upstream_call
from gateway._deadlines import RequestDeadline
from gateway._errors import (
    CircuitOpen,
    GatewayError,
    NoRow,
    TransactionRolledBack,
    UpstreamConnectError,
    UpstreamResetError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from gateway._limits import UpstreamLimiter
from gateway._policy import CallSettings, CircuitPolicy, ServerPolicy, UpstreamPolicy
from gateway._retries import RetryBudget
from gateway._runtime import UpstreamState
from gateway._trace import Span, Trace, TracedScope, traced_scope

MS = 0.001


# --------------------------------------------------------------------------- stand-ins


class FakeContext:
    """The parts of a request that run_attempts and upstream_call read."""

    def __init__(self, deadline_s: float = 2.0, *, source: str = "policy",
                 **server: Any) -> None:
        now = trio.current_time()
        self.trace = Trace("req-1", "GET", "/orders", "/orders")
        self.policy = SimpleNamespace(server=ServerPolicy.model_validate(server))
        self.deadline = RequestDeadline(now + deadline_s, deadline_s, source)  # type: ignore[arg-type]
        self.request_id = "req-1"


def connect_error() -> GatewayError:
    return UpstreamConnectError("connection refused", upstream="orders")


def reset_error() -> GatewayError:
    return UpstreamResetError("connection reset", upstream="orders")


Outcome = int | Callable[[], GatewayError]


class Upstream:
    """Attempt N sleeps ``script[N][0]`` virtual seconds, then answers ``script[N][1]``:
    a status (raised as UpstreamStatusError when the attempt was told to treat it as a
    retryable failure, as the proxy does) or an error factory."""

    def __init__(self, *script: tuple[float, Outcome]) -> None:
        self.script = script
        self.t0 = trio.current_time()
        self.starts: list[float] = []
        self.ends: list[float] = []
        #: Per attempt: was its status answer discarded for a retry (asked as it arrived)?
        self.discarded: list[bool] = []

    async def perform(self, attempt: TracedScope, claim: Claim,
                      retry_statuses: Container[int]) -> AttemptResult[Any]:
        index = len(self.starts)
        self.starts.append(trio.current_time() - self.t0)
        delay, outcome = self.script[min(index, len(self.script) - 1)]
        await trio.sleep(delay)
        self.ends.append(trio.current_time() - self.t0)
        if not isinstance(outcome, int):
            raise outcome()
        self.discarded.append(outcome in retry_statuses)
        if self.discarded[-1]:
            raise UpstreamStatusError(f"upstream 'orders' answered {outcome}",
                                      upstream_status=outcome, upstream="orders")
        return AttemptResult({"attempt": index + 1}, outcome)


class Pinned(random.Random):
    """Jitter pinned to a share of the interval (0: no wait, 1: the full cap)."""

    def __init__(self, share: float) -> None:
        super().__init__(0)
        self.share = share

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.share


def make_state(*, budget: RetryBudget | None = None,
               circuit: dict[str, Any] | None = None, concurrency: int = 10) -> UpstreamState:
    return UpstreamState(
        "orders", UpstreamPolicy(url="http://orders.invalid"),
        UpstreamLimiter("orders", concurrency=concurrency, queue=10, queue_timeout_s=0.05),
        retry_budget=budget if budget is not None else RetryBudget(0.2, 10.0),
        breaker=None if circuit is None else CircuitBreaker(
            "orders", CircuitPolicy.model_validate(circuit)))


def settings(**fields: Any) -> CallSettings:
    return CallSettings.model_validate(fields)


async def call(ctx: FakeContext, state: UpstreamState, call_settings: CallSettings,
               upstream: Upstream, *, method: str = "GET", timeout_s: float | None = None,
               first_number: int = 1) -> Any:
    """One call as the gateway makes it: request scope → call scope → attempts."""
    with traced_scope(ctx.trace, None, "request", "/orders",
                      deadline=ctx.deadline.at) as request:
        async with upstream_call(ctx, request, "orders", state, timeout_s) as scope:
            return await run_attempts(ctx, scope, state, call_settings, name="orders",
                                      method=method, replayable=True,
                                      perform=upstream.perform, first_number=first_number)


def spans(ctx: FakeContext) -> dict[str, Span]:
    assert ctx.trace.root is not None
    return {span.label: span for span in ctx.trace.root.walk()}


def attempt_spans(ctx: FakeContext) -> list[Span]:
    return [span for span in spans(ctx).values() if span.kind == "attempt"]


def where(span: Span) -> tuple[str, str | None, str | None]:
    return span.outcome, span.cause, span.fired_scope


# --------------------------------------------------------------------------- hedges


async def test_hedge_starts_at_hedge_after_and_the_first_answer_wins(autojump_clock):
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((1.0, 200), (10 * MS, 200))
    start = trio.current_time()

    value = await call(ctx, state, settings(hedge_after="80ms"), upstream)

    assert trio.current_time() - start == pytest.approx(0.090)
    assert value == {"attempt": 2}
    assert upstream.starts == pytest.approx([0.0, 0.080])
    assert upstream.ends == pytest.approx([0.090])  # the first attempt never finished
    found = spans(ctx)
    first, hedge = found["attempt orders#1"], found["attempt orders#2"]
    assert where(first) == ("cancelled", "hedge_lost", "attempt orders#1")
    assert first.attrs["cancelled_by"] == "orders#2"
    assert first.end_ms == pytest.approx(90)
    assert hedge.outcome == "ok" and hedge.attrs["status"] == 200
    assert (hedge.start_ms, hedge.end_ms) == (pytest.approx(80), pytest.approx(90))
    assert found["call orders"].outcome == "ok"
    assert state.retry_budget.statistics(trio.current_time()).retries == 1
    assert state.limiter.statistics().in_flight == 0


async def test_each_further_hedge_waits_hedge_after_again(autojump_clock):
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((1.0, 200))
    start = trio.current_time()

    value = await call(ctx, state, settings(hedge_after="80ms", max_hedges=2), upstream)

    assert upstream.starts == pytest.approx([0.0, 0.080, 0.160])
    assert trio.current_time() - start == pytest.approx(1.0)
    assert value == {"attempt": 1}
    found = spans(ctx)
    assert found["attempt orders#1"].outcome == "ok"
    for loser in ("attempt orders#2", "attempt orders#3"):
        assert where(found[loser]) == ("cancelled", "hedge_lost", loser)
        assert found[loser].attrs["cancelled_by"] == "orders#1"
        assert found[loser].end_ms == pytest.approx(1000)
    assert "attempt orders#4" not in found
    assert state.retry_budget.statistics(trio.current_time()).retries == 2


async def test_a_hedge_the_budget_refuses_is_a_retry_budget_span(autojump_clock):
    ctx, state = FakeContext(), make_state(budget=RetryBudget(0.0, 0.0))
    upstream = Upstream((1.0, 200))
    start = trio.current_time()

    value = await call(ctx, state, settings(hedge_after="80ms", max_hedges=2), upstream)

    assert value == {"attempt": 1}
    assert trio.current_time() - start == pytest.approx(1.0)
    assert upstream.starts == [0.0]  # refused hedges are never sent
    found = spans(ctx)
    refused = found["attempt orders#2"]
    assert where(refused) == ("cancelled", "retry_budget", "attempt orders#2")
    assert refused.attrs["attempt"] == 2
    assert refused.start_ms == pytest.approx(80)
    # Once refused, no further hedge is tried for this call.
    assert [s.cause for s in attempt_spans(ctx)] == [None, "retry_budget"]
    assert state.retry_budget.denied_total == 1


async def test_a_failed_first_attempt_leaves_the_hedge_running(autojump_clock):
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((100 * MS, reset_error), (50 * MS, 200))
    start = trio.current_time()

    value = await call(ctx, state, settings(hedge_after="80ms"), upstream)

    assert value == {"attempt": 2}
    assert trio.current_time() - start == pytest.approx(0.130)
    found = spans(ctx)
    assert found["attempt orders#1"].outcome == "error"
    assert found["attempt orders#2"].outcome == "ok"


class Streaming:
    """An upstream whose answer arrives after ``head_s`` and whose body then takes
    ``body_s`` to stream, claiming the answer at its head as the proxy does; with
    ``reset`` the body ends in a reset instead."""

    def __init__(self, head_s: float, body_s: float, *, reset: bool = False) -> None:
        self.head_s, self.body_s, self.reset = head_s, body_s, reset
        self.t0 = trio.current_time()
        self.starts: list[float] = []

    async def perform(self, attempt: TracedScope, claim: Claim,
                      retry_statuses: Container[int]) -> AttemptResult[Any]:
        self.starts.append(trio.current_time() - self.t0)
        await trio.sleep(self.head_s)
        if not claim.claim(attempt):
            return AttemptResult(None, 200)
        await trio.sleep(self.body_s)
        if self.reset:
            raise reset_error()
        return AttemptResult("body", 200)


async def test_no_hedge_once_an_attempt_is_sending_its_answer(autojump_clock):
    ctx, state = FakeContext(), make_state()
    upstream = Streaming(10 * MS, 500 * MS)  # head at 10 ms, body until 510 ms

    value = await call(ctx, state, settings(hedge_after="50ms"), upstream)  # type: ignore[arg-type]

    assert value == "body"
    assert upstream.starts == [0.0]  # no second request behind an answer under way
    assert [where(s) for s in attempt_spans(ctx)] == [("ok", None, None)]
    assert state.retry_budget.statistics(trio.current_time()).retries == 0


async def test_a_winner_failing_mid_body_ends_the_call_at_once(autojump_clock):
    ctx, state = FakeContext(deadline_s=2.0), make_state()
    # The first attempt is slow; the hedge answers at 90 ms, claims, then resets at 100.
    slow, hedge = Upstream((1.0, 200)), Streaming(10 * MS, 10 * MS, reset=True)

    async def perform(attempt: TracedScope, claim: Claim,
                      retry_statuses: Container[int]) -> AttemptResult[Any]:
        chosen = slow if attempt.span.name == "orders#1" else hedge
        return await chosen.perform(attempt, claim, retry_statuses)

    start = trio.current_time()
    with pytest.raises(UpstreamResetError):
        await call(ctx, state, settings(hedge_after="80ms"), SimpleNamespace(perform=perform))  # type: ignore[arg-type]

    assert trio.current_time() - start == pytest.approx(0.100)  # not at the 2 s deadline
    found = spans(ctx)
    assert where(found["attempt orders#1"]) == ("cancelled", "hedge_lost", "attempt orders#1")
    assert found["attempt orders#2"].outcome == "error"
    assert state.limiter.statistics().in_flight == 0


async def test_no_retry_once_the_answer_has_started(autojump_clock):
    ctx, state = FakeContext(deadline_s=2.0), make_state()
    upstream = Streaming(10 * MS, 10 * MS, reset=True)  # resets mid-body at 20 ms
    start = trio.current_time()

    with pytest.raises(UpstreamResetError):
        await call(ctx, state, settings(retries={"attempts": 3}), upstream)  # type: ignore[arg-type]

    assert trio.current_time() - start == pytest.approx(0.020)
    assert upstream.starts == [0.0]  # a reset after the head is not retried
    assert [s.outcome for s in attempt_spans(ctx)] == ["error"]
    assert state.retry_budget.statistics(trio.current_time()).retries == 0


# --------------------------------------------------------------------------- retries


async def test_503_twice_then_200_is_retried_with_full_jitter(autojump_clock):
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((5 * MS, 503), (5 * MS, 503), (5 * MS, 200))
    policy = settings(retries={"attempts": 3, "backoff": "20ms..20ms"})

    value = await call(ctx, state, policy, upstream)

    assert value == {"attempt": 3}
    assert len(upstream.starts) == 3
    gaps = [upstream.starts[i + 1] - upstream.ends[i] for i in range(2)]
    assert all(0.0 <= gap <= 0.020 + 1e-9 for gap in gaps), gaps
    assert upstream.discarded == [True, True, False]
    assert [s.outcome for s in attempt_spans(ctx)] == ["error", "error", "ok"]
    assert [s.attrs["attempt"] for s in attempt_spans(ctx)] == [1, 2, 3]
    assert state.retry_budget.statistics(trio.current_time()).retries == 2


@pytest.mark.parametrize(
    ("share", "gaps"),
    [(1.0, [0.020, 0.040, 0.050]),  # the cap doubles from the low end, clamped high
     (0.5, [0.010, 0.020, 0.025]),
     (0.0, [0.0, 0.0, 0.0])],
)
async def test_backoff_is_jittered_under_a_doubling_cap(autojump_clock, monkeypatch, share,
                                                        gaps):
    monkeypatch.setattr(gateway._attempts, "_rng", Pinned(share))
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((5 * MS, 503), (5 * MS, 503), (5 * MS, 503), (5 * MS, 200))
    policy = settings(retries={"attempts": 4, "backoff": "20ms..50ms"})

    assert await call(ctx, state, policy, upstream) == {"attempt": 4}
    assert [upstream.starts[i + 1] - upstream.ends[i] for i in range(3)] == \
        pytest.approx(gaps, abs=1e-9)


async def test_a_last_try_status_is_the_answer(autojump_clock, monkeypatch):
    monkeypatch.setattr(gateway._attempts, "_rng", Pinned(0.0))
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((5 * MS, 503))
    policy = settings(retries={"attempts": 2, "backoff": "20ms..20ms"})

    assert await call(ctx, state, policy, upstream) == {"attempt": 2}
    assert len(upstream.starts) == 2
    assert attempt_spans(ctx)[-1].attrs["status"] == 503


async def test_post_is_neither_retried_nor_hedged(autojump_clock):
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((200 * MS, reset_error), (5 * MS, 200))
    policy = settings(retries={"attempts": 3, "backoff": "20ms..20ms"}, hedge_after="80ms")
    start = trio.current_time()

    with pytest.raises(UpstreamResetError):
        await call(ctx, state, policy, upstream, method="POST")

    assert upstream.starts == [0.0]
    assert trio.current_time() - start == pytest.approx(0.200)
    assert [s.name for s in attempt_spans(ctx)] == ["orders#1"]


async def test_post_5xx_is_passed_through_not_retried(autojump_clock):
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((5 * MS, 503), (5 * MS, 200))
    policy = settings(retries={"attempts": 3, "backoff": "20ms..20ms"})

    assert await call(ctx, state, policy, upstream, method="POST") == {"attempt": 1}
    assert upstream.discarded == [False]


async def test_post_is_retried_when_the_policy_opts_in(autojump_clock):
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((5 * MS, 503), (5 * MS, 200))
    policy = settings(retries={"attempts": 3, "backoff": "20ms..20ms", "non_idempotent": True})

    assert await call(ctx, state, policy, upstream, method="POST") == {"attempt": 2}
    assert len(upstream.starts) == 2


async def test_post_connect_failure_is_retried(autojump_clock):
    # Nothing of a request whose connection failed reached the upstream, so sending it
    # again cannot repeat an effect (see ``is_retryable``).
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((5 * MS, connect_error), (5 * MS, 200))
    policy = settings(retries={"attempts": 3, "backoff": "20ms..20ms"})

    assert await call(ctx, state, policy, upstream, method="POST") == {"attempt": 2}
    assert len(upstream.starts) == 2


def rolled_back() -> GatewayError:
    return TransactionRolledBack("DeadlockDetectedError (SQLSTATE 40P01)", upstream="orders")


async def test_post_the_database_rolled_back_is_retried(autojump_clock):
    # A SQL write whose transaction the database rolled back for a deadlock or a
    # serialization failure committed nothing: it may run again, as PostgreSQL advises.
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((5 * MS, rolled_back), (5 * MS, rolled_back), (5 * MS, 200))
    policy = settings(retries={"attempts": 3, "backoff": "20ms..20ms"})

    assert await call(ctx, state, policy, upstream, method="POST") == {"attempt": 3}
    assert len(upstream.starts) == 3


async def test_post_rolled_back_is_retried_only_when_on_lists_reset(autojump_clock):
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((5 * MS, rolled_back), (5 * MS, 200))
    policy = settings(retries={"attempts": 3, "on": ["connect", 503]})

    with pytest.raises(TransactionRolledBack):
        await call(ctx, state, policy, upstream, method="POST")
    assert len(upstream.starts) == 1


async def test_post_reset_is_not_retried(autojump_clock):
    # A connection lost mid-write (a COMMIT unanswered included) may have committed.
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((5 * MS, reset_error), (5 * MS, 200))
    policy = settings(retries={"attempts": 3, "backoff": "20ms..20ms"})

    with pytest.raises(UpstreamResetError):
        await call(ctx, state, policy, upstream, method="POST")
    assert len(upstream.starts) == 1


async def test_a_call_run_again_goes_on_from_its_tries(autojump_clock):
    # A SQL read refused as a write (try #1) runs again as a write from #2: no first
    # try earning the budget, and its tries in all stay within attempts.
    ctx, state = FakeContext(), make_state()
    upstream = Upstream(*[(5 * MS, rolled_back)] * 3)
    policy = settings(retries={"attempts": 3, "backoff": "20ms..20ms"})

    with pytest.raises(TransactionRolledBack):
        await call(ctx, state, policy, upstream, method="POST", first_number=2)
    assert len(upstream.starts) == 2
    assert {"attempt orders#2", "attempt orders#3"} <= set(spans(ctx))
    assert state.retry_budget.statistics(trio.current_time()).requests == 0

    once = make_state()
    await call(FakeContext(), once, settings(), Upstream((5 * MS, 200)), first_number=2)
    assert once.retry_budget.statistics(trio.current_time()).requests == 0


async def test_per_try_timeout_cuts_one_attempt_and_is_retried(autojump_clock, monkeypatch):
    monkeypatch.setattr(gateway._attempts, "_rng", Pinned(1.0))
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((1.0, 200), (10 * MS, 200))
    policy = settings(retries={"attempts": 2, "on": ["timeout"], "per_try_timeout": "50ms",
                               "backoff": "20ms..20ms"})
    start = trio.current_time()

    value = await call(ctx, state, policy, upstream)

    assert value == {"attempt": 2}
    assert upstream.starts == pytest.approx([0.0, 0.070])  # 50ms try + 20ms backoff
    assert trio.current_time() - start == pytest.approx(0.080)
    found = spans(ctx)
    first = found["attempt orders#1"]
    assert where(first) == ("cancelled", "deadline", "attempt orders#1")
    assert first.budget_ms == pytest.approx(50)
    assert first.end_ms == pytest.approx(50)
    assert found["attempt orders#2"].budget_ms == pytest.approx(50)
    assert found["call orders"].outcome == "ok"


async def test_per_try_timeout_is_not_retried_unless_listed(autojump_clock):
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((1.0, 200))
    policy = settings(retries={"attempts": 3, "per_try_timeout": "50ms"})
    start = trio.current_time()

    with pytest.raises(UpstreamTimeout) as info:
        await call(ctx, state, policy, upstream)

    assert info.value.detail["scope"] == "attempt orders#1"
    assert trio.current_time() - start == pytest.approx(0.050)
    assert len(upstream.starts) == 1
    assert where(spans(ctx)["attempt orders#1"]) == \
        ("cancelled", "deadline", "attempt orders#1")


@pytest.mark.parametrize(
    ("per_try", "fails_at", "sent"),
    [("60ms", 0.050, False),   # 50ms left < 20ms backoff + 60ms try
     ("60ms", 0.010, True),    # 90ms left >= 80ms
     (None, 0.090, False),     # 10ms left < 20ms backoff + 2ms floor
     (None, 0.050, True)],
)
async def test_a_retry_that_cannot_fit_the_call_deadline_is_not_sent(
        autojump_clock, monkeypatch, per_try, fails_at, sent):
    monkeypatch.setattr(gateway._attempts, "_rng", Pinned(1.0))
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((fails_at, 503), (5 * MS, 200))
    retries: dict[str, Any] = {"attempts": 3, "backoff": "20ms..20ms"}
    if per_try is not None:
        retries["per_try_timeout"] = per_try
    start = trio.current_time()

    if sent:
        assert await call(ctx, state, settings(retries=retries), upstream,
                          timeout_s=0.100) == {"attempt": 2}
        assert upstream.starts == pytest.approx([0.0, fails_at + 0.020])
    else:
        # No retry can follow: the 503 itself is the answer (its Retry-After with it),
        # at once, not at the deadline.
        assert await call(ctx, state, settings(retries=retries), upstream,
                          timeout_s=0.100) == {"attempt": 1}
        assert upstream.discarded == [False]
        assert trio.current_time() - start == pytest.approx(fails_at)
        assert [(s.name, s.attrs["status"]) for s in attempt_spans(ctx)] == \
            [("orders#1", 503)]


async def test_a_retry_the_budget_refuses_is_a_retry_budget_span(autojump_clock):
    ctx, state = FakeContext(), make_state(budget=RetryBudget(0.0, 0.0))
    upstream = Upstream((5 * MS, 503), (5 * MS, 200))

    # The retry refused, the 503 is the answer.
    assert await call(ctx, state, settings(retries={"attempts": 3}), upstream) == \
        {"attempt": 1}

    assert len(upstream.starts) == 1 and upstream.discarded == [False]
    refused = spans(ctx)["attempt orders#2"]
    assert where(refused) == ("cancelled", "retry_budget", "attempt orders#2")
    assert state.retry_budget.denied_total == 1


# --------------------------------------------------------------------------- breaker

CIRCUIT = {"consecutive_failures": 1, "open_for": "1s", "half_open_probes": 1}


async def test_open_breaker_refuses_without_sending_then_admits_a_probe(autojump_clock):
    state = make_state(circuit=CIRCUIT)
    breaker = state.breaker
    assert breaker is not None
    failing = Upstream((10 * MS, connect_error))
    start = trio.current_time()

    with pytest.raises(UpstreamConnectError):
        await call(FakeContext(), state, settings(), failing)
    assert breaker.state is BreakerState.OPEN
    opened_at = trio.current_time()

    ctx = FakeContext()
    with pytest.raises(CircuitOpen) as info:
        await call(ctx, state, settings(), failing)
    assert len(failing.starts) == 1  # the upstream was not called
    assert trio.current_time() == opened_at  # refused at once
    assert info.value.retry_after_s == pytest.approx(1.0)
    assert where(spans(ctx)["attempt orders#1"]) == \
        ("cancelled", "circuit_open", "attempt orders#1")

    await trio.sleep(0.5)
    with pytest.raises(CircuitOpen) as info:
        await call(FakeContext(), state, settings(), failing)
    assert info.value.retry_after_s == pytest.approx(0.5)

    await trio.sleep_until(opened_at + 1.0)
    healthy = Upstream((10 * MS, 200))
    ctx = FakeContext()
    assert await call(ctx, state, settings(), healthy) == {"attempt": 1}
    assert len(healthy.starts) == 1
    assert spans(ctx)["attempt orders#1"].outcome == "ok"
    assert breaker.state is BreakerState.CLOSED
    assert len(failing.starts) == 1
    assert trio.current_time() - start == pytest.approx(1.020)


async def test_a_failed_probe_opens_the_breaker_again(autojump_clock):
    state = make_state(circuit=CIRCUIT)
    breaker = state.breaker
    assert breaker is not None
    failing = Upstream((10 * MS, connect_error))
    with pytest.raises(UpstreamConnectError):
        await call(FakeContext(), state, settings(), failing)
    await trio.sleep(1.0)

    with pytest.raises(UpstreamConnectError):
        await call(FakeContext(), state, settings(), failing)
    assert len(failing.starts) == 2
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await call(FakeContext(), state, settings(), failing)
    assert len(failing.starts) == 2


async def test_a_5xx_answer_counts_as_a_breaker_failure(autojump_clock):
    state = make_state(circuit=CIRCUIT)
    upstream = Upstream((10 * MS, 502))

    assert await call(FakeContext(), state, settings(), upstream) == {"attempt": 1}
    assert state.breaker is not None and state.breaker.state is BreakerState.OPEN


async def test_a_retry_meeting_the_open_breaker_is_not_sent(autojump_clock, monkeypatch):
    monkeypatch.setattr(gateway._attempts, "_rng", Pinned(0.0))
    ctx, state = FakeContext(), make_state(circuit=CIRCUIT)
    upstream = Upstream((10 * MS, connect_error), (10 * MS, 200))

    with pytest.raises(CircuitOpen):
        await call(ctx, state, settings(retries={"attempts": 3}), upstream)

    assert len(upstream.starts) == 1
    found = spans(ctx)
    assert found["attempt orders#1"].outcome == "error"
    assert where(found["attempt orders#2"]) == \
        ("cancelled", "circuit_open", "attempt orders#2")
    assert "attempt orders#3" not in found


async def test_a_4xx_answer_is_a_healthy_upstream_to_the_breaker(autojump_clock):
    # A fan-out lookup of a missing user is a 404 raised as a status error: the
    # upstream answered, and must not be cut off for it.
    state = make_state(circuit=CIRCUIT)
    missing = Upstream((10 * MS, lambda: UpstreamStatusError(
        "upstream 'orders' answered 404", upstream_status=404, upstream="orders")))
    for _ in range(3):
        with pytest.raises(UpstreamStatusError):
            await call(FakeContext(), state, settings(), missing)
    assert state.breaker is not None and state.breaker.state is BreakerState.CLOSED
    assert await call(FakeContext(), state, settings(), Upstream((10 * MS, 200))) == \
        {"attempt": 1}


@pytest.mark.parametrize(("source", "opened"), [("header", False), ("policy", True)])
async def test_only_a_policy_deadline_counts_against_the_breaker(autojump_clock, source,
                                                                 opened):
    # A client may shorten its own deadline: its impatience says nothing about the
    # upstream, and must not open the circuit for every other client.
    state = make_state(circuit=CIRCUIT)
    with pytest.raises(UpstreamTimeout):
        await call(FakeContext(0.030, source=source), state, settings(),
                   Upstream((100 * MS, 200)))
    assert state.breaker is not None
    assert (state.breaker.state is BreakerState.OPEN) is opened


async def test_a_hedge_needs_the_floor_a_first_try_needs(autojump_clock):
    ctx = FakeContext(0.500, deadline_margin="50ms", min_call_budget="50ms")
    state = make_state()
    upstream = Upstream((2.0, 200))
    # At 420 ms the hedge would have 500 - 420 - 50 = 30 ms: below the 50 ms floor.
    with pytest.raises(UpstreamTimeout):
        await call(ctx, state, settings(hedge_after="420ms"), upstream)
    assert upstream.starts == [0.0]
    assert spans(ctx)["call orders"].attrs["hedge_not_sent"] == "no budget left for a try"
    assert state.retry_budget.statistics(trio.current_time()).retries == 0


async def test_a_retry_needs_the_floor_a_first_try_needs(autojump_clock, monkeypatch):
    monkeypatch.setattr(gateway._attempts, "_rng", Pinned(0.0))
    ctx = FakeContext(0.500, deadline_margin="50ms", min_call_budget="50ms")
    upstream = Upstream((420 * MS, 503), (5 * MS, 200))
    # 30 ms would be left after the margin: the 503 is the answer, not a retry.
    assert await call(ctx, make_state(), settings(retries={"attempts": 3}), upstream) == \
        {"attempt": 1}
    assert len(upstream.starts) == 1 and upstream.discarded == [False]


async def test_a_hedge_takes_a_slot_of_the_concurrency_limit_or_is_not_sent(autojump_clock):
    ctx, state = FakeContext(), make_state(concurrency=1)
    upstream = Upstream((1.0, 200))

    assert await call(ctx, state, settings(hedge_after="80ms"), upstream) == {"attempt": 1}

    assert upstream.starts == [0.0]  # the call holds the only slot
    assert spans(ctx)["call orders"].attrs["hedge_not_sent"] == \
        "the upstream's concurrency limit is reached"
    assert state.limiter.statistics().in_flight == 0

    ctx, state = FakeContext(), make_state(concurrency=2)
    upstream = Upstream((1.0, 200), (10 * MS, 200))
    assert await call(ctx, state, settings(hedge_after="80ms"), upstream) == {"attempt": 2}
    assert upstream.starts == pytest.approx([0.0, 0.080])
    assert state.limiter.statistics().in_flight == 0  # the hedge's slot is given back


async def test_a_hedges_retryable_503_does_not_beat_the_first_attempt_still_running(
        autojump_clock):
    # hedge_after 100ms; the first attempt answers 200 at 300 ms, the hedge answers 503
    # (listed in retries.on) at 110 ms while the first attempt is still running.
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((300 * MS, 200), (10 * MS, 503))
    value = await call(ctx, state, settings(
        hedge_after="100ms", retries={"attempts": 2, "on": [503]}), upstream)
    assert value == {"attempt": 1}, spans(ctx)


async def test_a_no_row_answer_is_a_healthy_upstream_to_a_half_open_breaker(autojump_clock):
    # A `one:` SQL query that finds no row raises NoRow (404) inside the attempt: the
    # database answered, as an HTTP upstream's 404 does (a success to the breaker).
    state = make_state(circuit={"consecutive_failures": 1, "open_for": "1s",
                                "half_open_probes": 1})
    breaker = state.breaker
    assert breaker is not None
    with pytest.raises(UpstreamConnectError):
        await call(FakeContext(), state, settings(), Upstream((10 * MS, lambda: (
            UpstreamConnectError("connection refused", upstream="orders")))))
    assert breaker.state is BreakerState.OPEN
    await trio.sleep(1.0)
    no_row = Upstream((10 * MS, lambda: NoRow("orders: no row found", call="orders")))
    for _ in range(5):
        with pytest.raises(NoRow):
            await call(FakeContext(), state, settings(), no_row)
    # Five answers from a database that is up again: the circuit closes.
    assert breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize(("failure", "opened"), [(rolled_back, False), (connect_error, True)])
async def test_a_rolled_back_transaction_is_an_answering_database_to_the_breaker(
        autojump_clock, failure, opened):
    # Serialization failures and deadlocks (40001, 40P01) come from a database that is
    # up and answering under lock contention: counted as failures, five of them opened
    # the circuit for every route on it. Five connect failures do.
    state = make_state(circuit={"consecutive_failures": 3, "open_for": "30s"})
    upstream = Upstream(*[(5 * MS, failure)] * 5)
    for _ in range(5):
        with pytest.raises(GatewayError) as info:
            await call(FakeContext(), state, settings(), upstream, method="POST")
        assert not isinstance(info.value, CircuitOpen) or opened
    assert state.breaker is not None
    assert (state.breaker.state is BreakerState.OPEN) is opened
    assert (len(upstream.starts) == 5) is not opened


async def test_a_hedge_claimed_before_it_starts_does_not_free_anothers_probe(autojump_clock):
    # The first try claims the answer (the proxy does at the response head) in the same
    # scheduler pass as the hedge timer fires; the hedge task then starts, sees the
    # winner and ends without asking the breaker, yet reports record_ignored, which frees
    # the probe its own call holds: that probe's success is then dropped.
    class ClaimingUpstream:
        def __init__(self) -> None:
            self.starts = 0

        async def perform(self, attempt, claim, retry_statuses):
            self.starts += 1
            if self.starts == 1:
                await trio.sleep(100 * MS)  # the head arrives as hedge_after passes
                claim.claim(attempt)
                await trio.sleep(50 * MS)  # the body
                return AttemptResult({"ok": 1}, 200)
            await trio.sleep(10)
            return AttemptResult({"ok": 2}, 200)

    failures = 0
    for _ in range(24):
        state = make_state(circuit={"consecutive_failures": 1, "open_for": "1s",
                                    "half_open_probes": 2})
        breaker = state.breaker
        assert breaker is not None
        with pytest.raises(UpstreamConnectError):
            await call(FakeContext(), state, settings(), Upstream((10 * MS, lambda: (
                UpstreamConnectError("connection refused", upstream="orders")))))
        await trio.sleep(1.0)
        assert breaker.state is BreakerState.HALF_OPEN
        # Two successful probes, one after the other: half_open_probes is met.
        await call(FakeContext(), state, settings(hedge_after="100ms"), ClaimingUpstream())
        await call(FakeContext(), state, settings(), Upstream((10 * MS, 200)))
        if breaker.state is not BreakerState.CLOSED:
            failures += 1
    assert failures == 0, f"{failures} of 24 runs left the breaker half-open"


async def test_two_503s_arriving_together_with_no_retry_left_pass_the_upstreams_answer_on(
        autojump_clock):
    """hedge_after 50 ms, attempts 2 (the hedge is the second): the first try and the
    hedge both answer 503 at 100 ms. No retry can follow, so one of those answers
    (its status, body and Retry-After) must be the client's.

    What a user sees: both 503s are discarded "for a retry" (each sees the other still
    running), and the client gets the gateway's own 503 error body without the
    upstream's ``Retry-After`` instead of the upstream's answer.
    """
    ctx, state = FakeContext(), make_state()
    upstream = Upstream((100 * MS, 503), (50 * MS, 503))
    value = await call(ctx, state, settings(
        hedge_after="50ms", retries={"attempts": 2, "on": [503]}), upstream)
    assert upstream.starts == [0.0, 0.05]
    assert value in ({"attempt": 1}, {"attempt": 2})


class ClaimsAsTheHedgeStarts(RetryBudget):
    """A budget that lets the first try's head arrive in the one window the coordinator
    cannot see: after it decided to hedge (and paid for it) and before the hedge's task
    ran its first step, as when the head arrives in the scheduler pass the hedge timer
    fires in."""

    def __init__(self, arrive: Callable[[], None]) -> None:
        super().__init__(1.0, 10.0)
        self.arrive = arrive

    def try_spend(self, now: float) -> bool:
        granted = super().try_spend(now)
        self.arrive()
        return granted


def counter(metric: Any, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


async def test_a_hedge_started_as_the_first_answer_is_claimed_is_never_sent(autojump_clock):
    from gateway._metrics import METRICS

    first: list[tuple[TracedScope, Claim]] = []
    head = trio.Event()
    sent: list[str] = []

    async def perform(attempt: TracedScope, claim: Claim,
                      retry_statuses: Container[int]) -> AttemptResult[Any]:
        sent.append(attempt.span.name)
        if attempt.span.name != "orders#1":
            await trio.sleep(10)  # a hedge that got this far would be upstream work
            return AttemptResult({"attempt": 2}, 200)
        first.append((attempt, claim))
        await head.wait()
        await trio.sleep(50 * MS)  # the body
        return AttemptResult({"attempt": 1}, 200)

    def arrive() -> None:  # the first try's head: it claims the answer
        attempt, claim = first[0]
        assert claim.claim(attempt)
        head.set()

    ctx = FakeContext()
    state = make_state(budget=ClaimsAsTheHedgeStarts(arrive),
                       circuit={"consecutive_failures": 1, "open_for": "1s"})
    hedges_sent = counter(METRICS.attempts, "orders", "hedge")
    races = {result: counter(METRICS.hedges, "orders", result)
             for result in ("hedge_won", "hedge_lost", "failed")}
    start = trio.current_time()

    value = await call(ctx, state, settings(hedge_after="100ms"),
                       SimpleNamespace(perform=perform))  # type: ignore[arg-type]

    assert value == {"attempt": 1}  # one answer, the first try's
    assert trio.current_time() - start == pytest.approx(0.150)
    assert sent == ["orders#1"]  # the hedge never reached the upstream
    found = spans(ctx)
    assert found["attempt orders#1"].outcome == "ok"
    hedge = found["attempt orders#2"]
    assert where(hedge) == ("cancelled", "hedge_lost", "attempt orders#2")
    assert hedge.attrs["cancelled_by"] == "orders#1"
    assert hedge.attrs["hedge_not_sent"] == "an answer was claimed as it started"
    assert hedge.start_ms == pytest.approx(100) and hedge.end_ms == pytest.approx(100)
    assert found["call orders"].outcome == "ok"
    # Paid once, when the hedge was decided; its slot given back; nothing runs on.
    assert state.retry_budget.statistics(trio.current_time()).retries == 1
    assert state.limiter.statistics().in_flight == 0
    assert state.breaker is not None and state.breaker.state is BreakerState.CLOSED
    # No hedge was sent: none is counted, nor a race a hedge lost.
    assert counter(METRICS.attempts, "orders", "hedge") == hedges_sent
    assert {result: counter(METRICS.hedges, "orders", result) for result in races} == races


async def test_per_try_timeout_bounds_a_try_until_its_answer_is_claimed(autojump_clock):
    # As Envoy's per_try_timeout: once the answer has started to reach the client, the
    # body streams within the call's deadline, not the try's.
    ctx, state = FakeContext(deadline_s=2.0), make_state()
    upstream = Streaming(10 * MS, 500 * MS)  # head at 10 ms, body until 510 ms
    policy = settings(retries={"attempts": 2, "on": ["timeout"], "per_try_timeout": "50ms"})
    start = trio.current_time()

    value = await call(ctx, state, policy, upstream)  # type: ignore[arg-type]

    assert value == "body"
    assert trio.current_time() - start == pytest.approx(0.510)
    assert upstream.starts == [0.0]
    assert [where(s) for s in attempt_spans(ctx)] == [("ok", None, None)]


async def test_per_try_timeout_bounds_a_single_try_too(autojump_clock):
    # One attempt, no hedge, no breaker: the try is still bounded as the policy says.
    ctx, state = FakeContext(deadline_s=2.0), make_state()
    start = trio.current_time()
    with pytest.raises(UpstreamTimeout) as info:
        await call(ctx, state, settings(retries={"attempts": 1, "per_try_timeout": "50ms"}),
                   Upstream((1.0, 200)))
    assert trio.current_time() - start == pytest.approx(0.050)
    assert info.value.detail["scope"] == "attempt orders#1"


class Streamed(Upstream):
    """A try whose body streams from the client: it reads the body (``reads``) before
    its outcome, as the pool reads it only on an open connection."""

    def __init__(self, *script: tuple[float, Outcome], reads: list[bool]) -> None:
        super().__init__(*script)
        self.reads = reads
        self.read = False

    async def perform(self, attempt: TracedScope, claim: Claim,
                      retry_statuses: Container[int]) -> AttemptResult[Any]:
        self.read = self.read or self.reads[len(self.starts)]
        return await super().perform(attempt, claim, retry_statuses)


@pytest.mark.parametrize(("reads", "outcome", "tries"), [
    ([False, False], connect_error, 2),  # nothing read: the body goes whole to try 2
    ([True, False], connect_error, 1),  # (a body read, then a connect failure)
    ([True, False], reset_error, 1),  # sent: a streamed body cannot go again
    ([False, False], reset_error, 1),
], ids=["connect, unread", "connect, read", "reset, read", "reset, unread"])
async def test_a_streamed_body_is_tried_again_only_after_a_connect_failure_unread(
        autojump_clock, reads, outcome, tries):
    ctx, state = FakeContext(), make_state()
    upstream = Streamed((10 * MS, outcome), (10 * MS, 200), reads=reads)
    policy = settings(retries={"attempts": 3, "on": ["connect", "reset"],
                               "backoff": "1ms..1ms"})

    async def post() -> Any:
        with traced_scope(ctx.trace, None, "request", "/orders",
                          deadline=ctx.deadline.at) as request:
            async with upstream_call(ctx, request, "orders", state, None) as scope:
                return await run_attempts(ctx, scope, state, policy, name="orders",
                                          method="POST", replayable=False,
                                          perform=upstream.perform,
                                          body_unread=lambda: not upstream.read)

    if tries == 2:
        assert await post() == {"attempt": 2}
    else:
        with pytest.raises(GatewayError):
            await post()
    assert len(upstream.starts) == tries


class Uploading:
    """A try whose body streams from the client: sent whole after ``upload_s``, then
    answered ``answer_s`` later (the proxy tells ``claim.sent`` as the pool does)."""

    def __init__(self, upload_s: float, answer_s: float) -> None:
        self.upload_s, self.answer_s = upload_s, answer_s

    async def perform(self, attempt: TracedScope, claim: Claim,
                      retry_statuses: Container[int]) -> AttemptResult[Any]:
        await trio.sleep(self.upload_s)
        claim.sent(attempt)
        await trio.sleep(self.answer_s)
        return AttemptResult("uploaded", 200)


@pytest.mark.parametrize("circuit", [None, {"consecutive_failures": 5, "open_for": "1s"}],
                         ids=["single try", "with a breaker"])
async def test_per_try_timeout_starts_once_a_streamed_body_is_sent(autojump_clock, circuit):
    # As Envoy's per-try timer, which starts once the downstream request is complete: a
    # client's upload is not cut by a timeout meant for the upstream's answer.
    policy = settings(retries={"attempts": 3, "per_try_timeout": "50ms"})

    async def upload(upstream: Uploading) -> Any:
        ctx, state = FakeContext(deadline_s=2.0), make_state(circuit=circuit)
        with traced_scope(ctx.trace, None, "request", "/orders",
                          deadline=ctx.deadline.at) as request:
            async with upstream_call(ctx, request, "orders", state, None) as scope:
                return await run_attempts(ctx, scope, state, policy,
                                          name="orders", method="PUT", replayable=False,
                                          perform=upstream.perform)

    start = trio.current_time()
    assert await upload(Uploading(upload_s=1.0, answer_s=40 * MS)) == "uploaded"
    assert trio.current_time() - start == pytest.approx(1.040)

    start = trio.current_time()
    with pytest.raises(UpstreamTimeout) as info:
        await upload(Uploading(upload_s=1.0, answer_s=1.0))
    assert trio.current_time() - start == pytest.approx(1.050)
    assert info.value.detail["scope"] == "attempt orders#1"
