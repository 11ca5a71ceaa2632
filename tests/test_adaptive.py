"""The adaptive concurrency limit against a simulated upstream whose latency rises once
it is given more calls than it can work on at once (MockClock: minutes in milliseconds)."""

import statistics

import pytest
import trio

from gateway._adaptive import GradientLimit
from gateway._errors import CircuitOpen, Shed, UpstreamStatusError
from gateway._limits import UpstreamLimiter
from gateway._policy_loader import load_policy_text
from gateway._runtime import Runtime

BASE_S = 0.010  # the upstream's latency while it has room


class Upstream:
    """Works on ``capacity`` calls at once; beyond that, calls wait inside it (latency
    grows with the excess, as in a server's own queue)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self.latencies: list[float] = []

    async def call(self) -> None:
        self.in_flight += 1
        started = trio.current_time()
        try:
            await trio.sleep(BASE_S * max(1.0, self.in_flight / self.capacity))
        finally:
            self.in_flight -= 1
        self.latencies.append(trio.current_time() - started)


async def drive(limiter: UpstreamLimiter, upstream: Upstream, callers: int,
                seconds: float) -> None:
    async def caller() -> None:
        while True:
            async with limiter.slot():
                await upstream.call()

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for _ in range(callers):
                nursery.start_soon(caller)


def limiter(*, adaptive: bool, concurrency: int = 100) -> UpstreamLimiter:
    return UpstreamLimiter(
        "u", concurrency=concurrency, queue=10_000, queue_timeout_s=3600,
        adaptive=GradientLimit(maximum=concurrency, minimum=4, tolerance=0.25)
        if adaptive else None)


async def test_an_upstream_slowing_under_load_is_given_fewer_calls(autojump_clock):
    static, upstream_a = limiter(adaptive=False), Upstream(capacity=10)
    await drive(static, upstream_a, callers=60, seconds=8)
    adaptive, upstream_b = limiter(adaptive=True), Upstream(capacity=10)
    await drive(adaptive, upstream_b, callers=60, seconds=8)
    # A static 100 lets all 60 callers in: each call takes six times its base latency.
    assert statistics.median(upstream_a.latencies[-500:]) > 5 * BASE_S
    # The adaptive limit falls toward what the upstream works on at once, and the
    # calls it lets in stay near the upstream's own latency; the rest wait at the
    # gateway, where a deadline or the queue bounds can shed them.
    slots = adaptive.statistics().concurrency
    assert 4 <= slots <= 25, slots
    assert statistics.median(upstream_b.latencies[-500:]) < 2.5 * BASE_S
    # The upstream serves about as much either way: nothing is lost to the limit.
    assert len(upstream_b.latencies) > 0.8 * len(upstream_a.latencies)


async def test_the_limit_grows_back_when_the_upstream_can_take_more(autojump_clock):
    adaptive, upstream = limiter(adaptive=True), Upstream(capacity=5)
    await drive(adaptive, upstream, callers=80, seconds=8)
    low = adaptive.statistics().concurrency
    upstream.capacity = 60  # scaled out
    await drive(adaptive, upstream, callers=80, seconds=8)
    high = adaptive.statistics().concurrency
    assert low <= 15 < 40 <= high, (low, high)


async def test_an_idle_upstream_keeps_its_limit(autojump_clock):
    # Two callers say nothing of what the upstream could take: no growth, no fall.
    adaptive, upstream = limiter(adaptive=True, concurrency=50), Upstream(capacity=1)
    await drive(adaptive, upstream, callers=2, seconds=10)
    assert adaptive.statistics().concurrency == 50


async def test_a_reload_keeps_the_limit_within_its_new_bounds(autojump_clock):
    adaptive, upstream = limiter(adaptive=True), Upstream(capacity=5)
    await drive(adaptive, upstream, callers=60, seconds=5)
    adaptive.resize(concurrency=100, queue=10, queue_timeout_s=1, adaptive=(30, 0.25))
    assert adaptive.statistics().concurrency == 30  # raised to the new minimum
    adaptive.resize(concurrency=100, queue=10, queue_timeout_s=1, adaptive=None)
    assert adaptive.statistics().concurrency == 100 and adaptive.adaptive is None


async def test_the_policy_turns_it_on_and_a_reload_off():
    text = """
version: 1
upstreams:
  users:
    url: "http://127.0.0.1:9001"
    limit: {concurrency: 80, adaptive: {min_concurrency: 6, tolerance: 50%}}
routes:
  - path: /api/{rest*}
    proxy: {upstream: users, path: "/{rest}"}
