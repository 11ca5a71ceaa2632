"""The HTTP/1.1 upstream pool against real trio servers on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import gc
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from functools import partial

import h11
import pytest
import trio
import trio.testing

from gateway._errors import (
    BadRequest,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamResetError,
)
from gateway.upstreams import HttpUpstreamPool, PoolLimits, PoolStatistics, UpstreamResponse
from gateway.upstreams._h1 import ClientConnection, RequestHead
from gateway.upstreams._http import _Connection
from gateway.upstreams._tls import UpstreamTls, client_context

SAFETY_S = 10.0  # bounds a wait that should end at once; a hang fails instead of blocking CI


# -- a small h11 upstream ------------------------------------------------------------------


class ServerConn:
    """One accepted connection, with helpers for the handlers below."""

    def __init__(self, stream: trio.SocketStream, index: int) -> None:
        self.stream = stream
        self.index = index
        self.h = h11.Connection(h11.SERVER)
        self.requests = 0
        self.peer_closed = trio.Event()  # the client closed its side (EOF or reset)
        self.closed = False

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.peer_closed.set()
        self.h.receive_data(data)
        return bool(data)

    async def next_event(self) -> object:
        while True:
            event = self.h.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self._fill()

    async def next_request(self) -> h11.Request | None:
        event = await self.next_event()
        if isinstance(event, h11.Request):
            self.requests += 1
            return event
        return None

    async def body_chunks(self) -> AsyncIterator[bytes]:
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def read_body(self) -> bytes:
        return b"".join([chunk async for chunk in self.body_chunks()])

    async def send(self, event: object) -> None:
        data = self.h.send(event)
        if data:
            await self.stream.send_all(data)

    async def respond(
        self, status: int = 200, body: bytes = b"", headers: list[tuple[bytes, bytes]] = ()
    ) -> None:
        await self.send(
            h11.Response(
                status_code=status,
                headers=[(b"content-length", b"%d" % len(body)), *headers],
            )
        )
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def wait_peer_closed(self) -> None:
        """Wait for the client's EOF, reading (and dropping) whatever it still sends."""
        with trio.fail_after(SAFETY_S):
            while not self.peer_closed.is_set():
                await self._fill_raw()

    async def _fill_raw(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.peer_closed.set()

    async def close(self, *, reset: bool = False) -> None:
        if reset:
            self.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self.closed = True
        await self.stream.aclose()


Handler = Callable[[ServerConn, h11.Request], Awaitable[None]]


class Upstream:
    """Serves each request with ``handler``; counts connections as the pool sees them."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns: list[ServerConn] = []
        self.open_now = 0
        self.peak_open = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = ServerConn(stream, len(self.conns))
        self.conns.append(conn)
        self.open_now += 1
        self.peak_open = max(self.peak_open, self.open_now)
        try:
            while not conn.closed:
                request = await conn.next_request()
                if request is None:
                    break
                await self.handler(conn, request)
                if conn.closed:
                    break
                if conn.h.our_state is h11.DONE and conn.h.their_state is h11.DONE:
                    conn.h.start_next_cycle()
                else:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            self.open_now -= 1
            if not conn.closed:
                await conn.wait_peer_closed()
                await conn.close()


async def start_upstream(nursery: trio.Nursery, handler: Handler) -> Upstream:
    upstream = Upstream(handler)
    listeners = await nursery.start(partial(trio.serve_tcp, upstream._serve, 0, host="127.0.0.1"))
    upstream.port = listeners[0].socket.getsockname()[1]
    return upstream


async def echo(conn: ServerConn, request: h11.Request) -> None:
    """Answers with the request target, for checks that carry no body."""
    await conn.read_body()
    await conn.respond(200, request.target)


async def get(pool: HttpUpstreamPool, target: str = "/") -> tuple[int, bytes]:
    async with pool.request("GET", target, []) as response:
        return response.status, await response.read()


# -- basics -------------------------------------------------------------------------------


@pytest.fixture(params=[0, 1100], ids=["low descriptors", "descriptors above 1,023"])
def new_descriptors_from(request):
    """Hold enough descriptors that new sockets get numbers from the parameter up: above
    1,023, as in a worker serving a thousand clients (``select()`` cannot take them)."""
    held: list[socket.socket] = []
    try:
        while request.param and (not held or held[-1].fileno() < request.param):
            held.append(socket.socket())
        yield request.param
    finally:
        for sock in held:
            sock.close()


async def test_get_reuses_one_connection(nursery, new_descriptors_from):
    upstream = await start_upstream(nursery, echo)
    pool = HttpUpstreamPool("users", upstream.url)
    for i in range(5):
        assert await get(pool, f"/users/{i}") == (200, f"/users/{i}".encode())
    assert pool._idle[0].socket.fileno() >= new_descriptors_from
    assert len(upstream.conns) == 1
    assert upstream.conns[0].requests == 5
    assert pool.statistics() == PoolStatistics(
        active=0, idle=1, waiting=0, opened_total=1, closed_total=0
    )
    assert repr(pool) == (
        "<HttpUpstreamPool users [Requests: 0 active, 0 queued | Connections: 0 active, 1 idle]>"
    )
    await pool.aclose()
    assert pool.statistics().idle == 0
    await upstream.conns[0].peer_closed.wait()


async def test_prefix_host_header_and_response_fields(nursery):
    seen: list[h11.Request] = []

    async def handler(conn: ServerConn, request: h11.Request) -> None:
        seen.append(request)
        await conn.read_body()
        await conn.respond(201, b"{}", [(b"X-Thing", b"1")])

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url + "/v1/")
    async with pool.request("GET", "/users/7?x=1", [(b"accept", b"*/*")]) as response:
        assert isinstance(response, UpstreamResponse)
        assert response.status == 201
        assert response.reason == b""
        assert (b"x-thing", b"1") in response.headers
        assert await response.read() == b"{}"
    async with pool.request("GET", "/", [(b"Host", b"example.test")]) as response:
        await response.read()
    assert seen[0].target == b"/v1/users/7?x=1"
    assert (b"host", f"127.0.0.1:{upstream.port}".encode()) in list(seen[0].headers)
    assert (b"accept", b"*/*") in list(seen[0].headers)
    assert [v for n, v in seen[1].headers if n == b"host"] == [b"example.test"]


def test_base_url_and_limits_are_validated():
    with pytest.raises(ValueError, match="TLS settings for an http:// URL"):
        HttpUpstreamPool("u", "http://127.0.0.1:9001", tls=UpstreamTls(client_context(), "u"))
    with pytest.raises(ValueError, match="http://"):
        HttpUpstreamPool("u", "ftp://127.0.0.1")
    with pytest.raises(ValueError, match="no host"):
        HttpUpstreamPool("u", "http:///x")
    with pytest.raises(ValueError, match="max_connections must be at least 1, got 0"):
        PoolLimits(max_connections=0)
    with pytest.raises(ValueError, match="idle_timeout_s"):
        PoolLimits(idle_timeout_s=0)


async def test_closed_pool_refuses_new_requests_and_closes_released_connections(nursery):
    upstream = await start_upstream(nursery, echo)
    pool = HttpUpstreamPool("users", upstream.url)
    async with pool.request("GET", "/", []) as response:
        await pool.aclose()
        assert await response.read() == b"/"
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)
    await upstream.conns[0].peer_closed.wait()
    with pytest.raises(UpstreamConnectError, match="closed"):
        async with pool.request("GET", "/", []):
            pass  # pragma: no cover


# -- 1. the connection cap ----------------------------------------------------------------


async def test_200_concurrent_requests_never_exceed_max_connections(nursery):
    ten_in_flight = trio.Event()
    in_flight = 0

    async def handler(conn: ServerConn, request: h11.Request) -> None:
        nonlocal in_flight
        await conn.read_body()
        in_flight += 1
        if in_flight == 10:
            ten_in_flight.set()
        await ten_in_flight.wait()  # hold the first ten until the pool has filled up
        await conn.respond(200, request.target)

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits(max_connections=10))
    results: dict[int, tuple[int, bytes]] = {}

    async def one(i: int) -> None:
        results[i] = await get(pool, f"/{i}")

    async with trio.open_nursery() as clients:
        for i in range(200):
            clients.start_soon(one, i)
        with trio.fail_after(SAFETY_S):
            await ten_in_flight.wait()
        stats = pool.statistics()
        assert (stats.active, stats.waiting) == (10, 190)
        assert "Connections: 10 active" in repr(pool)
        assert "190 queued" in repr(pool)

    assert results == {i: (200, f"/{i}".encode()) for i in range(200)}
    assert len(upstream.conns) == 10
    assert upstream.peak_open == 10
    assert pool.statistics() == PoolStatistics(
        active=0, idle=10, waiting=0, opened_total=10, closed_total=0
    )


async def test_cancelled_waiter_leaves_the_queue(nursery):
    release = trio.Event()

    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.read_body()
        await release.wait()
        await conn.respond(200, b"ok")

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits(max_connections=1))
    async with trio.open_nursery() as clients:
        clients.start_soon(get, pool)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:

            async def cancel_when_queued() -> None:
                await trio.testing.wait_all_tasks_blocked()
                assert pool.statistics().waiting == 1
                scope.cancel(reason="test gives up")

            clients.start_soon(cancel_when_queued)
            await get(pool)  # queued behind the first request, then cancelled
        assert scope.cancelled_caught
        assert pool.statistics().waiting == 0
        release.set()
    assert await get(pool) == (200, b"ok")
    assert pool.statistics() == PoolStatistics(0, 1, 0, 1, 0)


async def test_waiters_are_served_first_in_first_out(nursery):
    order: list[bytes] = []

    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.read_body()
        order.append(request.target)
        await conn.respond(200, b"ok")

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits(max_connections=1))
    async with trio.open_nursery() as clients:
        for i in range(6):
            clients.start_soon(get, pool, f"/{i}")
            await trio.testing.wait_all_tasks_blocked()  # queue them in a known order
    assert order == [f"/{i}".encode() for i in range(6)]
    assert len(upstream.conns) == 1


async def test_a_closed_connection_hands_its_slot_to_the_next_waiter(nursery):
    release = trio.Event()

    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.read_body()
        if request.target == b"/first":
            await release.wait()
        await conn.respond(200, request.target)

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits(max_connections=1))

    async def first() -> None:
        async with pool.request("GET", "/first", []) as response:
            assert response.status == 200  # leaves without reading: connection closed

    async with trio.open_nursery() as clients:
        clients.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        clients.start_soon(get, pool, "/second")
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics() == PoolStatistics(1, 0, 1, 1, 0)
        release.set()
    assert len(upstream.conns) == 2
    assert pool.statistics() == PoolStatistics(0, 1, 0, 2, 1)


async def test_connecting_counts_against_the_cap(nursery, monkeypatch):
    upstream = await start_upstream(nursery, echo)
    connect_gate = trio.Event()
    real_open = trio.open_tcp_stream

    async def gated_open(host: str, port: int) -> trio.SocketStream:
        await connect_gate.wait()
        return await real_open(host, port)

    monkeypatch.setattr(trio, "open_tcp_stream", gated_open)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits(max_connections=2))
    async with trio.open_nursery() as clients:
        for i in range(3):
            clients.start_soon(get, pool, f"/{i}")
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics() == PoolStatistics(2, 0, 1, 0, 0)
        connect_gate.set()
    assert len(upstream.conns) == 2
    assert pool.statistics() == PoolStatistics(0, 2, 0, 2, 0)


async def test_failed_connect_frees_its_slot_for_a_waiter(monkeypatch):
    attempts = 0
    gate = trio.Event()

    async def refuse(host: str, port: int) -> trio.SocketStream:
        nonlocal attempts
        attempts += 1
        await gate.wait()
        raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(trio, "open_tcp_stream", refuse)
    pool = HttpUpstreamPool("gone", "http://127.0.0.1:9", PoolLimits(max_connections=1))
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await get(pool)
        except UpstreamConnectError as exc:
            errors.append(exc)

    async with trio.open_nursery() as clients:
        clients.start_soon(one)
        clients.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics() == PoolStatistics(1, 0, 1, 0, 0)
        gate.set()
    assert attempts == 2
    assert len(errors) == 2
    assert pool.statistics() == PoolStatistics(0, 0, 0, 0, 0)


async def test_head_response_with_content_length_is_reusable(nursery):
    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.read_body()
        await conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"1234")]))
        await conn.send(h11.EndOfMessage())

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url)
    for _ in range(2):
        async with pool.request("HEAD", "/", []) as response:
            assert await response.read() == b""
    assert len(upstream.conns) == 1


# -- 2. cancellation mid-response ---------------------------------------------------------


async def test_cancel_mid_response_closes_connection_and_is_not_reused(nursery):
    first_chunk_sent = trio.Event()

    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.read_body()
        if request.target == b"/stall":
            await conn.send(h11.Response(status_code=200, headers=[(b"content-length", b"10")]))
            await conn.send(h11.Data(data=b"12345"))
            first_chunk_sent.set()
            await conn.wait_peer_closed()  # the pool must close the socket
            await conn.close()
            return
        await conn.respond(200, b"fresh")

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url)
    assert await get(pool, "/warm") == (200, b"fresh")
    with trio.CancelScope() as scope:
        async with pool.request("GET", "/stall", []) as response:
            async for chunk in response.aiter_body():
                assert chunk == b"12345"
                await first_chunk_sent.wait()
                scope.cancel(reason="test gives up")
    assert scope.cancelled_caught
    await upstream.conns[0].peer_closed.wait()
    assert pool.statistics() == PoolStatistics(
        active=0, idle=0, waiting=0, opened_total=1, closed_total=1
    )
    assert await get(pool, "/again") == (200, b"fresh")
    assert len(upstream.conns) == 2
    assert pool.statistics() == PoolStatistics(0, 1, 0, 2, 1)


async def test_cancel_while_waiting_for_the_head_closes_connection(nursery):
    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.read_body()
        await conn.wait_peer_closed()
        await conn.close()

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url)
    async with trio.open_nursery() as clients:
        clients.start_soon(get, pool)
        while not upstream.conns or upstream.conns[0].requests == 0:
            await trio.testing.wait_all_tasks_blocked()
        clients.cancel_scope.cancel(reason="test gives up")
    await upstream.conns[0].peer_closed.wait()
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)


async def test_leaving_without_reading_the_body_closes_the_connection(nursery):
    upstream = await start_upstream(nursery, echo)
    pool = HttpUpstreamPool("users", upstream.url)
    async with pool.request("GET", "/unread", []) as response:
        assert response.status == 200
    await upstream.conns[0].peer_closed.wait()
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)


async def test_caller_error_inside_the_block_closes_and_propagates(nursery):
    upstream = await start_upstream(nursery, echo)
    pool = HttpUpstreamPool("users", upstream.url)
    with pytest.raises(KeyError):
        async with pool.request("GET", "/", []):
            raise KeyError("caller")
    await upstream.conns[0].peer_closed.wait()
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)


async def test_empty_body_response_is_reusable_without_reading(nursery):
    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.read_body()
        await conn.send(h11.Response(status_code=204, headers=[]))
        await conn.send(h11.EndOfMessage())

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url)
    for _ in range(3):
        async with pool.request("DELETE", "/x", []) as response:
            assert response.status == 204
    assert len(upstream.conns) == 1
    assert pool.statistics() == PoolStatistics(0, 1, 0, 1, 0)


#: Bytes a broken upstream sends after a complete response (a body longer than its
#: Content-Length, a body on a HEAD answer): they must never answer the next request.
STRAY = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 5\r\n\r\nstale"


@pytest.mark.parametrize("handoff", ["idle", "to a waiter"])
@pytest.mark.parametrize("arrival", ["with the response", "after it was read"])
async def test_bytes_after_a_response_never_answer_the_next_request(nursery, arrival, handoff):
    read_done, stray_sent = trio.Event(), trio.Event()

    async def handler(conn: ServerConn, request: h11.Request) -> None:
        if request.target != b"/one":
            await echo(conn, request)
            return
        response = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst"
        if arrival == "with the response":
            await conn.stream.send_all(response + STRAY)
        else:
            await conn.stream.send_all(response)
            await read_done.wait()
            await conn.stream.send_all(STRAY)  # on loopback: in the client's queue now
        stray_sent.set()

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits(max_connections=1))
    second: list[tuple[int, bytes]] = []
    answered = trio.Event()

    async def get_second() -> None:
        second.append(await get(pool, "/two"))
        answered.set()

    async with pool.request("GET", "/one", []) as response:
        if handoff == "to a waiter":
            nursery.start_soon(get_second)
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics().waiting == 1
        assert await response.read() == b"first"
        read_done.set()
        with trio.fail_after(SAFETY_S):
            await stray_sent.wait()
    if handoff == "idle":
        await get_second()
    with trio.fail_after(SAFETY_S):
        await answered.wait()
    assert second == [(200, b"/two")]
    assert len(upstream.conns) == 2  # the first connection was not used again
    assert pool.statistics().closed_total == 1


# -- 3. stale keep-alive connections ------------------------------------------------------


async def test_idle_connection_closed_by_upstream_is_detected_before_reuse(
        nursery, new_descriptors_from):
    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.read_body()
        await conn.respond(200, b"once")
        await conn.close()  # keep-alive was promised, yet the socket goes

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("users", upstream.url)
    assert await get(pool) == (200, b"once")
    assert pool.statistics().idle == 1
    # Wait until the FIN is visible on the idle socket, so the readable check sees it.
    idle_socket = pool._idle[0].socket
    assert idle_socket.fileno() >= new_descriptors_from
    with trio.fail_after(SAFETY_S):
        await trio.lowlevel.wait_readable(idle_socket)
    # POST is never retried: success proves the check caught the stale socket first.
    async with pool.request("POST", "/", [], b"data") as response:
        assert await response.read() == b"once"
    assert len(upstream.conns) == 2
    assert upstream.conns[1].requests == 1
    assert pool.statistics() == PoolStatistics(0, 1, 0, 2, 1)


async def _start_drop_second_request(nursery: trio.Nursery) -> Upstream:
    """The first connection answers once, reads the next request, then closes unanswered."""

    async def handler(conn: ServerConn, request: h11.Request) -> None:
        body = await conn.read_body()
        if conn.index == 0 and conn.requests == 2:
            await conn.close()
            return
        await conn.respond(200, b"%d:%s" % (conn.index, body))

    return await start_upstream(nursery, handler)


async def test_stale_connection_is_retried_once_on_a_fresh_one(nursery):
    upstream = await _start_drop_second_request(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    assert await get(pool) == (200, b"0:")
    async with pool.request("PUT", "/", [], b"payload") as response:
        assert await response.read() == b"1:payload"
    assert upstream.conns[0].requests == 2
    assert len(upstream.conns) == 2
    assert pool.statistics() == PoolStatistics(0, 1, 0, 2, 1)


async def test_stale_connection_is_not_retried_for_post(nursery):
    upstream = await _start_drop_second_request(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    assert await get(pool) == (200, b"0:")
    with pytest.raises(UpstreamResetError):
        async with pool.request("POST", "/", [], b"payload"):
            pass  # pragma: no cover
    assert len(upstream.conns) == 1
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)
    assert await get(pool) == (200, b"1:")


async def test_stale_connection_is_not_retried_for_streamed_body(nursery):
    upstream = await _start_drop_second_request(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    assert await get(pool) == (200, b"0:")

    async def body() -> AsyncIterator[bytes]:
        yield b"streamed"

    with pytest.raises(UpstreamResetError):
        async with pool.request("PUT", "/", [], body()):
            pass  # pragma: no cover
    assert len(upstream.conns) == 1
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)


async def test_large_bytes_body_is_retried_on_a_fresh_connection(nursery):
    upstream = await _start_drop_second_request(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    assert await get(pool) == (200, b"0:")
    payload = b"x" * 200_000  # above the inline size: written by the upload task
    async with pool.request("PUT", "/", [], payload) as response:
        assert await response.read() == b"1:" + payload
    assert pool.statistics() == PoolStatistics(0, 1, 0, 2, 1)


# -- 4. streaming both ways, in bounded memory --------------------------------------------

FIFTY_MB = 50 * 1024 * 1024
CHUNK = b"z" * 65536


async def test_50mb_upload_and_download_stream_in_bounded_memory(nursery):
    async def handler(conn: ServerConn, request: h11.Request) -> None:
        if request.target == b"/upload":
            received = 0
            chunks = 0
            async for chunk in conn.body_chunks():
                received += len(chunk)
                chunks += 1
            await conn.respond(200, b"%d" % received)
            return
        await conn.read_body()
        await conn.send(
            h11.Response(status_code=200, headers=[(b"content-length", b"%d" % FIFTY_MB)])
        )
        for _ in range(FIFTY_MB // len(CHUNK)):
            await conn.send(h11.Data(data=CHUNK))
        await conn.send(h11.EndOfMessage())

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("files", upstream.url)
    produced = 0

    async def upload() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(FIFTY_MB // len(CHUNK)):
            produced += 1
            yield CHUNK

    tracemalloc.start()
    try:
        async with pool.request("POST", "/upload", [], upload()) as response:
            assert await response.read() == b"%d" % FIFTY_MB
        assert produced == FIFTY_MB // len(CHUNK)

        downloaded = 0
        chunks = 0
        async with pool.request("GET", "/download", []) as response:
            async for chunk in response.aiter_body():
                assert len(chunk) <= 65536
                downloaded += len(chunk)
                chunks += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert downloaded == FIFTY_MB
    assert chunks >= FIFTY_MB // 65536
    assert peak < 4 * 1024 * 1024, f"peak traced memory {peak} bytes"
    assert pool.statistics() == PoolStatistics(0, 1, 0, 1, 0)


async def test_early_answer_during_upload_is_returned(nursery):
    async def handler(conn: ServerConn, request: h11.Request) -> None:
        async for _ in conn.body_chunks():
            break  # one chunk is enough to refuse
        await conn.send(
            h11.Response(
                status_code=413, headers=[(b"content-length", b"4"), (b"connection", b"close")]
            )
        )
        await conn.send(h11.Data(data=b"big!"))
        await conn.send(h11.EndOfMessage())
        await conn.close()

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("files", upstream.url)
    gate = trio.Event()

    async def endless() -> AsyncIterator[bytes]:
        yield CHUNK
        await gate.wait()  # never set: the body would block forever
        yield CHUNK  # pragma: no cover

    async with pool.request("POST", "/upload", [], endless()) as response:
        assert response.status == 413
        assert await response.read() == b"big!"
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)


async def test_a_connection_is_not_reused_before_its_upload_is_written(nursery, monkeypatch):
    """The upstream answers early (keep-alive) while the end of a chunked body is still
    unwritten: h11 counts the request as sent once it has framed the end, but the
    connection must not carry another request before those bytes are in the socket, or
    the upstream reads that request as the rest of the body.

    A socket buffer full at exactly a chunk boundary cannot be set up reliably on
    loopback (acknowledgements free room at their own pace), so the write of the body's
    end is held back instead, as a full buffer would hold it."""
    opened = trio.open_tcp_stream
    never = trio.Event()

    async def end_of_body_stalls(*args, **kwargs):
        stream = await opened(*args, **kwargs)
        send_all = stream.send_all

        async def stalling_send_all(data) -> None:
            if bytes(data) == b"0\r\n\r\n":
                await never.wait()
            await send_all(data)

        stream.send_all = stalling_send_all  # type: ignore[method-assign]
        return stream

    monkeypatch.setattr(trio, "open_tcp_stream", end_of_body_stalls)
    exchange_left = trio.Event()
    after_answer: list[bytes] = []  # what the first connection carried after its 401

    async def handler(conn: ServerConn, request: h11.Request) -> None:
        if request.target != b"/upload":
            await echo(conn, request)
            return
        async for _ in conn.body_chunks():
            break  # one chunk is enough to refuse
        await conn.respond(401, b"nope")  # early answer, keep-alive
        await exchange_left.wait()
        received = bytearray(conn.h.trailing_data[0])
        while b"/two" not in received:
            data = await conn.stream.receive_some(65536)
            if not data:
                break
            received += data
        after_answer.append(bytes(received))
        await conn.close()

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("files", upstream.url, PoolLimits(max_connections=1))

    async def body() -> AsyncIterator[bytes]:
        yield b"all of it"

    async with pool.request("POST", "/upload", [], body()) as response:
        assert response.status == 401
        assert await response.read() == b"nope"
        await trio.testing.wait_all_tasks_blocked()  # the body's end waits to be written
    exchange_left.set()
    with trio.fail_after(SAFETY_S):
        assert await get(pool, "/two") == (200, b"/two")
    assert after_answer and b"/two" not in after_answer[0]  # it went on a new connection
    assert len(upstream.conns) == 2


async def test_body_iterable_failure_is_raised_and_closes_the_connection(nursery):
    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.read_body()
        await conn.respond(200, b"never")

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("files", upstream.url)

    async def failing() -> AsyncIterator[bytes]:
        yield b"part"
        raise ValueError("client went away")

    with pytest.raises(ValueError, match="client went away"):
        async with pool.request("POST", "/", [], failing()):
            pass  # pragma: no cover
    await upstream.conns[0].peer_closed.wait()
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)


async def test_outer_cancel_during_upload_is_not_grouped(nursery):
    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.wait_peer_closed()
        await conn.close()

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("files", upstream.url)

    async def slow() -> AsyncIterator[bytes]:
        yield b"a"
        await trio.sleep_forever()
        yield b"b"  # pragma: no cover

    caught: list[BaseException] = []

    async def client(scope_box: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            try:
                async with pool.request("POST", "/", [], slow()):
                    pass  # pragma: no cover
            except BaseException as exc:
                caught.append(exc)
                raise

    box: list[trio.CancelScope] = []
    async with trio.open_nursery() as clients:
        clients.start_soon(client, box)
        while not upstream.conns:
            await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        box[0].cancel(reason="deadline")
    assert len(caught) == 1
    assert isinstance(caught[0], trio.Cancelled)
    await upstream.conns[0].peer_closed.wait()
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)


# -- 5. errors, and the pool still serves afterwards --------------------------------------


async def test_refused_port_is_a_connect_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = HttpUpstreamPool("gone", f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamConnectError) as info:
        await get(pool)
    assert info.value.status == 502
    assert isinstance(info.value.__cause__, OSError)
    assert pool.statistics() == PoolStatistics(0, 0, 0, 0, 0)


async def test_connect_timeout_is_a_connect_error(autojump_clock, monkeypatch):
    async def never_connects(host: str, port: int) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    monkeypatch.setattr(trio, "open_tcp_stream", never_connects)
    pool = HttpUpstreamPool("slow", "http://192.0.2.1:80", PoolLimits(connect_timeout_s=0.5))
    start = trio.current_time()
    with pytest.raises(UpstreamConnectError, match="timed out"):
        await get(pool)
    assert trio.current_time() - start == pytest.approx(0.5)
    assert pool.statistics() == PoolStatistics(0, 0, 0, 0, 0)


async def _misbehave(conn: ServerConn, request: h11.Request) -> None:
    await conn.read_body()
    raw = conn.stream
    if request.target == b"/close":
        await conn.close()
    elif request.target == b"/reset":
        await conn.close(reset=True)
    elif request.target == b"/garbage":
        await raw.send_all(b"SMTP READY\r\n\r\n")
        await conn.close()
    elif request.target == b"/big-head":
        await raw.send_all(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 4096 + b"\r\n\r\n")
        await conn.close()
    elif request.target == b"/huge-head":  # arrives in pieces: h11's own limit trips
        await raw.send_all(b"HTTP/1.1 200 OK\r\n")
        for _ in range(100):
            await raw.send_all(b"x-h: " + b"a" * 1000 + b"\r\n")
        await conn.close()
    elif request.target == b"/status-600":  # three digits, but no HTTP status
        await raw.send_all(b"HTTP/1.1 600 Whatever\r\ncontent-length: 0\r\n\r\n")
        await conn.close()
    elif request.target == b"/short":
        await raw.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345")
        await conn.close()
    elif request.target == b"/bad-chunk":
        await raw.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
        await conn.close()
    else:
        await conn.respond(200, b"fine")


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("/close", UpstreamResetError),
        ("/reset", UpstreamResetError),
        ("/garbage", UpstreamProtocolError),
        ("/big-head", UpstreamProtocolError),
        ("/huge-head", UpstreamProtocolError),
        ("/status-600", UpstreamProtocolError),
    ],
)
async def test_failures_before_the_head(nursery, target, error):
    upstream = await start_upstream(nursery, _misbehave)
    limits = PoolLimits(max_response_header_bytes=2048)
    pool = HttpUpstreamPool("bad", upstream.url, limits)
    with pytest.raises(error) as info:
        await get(pool, target)
    assert info.value.status == 502
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)
    assert await get(pool) == (200, b"fine")
    assert pool.statistics() == PoolStatistics(0, 1, 0, 2, 1)


@pytest.mark.parametrize(
    ("target", "error"), [("/short", UpstreamResetError), ("/bad-chunk", UpstreamProtocolError)]
)
async def test_failures_in_the_body(nursery, target, error):
    upstream = await start_upstream(nursery, _misbehave)
    pool = HttpUpstreamPool("bad", upstream.url)
    async with pool.request("GET", target, []) as response:
        assert response.status == 200
        with pytest.raises(error):
            async for _ in response.aiter_body():
                pass
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)
    assert await get(pool) == (200, b"fine")


async def test_read_max_bytes(nursery):
    upstream = await start_upstream(nursery, echo)
    pool = HttpUpstreamPool("users", upstream.url)
    async with pool.request("GET", "/0123456789", []) as response:
        with pytest.raises(UpstreamProtocolError, match="exceeds 5 bytes"):
            await response.read(max_bytes=5)
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)


async def test_invalid_request_is_bad_request_and_nothing_is_opened(nursery):
    upstream = await start_upstream(nursery, echo)
    pool = HttpUpstreamPool("users", upstream.url)
    with pytest.raises(BadRequest):
        async with pool.request("GET", "/", [(b"bad header", b"x")]):
            pass  # pragma: no cover
    assert pool.statistics() == PoolStatistics(0, 0, 0, 0, 0)


# -- 6. idle expiry on virtual time -------------------------------------------------------


async def test_idle_connection_past_timeout_is_not_reused(mock_clock, nursery):
    upstream = await start_upstream(nursery, echo)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits(idle_timeout_s=30.0))
    assert await get(pool) == (200, b"/")
    mock_clock.jump(29.0)
    assert await get(pool) == (200, b"/")
    assert len(upstream.conns) == 1
    mock_clock.jump(30.5)
    assert await get(pool) == (200, b"/")
    assert len(upstream.conns) == 2
    await upstream.conns[0].peer_closed.wait()
    assert pool.statistics() == PoolStatistics(0, 1, 0, 2, 1)


async def test_expired_idle_connections_are_pruned_on_release(mock_clock, nursery):
    upstream = await start_upstream(nursery, echo)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits(idle_timeout_s=30.0))
    async with trio.open_nursery() as clients:  # two idle connections
        clients.start_soon(get, pool)
        clients.start_soon(get, pool)
    assert pool.statistics().idle == 2
    mock_clock.jump(31.0)
    assert await get(pool) == (200, b"/")
    assert pool.statistics() == PoolStatistics(0, 1, 0, 3, 2)


# -- 7. request body framing --------------------------------------------------------------


async def _raw_capture(nursery: trio.Nursery) -> tuple[int, trio.MemoryReceiveChannel[bytes]]:
    """A raw server that captures one request's bytes up to the end of its body."""
    send, receive = trio.open_memory_channel[bytes](1)

    async def serve(stream: trio.SocketStream) -> None:
        data = b""
        while True:
            data += await stream.receive_some(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            if b"chunked" in head and rest.endswith(b"0\r\n\r\n"):
                break
            if b"content-length: 11" in head and len(rest) >= 11:
                break
        await send.send(data)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.receive_some(65536)

    listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], receive


async def test_chunked_upload_is_framed_exactly(nursery):
    port, captured = await _raw_capture(nursery)
    pool = HttpUpstreamPool("raw", f"http://127.0.0.1:{port}")

    async def body() -> AsyncIterator[bytes]:
        yield b"hello"
        yield b""  # empty chunks must not end the body early
        yield b" world"

    async with pool.request("POST", "/c", [(b"x-a", b"1")], body()) as response:
        assert await response.read() == b"ok"
    data = await captured.receive()
    assert data == (
        b"POST /c HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ntransfer-encoding: chunked\r\nx-a: 1\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" % port
    )


async def test_caller_content_length_is_respected(nursery):
    port, captured = await _raw_capture(nursery)
    pool = HttpUpstreamPool("raw", f"http://127.0.0.1:{port}")

    async def body() -> AsyncIterator[bytes]:
        yield b"hello"
        yield b" world"

    async with pool.request("PUT", "/l", [(b"content-length", b"11")], body()) as response:
        assert await response.read() == b"ok"
    data = await captured.receive()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head
    assert rest == b"hello world"


async def test_body_longer_than_caller_content_length_is_bad_request(nursery):
    async def handler(conn: ServerConn, request: h11.Request) -> None:
        await conn.wait_peer_closed()
        await conn.close()

    upstream = await start_upstream(nursery, handler)
    pool = HttpUpstreamPool("raw", upstream.url)

    async def body() -> AsyncIterator[bytes]:
        yield b"hello world, and more"

    with pytest.raises(BadRequest, match="Content-Length"):
        async with pool.request("PUT", "/l", [(b"content-length", b"11")], body()):
            pass  # pragma: no cover
    assert pool.statistics() == PoolStatistics(0, 0, 0, 1, 1)


async def test_bytes_body_gets_content_length(nursery):
    port, captured = await _raw_capture(nursery)
    pool = HttpUpstreamPool("raw", f"http://127.0.0.1:{port}")
    async with pool.request("POST", "/b", [], b"hello world") as response:
        assert await response.read() == b"ok"
    data = await captured.receive()
    assert data.endswith(b"content-length: 11\r\n\r\nhello world")


async def test_streamed_uploads_reuse_their_connection_on_a_busy_loop():
    """The end of an upload may be in the socket before its task has returned from the
    write; an upstream answering in that gap (here one outside the event loop, while
    other work keeps the loop busy) must not cost the connection."""

    def answer_each_upload(conn: socket.socket) -> None:
        received = b""
        with conn:
            while True:
                while b"0\r\n\r\n" not in received:
                    data = conn.recv(65536)
                    if not data:
                        return
                    received += data
                received = received.split(b"0\r\n\r\n", 1)[1]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        with suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=answer_each_upload, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    pool = HttpUpstreamPool("files", f"http://127.0.0.1:{listener.getsockname()[1]}")

    async def other_work() -> None:
        while True:
            # The loop is held up (other requests' work) while the upstream thread, not
            # needing the GIL meanwhile, answers: the window the race needs.
            time.sleep(0.0005)  # noqa: ASYNC251
            await trio.lowlevel.checkpoint()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 100

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_work)
            for _ in range(100):
                async with pool.request("POST", "/upload", [], body()) as response:
                    assert await response.read() == b"ok"
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
    assert pool.statistics().opened_total == 1


