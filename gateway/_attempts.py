"""The attempts of one call: circuit breaker, retries within a budget, hedges.

Every attempt runs in its own traced scope inside the call's nursery, so a losing
hedge or a call that ends early can never leave an attempt behind. The rules:

* the circuit breaker is asked before every attempt; refused → ``circuit_open``;
* a failed attempt is retried only when the outcome is listed in ``retries.on``, the
  method is idempotent (or the route opted in, or the upstream cannot have acted on
  it: a connect failure, a SQL transaction rolled back by the database for a
  serialization failure or a deadlock), the body can be sent again (a body streaming
  from the client only after a connect failure, none of it read), attempts
  are left, the retry budget allows it (else a span with cause ``retry_budget``), and
  the remaining deadline covers the backoff plus one more try;
* a retry or hedge is a new try sent upstream, so it must leave the budget a first try
  needs (``min_call_budget`` after ``deadline_margin``, or the per-try timeout);
* a status listed in ``retries.on`` is a failure only when a retry can follow it
  (attempts, time and budget left, a circuit this failure leaves closed; decided when
  the answer arrives, so two answers arriving together see each other); otherwise the
  upstream's answer, its ``Retry-After`` included, goes to the client;
* ``hedge_after`` starts another concurrent attempt when none has answered yet (at
  most ``max_hedges``, each paid from the retry budget and holding a slot of the
  upstream's concurrency limit of its own, or not sent); the first attempt to
  *claim* the answer wins and the others are cancelled with cause ``hedge_lost``;
* the circuit breaker counts what says something about the upstream: a 5xx, a failed
  exchange, a deadline set by policy. A 4xx answer is a healthy upstream (so is a SQL
  transaction the database rolled back for a serialization failure or a deadlock), and a
  request whose client-shortened deadline ran out says nothing (one impatient client
  must not open the circuit for everyone);
* once an attempt has claimed the answer (the proxy claims at the response head, before
  the first byte goes to the client), no hedge or retry follows it: if it then fails,
  the call fails with it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import trio

from ._errors import (
    BadRequest,
    CircuitOpen,
    Conflict,
    GatewayError,
    NoRow,
    Shed,
    StatementWrites,
    TransactionRolledBack,
    UpstreamCertificateError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamQueryError,
    UpstreamResetError,
    UpstreamResultRefused,
    UpstreamStatusError,
    UpstreamTimeout,
)
from ._metrics import METRICS
from ._policy import IDEMPOTENT_METHODS, CallSettings, RetryPolicy
from ._retries import backoff_delay, is_retryable, may_retry_within
from ._trace import TracedScope, traced_scope

if TYPE_CHECKING:
    from ._limits import HeldSlot
    from ._request import RequestContext
    from ._runtime import UpstreamState

T = TypeVar("T")
_rng = random.Random()


class RetryBudgetSpent(GatewayError):
    """A retry or hedge was not sent: the upstream's retry budget is spent."""

    status = 503
    cause = "retry_budget"


@dataclass(frozen=True)
class AttemptResult(Generic[T]):
    value: T
    status: int | None = None  # the upstream's status, when it answered HTTP


