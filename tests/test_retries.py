import random

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway._policy import RetryPolicy
from gateway._retries import RetryBudget, backoff_delay, is_retryable, may_retry_within

# ----------------------------------------------------------------------------- backoff


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 8, 30, 5000])
def test_backoff_delay_stays_within_the_cap(attempt):
    rng = random.Random(attempt)
    low, high = 0.02, 0.2
    cap = min(high, low * 2.0 ** min(attempt - 1, 60))
    delays = [backoff_delay(attempt, low, high, rng) for _ in range(500)]
    assert all(0.0 <= d <= cap for d in delays)
    # Full jitter: the delays spread over the whole interval, not just near the cap.
    assert min(delays) < cap * 0.1 and max(delays) > cap * 0.9


def test_backoff_cap_grows_exponentially_until_high():
    class Top(random.Random):
        def random(self) -> float:
            return 1.0  # uniform(0, cap) then returns the cap itself

    rng = Top()
    caps = [backoff_delay(n, 0.01, 0.5, rng) for n in range(1, 9)]
    assert caps == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.5, 0.5])


def test_backoff_is_deterministic_for_a_seed():
    first = [backoff_delay(n, 0.02, 0.2, random.Random(7)) for n in range(1, 6)]
    again = [backoff_delay(n, 0.02, 0.2, random.Random(7)) for n in range(1, 6)]
    other = [backoff_delay(n, 0.02, 0.2, random.Random(8)) for n in range(1, 6)]
    assert first == again != other


def test_backoff_edges():
    rng = random.Random(1)
    assert backoff_delay(3, 0.0, 0.0, rng) == 0.0
    assert backoff_delay(1, 0.5, 0.1, rng) <= 0.1  # low above high: high still caps
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(0, 0.02, 0.2, rng)
    with pytest.raises(ValueError, match="non-negative"):
        backoff_delay(1, -0.1, 0.2, rng)


@given(attempt=st.integers(1, 10_000),
       low=st.floats(0, 10, allow_nan=False), high=st.floats(0, 10, allow_nan=False),
       seed=st.integers(0, 2**32))
def test_backoff_never_negative_never_above_high(attempt, low, high, seed):
    delay = backoff_delay(attempt, low, high, random.Random(seed))
    assert 0.0 <= delay <= high


# ----------------------------------------------------------------------------- budget

# (window_s, buckets) pairs whose bucket width (0.5 s, 1 s or 2 s) is exact in binary,
# so that the test's millisecond arithmetic and the budget's buckets agree exactly.
_SHAPES = [(1.0, 1), (1.0, 2), (2.0, 1), (2.0, 4), (4.0, 2), (5.0, 5), (10.0, 10), (10.0, 5)]