# -- 9. the answer's framing, byte by byte -------------------------------------------------

TRICKLED = (b"HTTP/1.1 201 Made Here\r\nContent-Type: text/plain \r\nX-Multi: a\r\n"
            b"x-multi: b\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: dropped\r\n\r\n")


#: Answers written by hand, by request target; ``None``: the target echoed (with
#: Content-Length). ``(answer, close)``: close the connection after the answer.
RAW_ANSWERS: dict[bytes, tuple[bytes, bool]] = {
    b"/until-close": (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it", True),
    b"/gzip-framed": (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nabc", True),
    b"/chunked-twice": (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                        b"transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", True),
    b"/informational": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
                        b"link: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
                        b"\r\nok", False),
    b"/switch": (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n"
                 b"connection: upgrade\r\n\r\n", True),
    b"/stray-after-head": (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n" + STRAY, False),
    b"/close-after": (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n"
                      b"\r\nok", False),
    # An HTTP/1.0 answer framed by Transfer-Encoding (RFC 9112 §6.1: the framing is
    # faulty, the connection closes after it), offering to keep the connection.
    b"/te-on-1.0": (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n"
                    b"transfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", False),
    # Three digits, but below 100: no HTTP status. Then an answer.
    b"/status-099": (b"HTTP/1.1 099 Odd\r\ncontent-length: 0\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", False),
    b"/status-000": (b"HTTP/1.1 000 Odd\r\ncontent-length: 0\r\n\r\n"
                     b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", False),
    # A long stream of small chunks: framing bytes well past any head limit in all.
    b"/many-chunks": (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                      + b"1;n=v\r\nx\r\n" * 20_000 + b"0\r\n\r\n", False),
    # A HEAD answer need not say the length its GET would have (RFC 9110 §9.3.2).
    b"/head-no-length": (b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\n\r\n", False),
}
#: After its chunked body, a trailer field that never ends.
ENDLESS_TRAILER_HEAD = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                        b"2\r\nok\r\n0\r\nx-trailer: ")


class RawUpstream:
    """Reads bodiless requests (up to their blank line) and writes ``RAW_ANSWERS`` as
    they are, a byte per write for ``/trickled``; counts its connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self.heads: list[bytes] = []
        self.trailer_bytes_sent = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, stream: trio.SocketStream) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._serve(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        return
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                self.heads.append(head)
                target = head.split(b" ", 2)[1]
                if target == b"/endless-trailer":
                    await stream.send_all(ENDLESS_TRAILER_HEAD)
                    for _ in range(128):
                        await stream.send_all(b"a" * 65536)
                        self.trailer_bytes_sent += 65536
                    await trio.sleep_forever()
                if target == b"/trickled":
                    for index in range(len(TRICKLED)):
                        await stream.send_all(TRICKLED[index:index + 1])
                        await trio.sleep(0.001)  # a segment per byte on loopback
                    continue
                answer, close = RAW_ANSWERS.get(target, (
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(target), target), False))
                await stream.send_all(answer)
                if close:
                    return


async def start_raw_upstream(nursery: trio.Nursery) -> RawUpstream:
    upstream = RawUpstream()
    listeners = await nursery.start(partial(trio.serve_tcp, upstream.serve, 0,
                                            host="127.0.0.1"))
    upstream.port = listeners[0].socket.getsockname()[1]
    return upstream


async def test_an_answer_trickled_a_byte_at_a_time_reads_whole(nursery):
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    async with pool.request("GET", "/trickled", []) as response:
        assert (response.status, response.reason) == (201, b"Made Here")
        assert response.headers == [(b"content-type", b"text/plain"), (b"x-multi", b"a"),
                                    (b"x-multi", b"b"), (b"transfer-encoding", b"chunked")]
        assert await response.read() == b"hello world"  # the trailer is dropped
    assert await get(pool, "/next") == (200, b"/next")
    assert upstream.connections == 1  # read to its end: reused


async def test_a_body_framed_by_the_close_is_read_to_the_end_and_not_reused(nursery):
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    assert await get(pool, "/until-close") == (200, b"all of it")
    assert await get(pool, "/next") == (200, b"/next")
    assert upstream.connections == 2


@pytest.mark.parametrize("target", ["/gzip-framed", "/chunked-twice", "/switch"])
async def test_an_answer_framed_otherwise_than_http_1_1_reads_is_a_protocol_error(
        nursery, target):
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    with pytest.raises(UpstreamProtocolError):
        await get(pool, target)
    assert await get(pool, "/next") == (200, b"/next")
    assert pool.statistics().closed_total == 1


async def test_informational_heads_are_passed_over_and_the_connection_kept(nursery):
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    assert await get(pool, "/informational") == (200, b"ok")
    assert await get(pool, "/next") == (200, b"/next")
    assert upstream.connections == 1


async def test_bytes_after_a_head_answer_never_answer_the_next_request(nursery):
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    async with pool.request("HEAD", "/stray-after-head", []) as response:
        assert response.status == 200
        assert await response.read() == b""
    assert await get(pool, "/next") == (200, b"/next")
    assert upstream.connections == 2


async def test_an_answer_saying_connection_close_is_not_reused(nursery):
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    assert await get(pool, "/close-after") == (200, b"ok")
    assert await get(pool, "/next") == (200, b"/next")
    assert upstream.connections == 2


@pytest.mark.parametrize("header", [
    (b"x-bad", b"a\r\nx-smuggled: 1"), (b"x-bad", b"nul\x00"), (b"x bad", b"v"),
    (b"x-bad:", b"v"), (b"", b"v"),
])
async def test_a_request_header_that_would_break_the_framing_is_never_sent(nursery, header):
    upstream = await start_upstream(nursery, echo)
    pool = HttpUpstreamPool("users", upstream.url)
    with pytest.raises(BadRequest):
        async with pool.request("GET", "/", [header]):
            pass  # pragma: no cover
    with pytest.raises(BadRequest):
        async with pool.request("GET", "/a b\r\nx: y", []):
            pass  # pragma: no cover
    assert pool.statistics() == PoolStatistics(0, 0, 0, 0, 0)


async def test_a_trailer_longer_than_the_head_limit_is_a_protocol_error(nursery):
    """A chunked answer's trailer section is bounded like its head (h11 bounded it by
    ``max_incomplete_event_size``): a trailer field that never ends is a 502 once past
    the limit, not memory held for as long as the upstream sends and the deadline
    allows."""
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits(max_response_header_bytes=4096))
    with trio.move_on_after(5):
        with pytest.raises(UpstreamProtocolError):
            await get(pool, "/endless-trailer")
        assert upstream.trailer_bytes_sent < 1024 * 1024  # read no further than needed
        return
    pytest.fail(f"{upstream.trailer_bytes_sent} bytes of one trailer field were read and "
                "held without error in 5 s (limit 4096)")


async def test_an_http_1_0_answer_with_transfer_encoding_closes_its_connection(nursery):
    """RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing, and
    the recipient MUST close the connection after it (its sender may have kept part
    of it, which would answer the next request). Like h11, the pool reuses a connection
    only after an HTTP/1.1 answer."""
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    assert await get(pool, "/te-on-1.0") == (200, b"ok")
    assert await get(pool, "/next") == (200, b"/next")
    assert upstream.connections == 2


@pytest.mark.parametrize("target", ["/status-099", "/status-000"])
async def test_a_status_below_100_is_a_protocol_error(nursery, target):
    """A status line ``099``/``000`` is no HTTP status (RFC 9110 15: 100-599; h11
    refused it too): a 502, not an informational head passed over for what comes next
    (here a 200)."""
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    with pytest.raises(UpstreamProtocolError):
        await get(pool, target)


async def test_a_request_header_name_holding_a_colon_is_never_sent(nursery):
    """Written as ``x-user:admin: v``, the upstream would read header ``x-user`` with
    value ``admin: v``: refused (BadRequest), nothing opened."""
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    with pytest.raises(BadRequest):
        async with pool.request("GET", "/", [(b"x-user:admin", b"v")]):
            pass  # pragma: no cover
    assert upstream.heads == []


async def test_a_head_answer_without_content_length_keeps_its_connection(nursery):
    """A HEAD answer ends at its head whatever its framing (RFC 9110 9.3.2), and may
    carry no Content-Length: its connection is kept (llhttp, not told the request was a
    HEAD, would take it for a body framed by the close), so that HEADs (health checks,
    caches revalidating) do not each cost a new upstream connection."""
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url)
    for _ in range(3):
        async with pool.request("HEAD", "/head-no-length", []) as response:
            assert response.status == 200
            assert await response.read() == b""
    assert await get(pool, "/next") == (200, b"/next")
    assert upstream.connections == 1


async def test_a_long_stream_of_small_chunks_is_not_held_to_the_head_limit(nursery):
    """The head limit bounds each chunk's framing (and a trailer section), not their
    sum: 200 KiB of chunk lines under a 2 KiB limit is a stream (an event feed, say)."""
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits(max_response_header_bytes=2048))
    assert await get(pool, "/many-chunks") == (200, b"x" * 20_000)
    assert await get(pool, "/next") == (200, b"/next")
    assert upstream.connections == 1


@pytest.fixture
def no_gc():
    """Workers run with automatic collections off (gateway/_gc.py)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
        gc.collect()


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


async def _drive(pool: HttpUpstreamPool, how: str) -> None:
    if how == "answer-says-close":
        assert await get(pool, "/close-after") == (200, b"ok")
    elif how == "protocol-error":
        try:
            await get(pool, "/gzip-framed")
        except UpstreamProtocolError:
            pass
        else:  # pragma: no cover
            raise AssertionError("expected a protocol error")
    elif how in ("idle-expiry", "pool-close"):
        assert await get(pool, "/next") == (200, b"/next")


@pytest.mark.parametrize("how", ["answer-says-close", "protocol-error", "idle-expiry",
                                 "pool-close"])
async def test_a_connection_the_pool_closes_is_freed_without_the_garbage_collector(
        nursery, no_gc, how):
    """gc is off in workers (collections on a clock): a closed upstream connection is
    freed by reference counting, with its socket object, framing, parser and buffers,
    whatever ended it (no cycle through its error mapping, its parser, or the error it
    raised)."""
    upstream = await start_raw_upstream(nursery)
    for _ in range(10):
        pool = HttpUpstreamPool("users", upstream.url)
        await _drive(pool, how)
        if how == "idle-expiry":
            pool.close_idle(trio.current_time() + 3600)
        elif how == "pool-close":
            await pool.aclose()
        assert pool.statistics().closed_total == 1
        del pool
    assert _alive(_Connection) == 0, f"{_alive(_Connection)} closed connections still in memory"


def test_a_framing_error_once_raised_leaves_no_reference_cycle(no_gc):
    """The framing's error, raised again on every call, is raised anew each time: an
    error kept and raised again would hold, through its traceback, the frame holding
    the framing that holds it (a cycle per connection that saw bad HTTP)."""
    before = _alive(ClientConnection)
    framing = ClientConnection(4096)
    framing.send_head(RequestHead("GET", "/", [(b"host", b"x")]))
    framing.send_end()
    framing.receive_data(b"garbage, no HTTP\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        framing.next_event()
    framing.close()
    del framing
    assert _alive(ClientConnection) == before


def test_an_endless_trailer_field_is_refused_within_two_reads_past_the_limit():
    """A trailer field that never ends is refused once past the head limit, late by at
    most two reads (the count restarts at each chunk, mid-read): what an upstream can
    make the gateway hold is bounded."""
    limit, read = 4096, 65536
    framing = ClientConnection(limit)
    framing.send_head(RequestHead("GET", "/", [(b"host", b"x")]))
    framing.send_end()
    start = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
             b"2\r\nok\r\n0\r\nx-trailer: ")
    first = read - len(start)
    framing.receive_data(start + b"a" * first)
    field = first
    while framing._error is None and field < 4 * read:
        framing.receive_data(b"a" * read)
        field += read
    assert framing._error is not None
    assert field <= limit + 2 * read, f"a {field}-byte trailer field read under a {limit} limit"


async def test_a_proxy_connection_header_does_not_close_a_keep_alive_answer(
        nursery, monkeypatch):
    """``Proxy-Connection`` is no HTTP/1.1 header (RFC 9112 reads only ``Connection``;
    h11 ignored it): it does not cost the answer its connection."""
    monkeypatch.setitem(RAW_ANSWERS, b"/proxy-connection", (
        b"HTTP/1.1 200 OK\r\nproxy-connection: close\r\ncontent-length: 2\r\n\r\nok", False))
    upstream = await start_raw_upstream(nursery)
    pool = HttpUpstreamPool("users", upstream.url, PoolLimits())
    assert await get(pool, "/proxy-connection") == (200, b"ok")
    assert await get(pool, "/next") == (200, b"/next")
    assert upstream.connections == 1