class Claim:
    """The first attempt to claim the answer wins; the others are cancelled.

    The winner's ``per_try_timeout`` is lifted as it claims: it bounds a try until its
    answer starts (the proxy claims at the response head), and the body then streams
    within the call's deadline, as Envoy ignores its per-try timeout once the response
    has started downstream. A download longer than a try is not cut mid-body.

    A try whose request body streams from the client as it goes (``per_try_after_sent``)
    starts its ``per_try_timeout`` only once that body is sent whole (:meth:`sent`), as
    Envoy starts its per-try timer once the downstream request is complete: a slow
    client's upload is bounded by the call's deadline, not cut by a timeout meant for
    the upstream's answer.
    """

    def __init__(self, per_try_after_sent: float | None = None) -> None:
        self.winner: TracedScope | None = None
        self.attempts: list[TracedScope] = []
        self.per_try_after_sent = per_try_after_sent
        #: The limiter slot each hedge holds of its own (the other tries run under the
        #: call's).
        self.hedge_slots: dict[TracedScope, HeldSlot] = {}

    def slot_of(self, attempt: TracedScope) -> HeldSlot | None:
        """The slot ``attempt`` holds of its own (a hedge's), or None: what its try
        leaves out (a PostgreSQL connection on its way back) keeps that one taken."""
        return self.hedge_slots.get(attempt)

    def sent(self, attempt: TracedScope) -> None:
        """``attempt``'s request is sent whole: its ``per_try_timeout`` starts now, unless
        its answer has already started (an upstream answering before the body's end)."""
        if self.per_try_after_sent is None or self.winner is not None:
            return
        scope = attempt.cancel_scope
        scope.deadline = min(scope.deadline, trio.current_time() + self.per_try_after_sent)

    def claim(self, attempt: TracedScope) -> bool:
        if self.winner is None:
            self.winner = attempt
            # The call's scope, which this attempt's is nested in, still bounds it.
            attempt.cancel_scope.deadline = math.inf
            for other in self.attempts:
                if other is not attempt:
                    other.cancel("hedge_lost", detail=attempt.span.name)
            return True
        return self.winner is attempt


#: perform(attempt scope, claim, statuses to treat as retryable failures): ``status in
#: retry_statuses`` is asked once the status has arrived, and may decide on a retry then.
Perform = Callable[[TracedScope, Claim, Container[int]], Awaitable[AttemptResult[T]]]


def outcome_of(error: GatewayError) -> str | int | None:
    """The retry condition an error matches (``connect``, ``reset``, ``timeout``, status)."""
    if isinstance(error, UpstreamCertificateError):
        return None  # the same handshake fails the same way again
    if isinstance(error, UpstreamConnectError):
        return "connect"
    if isinstance(error, UpstreamResetError):
        return "reset"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamStatusError):
        return error.upstream_status
    if isinstance(error, UpstreamQueryError):
        return None  # it would fail the same way again
    if isinstance(error, UpstreamError):  # a SQL rollback (40001, 40P01) included
        return "reset"
    return None


def _is_breaker_failure(error: GatewayError) -> bool:
    if isinstance(error, UpstreamStatusError):
        return error.upstream_status >= 500
    return isinstance(error, UpstreamError | UpstreamTimeout) and not isinstance(
        error, StatementWrites | UpstreamResultRefused | TransactionRolledBack)


class _DecidedOnArrival:
    """A ``Container`` whose ``status in`` it asks ``decide(status)`` when the answer
    arrives (the protocol attempts speak: a set of statuses)."""

    __slots__ = ("decide",)

    def __init__(self, decide: Callable[[int], bool]) -> None:
        self.decide = decide

    def __contains__(self, status: object) -> bool:
        return isinstance(status, int) and self.decide(status)


def _refused_retry(ctx: RequestContext, call: TracedScope, name: str, number: int,
                   upstream: str) -> None:
    """Record a retry (or hedge) the budget refused as its own cancelled span."""
    try:
        with traced_scope(ctx.trace, call, "attempt", f"{name}#{number}", attempt=number):
            raise RetryBudgetSpent(f"retry budget of upstream {upstream!r} is spent",
                                   upstream=upstream)
    except RetryBudgetSpent:
        pass


def _try_deadline(call: TracedScope, per_try: float | None, streamed: bool) -> float:
    """A try's deadline as it starts: its ``per_try_timeout`` from now, unless its body
    streams as it goes (the timeout then starts once the body is sent, see Claim)."""
    if per_try is None or streamed:
        return call.deadline
    return min(call.deadline, trio.current_time() + per_try)


async def _single_attempt(ctx: RequestContext, call: TracedScope, name: str,
                          perform: Perform[T], number: int, per_try: float | None,
                          streamed: bool) -> T:
    """The common case (no retry, hedge or breaker): one attempt in the caller's task,
    without the coordinator's nursery, task and channel."""
    with traced_scope(ctx.trace, call, "attempt", f"{name}#{number}", attempt=number,
                      deadline=_try_deadline(call, per_try, streamed)) as attempt:
        result = await perform(attempt, Claim(per_try if streamed else None), frozenset())
        if result.status is not None:
            attempt.note(status=result.status)
    return result.value