@settings(max_examples=300, deadline=None)
@given(
    shape=st.sampled_from(_SHAPES),
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0, 2.5]),
    floor=st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0]),
    ops=st.lists(st.tuples(st.integers(0, 1500), st.booleans()), max_size=300),
)
def test_budget_bound_over_any_interleaving(shape, ratio, floor, ops):
    """The two-sided bound stated in RetryBudget's docstring, checked at every decision.

    Times are whole milliseconds. With W = window_s, b = the bucket width and
    F = floor * W:
    - every grant at t: grants in [t - W, t] <= ratio * requests in (t - W - b, t] + F
    - every refusal at t: grants in (t - W - b, t] + 1 > ratio * requests in [t - W, t] + F
    """
    window_s, buckets = shape
    budget = RetryBudget(ratio, floor, window_s, buckets=buckets)
    w_ms, b_ms = round(window_s * 1000), round(window_s / buckets * 1000)
    allowance = floor * window_s
    eps = 1e-6
    requests: list[int] = []
    grants: list[int] = []
    now_ms = 0
    for step_ms, is_retry in ops:
        now_ms += step_ms
        now = now_ms / 1000
        if not is_retry:
            budget.record_request(now)
            requests.append(now_ms)
            continue
        if budget.try_spend(now):
            grants.append(now_ms)
            in_window = sum(1 for g in grants if now_ms - w_ms <= g)
            credit = sum(1 for r in requests if now_ms - w_ms - b_ms < r)
            assert in_window <= ratio * credit + allowance + eps
        else:
            in_wider = sum(1 for g in grants if now_ms - w_ms - b_ms < g)
            credit = sum(1 for r in requests if now_ms - w_ms <= r)
            assert in_wider + 1 > ratio * credit + allowance - eps
        # statistics() counts the buckets c - buckets .. c, c being the bucket of now.
        oldest_ms = (now_ms // b_ms - buckets) * b_ms
        stats = budget.statistics(now)
        assert stats.requests == sum(1 for r in requests if r >= oldest_ms)
        assert stats.retries == sum(1 for g in grants if g >= oldest_ms)


def test_floor_alone_grants_exactly_floor_times_window():
    budget = RetryBudget(ratio=0.2, min_per_second=10, window_s=10)
    granted = sum(budget.try_spend(0.0) for _ in range(1000))
    assert granted == 100
    assert budget.statistics(0.0).allowed_now == 0
    # Spread over the window instead of at once: still exactly 100.
    budget = RetryBudget(ratio=0.2, min_per_second=10, window_s=10)
    granted = sum(budget.try_spend(t / 100) for t in range(1000) for _ in range(3))
    assert granted == 100


def test_ratio_adds_to_the_floor():
    budget = RetryBudget(ratio=0.1, min_per_second=0, window_s=10)
    assert not budget.try_spend(0.0)
    for _ in range(30):
        budget.record_request(0.0)
    assert sum(budget.try_spend(0.0) for _ in range(10)) == 3  # 0.1 * 30, no float loss
    budget.reconfigure(ratio=0.1, min_per_second=0.5)
    assert sum(budget.try_spend(0.0) for _ in range(10)) == 5  # + 0.5/s * 10 s
    stats = budget.statistics(0.0)
    assert (stats.requests, stats.retries, stats.allowed_now) == (30, 8, 0)
    assert stats.denied_total == 1 + 7 + 5


def test_budget_recovers_as_the_window_slides():
    # 10 s window in 1 s buckets: a retry's room comes back 10 to 11 s after it was spent.
    budget = RetryBudget(ratio=0.5, min_per_second=0, window_s=10)
    for _ in range(10):
        budget.record_request(0.5)
    assert sum(budget.try_spend(0.5) for _ in range(10)) == 5
    assert not budget.try_spend(5.0)
    for _ in range(4):
        budget.record_request(5.0)  # new credit: 2 more
    assert sum(budget.try_spend(5.0) for _ in range(5)) == 2
    assert not budget.try_spend(10.99)  # the bucket of t=0.5 is still counted
    stats = budget.statistics(11.0)  # it has left: only the requests at t=5 remain
    assert (stats.requests, stats.retries, stats.allowed_now) == (4, 2, 0)
    stats = budget.statistics(16.0)
    assert (stats.requests, stats.retries, stats.allowed_now) == (0, 0, 0)
    for _ in range(2):
        budget.record_request(16.0)
    assert budget.try_spend(16.0)
    # A long gap clears every bucket at once.
    assert budget.statistics(1000.0).requests == 0


async def test_budget_on_the_trio_clock(autojump_clock):
    budget = RetryBudget(ratio=0.0, min_per_second=1, window_s=2)
    assert budget.try_spend(trio.current_time())
    assert budget.try_spend(trio.current_time())
    assert not budget.try_spend(trio.current_time())
    await trio.sleep(2.2)  # past window + one 0.2 s bucket
    assert budget.try_spend(trio.current_time())


def test_budget_rejects_bad_settings():
    with pytest.raises(ValueError, match="window_s"):
        RetryBudget(0.2, 10, window_s=0)
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(-0.1, 10)
    with pytest.raises(ValueError, match="min_per_second"):
        RetryBudget(0.2, 10).reconfigure(0.2, -1)


def test_budget_repr():
    budget = RetryBudget(0.2, 10)
    budget.record_request(0.0)
    budget.try_spend(0.0)
    assert repr(budget) == "<RetryBudget [20% + 10/s over 10s | 1 retries / 1 requests, 0 denied]>"


# ----------------------------------------------------------------------------- rules

_DEFAULT = RetryPolicy()  # on: connect, reset, 502, 503, 504
_WITH_TIMEOUT = RetryPolicy(on=("connect", "reset", "timeout", 503))
_NON_IDEMPOTENT = RetryPolicy(non_idempotent=True)


@pytest.mark.parametrize(
    ("method", "outcome", "policy", "replayable", "expected"),
    [
        # idempotent methods, listed outcomes
        ("GET", "connect", _DEFAULT, True, True),
        ("GET", "reset", _DEFAULT, True, True),
        ("HEAD", 502, _DEFAULT, True, True),
        ("OPTIONS", 503, _DEFAULT, True, True),
        ("PUT", 504, _DEFAULT, True, True),
        ("DELETE", "reset", _DEFAULT, True, True),
        ("TRACE", 503, _DEFAULT, True, True),
        ("get", 503, _DEFAULT, True, True),
        # outcomes not listed
        ("GET", "timeout", _DEFAULT, True, False),
        ("GET", "timeout", _WITH_TIMEOUT, True, True),
        ("GET", 500, _DEFAULT, True, False),
        ("GET", 502, _WITH_TIMEOUT, True, False),
        ("GET", 404, _DEFAULT, True, False),
        ("GET", 200, _DEFAULT, True, False),
        ("GET", "cancelled", _DEFAULT, True, False),
        # non-idempotent methods: only when the policy says so, or nothing was sent
        ("POST", 503, _DEFAULT, True, False),
        ("PATCH", "reset", _DEFAULT, True, False),
        ("POST", "timeout", _WITH_TIMEOUT, True, False),
        ("POST", 503, _NON_IDEMPOTENT, True, True),
        ("PATCH", "reset", _NON_IDEMPOTENT, True, True),
        ("POST", "connect", _DEFAULT, True, True),
        # a streamed body is never sent twice
        ("GET", 503, _DEFAULT, False, False),
        ("PUT", "connect", _DEFAULT, False, False),
        ("POST", 503, _NON_IDEMPOTENT, False, False),
    ],
)
def test_is_retryable(method, outcome, policy, replayable, expected):
    assert is_retryable(method=method, outcome=outcome, policy=policy,
                        body_replayable=replayable) is expected


def test_a_try_the_upstream_undid_is_retried_whatever_the_method():
    # A SQL transaction rolled back for a deadlock or a serialization failure.
    assert is_retryable(method="POST", outcome="reset", policy=_DEFAULT,
                        body_replayable=True, undone=True)
    assert not is_retryable(method="POST", outcome="reset", policy=RetryPolicy(on=(503,)),
                            body_replayable=True, undone=True)
    assert not is_retryable(method="POST", outcome="reset", policy=_DEFAULT,
                            body_replayable=False, undone=True)


@pytest.mark.parametrize(("method", "outcome", "policy", "expected"), [
    ("POST", "connect", _DEFAULT, True),
    ("PUT", "connect", _DEFAULT, True),
    ("PUT", "reset", _DEFAULT, False),
    ("GET", 503, _DEFAULT, False),
    ("POST", 503, _NON_IDEMPOTENT, False),
    ("PUT", "connect", RetryPolicy(on=(503,)), False),
])
def test_a_streamed_body_none_of_which_was_read_is_retried_after_a_connect_failure_only(
        method, outcome, policy, expected):
    assert is_retryable(method=method, outcome=outcome, policy=policy,
                        body_replayable=False, body_unread=True) is expected


def test_connect_not_listed_is_not_retried_even_for_get():
    policy = RetryPolicy(on=(503,))
    assert not is_retryable(method="GET", outcome="connect", policy=policy,
                            body_replayable=True)
    assert not is_retryable(method="POST", outcome="connect", policy=policy,
                            body_replayable=True)


@pytest.mark.parametrize(
    ("remaining", "per_try", "delay", "min_budget", "expected"),
    [
        (1.0, 0.3, 0.1, 0.05, True),
        (0.4, 0.3, 0.1, 0.05, True),  # exactly enough
        (0.39, 0.3, 0.1, 0.05, False),  # per-try timeout would outlive the deadline
        (0.2, None, 0.1, 0.05, True),  # no per-try timeout: the minimum budget counts
        (0.14, None, 0.1, 0.05, False),
        (0.05, None, 0.0, 0.05, True),
        (0.0, None, 0.0, 0.0, False),  # nothing left at all
        (-0.5, None, 0.0, 0.0, False),
    ],
)
def test_may_retry_within(remaining, per_try, delay, min_budget, expected):
    assert may_retry_within(remaining, per_try, delay, min_budget) is expected