"""
    runtime = Runtime(load_policy_text(text, "p.yaml"))
    limiter = runtime.snapshot.upstreams["users"].limiter
    assert limiter.adaptive is not None
    assert (limiter.adaptive.maximum, limiter.adaptive.minimum,
            limiter.adaptive.tolerance) == (80, 6, 0.5)
    # It starts by measuring the upstream's minimum latency, with the fewest slots.
    assert limiter.statistics().concurrency == 6
    plain = text.replace(", adaptive: {min_concurrency: 6, tolerance: 50%}", "")
    new = runtime.prepare(load_policy_text(plain, "p.yaml"))
    runtime.activate(new)
    assert runtime.snapshot.upstreams["users"].limiter is limiter  # the same upstream
    assert limiter.adaptive is None and limiter.statistics().concurrency == 80


def adaptive_limiter(concurrency: int = 100, minimum: int = 4) -> UpstreamLimiter:
    return UpstreamLimiter(
        "u", concurrency=concurrency, queue=10_000, queue_timeout_s=3600,
        adaptive=GradientLimit(maximum=concurrency, minimum=minimum, tolerance=0.25))


async def test_reload_turning_adaptation_off_is_undone_by_calls_in_flight(autojump_clock):
    # Adaptive, still measuring the minimum latency: 4 slots.
    limiter = adaptive_limiter(concurrency=100, minimum=4)
    assert limiter.statistics().concurrency == 4
    release = trio.Event()

    async def hold() -> None:
        async with limiter.slot():
            await release.wait()

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(hold)
        await trio.sleep(0.1)
        # A reload turns adaptation off: the static 100 slots apply.
        limiter.resize(concurrency=100, queue=10_000, queue_timeout_s=3600, adaptive=None)
        assert limiter.statistics().concurrency == 100
        release.set()
    # The calls let in before the reload finish: the static limit must stay 100.
    assert limiter.adaptive is None
    assert limiter.statistics().concurrency == 100


async def test_limit_falls_when_the_upstream_slows_past_the_call_deadline(autojump_clock):
    limiter = adaptive_limiter(concurrency=100, minimum=4)
    latency = {"s": 0.010}

    async def caller() -> None:
        while True:
            # The call's deadline (1 s) is outside the slot, as in call_span/capacity_slot.
            with trio.move_on_after(1.0):
                async with limiter.slot():
                    await trio.sleep(latency["s"])

    async def drive(seconds: float) -> None:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for _ in range(60):
                    nursery.start_soon(caller)

    await drive(5)  # minimum latency measured (10 ms), the limit where it was
    before = limiter.statistics().concurrency
    assert before >= 60, before
    # The upstream degrades: every call now takes 5 s, five times the deadline (504s).
    latency["s"] = 5.0
    await drive(60)
    # An upstream that slows under load must be given fewer calls at once.
    after = limiter.statistics().concurrency
    assert after < before / 2, (before, after)


async def test_an_upstream_answering_4xx_gets_its_minimum_latency_measured(autojump_clock):
    # A healthy upstream that answers quickly, often "404 not found" (a fan-out call's
    # non-2xx answer, or a `one:` SQL query finding no row, leaves the slot as an error).
    limiter = UpstreamLimiter(
        "u", concurrency=100, queue=100, queue_timeout_s=0.05,
        adaptive=GradientLimit(maximum=100, minimum=4, tolerance=0.25))
    answered = shed = 0

    async def caller() -> None:
        nonlocal answered, shed
        while True:
            try:
                async with limiter.slot():
                    await trio.sleep(0.010)
                    answered += 1
                    raise UpstreamStatusError("upstream 'u' answered 404",
                                              upstream_status=404, upstream="u")
            except UpstreamStatusError:
                pass
            except Shed:
                shed += 1
                await trio.sleep(0.01)

    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(caller)
    # Thousands of answers within 10 ms each: the minimum latency is long measured, and
    # the upstream (as fast under load as alone) gets more than min_concurrency slots.
    assert answered > 1000
    assert limiter.statistics().concurrency > 4, (limiter.statistics(), shed)


async def test_relaying_an_answer_to_a_slow_client_is_not_the_upstream_s_latency(
        autojump_clock):
    # A proxied answer holds its slot while it streams to the client; once the head is
    # in (marked), the upstream's part is done, and slow clients must not shrink its
    # slots. Unmarked, the same slow clients would.
    upstream = Upstream(capacity=100)
    slots: dict[bool, int] = {}
    for marked in (True, False):
        adaptive = limiter(adaptive=True)
        gradient = adaptive.adaptive
        assert gradient is not None

        async def caller(adaptive: UpstreamLimiter = adaptive, marked: bool = marked,
                         gradient: GradientLimit = gradient) -> None:
            while True:
                async with adaptive.slot() as held:
                    await upstream.call()
                    if marked:
                        held.answered()
                    if gradient.min_latency_s is not None:  # clients slow from now on
                        await trio.sleep(0.5)  # relaying the body

        with trio.move_on_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(60):
                    nursery.start_soon(caller)
        slots[marked] = adaptive.statistics().concurrency
    assert slots[True] == 100 and slots[False] < 50, slots


async def test_calls_refused_before_anything_is_sent_teach_it_nothing(autojump_clock):
    # An open circuit refuses at once, inside the slot: a latency of ~0 taken as the
    # upstream's minimum would pin the limit at min_concurrency until the next
    # measurement.
    adaptive = limiter(adaptive=True)

    async def refused() -> None:
        async with adaptive.slot():
            raise CircuitOpen("open", retry_after_s=1.0)

    for _ in range(50):
        with pytest.raises(CircuitOpen):
            await refused()
    gradient = adaptive.adaptive
    assert gradient is not None and gradient.min_latency_s is None


def test_workers_do_not_all_measure_the_minimum_latency_at_once():
    # Workers (and gateways) started together and given the same traffic must not all
    # hold their slots at min_concurrency at the same moment every minute (the whole
    # fleet's capacity to the upstream falling at once): as Envoy's ``jitter``, each
    # measurement is put off by a random part of the period.
    started_measuring: list[float] = []
    for _ in range(20):
        gradient = GradientLimit(maximum=100, minimum=4, tolerance=0.25)
        now = 0.0
        for _ in range(GradientLimit.MIN_LATENCY_SAMPLES):
            gradient.sample(0.010, now, 1, now)
        assert gradient.slots == 100  # measured
        while gradient.slots != 4 and now < 200:
            now = round(now + 0.010, 3)
            gradient.sample(0.010, now - 0.010, 60, now)
        started_measuring.append(now)
    assert all(60 <= at < 60 * 1.2 for at in started_measuring), started_measuring
    assert len(set(started_measuring)) > 5, started_measuring
