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
def automatic_collections_off(monkeypatch):
    monkeypatch.setattr(_gc, "_tuned", True)
    was_enabled = gc.isenabled()
    gc.disable()  # nothing from the allocation counters: only the clock collects
    yield
    if was_enabled:
        gc.enable()


async def test_cyclic_garbage_is_collected_on_the_clock(automatic_collections_off,
                                                        autojump_clock):
    cycle = _Cycle()
    alive = weakref.ref(cycle)
    del cycle
    assert alive() is not None, "cyclic garbage only goes in a collection"
    with trio.move_on_after(_gc.FULL_COLLECTION_INTERVAL_S * 1.5):
        await _gc.run_full_collections()
    assert alive() is None


async def test_costly_collections_are_spaced_to_stay_within_the_budget(
        automatic_collections_off, autojump_clock, monkeypatch):
    collected_at: list[float] = []
    monkeypatch.setattr(_gc.gc, "collect", lambda: collected_at.append(trio.current_time()))
    # Each collection "takes" 100 ms of real time: at a 2 % budget, one every 5 s.
    ticks = itertools.count()
    monkeypatch.setattr(_gc.time, "perf_counter", lambda: next(ticks) * 0.1)
    with trio.move_on_after(12):
        await _gc.run_full_collections(min_interval_s=1.0, budget=0.02)
    assert collected_at == pytest.approx([1.0, 6.0, 11.0])


async def test_cheap_collections_run_every_interval(automatic_collections_off,
                                                    autojump_clock, monkeypatch):
    collected_at: list[float] = []
    monkeypatch.setattr(_gc.gc, "collect", lambda: collected_at.append(trio.current_time()))
    monkeypatch.setattr(_gc.time, "perf_counter", lambda: 0.0)
    with trio.move_on_after(3.5):
        await _gc.run_full_collections(min_interval_s=1.0, budget=0.02)
    assert collected_at == pytest.approx([1.0, 2.0, 3.0])



async def test_a_surge_in_memory_collects_before_a_deferred_collection(
        automatic_collections_off, autojump_clock, monkeypatch):
    # Collections "take" 100 ms, so at a 2 % budget the next is due 5 s after the
    # last; the peak RSS jumps by the surge size at 2.5 s: the clock collects at the
    # next check (3 s) instead of waiting for 6 s.
    collected_at: list[float] = []
    monkeypatch.setattr(_gc.gc, "collect", lambda: collected_at.append(trio.current_time()))
    ticks = itertools.count()
    monkeypatch.setattr(_gc.time, "perf_counter", lambda: next(ticks) * 0.1)
    monkeypatch.setattr(_gc, "peak_rss_bytes",
                        lambda: 100 * 2**20 + (64 * 2**20 if trio.current_time() > 2.5 else 0))
    with trio.move_on_after(6.5):
        await _gc.run_full_collections(min_interval_s=1.0, budget=0.02, surge_bytes=64 * 2**20)
    assert collected_at == pytest.approx([1.0, 3.0])


def test_a_tuned_worker_leaves_collections_to_the_clock(monkeypatch):
    # Request churn (objects freed by reference counting) must not run collections that
    # walk the requests in flight: the tuned worker collects only on its clock.
    monkeypatch.delenv("GATEWAY_GC", raising=False)
    monkeypatch.delenv("GATEWAY_GC_THRESHOLDS", raising=False)
    monkeypatch.setattr(_gc, "_tuned", False)
    was_enabled = gc.isenabled()
    try:
        _gc.tune_garbage_collector()
        before = gc.get_stats()[0]["collections"]
        in_flight: collections.deque[list[list[int]]] = collections.deque(maxlen=1000)
        for _ in range(50_000):  # 1,000 requests in flight, each holding 20 objects
            in_flight.append([[] for _ in range(20)])
        assert gc.get_stats()[0]["collections"] == before
        assert _gc._tuned
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
