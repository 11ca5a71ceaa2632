"""``server.accept_batch``: how many queued connections a worker takes per wake-up.

With 1 (the default, trio's behaviour) every accepted connection costs a scheduler
pass, so a busy worker takes a burst of new connections in over as many passes; with
N it takes up to N in one.
"""

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import hypercorn.trio.run
import pytest
import trio
import trio.testing

from gateway import _hypercorn_fixes
from gateway._hypercorn_fixes import BatchAcceptListener, set_accept_batch
from gateway._policy_loader import PolicyError, load_policy_text
from gateway._server import listen_socket
from tests.gateway_harness import run_gateway
from tests.upstream import proxy_policy, start_upstream

QUEUED = 8


@contextmanager
def queued_connections(count: int) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listening socket with ``count`` connections waiting in its backlog (the kernel
    completes the handshakes; nobody has accepted them yet)."""
    listening = listen_socket()
    clients = [socket.create_connection(listening.getsockname()) for _ in range(count)]
    try:
        yield listening, clients
    finally:
        for client in clients:
            client.close()
        listening.close()


@pytest.fixture
def batch():
    yield set_accept_batch
    set_accept_batch(1)


async def test_one_per_pass_by_default(batch) -> None:
    batch(1)
    with queued_connections(QUEUED) as (listening, _clients):
        listener = BatchAcceptListener(trio.socket.from_stdlib_socket(listening))
        streams = [await listener.accept()]
        for _ in range(QUEUED - 1):
            with trio.testing.assert_checkpoints():
                streams.append(await listener.accept())
        for stream in streams:
            await stream.aclose()


async def test_a_batch_takes_the_queued_connections_in_one_wake_up(batch) -> None:
    batch(QUEUED)
    with queued_connections(QUEUED) as (listening, clients):
        listener = BatchAcceptListener(trio.socket.from_stdlib_socket(listening))
        streams = [await listener.accept()]
        with trio.testing.assert_no_checkpoints():
            for _ in range(QUEUED - 1):
                streams.append(await listener.accept())
        # Each stream is a real connection to one of the clients, none of them twice.
        peers = {stream.socket.getpeername() for stream in streams}
        assert peers == {client.getsockname() for client in clients}
        for stream in streams:
            await stream.aclose()


async def test_a_batch_is_capped(batch) -> None:
    batch(3)
    with queued_connections(QUEUED) as (listening, _clients):
        listener = BatchAcceptListener(trio.socket.from_stdlib_socket(listening))
        streams = [await listener.accept()]
        with trio.testing.assert_no_checkpoints():
            streams += [await listener.accept(), await listener.accept()]
        with trio.testing.assert_checkpoints():
            streams.append(await listener.accept())  # the fourth starts a new batch
        await listener.aclose()  # closes the ones taken but not yet handed out
        for stream in streams:
            await stream.aclose()


def test_policy_refuses_a_batch_of_zero() -> None:
    text = proxy_policy("http://127.0.0.1:1") + "server:\n  accept_batch: 0\n"
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    message = str(caught.value)
    assert "server.accept_batch" in message and "p.yaml:" in message


async def test_the_gateway_serves_a_burst_taken_in_one_batch(batch) -> None:
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = proxy_policy(upstream.url) + f"server:\n  accept_batch: {QUEUED}\n"
        async with run_gateway(policy) as gateway:
            assert _hypercorn_fixes._accept_batch == QUEUED
            assert hypercorn.trio.run.trio.SocketListener is BatchAcceptListener
            # Blocking connects from outside the loop: all of them queue in the backlog
            # before the worker wakes, and it takes them in together.
            clients = [socket.create_connection(("127.0.0.1", gateway.port))
                       for _ in range(QUEUED)]
            try:
                streams = [trio.SocketStream(trio.socket.from_stdlib_socket(c))
                           for c in clients]
                for index, stream in enumerate(streams):
                    await stream.send_all(f"GET /api/n{index} HTTP/1.1\r\nhost: x\r\n"
                                          "connection: close\r\n\r\n".encode())
                for stream in streams:
                    answer = b""
                    with trio.fail_after(10):
                        while chunk := await stream.receive_some():
                            answer += chunk
                    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]
            finally:
                for client in clients:
                    client.close()
        nursery.cancel_scope.cancel()
    assert _hypercorn_fixes._accept_batch == QUEUED  # until a policy says otherwise
