"""Fan-out under virtual time: modes, fail_fast and partial, per-call timeouts.

``fanout`` runs for real, and each call goes through the real call scope, limiter and
``run_attempts``; only the upstream exchange is replaced by a sleep on the mock clock
followed by an answer or an error.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

import gateway._fanout
from gateway._attempts import AttemptResult, Claim, run_attempts
from gateway._calls import upstream_call
from gateway._deadlines import RequestDeadline
from gateway._errors import (
    GatewayError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from gateway._fanout import fanout
from gateway._limits import UpstreamLimiter
from gateway._policy import FanoutCall, Policy, resolve_call_settings
from gateway._retries import RetryBudget
from gateway._runtime import UpstreamState
from gateway._trace import Span, Trace, TracedScope, traced_scope

MS = 0.001
Outcome = Any | Callable[[], GatewayError]  # a JSON value, or an error factory


def connect_error() -> GatewayError:
    return UpstreamConnectError("upstream 'bad' refused the connection", upstream="bad")


def status_error() -> GatewayError:
    return UpstreamStatusError("upstream 'bad' answered 503", upstream_status=503,
                               upstream="bad")


# --------------------------------------------------------------------------- stand-ins


def make_policy(calls: Iterable[str] | dict[str, dict[str, Any]],
                **fanout_fields: Any) -> Policy:
    """A policy with one fan-out route; ``calls`` names the calls (or maps them to their
    own fields), each to an upstream of its own name."""
    if not isinstance(calls, dict):
        calls = {name: {} for name in calls}
    return Policy.model_validate({
        "version": 1,
        "upstreams": {name: {"url": f"http://{name}.invalid"} for name in calls},
        "routes": [{"path": "/dashboard", "fanout": {
            **fanout_fields,
            "calls": {name: {"upstream": name, "path": "/data", **fields}
                      for name, fields in calls.items()}}}],
    })


class FakeSnapshot:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.upstreams = {
            name: UpstreamState(name, upstream,
                                UpstreamLimiter(name, concurrency=10, queue=10,
                                                queue_timeout_s=0.05),
                                retry_budget=RetryBudget(0.2, 10.0))
            for name, upstream in policy.upstreams.items()}

    def call_settings(self, call: Any, resolve: Callable[[Policy, Any], Any]) -> Any:
        return resolve(self.policy, call)


class FakeContext:
    """The parts of a request that ``fanout`` and the call path read."""

    def __init__(self, policy: Policy, deadline_s: float = 2.0) -> None:
        route = policy.routes[0]
        self.t0 = trio.current_time()
        self.policy = policy
        self.snapshot = FakeSnapshot(policy)
        self.match = SimpleNamespace(route=route)
        self.trace = Trace("req-1", "GET", route.path, route.path)
        self.request_id = "req-1"
        self.deadline = RequestDeadline(self.t0 + deadline_s, deadline_s, "policy")
        self.request_scope: TracedScope | None = None
        self.sent: list[tuple[int, Any, float]] = []

    async def send_json(self, status: int, payload: Any,
                        extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.sent.append((status, payload, trio.current_time() - self.t0))


def install(monkeypatch: pytest.MonkeyPatch,
            script: dict[str, tuple[float, Outcome]]) -> list[str]:
    """Replace the upstream exchange of each call by ``script[name]``; returns the
    names of the calls in the order their answers arrived."""
    finished: list[str] = []

    async def run_call(ctx: Any, parent: TracedScope, name: str, call: FanoutCall) -> Any:
        state = ctx.snapshot.upstreams[call.upstream]
        settings = ctx.snapshot.call_settings(call, resolve_call_settings)
        delay, outcome = script[name]

        async def perform(attempt: TracedScope, claim: Claim,
                          retry_statuses: Container[int]) -> AttemptResult[Any]:
            await trio.sleep(delay)
            finished.append(name)
            if callable(outcome):
                raise outcome()
            return AttemptResult(outcome, 200)

        async with upstream_call(ctx, parent, name, state, settings.timeout) as scope:
            return await run_attempts(ctx, scope, state, settings, name=name,
                                      method=call.method, replayable=True, perform=perform)

    monkeypatch.setattr(gateway._fanout, "_run_call", run_call)
    return finished


async def serve(ctx: FakeContext) -> float:
    """Run the fan-out inside a request scope; the virtual time it took."""
    start = trio.current_time()
    with traced_scope(ctx.trace, None, "request", ctx.match.route.path,
                      deadline=ctx.deadline.at) as request:
        ctx.request_scope = request
        await fanout(ctx)  # type: ignore[arg-type]
    return trio.current_time() - start


def spans(ctx: FakeContext) -> dict[str, Span]:
    assert ctx.trace.root is not None
    return {span.label: span for span in ctx.trace.root.walk()}


def where(span: Span) -> tuple[str, str | None, str | None]:
    return span.outcome, span.cause, span.fired_scope


THREE = {"fast": (10 * MS, {"n": 1}), "mid": (50 * MS, {"n": 2}), "slow": (200 * MS, {"n": 3})}


def assert_no_slot_held(ctx: FakeContext) -> None:
    for state in ctx.snapshot.upstreams.values():
        assert state.limiter.statistics().in_flight == 0


# --------------------------------------------------------------------------- modes


async def test_mode_all_waits_for_every_call(autojump_clock, monkeypatch):
    install(monkeypatch, THREE)
    ctx = FakeContext(make_policy(list(THREE), mode="all"))

    assert await serve(ctx) == pytest.approx(0.200)

    assert ctx.sent == [(200, {"fast": {"n": 1}, "mid": {"n": 2}, "slow": {"n": 3}},
                         pytest.approx(0.200))]
    assert ctx.trace.cancelled_spans() == []
    found = spans(ctx)
    for name, (delay, _) in THREE.items():
        assert found[f"call {name}"].end_ms == pytest.approx(delay * 1000)
    assert found["stage fanout"].attrs["mode"] == "all"


async def test_mode_first_answers_at_the_first_and_cancels_the_rest(autojump_clock,
                                                                    monkeypatch):
    finished = install(monkeypatch, THREE)
    ctx = FakeContext(make_policy(list(THREE), mode="first"))

    assert await serve(ctx) == pytest.approx(0.010)

    assert ctx.sent == [(200, {"fast": {"n": 1}}, pytest.approx(0.010))]
    assert finished == ["fast"]
    found = spans(ctx)
    assert found["call fast"].outcome == "ok"
    for name in ("mid", "slow"):
        for label in (f"call {name}", f"attempt {name}#1"):
            assert where(found[label]) == ("cancelled", "quorum_reached", "call fast")
            assert found[label].end_ms == pytest.approx(10)
    assert found["stage fanout"].outcome == "ok"
    assert_no_slot_held(ctx)


async def test_quorum_answers_at_the_nth_answer(autojump_clock, monkeypatch):
    finished = install(monkeypatch, THREE)
    ctx = FakeContext(make_policy(list(THREE), mode={"quorum": 2}))

    assert await serve(ctx) == pytest.approx(0.050)

    assert ctx.sent == [(200, {"fast": {"n": 1}, "mid": {"n": 2}}, pytest.approx(0.050))]
    assert finished == ["fast", "mid"]
    found = spans(ctx)
    assert where(found["call slow"]) == ("cancelled", "quorum_reached", "call mid")
    assert found["stage fanout"].attrs["mode"] == "quorum:2"
    assert_no_slot_held(ctx)


async def test_first_and_quorum_outlive_a_failure_that_leaves_enough_calls(autojump_clock,
                                                                            monkeypatch):
    failing_first = {"bad": (5 * MS, connect_error), "fast": (10 * MS, {"n": 1}),
                     "mid": (50 * MS, {"n": 2})}
    install(monkeypatch, failing_first)
    first = FakeContext(make_policy(list(failing_first), mode="first"))
    assert await serve(first) == pytest.approx(0.010)
    assert first.sent == [(200, {"fast": {"n": 1}}, pytest.approx(0.010))]

    quorum = FakeContext(make_policy(list(failing_first), mode={"quorum": 2}))
    assert await serve(quorum) == pytest.approx(0.050)
    assert quorum.sent == [(200, {"fast": {"n": 1}, "mid": {"n": 2}}, pytest.approx(0.050))]


async def test_quorum_fails_fast_once_it_cannot_be_reached(autojump_clock, monkeypatch):
    two_bad = {"bad": (5 * MS, connect_error), "worse": (8 * MS, connect_error),
               "slow": (200 * MS, {"n": 1})}
    install(monkeypatch, two_bad)
    ctx = FakeContext(make_policy(list(two_bad), mode={"quorum": 2}))
    start = trio.current_time()
    with pytest.raises(UpstreamConnectError) as failed:
        await serve(ctx)
    assert failed.value.detail["call"] == "worse"
    assert trio.current_time() - start == pytest.approx(0.008)  # not the slow call's 200
    assert where(spans(ctx)["call slow"])[:2] == ("cancelled", "sibling_failed")
    assert_no_slot_held(ctx)


# --------------------------------------------------------------------------- failures

WITH_BAD = {"fast": (10 * MS, {"n": 1}), "bad": (20 * MS, connect_error),
            "mid": (50 * MS, {"n": 2}), "slow": (200 * MS, {"n": 3})}


async def test_fail_fast_cancels_the_siblings_naming_the_failed_call(autojump_clock,
                                                                     monkeypatch):
    finished = install(monkeypatch, WITH_BAD)
    ctx = FakeContext(make_policy(list(WITH_BAD), on_failure="fail_fast"))
    start = trio.current_time()

    with pytest.raises(UpstreamConnectError) as info:
        await serve(ctx)

    assert trio.current_time() - start == pytest.approx(0.020)
    assert info.value.detail["call"] == "bad"
    assert info.value.status == 502
    assert ctx.sent == []
    assert finished == ["fast", "bad"]
    found = spans(ctx)
    assert found["call fast"].outcome == "ok"
    assert found["call bad"].outcome == "error"
    for name in ("mid", "slow"):
        for label in (f"call {name}", f"attempt {name}#1"):
            assert where(found[label]) == ("cancelled", "sibling_failed", "call bad")
            assert found[label].end_ms == pytest.approx(20)
    assert_no_slot_held(ctx)


async def test_fail_fast_keeps_the_upstream_status(autojump_clock, monkeypatch):
    install(monkeypatch, {**THREE, "mid": (20 * MS, status_error)})
    ctx = FakeContext(make_policy(list(THREE)))

    with pytest.raises(UpstreamStatusError) as info:
        await serve(ctx)

    assert (info.value.status, info.value.detail["call"]) == (503, "mid")
    assert where(spans(ctx)["call slow"]) == ("cancelled", "sibling_failed", "call mid")


async def test_partial_lets_the_others_finish_and_reports_errors(autojump_clock,
                                                                 monkeypatch):
    install(monkeypatch, WITH_BAD)
    ctx = FakeContext(make_policy(list(WITH_BAD), on_failure="partial"))

    assert await serve(ctx) == pytest.approx(0.200)

    assert ctx.sent == [(200, {
        "fast": {"n": 1}, "mid": {"n": 2}, "slow": {"n": 3},
        "errors": {"bad": {"error": "upstream 'bad' refused the connection",
                           "cause": "upstream_connect", "upstream": "bad", "status": 502}},
    }, pytest.approx(0.200))]
    found = spans(ctx)
    assert found["call bad"].outcome == "error"
    assert ctx.trace.cancelled_spans() == []


async def test_partial_with_every_call_failed_raises_the_first(autojump_clock, monkeypatch):
    install(monkeypatch, {"one": (30 * MS, connect_error), "two": (10 * MS, status_error)})
    ctx = FakeContext(make_policy(["one", "two"], on_failure="partial"))
    start = trio.current_time()

    with pytest.raises(GatewayError) as info:
        await serve(ctx)

    assert trio.current_time() - start == pytest.approx(0.030)
    assert info.value.detail["call"] == "two"  # the first to fail
    assert ctx.sent == []


# --------------------------------------------------------------------------- timeouts


async def test_a_call_timeout_fires_in_its_own_scope(autojump_clock, monkeypatch):
    install(monkeypatch, THREE)
    calls = {"fast": {}, "mid": {}, "slow": {"timeout": "100ms"}}
    ctx = FakeContext(make_policy(calls, on_failure="partial"))

    assert await serve(ctx) == pytest.approx(0.100)

    status, payload, _ = ctx.sent[0]
    assert status == 200
    assert payload == {"fast": {"n": 1}, "mid": {"n": 2}, "errors": {"slow": {
        "error": "the call's timeout passed", "cause": "deadline", "scope": "call",
        "status": 504}}}
    found = spans(ctx)
    assert where(found["call slow"]) == ("cancelled", "deadline", "call slow")
    assert where(found["attempt slow#1"]) == ("cancelled", "deadline", "call slow")
    assert found["call slow"].budget_ms == pytest.approx(100)
    assert found["call slow"].end_ms == pytest.approx(100)
    assert_no_slot_held(ctx)


async def test_a_call_timeout_under_fail_fast_fails_the_fanout(autojump_clock, monkeypatch):
    install(monkeypatch, THREE)
    calls = {"fast": {}, "mid": {"timeout": "30ms"}, "slow": {}}
    ctx = FakeContext(make_policy(calls))
    start = trio.current_time()

    with pytest.raises(UpstreamTimeout) as info:
        await serve(ctx)

    assert trio.current_time() - start == pytest.approx(0.030)
    assert info.value.detail == {"scope": "call mid", "call": "mid"}
    found = spans(ctx)
    assert where(found["call mid"]) == ("cancelled", "deadline", "call mid")
    assert where(found["call slow"]) == ("cancelled", "sibling_failed", "call mid")


async def test_the_request_deadline_bounds_every_call(autojump_clock, monkeypatch):
    install(monkeypatch, THREE)
    ctx = FakeContext(make_policy(list(THREE)), deadline_s=0.100)
    start = trio.current_time()

    with pytest.raises(UpstreamTimeout) as info:
        await serve(ctx)

    assert trio.current_time() - start == pytest.approx(0.100)
    assert info.value.detail["scope"] == "request"
    found = spans(ctx)
    assert where(found["call slow"]) == ("cancelled", "deadline", "request")
    assert ctx.sent == []


async def test_a_partial_fan_out_answers_what_arrived_before_the_deadline(autojump_clock,
                                                                         monkeypatch):
    # The slow call is cut a tenth of the budget before the request's deadline (10 ms
    # here), so what arrived is answered instead of a 504.
    install(monkeypatch, THREE)
    ctx = FakeContext(make_policy(list(THREE), on_failure="partial"), deadline_s=0.100)

    assert await serve(ctx) == pytest.approx(0.090)

    (status, payload, _), = ctx.sent
    assert status == 200
    assert (payload["fast"], payload["mid"]) == ({"n": 1}, {"n": 2})
    assert payload["errors"]["slow"]["cause"] == "deadline"
    assert payload["errors"]["slow"]["status"] == 504
    assert where(spans(ctx)["call slow"]) == ("cancelled", "deadline", "stage fanout")
    assert_no_slot_held(ctx)


def test_siblings_of_a_crashed_call_are_sibling_failed_whatever_their_inner_scopes(
        monkeypatch):
    """A call's own code may use a library scope that is cancelled explicitly at the same
    moment (trio's ``open_tcp_stream`` cancels its other attempts "successfully found a
    socket"); the span still reads the cause Trio recorded on it. Scheduling order varies
    between runs, so the case runs many times."""

    async def run_call(ctx: Any, parent: Any, name: str, call: FanoutCall) -> Any:
        state = ctx.snapshot.upstreams[call.upstream]
        settings = ctx.snapshot.call_settings(call, resolve_call_settings)

        async def perform(attempt: TracedScope, claim: Claim,
                          retry_statuses: Container[int]) -> AttemptResult[Any]:
            if name == "crash":
                await trio.sleep(10 * MS)
                raise RuntimeError("a fault of the gateway's own")
            async with trio.open_nursery() as inner:  # happy eyeballs, say
                async def found() -> None:
                    await trio.sleep(10 * MS)
                    inner.cancel_scope.cancel(reason="successfully found a socket")
                inner.start_soon(found)
                await trio.sleep(1)
            await trio.sleep(1)
            return AttemptResult({}, 200)

        async with upstream_call(ctx, parent, name, state, settings.timeout) as scope:
            return await run_attempts(ctx, scope, state, settings, name=name,
                                      method=call.method, replayable=True, perform=perform)

    monkeypatch.setattr(gateway._fanout, "_run_call", run_call)
    causes = set()
    for _ in range(40):
        async def main() -> None:
            ctx = FakeContext(make_policy(["good", "crash"], on_failure="partial"))
            with pytest.RaisesGroup(RuntimeError, flatten_subgroups=True):
                await serve(ctx)
            causes.add(where(spans(ctx)["call good"])[:2])
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert causes == {("cancelled", "sibling_failed")}
