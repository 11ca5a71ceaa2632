"""The worker's garbage collector, tuned for many requests in flight.

Modules, the policy and the app are alive for the worker's whole life; they are frozen
after start-up so that no collection walks them again.

A proxied request frees almost everything it allocates by reference counting; cyclic
garbage is rare (about 2,400 objects over 130,000 requests at 1,000 connections). But
the objects of requests in flight live for the whole request, so with many in flight
CPython's allocation-driven collections walk them again and again: at 1,000 connections
collections took 12 % of the worker's CPU (``perf``: ``gc_collect_main`` and its
visitors, 52 of 438 µs per request; 5 % at 64). Automatic collections are therefore
off, and collections run on a clock instead: every :data:`FULL_COLLECTION_INTERVAL_S`,
and less often when a collection is costly, so that the clock's collections take at
most :data:`FULL_COLLECTION_BUDGET` of the worker's CPU (their cost grows with the
requests in flight), or :data:`QUIET_COLLECTION_BUDGET` while they find almost no
garbage, but never less often than :data:`MAX_INTERVAL_S`. While a
costly collection is deferred, the clock still looks every interval at the worker's
RSS high-water mark: if it rose by :data:`SURGE_BYTES` since the last collection (a
storm of cyclic garbage, such as exception tracebacks holding buffers), it collects
at that check, whatever the budget. Memory freed by a collection can be refilled up
to the old mark unnoticed; the next collection on the clock takes it. Measured with
``bench.overhead --feature gc --connections 1000`` and in a three-minute soak: see
``bench/README.md``.

``GATEWAY_GC=default`` keeps CPython's behaviour; ``GATEWAY_GC_THRESHOLDS=a,b,c`` turns
allocation-driven collections back on with these thresholds (the clock still runs).
"""

from __future__ import annotations

import gc
import os
import resource
import time

import trio

#: Seconds between full collections a worker runs itself (and between surge checks).
FULL_COLLECTION_INTERVAL_S = 1.0
#: Most of the worker's CPU the clock's collections may take (their interval grows).
#: Not lower: at 0.5 % the garbage of hostile traffic, costlier to collect the longer
#: it waits, grew the worker's RSS by 145 % in ``make soak`` (2 %: +1.2 %).
FULL_COLLECTION_BUDGET = 0.02
#: The budget while collections find almost nothing (fewer than
#: :data:`GARBAGE_WORTH_COLLECTING` objects): a proxied request leaves about one cyclic
#: object in fifty, so at 1,000 connections the 2 % budget was the one cost per
#: request that grew with the requests in flight (``perf``: 8.0 against 2.1 µs at 64).
#: A collection that finds garbage goes back to :data:`FULL_COLLECTION_BUDGET`.
QUIET_COLLECTION_BUDGET = 0.005
#: Unreachable objects a collection must find for the clock to keep the full budget.
GARBAGE_WORTH_COLLECTING = 1_000
#: Longest interval between the clock's collections, however costly they are.
MAX_INTERVAL_S = 30.0
#: Growth of the worker's peak RSS since the last collection that collects at once.
SURGE_BYTES = 64 * 2**20

_tuned = False


def tune_garbage_collector() -> None:
    """Freeze the start-up objects and leave collections to the clock.

    A worker calls this once; :func:`run_full_collections` then collects.
    """
    global _tuned
    if os.environ.get("GATEWAY_GC") == "default":
        return
    gc.collect()
    gc.freeze()
    if override := os.environ.get("GATEWAY_GC_THRESHOLDS"):
        gc.set_threshold(*(int(v) for v in override.split(",")))
        gc.enable()
    else:
        gc.disable()
    _tuned = True


def peak_rss_bytes() -> int:
    """The worker's RSS high-water mark (Linux reports ``ru_maxrss`` in KiB): a system
    call, no file to read."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def run_full_collections(min_interval_s: float = FULL_COLLECTION_INTERVAL_S,
                               budget: float = FULL_COLLECTION_BUDGET,
                               surge_bytes: int = SURGE_BYTES,
                               max_interval_s: float = MAX_INTERVAL_S,
                               quiet_budget: float = QUIET_COLLECTION_BUDGET,
                               garbage_worth_collecting: int = GARBAGE_WORTH_COLLECTING,
                               ) -> None:
    """Run full collections while the worker lives (if tuned).

    The next one comes ``duration / budget`` after the last (its CPU time, so that a
    worker descheduled mid-collection does not defer the next), or ``duration /
    quiet_budget`` when the last found fewer than ``garbage_worth_collecting``
    unreachable objects, between ``min_interval_s`` and ``max_interval_s``; or at the
    first check (every ``min_interval_s``) that finds the RSS high-water mark risen by
    ``surge_bytes``.
    """
    if (min_interval_s <= 0 or budget <= 0 or quiet_budget <= 0
            or max_interval_s < min_interval_s):
        raise ValueError("need 0 < min_interval_s <= max_interval_s and budgets above 0")
    if not _tuned:
        return
    interval_s = min_interval_s
    while True:
        rss_at_last = peak_rss_bytes()
        due = trio.current_time() + interval_s
        while (left_s := due - trio.current_time()) > 0:
            await trio.sleep(min(min_interval_s, left_s))
            if peak_rss_bytes() - rss_at_last >= surge_bytes:
                break
        started = time.thread_time()
        found = gc.collect()
        cost_s = time.thread_time() - started
        share = budget if found >= garbage_worth_collecting else quiet_budget
        interval_s = min(max_interval_s, max(min_interval_s, cost_s / share))
