import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._breaker import BreakerState, CircuitBreaker
from gateway._policy import CircuitPolicy

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def _policy(**overrides) -> CircuitPolicy:
    fields = {"failure_ratio": 0.5, "window": 10.0, "min_requests": 10, "open_for": 5.0,
              "half_open_probes": 3, **overrides}
    return CircuitPolicy.model_construct(**{**CircuitPolicy().__dict__, **fields})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _breaker(transitions: list | None = None, **overrides) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()

    def note(name: str, old: BreakerState, new: BreakerState) -> None:
        if transitions is not None:
            transitions.append((name, old, new))

    return CircuitBreaker("users", _policy(**overrides), on_transition=note, clock=clock), clock


def _open_it(breaker: CircuitBreaker, now: float = 0.0) -> None:
    for _ in range(10):
        assert breaker.allow(now)
        breaker.record_failure(now)
    assert breaker.statistics(now).state is OPEN


def test_opens_on_ratio_only_after_min_requests():
    transitions: list = []
    breaker, _ = _breaker(transitions)
    for _ in range(9):  # 9 failures: 100% failed, but below min_requests
        assert breaker.allow(1.0)
        breaker.record_failure(1.0)
    assert breaker.state is CLOSED
    breaker.record_failure(1.0)  # the 10th outcome
    assert breaker.state is OPEN
    assert transitions == [("users", CLOSED, OPEN)]
    stats = breaker.statistics(1.0)
    assert (stats.failures, stats.total, stats.opened_total) == (10, 10, 1)


def test_ratio_below_threshold_stays_closed_then_trips_at_it():
    breaker, _ = _breaker()
    for i in range(20):
        breaker.record_success(0.0) if i % 3 else breaker.record_failure(0.0)
    stats = breaker.statistics(0.0)
    assert (stats.state, stats.failures, stats.total) == (CLOSED, 7, 20)
    for _ in range(5):
        breaker.record_failure(0.0)
    assert breaker.statistics(0.0).state is CLOSED  # 12/25 = 48%
    breaker.record_failure(0.0)  # 13/26 = 50%: the ratio is reached
    assert breaker.statistics(0.0).state is OPEN


def test_old_outcomes_leave_the_window():
    breaker, _ = _breaker()
    for _ in range(9):
        breaker.record_failure(0.0)
    for _ in range(9):
        breaker.record_success(5.0)
    # At t=10 the failures of t=0 have left the 10 s window: 1 of 10 failed.
    breaker.record_failure(10.0)
    stats = breaker.statistics(10.0)
    assert (stats.state, stats.failures, stats.total) == (CLOSED, 1, 10)
    assert repr(breaker) == "<CircuitBreaker users [closed, 1/10 failed in 10s]>"


def test_consecutive_failures_open_it():
    breaker, _ = _breaker(min_requests=1000, consecutive_failures=3)
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    breaker.record_success(0.0)  # breaks the run
    breaker.record_failure(0.0)
    breaker.record_failure(0.0)
    assert breaker.statistics(0.0).consecutive_failures == 2
    assert breaker.statistics(0.0).state is CLOSED
    breaker.record_failure(0.0)
    assert breaker.statistics(0.0).state is OPEN


def test_open_refuses_until_open_for_passes():
    transitions: list = []
    breaker, clock = _breaker(transitions)
    _open_it(breaker, now=100.0)
    waits = []
    for now in (100.0, 101.0, 102.5, 104.9):
        clock.now = now
        assert not breaker.allow(now)
        assert breaker.state is OPEN
        waits.append(breaker.retry_after(now))
    assert waits == pytest.approx([5.0, 4.0, 2.5, 0.1])
    assert breaker.statistics(104.9).retry_after_s == pytest.approx(0.1)
    assert breaker.retry_after(200.0) == 0.0  # never negative
    clock.now = 105.0
    assert breaker.state is HALF_OPEN  # turned lazily, on reading
    assert breaker.retry_after(105.0) == 0.0
    assert transitions == [("users", CLOSED, OPEN), ("users", OPEN, HALF_OPEN)]