async def run_attempts(ctx: RequestContext, call: TracedScope, state: UpstreamState,
                       settings: CallSettings, *, name: str, method: str, replayable: bool,
                       perform: Perform[T], first_number: int = 1,
                       body_unread: Callable[[], bool] | None = None,
                       tries_sent: int | None = None,
                       again_after: GatewayError | None = None) -> T:
    """Run ``perform`` under the call's resilience rules; return the winning value.
    ``replayable``: the request can be sent again; one that cannot streams its body from
    the client as its try runs (``perform`` then tells ``claim.sent`` when it is sent),
    and is tried again only after a connect failure while ``body_unread()`` says none
    of that body was read yet. ``first_number``: what the first attempt is numbered (a
    call run again after attempts of its own goes on from them: its first attempt is
    not the call's first try, in the metrics and the retry budget, and its tries in all
    stay within ``attempts``, though one is always sent). ``tries_sent``: how many of
    those earlier attempts were sent (a refused retry or hedge has a span and sent
    nothing); ``first_number - 1`` unless given. ``again_after``: the failure of the
    tries sent before; the first attempt here is then a retry of them, paid from the
    retry budget like any, and the call fails with that failure when the budget refuses
    it."""
    shown = first_number - 1  # added to an attempt's number where the trace shows it
    # Tries the call sent before (a call run again): what its attempts count from.
    before = shown if tries_sent is None else tries_sent
    budget = state.retry_budget
    if before > 0 and again_after is not None and not budget.try_spend(trio.current_time()):
        _refused_retry(ctx, call, name, first_number, state.name)
        raise again_after
    retry: RetryPolicy | None = settings.retries
    allowed_retry = retry is not None and replayable and (
        method in IDEMPOTENT_METHODS or retry.non_idempotent)
    # A non-idempotent request may still be retried after a connect failure (nothing was
    # sent), and so may a streamed body none of which was read: is_retryable decides per
    # outcome, so only a streamed body that cannot tell caps attempts here.
    max_attempts = max(1, retry.attempts - before) if (
        retry is not None and (replayable or body_unread is not None)) else 1
    hedge_after = settings.hedge_after if replayable and method in IDEMPOTENT_METHODS else None
    max_hedges = settings.max_hedges if hedge_after is not None else 0
    retry_statuses = frozenset(s for s in retry.on if isinstance(s, int)) if (
        retry is not None and allowed_retry) else frozenset()
    breaker = state.breaker
    min_budget = ctx.policy.server.min_call_budget
    margin = ctx.policy.server.deadline_margin
    per_try = retry.per_try_timeout if retry is not None else None
    if max_attempts == 1 and hedge_after is None and breaker is None:
        if first_number == 1:  # a first try sent: it earns the budget its retries
            budget.record_request(trio.current_time())
        METRICS.attempt_sent(state.name, first_number, hedge=False)
        return await _single_attempt(ctx, call, name, perform, first_number, per_try,
                                     streamed=not replayable)

    # A body that cannot be sent again streams from the client as the (only) try runs.
    claim = Claim(per_try if not replayable else None)
    events_send, events_receive = trio.open_memory_channel[
        tuple[TracedScope, AttemptResult[T] | GatewayError | None]](math.inf)
    started = 0
    hedges = 0
    running = 0
    #: Attempts whose answer has arrived or that ended: told apart from those that may
    #: still answer the moment each answer arrives (the coordinator's ``running`` lags
    #: behind when two answers come in the same scheduler pass).
    settled: set[int] = set()
    hedge_attempts: set[TracedScope] = set()

    def others_may_answer(number: int) -> bool:
        settled.add(number)
        return started > len(settled) or claim.winner is not None
    #: A retry decided (and paid) when an attempt's retryable status arrived.
    planned_delay: float | None = None

    def time_for_a_try(delay_s: float) -> bool:
        """Is there time for ``delay_s`` and one more try, with the floor a first try has?"""
        remaining = call.deadline - trio.current_time() - margin
        return may_retry_within(remaining, per_try, delay_s, min_budget)

    def discard_for_retry(number: int, status: int) -> bool:
        """Is attempt ``number``'s answer with ``status`` to be discarded for a retry?
        Decided when it arrives, so that it is discarded only for a retry that will be
        sent."""
        nonlocal planned_delay
        if status not in retry_statuses:
            return False
        if others_may_answer(number):
            return True
        if retry is None or started >= max_attempts:
            return False
        if breaker is not None and breaker.failure_would_refuse(trio.current_time()):
            return False  # this answer opens the circuit: no retry could be sent
        delay = backoff_delay(started, retry.backoff.low_s, retry.backoff.high_s, _rng)
        if not time_for_a_try(delay):
            return False
        if not budget.try_spend(trio.current_time()):
            refuse_retry()
            return False
        planned_delay = delay
        return True

    def discard_while_others_run(number: int, status: int) -> bool:
        """The last try's retryable status: discarded only while another attempt may
        still answer (a hedge's 503 must not beat the first try's coming 200)."""
        return status in retry_statuses and others_may_answer(number)

    async def attempt_task(number: int, slot: HeldSlot | None,
                           task_status: trio.TaskStatus[TracedScope]) -> None:
        deadline = _try_deadline(call, per_try, streamed=not replayable)
        outcome: AttemptResult[T] | GatewayError
        # The breaker hears of an attempt only once it has let it through: one that ended
        # before asking (a hedge whose race was won as it started) must not free the
        # probe slot another attempt holds.
        breaker_asked = False
        try:
            with traced_scope(ctx.trace, call, "attempt", f"{name}#{number + shown}",
                              attempt=number + shown,
                              deadline=deadline) as attempt:
                claim.attempts.append(attempt)
                if slot is not None:
                    claim.hedge_slots[attempt] = slot
                task_status.started(attempt)
                if claim.winner is not None:  # claimed while this hedge was starting
                    attempt.note(hedge_not_sent="an answer was claimed as it started")
                    attempt.cancel("hedge_lost", detail=claim.winner.span.name)
                    await trio.lowlevel.checkpoint()
                if breaker is not None and not breaker.allow(trio.current_time()):
                    raise CircuitOpen(f"circuit of upstream {state.name!r} is open",
                                      retry_after_s=breaker.retry_after(trio.current_time()),
                                      upstream=state.name)
                breaker_asked = True
                METRICS.attempt_sent(state.name, number + before, hedge=slot is not None)
                if slot is not None:
                    hedge_attempts.add(attempt)
                if number + before == 1:  # a first try sent: it earns the budget its retries
                    budget.record_request(trio.current_time())
                last = number >= max_attempts and hedges >= max_hedges
                decide = discard_while_others_run if last else discard_for_retry
                result = await perform(attempt, claim, _DecidedOnArrival(
                    lambda status: decide(number, status)))
                if result.status is not None:
                    attempt.note(status=result.status)
            if attempt.cancel_cause is not None:  # lost a hedge race: not an outcome
                if breaker is not None and breaker_asked:
                    breaker.record_ignored(trio.current_time())
                events_send.send_nowait((attempt, None))  # ended: no longer running
                return
            if breaker is not None:
                if result.status is not None and result.status >= 500:
                    breaker.record_failure(trio.current_time())
                else:
                    breaker.record_success(trio.current_time())
            outcome = result
        except GatewayError as error:
            if breaker is not None and breaker_asked:
                if _is_breaker_failure(error):
                    breaker.record_failure(trio.current_time())
                elif isinstance(error, UpstreamStatusError | NoRow | BadRequest | Conflict
                                | UpstreamResultRefused | TransactionRolledBack):
                    # A 4xx, or a transaction the database rolled back under lock
                    # contention (40001, 40P01): it answered, and is healthy.
                    breaker.record_success(trio.current_time())
                else:
                    breaker.record_ignored(trio.current_time())
            outcome = error
        except trio.Cancelled as cancelled:
            # A policy's deadline (call, per-try, route) is the upstream being too slow:
            # a failure. Cancelled on purpose (client gone, hedge lost, sibling failed,
            # quorum reached), or by the client's own shorter deadline: says nothing
            # about the upstream's health.
            if breaker is not None and breaker_asked:
                if cancelled.source == "deadline" and not ctx.deadline.passed_by_client(
                        trio.current_time()):
                    breaker.record_failure(trio.current_time())
                else:
                    breaker.record_ignored(trio.current_time())
            raise
        except Exception:
            # Not an upstream outcome (a fault of the gateway's own): free the probe slot
            # so that a half-open breaker is not left waiting for it.
            if breaker is not None and breaker_asked:
                breaker.record_ignored(trio.current_time())
            raise
        finally:
            settled.add(number)
            if slot is not None:  # once the connection its try left out is back
                state.limiter.release(slot)
        events_send.send_nowait((attempt, outcome))

    def refuse_retry() -> None:
        _refused_retry(ctx, call, name, started + 1 + shown, state.name)

    # Decisions are taken inside the nursery but raised outside it, so the caller sees
    # the GatewayError itself, not an exception group.
    value: T | None = None
    failure: GatewayError | None = None
    async with trio.open_nursery() as nursery:
        started += 1
        running += 1
        await nursery.start(attempt_task, started, None)
        while True:
            wait_s = math.inf
            if hedge_after is not None and hedges < max_hedges and claim.winner is None:
                wait_s = hedge_after
            with trio.move_on_after(wait_s) as timer:
                attempt, outcome = await events_receive.receive()
            if timer.cancelled_caught:
                if claim.winner is not None:
                    # An attempt claimed the answer while the timer ran (it is sending
                    # its body now): a hedge could only lose.
                    continue
                # Nobody answered within hedge_after: start a hedge if there is time for
                # one, a slot of the upstream's concurrency limit free, and the budget.
                if not time_for_a_try(0.0):
                    hedges = max_hedges  # no more hedges for this call
                    call.note(hedge_not_sent="no budget left for a try")
                    continue
                slot = state.limiter.try_hold()
                if slot is None:
                    hedges = max_hedges
                    call.note(hedge_not_sent="the upstream's concurrency limit is reached")
                    continue
                if budget.try_spend(trio.current_time()):
                    hedges += 1
                    started += 1
                    running += 1
                    await nursery.start(attempt_task, started, slot)
                else:
                    state.limiter.release(slot)
                    hedges = max_hedges  # no more hedges for this call
                    refuse_retry()
                continue
            running -= 1
            if outcome is None:  # a loser cancelled by the winner's claim
                continue
            if isinstance(outcome, AttemptResult):
                if claim.winner is None or claim.winner is attempt:
                    claim.claim(attempt)
                    value = outcome.value
                    nursery.cancel_scope.cancel(reason="hedge_lost|" + attempt.span.label)
                    break
                continue
            if claim.winner is attempt:
                # It failed after claiming the answer (say, reset mid-body): the response
                # has started, so nothing can replace it; the others were cancelled.
                failure = outcome
                break
            if running > 0:
                continue  # a hedge is still trying
            failure = outcome
            if isinstance(outcome, CircuitOpen | Shed):
                break
            reason = outcome_of(outcome)
            if (started >= max_attempts or retry is None or reason is None
                    or not is_retryable(method=method, outcome=reason, policy=retry,
                                        body_replayable=replayable,
                                        body_unread=body_unread is not None
                                        and body_unread(),
                                        undone=isinstance(outcome, TransactionRolledBack))):
                break
            if planned_delay is not None:  # decided, and paid, when the status arrived
                delay, planned_delay = planned_delay, None
            else:
                delay = backoff_delay(started, retry.backoff.low_s, retry.backoff.high_s,
                                      _rng)
                if not time_for_a_try(delay):
                    break
                if not budget.try_spend(trio.current_time()):
                    refuse_retry()
                    break
            failure = None
            await trio.sleep(delay)
            started += 1
            running += 1
            await nursery.start(attempt_task, started, None)
    if hedge_attempts:  # a race only when a hedge was sent (not one claimed as it started)
        METRICS.hedge_race(state.name, "failed" if failure is not None
                           else "hedge_won" if claim.winner in hedge_attempts
                           else "hedge_lost")
    if failure is not None:
        raise failure
    return value  # type: ignore[return-value]
