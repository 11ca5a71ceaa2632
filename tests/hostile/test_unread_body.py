"""Request bodies nobody reads: the request still ends, and a client that leaves is seen.

While a handler is not reading the body (its upstream does not read it, or the request
waits for an upstream slot), the client's messages queue up in the worker. Neither the
answer nor the client's departure may then wait behind that queue.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio
import trio.testing

from tests.gateway_harness import traces_with
from tests.hostile import POLICY, closed_port, policy_for, stage
from tests.hostile.rawclient import RawConnection, connect
from tests.upstream import start_upstream

CHUNK = b"10000\r\n" + b"z" * 0x10000 + b"\r\n"  # 64 KiB, chunked


def big_uploads(policy: str) -> str:
    """The hostile policy with room for large bodies arriving slowly."""
    return policy.replace("max_body: 256KiB", "max_body: 1GiB").replace(
        "body_timeout: 1s", "body_timeout: 60s")


@asynccontextmanager
async def uploading(conn: RawConnection, target: bytes) -> AsyncIterator[None]:
    """A chunked upload to ``target`` that never ends, sent until every buffer between
    the client and the upstream is full; it stops when the block ends."""
    await conn.send(b"POST " + target + b" HTTP/1.1\r\nHost: g\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n")

    async def pump() -> None:
        while await conn.try_send(CHUNK):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump)
        await trio.testing.wait_all_tasks_blocked()
        yield
        nursery.cancel_scope.cancel()


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.01)


async def test_an_early_answer_to_an_unread_upload_ends_the_request():
    """An upstream refusing a large upload without reading it (401, 413) is common; the
    client gets the answer, and the request, its connections and its slot are freed."""
    answer = trio.Event()

    async def refuse_unread(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        await answer.wait()
        await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\nno way")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, refuse_unread, 0, host="127.0.0.1"))
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        policy = big_uploads(POLICY.format(url=url, dead_port=closed_port(), extra=""))
        async with stage(policy) as s, connect(s.port) as conn:
            runtime = s.gw.gateway.runtime
            async with uploading(conn, b"/api/long/upload"):
                # Everything stalls: the upstream, the worker's queues, the client.
                answer.set()
                response = await conn.read_response(timeout_s=10)
            assert response is not None and response.status == 401 and response.complete
            assert response.body == b"no way"
            assert await conn.wait_closed(timeout_s=5) is not None  # the body was unread
            await wait_until(lambda: runtime.gate.in_flight == 0)
            await wait_until(lambda: s.pool_statistics().active == 0)
        nursery.cancel_scope.cancel()


async def test_a_client_leaving_while_its_request_waits_for_a_slot_is_cancelled():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        one_slot = f'up: {{url: "{upstream.url}", limit: {{concurrency: 1, queue_timeout: 60s}}}}'
        policy = policy_for(upstream.url).replace(
            f'up: {{url: "{upstream.url}"}}', one_slot).replace(
            "body_timeout: 1s", "body_timeout: 60s")
        async with stage(policy) as s:
            runtime = s.gw.gateway.runtime
            async with connect(s.port) as hold:
                await hold.send(b"GET /api/long/stall HTTP/1.1\r\nHost: g\r\n\r\n")
                await upstream.wait_requests(1)  # the one slot is taken
                async with connect(s.port) as conn:
                    await conn.send(b"POST /api/long/echo HTTP/1.1\r\nHost: g\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n"
                                    + b"5\r\nhello\r\n" * 3)
                    await wait_until(lambda: s.queued() == 1)
                    conn.abort()
                await wait_until(lambda: runtime.gate.in_flight == 1)  # cancelled, queued
                assert s.queued() == 0
                hold.abort()
            await wait_until(lambda: runtime.gate.in_flight == 0)
            assert [r.target for r in upstream.requests] == ["/stall"]  # never sent
        nursery.cancel_scope.cancel()


async def test_a_client_resetting_a_large_upload_that_waits_for_a_slot_is_cancelled():
    """With more body queued than the worker buffers, the connection is no longer read
    while the request waits; the client's reset is seen all the same, not only at
    ``body_timeout`` (a minute here)."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = big_uploads(policy_for(upstream.url).replace(
            f'up: {{url: "{upstream.url}"}}',
            f'up: {{url: "{upstream.url}", limit: {{concurrency: 1, queue_timeout: 60s}}}}'))
        async with stage(policy) as s:
            runtime = s.gw.gateway.runtime
            async with connect(s.port) as hold:
                await hold.send(b"GET /api/long/stall HTTP/1.1\r\nHost: g\r\n\r\n")
                await upstream.wait_requests(1)  # the one slot is taken
                async with connect(s.port) as conn:
                    async with uploading(conn, b"/api/long/echo"):
                        pass  # every buffer is full: the client's, the kernel's, the worker's
                    assert s.queued() == 1
                    conn.abort()
                await wait_until(lambda: runtime.gate.in_flight == 1)  # cancelled, queued
                assert s.queued() == 0
                (trace,) = await traces_with(s.gw, route="/api/long/{rest*}")
                assert (trace.method, trace.cause) == ("POST", "client_disconnect")
                hold.abort()
            await wait_until(lambda: runtime.gate.in_flight == 0)
            assert [r.target for r in upstream.requests] == ["/stall"]  # never sent
        nursery.cancel_scope.cancel()
