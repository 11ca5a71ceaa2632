"""What the gateway changes in its Hypercorn worker, tested at the level of sockets and
the garbage collector: connections waiting in the listen backlog are taken in one
wake-up, and full collections run on a clock.
"""

import gc
import weakref

import trio
import trio.testing

from gateway import _gc
from gateway._hypercorn_fixes import BatchAcceptListener


async def _listener() -> tuple[BatchAcceptListener, int]:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return BatchAcceptListener(sock), sock.getsockname()[1]


async def test_queued_connections_are_taken_in_one_wake_up():
    listener, port = await _listener()
    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
    first = await listener.accept()
    # The other four were already in the backlog: no waiting (no checkpoint) for them.
    with trio.testing.assert_no_checkpoints():
        rest = [await listener.accept() for _ in range(4)]
    for n, client in enumerate(clients):
        await client.send_all(b"%d" % n)
    received = sorted([await stream.receive_some(16) for stream in (first, *rest)])
    assert received == [b"0", b"1", b"2", b"3", b"4"]
    # A sixth accept waits for a connection like any other.
    with trio.move_on_after(0.2) as waited:
        await listener.accept()
    assert waited.cancelled_caught
    for stream in (first, *rest, *clients):
        await stream.aclose()
    await listener.aclose()


async def test_closing_the_listener_closes_connections_taken_but_not_handed_out():
    listener, port = await _listener()
    clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
    first = await listener.accept()
    await listener.aclose()
    # The two drained connections were closed by the listener: their clients see EOF.
    for client in clients[1:]:
        with trio.fail_after(5):
            assert await client.receive_some(16) == b""
    await first.aclose()
    for client in clients:
        await client.aclose()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_full_collections_run_on_the_clock(monkeypatch, autojump_clock):
    monkeypatch.setattr(_gc, "_tuned", True)
    was_enabled = gc.isenabled()
    gc.disable()  # no collection from the allocation counters at all
    try:
        cycle = _Cycle()
        alive = weakref.ref(cycle)
        del cycle
        assert alive() is not None, "cyclic garbage only goes in a collection"
        with trio.move_on_after(_gc.FULL_COLLECTION_INTERVAL_S * 1.5):
            await _gc.run_full_collections()
        assert alive() is None
    finally:
        if was_enabled:
            gc.enable()
