import pytest
import trio
import trio.lowlevel

from gateway._errors import Shed
from gateway._limits import InflightGate, UpstreamLimiter


async def test_queue_full_and_queue_timeout_shed(autojump_clock):
    limiter = UpstreamLimiter("u", concurrency=2, queue=1, queue_timeout_s=0.05)
    outcomes: list[str] = []
    release = trio.Event()

    async def hold() -> None:
        try:
            async with limiter.slot():
                outcomes.append("ran")
                await release.wait()
        except Shed as shed:
            outcomes.append(shed.detail["reason"])

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(hold)
        await trio.sleep(0.01)
        stats = limiter.statistics()
        assert (stats.in_flight, stats.queued) == (2, 1)
        assert outcomes.count("queue_full") == 1
        await trio.sleep(0.1)  # the queued call waits past queue_timeout
        assert outcomes.count("queue_timeout") == 1
        release.set()
    assert outcomes.count("ran") == 2
    assert limiter.statistics().shed_total == 2
    assert limiter.statistics().in_flight == 0


async def test_queued_call_gets_a_freed_slot_in_time(autojump_clock):
    limiter = UpstreamLimiter("u", concurrency=1, queue=1, queue_timeout_s=0.05)
    got = []

    async def first() -> None:
        async with limiter.slot():
            await trio.sleep(0.03)

    async def second() -> None:
        async with limiter.slot():
            got.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.lowlevel.checkpoint()
        nursery.start_soon(second)
    assert got and got[0] == pytest.approx(0.03, abs=1e-6)


async def test_resize_in_place_keeps_holders(autojump_clock):
    limiter = UpstreamLimiter("u", concurrency=1, queue=0, queue_timeout_s=0.05)
    async with limiter.slot():
        limiter.resize(concurrency=3, queue=5, queue_timeout_s=0.1)
        async with limiter.slot(), limiter.slot():
            assert limiter.statistics().in_flight == 3
    assert "0/3 in flight" in repr(limiter)


def test_gate():
    gate = InflightGate(2)
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter()
    gate.leave()
    assert gate.try_enter()
    assert gate.shed_total == 1


async def test_a_queued_call_waits_no_longer_than_its_deadline_allows(autojump_clock):
    limiter = UpstreamLimiter("u", concurrency=1, queue=5, queue_timeout_s=5.0)
    release = trio.Event()

    async def hold() -> None:
        async with limiter.slot():
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await trio.sleep(0.01)
        start = trio.current_time()
        with pytest.raises(Shed) as shed:
            async with limiter.slot(max_wait_s=0.2):
                pass
        # Shed when the deadline's time to wait is spent, not at queue_timeout (5 s).
        assert trio.current_time() - start == pytest.approx(0.2)
        assert shed.value.detail["reason"] == "deadline"
        assert shed.value.retry_after_s is not None
        with pytest.raises(Shed):  # no time to wait at all: shed at once
            async with limiter.slot(max_wait_s=0.0):
                pass
        assert trio.current_time() - start == pytest.approx(0.2)
        release.set()
    assert limiter.statistics().shed_total == 2


async def test_a_call_arriving_as_a_slot_is_handed_to_the_queue_finds_the_queue_empty(
        autojump_clock):
    """concurrency 1, queue 1: A holds the slot, B waits in the queue. When A releases,
    B is given the slot (it no longer waits); a call C arriving at that moment must take
    the queue's one free place. It was shed with 503 "queue full (1 waiting)" while
    nobody waited: a spurious 503 at the handoff of a freed slot."""
    limiter = UpstreamLimiter("u", concurrency=1, queue=1, queue_timeout_s=10.0)
    order: list[str] = []
    release_a = trio.Event()

    async def b() -> None:
        async with limiter.slot():
            order.append("B")
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        async def a_then_c() -> None:
            async with limiter.slot():
                await release_a.wait()
            # No checkpoint between A's release and C's arrival: the same scheduler
            # pass, as any request arriving while the slot changes hands.
            try:
                async with limiter.slot():
                    order.append("C")
            except Shed as error:
                order.append(f"C shed: {error.message}")

        nursery.start_soon(a_then_c)
        await trio.sleep(0.01)
        nursery.start_soon(b)
        await trio.sleep(0.01)
        assert limiter.statistics().queued == 1
        release_a.set()
    assert order == ["B", "C"], order


@pytest.mark.parametrize("adaptive", [False, True])
async def test_a_kept_slot_stays_taken_past_its_block_until_returned(autojump_clock, adaptive):
    """What a cancelled call leaves occupying the upstream (a PostgreSQL connection on
    its way back to its pool) keeps its slot: a caller meanwhile queues or is shed."""
    limiter = UpstreamLimiter("u", concurrency=1, queue=1, queue_timeout_s=1.0)
    if adaptive:
        limiter.resize(concurrency=1, queue=1, queue_timeout_s=1.0, adaptive=(1, 0.25))
    async with limiter.slot() as held:
        returned = held.keep()
    assert limiter.statistics().in_flight == 1
    got: list[float] = []

    async def next_call() -> None:
        async with limiter.slot():
            got.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(next_call)
        await trio.sleep(0.5)
        assert limiter.statistics().queued == 1
        with pytest.raises(Shed):  # the queue (1) is full
            async with limiter.slot():
                pass
        returned()
        returned()  # once only
    assert got == [pytest.approx(0.5)]
    assert limiter.statistics().in_flight == 0


async def test_a_slot_returned_before_its_block_ends_is_released_with_it(autojump_clock):
    limiter = UpstreamLimiter("u", concurrency=1, queue=0, queue_timeout_s=1.0)
    async with limiter.slot() as held:
        returned = held.keep()
        waiter_done = trio.Event()

        async def wait_for_it() -> None:
            await held.returned()
            waiter_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_it)
            await trio.sleep(0.1)
            assert not waiter_done.is_set()
            returned()
        assert limiter.statistics().in_flight == 1
    assert limiter.statistics().in_flight == 0


async def test_a_hedges_slot_kept_by_its_connection_is_released_once_it_is_back():
    """A hedge holds a slot of its own (try_hold): what its try leaves out keeps that
    slot, so each connection on its way back holds one."""
    limiter = UpstreamLimiter("u", concurrency=2, queue=0, queue_timeout_s=1.0)
    async with limiter.slot():
        hedge = limiter.try_hold()
        assert hedge is not None and limiter.try_hold() is None
        returned = hedge.keep()
        limiter.release(hedge)
        limiter.release(hedge)  # once only
        assert limiter.statistics().in_flight == 2
        returned()
        assert limiter.statistics().in_flight == 1
    assert limiter.statistics().in_flight == 0
    hedge = limiter.try_hold()
    assert hedge is not None
    limiter.release(hedge)  # nothing kept: given back at once
    assert limiter.statistics().in_flight == 0
