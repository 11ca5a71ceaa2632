"""The worker's garbage collector: full collections run on a clock, paced by their cost.

(The keep-alive timer and the socket writes the gateway changes in Hypercorn's worker
are tested end to end in ``tests/hostile/test_keep_alive.py`` and the streaming tests.)
"""

import collections
import gc
import itertools
import weakref

import pytest
import trio

from gateway import _gc


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def collector_state_restored():
    """The collector as the test found it: enabled flag, thresholds, frozen objects."""
    was_enabled, thresholds = gc.isenabled(), gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    yield
    if frozen_before == 0:
        gc.unfreeze()
    gc.set_threshold(*thresholds)
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


@pytest.fixture
def automatic_collections_off(monkeypatch, collector_state_restored):
    monkeypatch.setattr(_gc, "_tuned", True)
    gc.disable()  # nothing from the allocation counters: only the clock collects


async def test_cyclic_garbage_is_collected_on_the_clock(automatic_collections_off,
                                                        autojump_clock):
    cycle = _Cycle()
    alive = weakref.ref(cycle)
    del cycle
    assert alive() is not None, "cyclic garbage only goes in a collection"
    with trio.move_on_after(_gc.FULL_COLLECTION_INTERVAL_S * 1.5):
        await _gc.run_full_collections()
    assert alive() is None


async def collection_times(monkeypatch, cost_s: float, run_for_s: float,
                           found: int = 5_000, **settings: float) -> list[float]:
    """When the clock collects within ``run_for_s`` if each collection takes ``cost_s``
    of CPU and finds ``found`` unreachable objects (a 1 s interval and a 2 % budget
    unless ``settings`` say otherwise)."""
    collected_at: list[float] = []

    def collect() -> int:
        collected_at.append(trio.current_time())
        return found

    monkeypatch.setattr(_gc.gc, "collect", collect)
    ticks = itertools.count()  # read twice per collection: before and after
    monkeypatch.setattr(_gc.time, "thread_time", lambda: next(ticks) * cost_s)
    with trio.move_on_after(run_for_s):
        await _gc.run_full_collections(**{"min_interval_s": 1.0, "budget": 0.02, **settings})
    return collected_at


async def test_costly_collections_are_spaced_to_stay_within_the_budget(
        automatic_collections_off, autojump_clock, monkeypatch):
    # 100 ms per collection at a 2 % budget: one every 5 s.
    assert await collection_times(monkeypatch, 0.1, 12) == pytest.approx([1.0, 6.0, 11.0])


async def test_collections_that_find_little_garbage_take_a_quarter_of_the_budget(
        automatic_collections_off, autojump_clock, monkeypatch):
    # 100 ms per collection, 12 objects found each time: at 0.5 %, one every 20 s.
    times = await collection_times(monkeypatch, 0.1, 45, found=12)
    assert times == pytest.approx([1.0, 21.0, 41.0])


async def test_cheap_collections_run_every_interval(automatic_collections_off,
                                                    autojump_clock, monkeypatch):
    assert await collection_times(monkeypatch, 0.0, 3.5) == pytest.approx([1.0, 2.0, 3.0])


async def test_very_costly_collections_still_run_every_max_interval(
        automatic_collections_off, autojump_clock, monkeypatch):
    # 10 s per collection would put the next one 500 s later at a 2 % budget.
    times = await collection_times(monkeypatch, 10.0, 65, max_interval_s=30.0)
    assert times == pytest.approx([1.0, 31.0, 61.0])


async def test_a_surge_in_memory_collects_before_a_deferred_collection(
        automatic_collections_off, autojump_clock, monkeypatch):
    # The next collection is due 5 s after the one at 1 s; the RSS high-water mark
    # rises by the surge size at 2.5 s: the clock collects at its next check (3 s).
    monkeypatch.setattr(_gc, "peak_rss_bytes",
                        lambda: 100 * 2**20 + (64 * 2**20 if trio.current_time() > 2.5 else 0))
    times = await collection_times(monkeypatch, 0.1, 6.5, surge_bytes=64 * 2**20)
    assert times == pytest.approx([1.0, 3.0])


def _requests_in_flight_churn() -> int:
    """Young collections run while 1,000 requests of 20 objects each come and go."""
    before = gc.get_stats()[0]["collections"]
    in_flight: collections.deque[list[list[int]]] = collections.deque(maxlen=1000)
    for _ in range(50_000):
        in_flight.append([[] for _ in range(20)])
    return gc.get_stats()[0]["collections"] - before


def test_a_tuned_worker_leaves_collections_to_the_clock(monkeypatch,
                                                         collector_state_restored):
    # Request churn (objects freed by reference counting) must not run collections that
    # walk the requests in flight: the tuned worker collects only on its clock.
    monkeypatch.delenv("GATEWAY_GC", raising=False)
    monkeypatch.delenv("GATEWAY_GC_THRESHOLDS", raising=False)
    monkeypatch.setattr(_gc, "_tuned", False)
    _gc.tune_garbage_collector()
    assert _gc._tuned
    assert _requests_in_flight_churn() == 0


def test_thresholds_from_the_environment_turn_young_collections_back_on(
        monkeypatch, collector_state_restored):
    monkeypatch.delenv("GATEWAY_GC", raising=False)
    monkeypatch.setenv("GATEWAY_GC_THRESHOLDS", "700,10,1000")
    monkeypatch.setattr(_gc, "_tuned", False)
    gc.disable()
    _gc.tune_garbage_collector()
    assert gc.isenabled()
    assert gc.get_threshold() == (700, 10, 1000)
    assert _requests_in_flight_churn() > 0


async def test_default_gc_leaves_the_collector_alone(monkeypatch, collector_state_restored):
    monkeypatch.setenv("GATEWAY_GC", "default")
    monkeypatch.setattr(_gc, "_tuned", False)
    gc.enable()
    thresholds = gc.get_threshold()
    _gc.tune_garbage_collector()
    assert gc.isenabled() and gc.get_threshold() == thresholds
    with trio.fail_after(1):
        await _gc.run_full_collections()  # returns at once: nothing to run
