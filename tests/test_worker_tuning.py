"""The worker's garbage collector: full collections run on a clock, paced by their cost.

(The keep-alive timer and the socket writes the gateway changes in Hypercorn's worker
are tested end to end in ``tests/hostile/test_keep_alive.py`` and the streaming tests.)
"""

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
