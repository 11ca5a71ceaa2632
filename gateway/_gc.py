"""The worker's garbage collector, tuned for many requests in flight.

Modules, the policy and the app are alive for the worker's whole life; they are frozen
after start-up so that no collection walks them again.

The objects of requests in flight survive the young collections, so with many in
flight they reach the oldest generation quickly, and CPython's thresholds then run a
full collection (walking all of them) every few hundred requests. Full collections are
therefore not left to the allocation counters (:data:`GC_THRESHOLDS` makes those rare)
but run on a clock: every :data:`FULL_COLLECTION_INTERVAL_S`, so that cyclic garbage
(exception tracebacks holding buffers, which hostile traffic produces by the thousand)
cannot pile up, and less often when a collection is costly, so that they never take
more than :data:`FULL_COLLECTION_BUDGET` of the time (their cost grows with the
requests in flight). Measured: at 1,000 connections 0.68 -> 0.61 ms of CPU per
request (``bench.overhead --feature gc --connections 1000``); a fixed 1 s clock halved
throughput at 10,000 connections; rare full collections without the clock let a
three-minute soak grow the worker's RSS by 128 % (with the clock: +0.6 %).

``GATEWAY_GC=default`` keeps CPython's behaviour; ``GATEWAY_GC_THRESHOLDS=a,b,c`` sets
the thresholds (the clock still runs).
"""

from __future__ import annotations

import gc
import os
import time

import trio

#: CPython's young thresholds; a full collection from the counters only after 1,000
#: (not 10) collections of the middle generation: the clock runs them instead.
GC_THRESHOLDS = (700, 10, 1000)
#: Seconds between full collections a worker runs itself.
FULL_COLLECTION_INTERVAL_S = 1.0
#: Most of the worker's time full collections may take (their interval grows with them).
FULL_COLLECTION_BUDGET = 0.02

_tuned = False


def tune_garbage_collector() -> None:
    """Freeze the start-up objects and set the thresholds (a worker calls this once)."""
    global _tuned
    if os.environ.get("GATEWAY_GC") == "default":
        return
    gc.collect()
    gc.freeze()
    override = os.environ.get("GATEWAY_GC_THRESHOLDS")
    thresholds = tuple(int(v) for v in override.split(",")) if override else GC_THRESHOLDS
    gc.set_threshold(*thresholds)
    _tuned = True


async def run_full_collections(min_interval_s: float = FULL_COLLECTION_INTERVAL_S,
                               budget: float = FULL_COLLECTION_BUDGET) -> None:
    """Run full collections while the worker lives (if tuned), spending at most
    ``budget`` of the time on them but never running them less often than needed:
    the next one comes ``max(min_interval_s, duration / budget)`` after the last."""
    if not _tuned:
        return
    interval_s = min_interval_s
    while True:
        await trio.sleep(interval_s)
        started = time.perf_counter()
        gc.collect()
        interval_s = max(min_interval_s, (time.perf_counter() - started) / budget)