def test_half_open_admits_exactly_n_probes_and_closes_when_all_succeed():
    transitions: list = []
    breaker, _ = _breaker(transitions)
    _open_it(breaker)
    admitted = [breaker.allow(5.0) for _ in range(5)]
    assert admitted == [True, True, True, False, False]
    assert breaker.statistics(5.0).probes_in_flight == 3
    breaker.record_success(5.1)
    breaker.record_success(5.2)
    assert breaker.statistics(5.2).state is HALF_OPEN
    assert not breaker.allow(5.2)  # two succeeded and one is out: no fourth probe
    breaker.record_success(5.3)
    stats = breaker.statistics(5.3)
    assert (stats.state, stats.failures, stats.total, stats.consecutive_failures) == (
        CLOSED, 0, 0, 0)  # a fresh start
    assert [new for _, _, new in transitions] == [OPEN, HALF_OPEN, CLOSED]
    assert all(breaker.allow(5.3) for _ in range(50))


def test_a_failed_probe_reopens_and_restarts_the_timer():
    breaker, _ = _breaker()
    _open_it(breaker)
    assert breaker.allow(6.0) and breaker.allow(6.0)
    breaker.record_success(6.1)
    breaker.record_failure(6.2)
    stats = breaker.statistics(6.2)
    assert (stats.state, stats.opened_total) == (OPEN, 2)
    assert breaker.retry_after(6.2) == pytest.approx(5.0)
    assert not breaker.allow(11.1)
    # The other probe's late answer says nothing new and changes nothing.
    breaker.record_success(11.1)
    assert breaker.statistics(11.1).state is OPEN
    assert breaker.allow(11.2)
    assert breaker.statistics(11.2).state is HALF_OPEN


def test_ignored_outcomes_neither_open_nor_close():
    breaker, _ = _breaker(consecutive_failures=2)
    for _ in range(50):
        breaker.record_ignored(0.0)
    stats = breaker.statistics(0.0)
    assert (stats.state, stats.total) == (CLOSED, 0)
    breaker.record_failure(0.0)
    breaker.record_ignored(0.0)
    breaker.record_failure(0.0)  # ignored calls do not break a run of failures
    assert breaker.statistics(0.0).state is OPEN
    # Half-open: an ignored probe frees its slot and does not count as a success.
    assert [breaker.allow(5.0) for _ in range(4)] == [True, True, True, False]
    breaker.record_ignored(5.0)
    breaker.record_success(5.0)
    breaker.record_success(5.0)
    assert breaker.statistics(5.0).state is HALF_OPEN
    assert breaker.allow(5.0)  # the freed slot
    assert not breaker.allow(5.0)
    breaker.record_success(5.0)
    assert breaker.statistics(5.0).state is CLOSED


def test_outcomes_while_open_are_not_counted():
    breaker, _ = _breaker()
    _open_it(breaker)
    for _ in range(5):
        breaker.record_failure(1.0)  # calls admitted before it opened
    stats = breaker.statistics(1.0)
    assert (stats.failures, stats.opened_total) == (10, 1)
    assert breaker.retry_after(1.0) == pytest.approx(4.0)  # the timer is not pushed back


def test_reconfigure_keeps_state_and_counts():
    breaker, _ = _breaker()
    for _ in range(6):
        breaker.record_failure(1.0)
    breaker.reconfigure(_policy(min_requests=50))
    stats = breaker.statistics(1.0)
    assert (stats.state, stats.failures, stats.consecutive_failures) == (CLOSED, 6, 6)
    breaker.reconfigure(_policy(min_requests=7))
    breaker.record_failure(1.0)  # new threshold applies at the next outcome
    assert breaker.statistics(1.0).state is OPEN
    breaker.reconfigure(_policy(open_for=2.0, half_open_probes=1))
    assert breaker.statistics(1.5).state is OPEN
    assert breaker.retry_after(1.5) == pytest.approx(1.5)  # from when it opened
    assert breaker.allow(3.0) and not breaker.allow(3.0)  # one probe now
    breaker.record_success(3.0)
    assert breaker.statistics(3.0).state is CLOSED


def test_lowering_half_open_probes_below_those_that_succeeded_closes_it():
    transitions: list = []
    breaker, _ = _breaker(transitions, half_open_probes=3)
    _open_it(breaker)
    assert breaker.allow(5.0) and breaker.allow(5.0)  # half-open: two of three probes
    breaker.record_success(5.1)
    breaker.record_success(5.1)
    assert breaker.statistics(5.1).state is HALF_OPEN
    breaker.reconfigure(_policy(half_open_probes=2))  # two are now enough, and they passed
    assert breaker.statistics(5.2).state is CLOSED
    assert breaker.allow(100.0)
    assert transitions[-1] == ("users", HALF_OPEN, CLOSED)


