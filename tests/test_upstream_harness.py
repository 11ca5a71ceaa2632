"""The scriptable upstream (tests/upstream.py) and the demo upstreams answer as documented.

End-to-end tests trust these records ("the upstream saw the cancellation within 100 ms"),
so the records themselves are checked here against a plain httpx client and raw sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import httpx
import pytest
import trio

from gateway._demo_upstreams import DEMO_UPSTREAMS, serve_demo_upstreams
from tests.upstream import (
    BODY_KEEP_LIMIT,
    DOWNLOAD_PATTERN,
    Responder,
    SeenRequest,
    Upstream,
    _tail_quantile,
    start_upstream,
)

WAIT_S = 5.0
"""Upper bound for waiting on a record; only reached when something is broken."""


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> Upstream:
    return await start_upstream(nursery)


@pytest.fixture
async def client(upstream: Upstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream.url) as client:
        yield client


async def _raw_exchange(upstream: Upstream, request: bytes) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(upstream.host, upstream.port)
    await stream.send_all(request)
    return stream


# -- routes ---------------------------------------------------------------------------


async def test_json_routes(upstream: Upstream, client: httpx.AsyncClient) -> None:
    assert (await client.get("/ok")).json() == {"path": "/ok", "method": "GET"}
    assert (await client.post("/whatever")).json() == {"path": "/whatever", "method": "POST"}
    assert (await client.get("/users/42")).json() == {"id": "42", "name": "user-42"}
    orders = (await client.get("/orders?user=7")).json()
    assert orders["user"] == "7"
    assert orders["orders"]
    assert [r.target for r in upstream.requests] == [
        "/ok",
        "/whatever",
        "/users/42",
        "/orders?user=7",
    ]
    assert all(r.status == 200 and r.ended_at is not None for r in upstream.requests)
    assert upstream.errors == []


async def test_status_route(upstream: Upstream, client: httpx.AsyncClient) -> None:
    response = await client.get("/status/503?retry_after=2")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert response.json() == {"status": 503}
    no_content = await client.get("/status/204")
    assert no_content.status_code == 204
    assert no_content.content == b""
    assert (await client.get("/status/99")).status_code == 400
    assert [r.status for r in upstream.requests] == [503, 204, 400]


async def test_headers_route_keeps_order_and_raw_target(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    response = await client.get(
        "/headers?a=1&b=%20x", headers=[("X-First", "1"), ("X-Second", "2"), ("X-First", "3")]
    )
    body = response.json()
    assert body["target"] == "/headers?a=1&b=%20x"
    names = [name for name, _ in body["headers"]]
    assert names.index("x-first") < names.index("x-second")
    seen = upstream.requests[0]
    assert seen.header_values("x-first") == ["1", "3"]
    assert seen.query == {"a": "1", "b": " x"}
    assert [list(pair) for pair in seen.headers] == body["headers"]


async def test_bodies_are_recorded_and_large_ones_only_sized(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    await client.post("/ok", content=b"hello")
    await client.post("/ok", content=b"x" * (BODY_KEEP_LIMIT + 1))
    small, large = upstream.requests
    assert (small.body, small.body_size) == (b"hello", 5)
    assert (large.body, large.body_size) == (None, BODY_KEEP_LIMIT + 1)


async def test_echo_streams_the_body_back(upstream: Upstream, client: httpx.AsyncClient) -> None:
    payload = bytes(range(256)) * 1024
    response = await client.post("/echo", content=payload)
    assert response.content == payload
    assert response.headers["transfer-encoding"] == "chunked"
    assert upstream.requests[0].body_size == len(payload)
    assert upstream.requests[0].body == payload


async def test_download_sends_the_pattern(client: httpx.AsyncClient) -> None:
    size = 200_000
    response = await client.get(f"/download?bytes={size}")
    assert response.headers["content-length"] == str(size)
    assert response.content == (DOWNLOAD_PATTERN * (size // len(DOWNLOAD_PATTERN) + 1))[:size]


async def test_flaky_is_deterministic_per_seed(nursery: trio.Nursery) -> None:
    async def statuses(upstream: Upstream) -> list[int]:
        async with httpx.AsyncClient(base_url=upstream.url) as client:
            return [
                (await client.get("/flaky?fail_ratio=0.5&seed=7")).status_code for _ in range(20)
            ]

    first, second = await start_upstream(nursery), await start_upstream(nursery)
    sequence = await statuses(first)
    assert set(sequence) == {200, 503}
    assert await statuses(second) == sequence
    assert first.attempts("/flaky") == 20
    first.reset_records()
    assert await statuses(first) == sequence


async def test_tail_quantiles_and_delay(client: httpx.AsyncClient) -> None:
    assert _tail_quantile(0.5, 5, 500) == 5
    assert _tail_quantile(0.99, 5, 500) == pytest.approx(500)
    assert _tail_quantile(0.0, 5, 500) == 0
    delays = [(await client.get("/tail?p50_ms=1&p99_ms=20")).json()["delay_ms"] for _ in range(5)]
    assert all(0 <= delay <= 40 for delay in delays)


# -- broken answers -------------------------------------------------------------------


async def test_reset_closes_without_answer(upstream: Upstream, client: httpx.AsyncClient) -> None:
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        await client.get("/reset")
    assert upstream.requests[0].status is None
    assert upstream.cancelled == []


async def test_reset_mid_body_is_a_short_body(client: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await client.get("/reset-mid-body")


async def test_garbage_is_not_http(upstream: Upstream) -> None:
    stream = await _raw_exchange(upstream, b"GET /garbage HTTP/1.1\r\nhost: x\r\n\r\n")
    received = b""
    while data := await stream.receive_some():
        received += data
    assert received == b"NOT HTTP\r\n\r\n"
    await stream.aclose()


async def test_endless_headers_stop_when_the_peer_leaves(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await client.get("/endless-headers")
    with trio.fail_after(WAIT_S):
        await upstream.wait_cancelled()
        await upstream.wait_for(lambda: upstream.in_flight == 0)


async def test_endless_body_stops_when_the_peer_leaves(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    async with client.stream("GET", "/endless-body") as response:
        received = 0
        async for chunk in response.aiter_raw():
            received += len(chunk)
            if received > 1_000_000:
                break
        left_at = trio.current_time()
    with trio.fail_after(WAIT_S):
        await upstream.wait_cancelled()
    assert upstream.cancelled[0].at - left_at < 1.0


async def test_malformed_request_gets_400(upstream: Upstream) -> None:
    stream = await _raw_exchange(upstream, b"NONSENSE\r\n\r\n")
    received = b""
    while data := await stream.receive_some():
        received += data
    assert received.startswith(b"HTTP/1.1 400 ")
    await stream.aclose()


# -- cancellation ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/slow?ms=5000", "/stall"])
async def test_client_giving_up_is_recorded_promptly(
    upstream: Upstream, client: httpx.AsyncClient, target: str
) -> None:
    gave_up_at = trio.current_time() + 0.2
    with trio.move_on_at(gave_up_at):
        await client.get(target)
    with trio.fail_after(WAIT_S):
        await upstream.wait_cancelled()
    [cancelled] = upstream.cancelled
    assert cancelled.target == target
    assert 0 <= cancelled.at - gave_up_at < 0.1
    assert 0.15 < cancelled.elapsed < 1.0
    [seen] = upstream.requests
    assert seen.cancelled
    assert seen.status is None
    assert seen.ended_at is not None
    assert upstream.in_flight == 0


async def test_reset_by_the_peer_is_recorded(upstream: Upstream) -> None:
    stream = await _raw_exchange(upstream, b"GET /stall HTTP/1.1\r\nhost: x\r\n\r\n")
    with trio.fail_after(WAIT_S):
        await upstream.wait_requests(1)
    stream.socket.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    closed_at = trio.current_time()
    await stream.aclose()
    with trio.fail_after(WAIT_S):
        await upstream.wait_cancelled()
    assert upstream.cancelled[0].at - closed_at < 0.1


async def test_peer_leaving_mid_upload_is_recorded(upstream: Upstream) -> None:
    head = b"POST /ok HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n"
    stream = await _raw_exchange(upstream, head + b"x" * 10)
    with trio.fail_after(WAIT_S):
        await upstream.wait_for(lambda: upstream.requests and upstream.requests[0].body_size)
    await stream.aclose()
    with trio.fail_after(WAIT_S):
        await upstream.wait_cancelled()
    assert upstream.requests[0].body == b"x" * 10


async def test_max_in_flight_counts_concurrent_requests(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(client.get, "/slow?ms=300")
        with trio.fail_after(WAIT_S):
            await upstream.wait_for(lambda: upstream.in_flight == 5)
    assert upstream.max_in_flight == 5
    assert upstream.in_flight == 0
    assert upstream.connections_opened == 5
    await client.get("/ok")
    assert upstream.max_in_flight == 5
    upstream.reset_records()
    assert (upstream.max_in_flight, upstream.requests, upstream.connections_opened) == (0, [], 0)


# -- connections ----------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    await client.get("/ok")
    await client.post("/users/1", content=b"body")
    assert upstream.connections_opened == 1
    assert {r.connection_id for r in upstream.requests} == {1}
    assert upstream.cancelled == []


async def test_close_after_closes_an_idle_keep_alive_connection(
    upstream: Upstream, client: httpx.AsyncClient
) -> None:
    response = await client.get("/close-after")
    assert response.status_code == 200
    assert "close" not in response.headers.get("connection", "")
    with trio.fail_after(WAIT_S):
        await upstream.wait_connections_closed(1)
    assert (await client.get("/ok")).status_code == 200
    assert upstream.connections_opened == 2


async def test_stop_refuses_new_connections(upstream: Upstream) -> None:
    upstream.stop()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(upstream.host, upstream.port)


# -- custom behaviour -----------------------------------------------------------------


async def test_behaviour_streams_with_the_responder(nursery: trio.Nursery) -> None:
    async def behaviour(request: SeenRequest, respond: Responder) -> None:
        if request.path == "/builtin":
            await respond.fallback()
            return
        await respond.start(201, [("x-kind", "custom")])
        for part in (b"a", b"b", request.body or b""):
            await respond.send(part)
        await respond.end()

    upstream = await start_upstream(nursery, behaviour=behaviour)
    async with httpx.AsyncClient(base_url=upstream.url) as client:
        response = await client.post("/anything", content=b"c")
        assert (response.status_code, response.content) == (201, b"abc")
        assert response.headers["x-kind"] == "custom"
        assert (await client.get("/builtin")).json() == {"path": "/builtin", "method": "GET"}
    assert upstream.connections_opened == 1


async def test_behaviour_errors_are_recorded_and_answered_500(nursery: trio.Nursery) -> None:
    async def behaviour(request: SeenRequest, respond: Responder) -> None:
        raise RuntimeError("boom")

    upstream = await start_upstream(nursery, behaviour=behaviour)
    async with httpx.AsyncClient(base_url=upstream.url) as client:
        assert (await client.get("/x")).status_code == 500
    assert [type(exc) for exc in upstream.errors] == [RuntimeError]


async def test_silent_behaviour_gets_500(nursery: trio.Nursery) -> None:
    async def behaviour(request: SeenRequest, respond: Responder) -> None:
        return

    upstream = await start_upstream(nursery, behaviour=behaviour)
    async with httpx.AsyncClient(base_url=upstream.url) as client:
        assert (await client.get("/x")).status_code == 500
    assert upstream.errors == []


# -- the demo upstreams ---------------------------------------------------------------


async def test_demo_upstreams_serve_users_and_orders(nursery: trio.Nursery) -> None:
    assert [(u.name, u.port) for u in DEMO_UPSTREAMS] == [("users", 9001), ("orders", 9002)]
    urls = dict(await nursery.start(partial(serve_demo_upstreams, users_port=0, orders_port=0)))
    assert set(urls) == {"users", "orders"}
    assert not urls["users"].endswith(":0")
    async with httpx.AsyncClient() as client:
        user = (await client.get(f"{urls['users']}/users/7")).json()
        assert user["id"] == 7
        assert {"name", "email"} <= set(user)
        missing = await client.get(f"{urls['users']}/users/1001")
        assert missing.status_code == 404
        assert "error" in missing.json()
        orders = await client.get(f"{urls['orders']}/orders?user=7")
        assert orders.status_code in (200, 503)
        if orders.status_code == 200:
            assert orders.json()["user"] == 7
        created = await client.post(f"{urls['orders']}/orders", json={"user": 7, "total": 12.5})
        assert created.status_code == 201
        assert created.json()["total"] == 12.5
        assert "id" in created.json()