def test_lowering_half_open_probes_waits_for_a_probe_still_out():
    breaker, _ = _breaker(half_open_probes=3)
    _open_it(breaker)
    assert breaker.allow(5.0) and breaker.allow(5.0)
    breaker.record_success(5.1)
    breaker.reconfigure(_policy(half_open_probes=1))
    assert breaker.statistics(5.2).state is HALF_OPEN  # the probe out still decides
    breaker.record_failure(5.3)
    assert breaker.statistics(5.3).state is OPEN


def test_reconfigure_window_keeps_the_counts_inside_it():
    breaker, _ = _breaker(min_requests=1000)
    for t in range(10):
        breaker.record_failure(float(t))
    assert breaker.statistics(9.0).total == 10
    breaker.reconfigure(_policy(min_requests=1000, window=20.0))
    assert breaker.statistics(9.0).total == 10
    assert breaker.statistics(19.0).total == 10  # the longer window still holds them
    breaker.reconfigure(_policy(min_requests=1000, window=5.0))
    assert breaker.statistics(19.0).total == 0
    assert repr(breaker) == "<CircuitBreaker users [closed, 0/0 failed in 5s]>"


async def test_state_reads_the_trio_clock(autojump_clock):
    breaker = CircuitBreaker("orders", _policy(consecutive_failures=1, open_for=0.5))
    breaker.record_failure(trio.current_time())
    assert breaker.state is OPEN
    await trio.sleep(0.5)
    assert breaker.state is HALF_OPEN
    assert breaker.allow(trio.current_time())


@settings(max_examples=300, deadline=None)
@given(
    probes=st.integers(1, 4),
    consecutive=st.one_of(st.none(), st.integers(1, 4)),
    ops=st.lists(
        st.tuples(st.integers(0, 1500), st.sampled_from(["allow", "ok", "fail", "ignore"])),
        max_size=200),
)
def test_never_admits_while_open_before_open_for(probes, consecutive, ops):
    """Over any sequence of outcomes: no call while OPEN within open_for of opening,
    at most ``probes`` calls in flight while HALF_OPEN, and transitions in legal order."""
    open_for_ms, transitions = 2000, []
    breaker, clock = _breaker(transitions, min_requests=3, window=5.0,
                              open_for=open_for_ms / 1000, half_open_probes=probes,
                              consecutive_failures=consecutive)
    legal = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}
    opened_ms = None
    now_ms = 0
    for step_ms, op in ops:
        now_ms += step_ms
        now = clock.now = now_ms / 1000
        seen = len(transitions)
        if op == "allow":
            admitted = breaker.allow(now)
            if admitted and breaker.statistics(now).state is not CLOSED:
                assert opened_ms is not None and now_ms - opened_ms >= open_for_ms
        elif op == "ok":
            breaker.record_success(now)
        elif op == "fail":
            breaker.record_failure(now)
        else:
            breaker.record_ignored(now)
        for _, old, new in transitions[seen:]:
            assert (old, new) in legal
            if new is OPEN:
                opened_ms = now_ms
        stats = breaker.statistics(now)
        assert stats.probes_in_flight <= probes
        assert 0 <= stats.failures <= stats.total
        if stats.state is OPEN:
            # Whole milliseconds: "<=" since opened + open_for may round above now.
            assert opened_ms is not None and now_ms - opened_ms <= open_for_ms
            assert not breaker.allow(now)
            assert 0 <= breaker.retry_after(now) <= open_for_ms / 1000


def test_late_outcomes_in_half_open_without_probes_out_are_dropped():
    breaker, clock = _breaker()
    _open_it(breaker)
    clock.now = 5.0
    assert breaker.state is HALF_OPEN
    # Outcomes of calls admitted before it opened, arriving with no probe out.
    breaker.record_failure(5.0)
    breaker.record_success(5.0)
    breaker.record_ignored(5.0)
    stats = breaker.statistics(5.0)
    assert (stats.state, stats.probes_in_flight, stats.opened_total) == (HALF_OPEN, 0, 1)
    assert [breaker.allow(5.0) for _ in range(4)] == [True, True, True, False]
