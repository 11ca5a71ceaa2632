"""The small upstream services ``python -m gateway demo`` puts behind the gateway.

They exist so an operator can try the demo policy without writing a backend: ``users``
answers quickly (and slowly on ``/users/{id}/slow``, so a deadline can be seen firing),
``orders`` has a little jittery latency and an occasional 503, so retries and hedges
have something to do (the demo policy retries them: its clients see 200s). Plain h11
over Trio, keep-alive included; nothing here is meant for production traffic.

- ``users`` (127.0.0.1:9001): ``GET /users/{id}`` → ``{"id", "name", "email"}``, 404 for
  ids outside 1..1000; ``GET /users/{id}/slow`` answers the same after 2 s.
- ``orders`` (127.0.0.1:9002): ``GET /orders?user={id}`` → ``{"user", "orders"}`` after
  5-40 ms, 503 every twentieth time; ``POST /orders`` echoes the JSON body with an id.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

__all__ = ["DEMO_UPSTREAMS", "DemoUpstream", "serve_demo_upstreams"]


@dataclass(frozen=True)
class DemoUpstream:
    """Where a demo service listens by default."""

    name: str
    host: str
    port: int


DEMO_UPSTREAMS: tuple[DemoUpstream, ...] = (
    DemoUpstream("users", "127.0.0.1", 9001),
    DemoUpstream("orders", "127.0.0.1", 9002),
)

MAX_USER_ID = 1000
"""Users 1..MAX_USER_ID exist; any other id is a 404."""
SLOW_USER_DELAY_S = 2.0
ORDERS_LATENCY_S = (0.005, 0.040)
"""Uniform latency range of ``GET /orders``."""
ORDERS_FAILURE_RATIO = 0.05
"""Share of ``GET /orders`` answered 503, so retries have something to retry. The
failures are spread evenly (every twentieth GET), not drawn at random, so that the
same traffic meets the same failures: a test of the retries depends on no luck."""
KEEP_ALIVE_TIMEOUT_S = 75.0
"""An idle keep-alive connection is closed after this long (longer than usual clients)."""
MAX_BODY_BYTES = 1024 * 1024
"""Request bodies larger than this are answered 413."""

_FIRST_NAMES = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken")
_LAST_NAMES = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen")
_USER_PATH = re.compile(r"^/users/(\d+)(/slow)?$")

_Answer = tuple[int, Any]
_App = Callable[[str, str, bytes], Awaitable[_Answer]]


def _error(status: int, message: str) -> _Answer:
    return status, {"error": message}


async def _users(method: str, target: str, body: bytes) -> _Answer:
    match = _USER_PATH.match(urlsplit(target).path)
    if match is None:
        return _error(404, "no such route; try GET /users/{id}")
    if method != "GET":
        return _error(405, "only GET is served here")
    user_id = int(match.group(1))
    if match.group(2):
        await trio.sleep(SLOW_USER_DELAY_S)
    if not 1 <= user_id <= MAX_USER_ID:
        return _error(404, f"user {user_id} not found")
    first = _FIRST_NAMES[user_id % len(_FIRST_NAMES)]
    last = _LAST_NAMES[user_id % len(_LAST_NAMES)]
    email = f"{first}.{last}{user_id}@example.com".lower()
    return 200, {"id": user_id, "name": f"{first} {last}", "email": email}


class _Orders:
    """The orders service; holds the id counter of created orders."""

    def __init__(self, failure_ratio: float = ORDERS_FAILURE_RATIO) -> None:
        if not 0.0 <= failure_ratio <= 1.0:
            raise ValueError(f"failure_ratio must be within 0..1, got {failure_ratio}")
        self._ids = itertools.count(10_001)
        self._failure_ratio = failure_ratio
        self._failures_due = 0.0

    def _fails(self) -> bool:
        """Whether this GET answers 503: one in every ``1 / failure_ratio``, evenly."""
        self._failures_due += self._failure_ratio
        if self._failures_due >= 1.0 - 1e-9:
            self._failures_due -= 1.0
            return True
        return False

    async def __call__(self, method: str, target: str, body: bytes) -> _Answer:
        url = urlsplit(target)
        if url.path != "/orders":
            return _error(404, "no such route; try GET /orders?user={id}")
        if method == "POST":
            return self._create(body)
        if method != "GET":
            return _error(405, "GET or POST only")
        users = parse_qs(url.query).get("user", [])
        if not users or not users[0].isdigit():
            return _error(400, "query parameter user must be an integer id")
        user_id = int(users[0])
        await trio.sleep(random.uniform(*ORDERS_LATENCY_S))
        if self._fails():
            return _error(503, "orders is briefly unavailable")
        count = user_id % 4
        orders = [
            {"id": user_id * 100 + n, "total": round(9.5 * (n + 1) + user_id % 7, 2)}
            for n in range(count)
        ]
        return 200, {"user": user_id, "orders": orders}

    def _create(self, body: bytes) -> _Answer:
        try:
            order = json.loads(body)
        except ValueError:
            return _error(400, "body must be JSON")
        if not isinstance(order, dict):
            return _error(400, "body must be a JSON object")
        return 201, {**order, "id": next(self._ids)}


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(64 * 1024))


async def _send(
    conn: h11.Connection, stream: trio.SocketStream, status: int, obj: Any, *, close: bool = False
) -> None:
    body = json.dumps(obj).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    if close:
        headers.append(("connection", "close"))
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def _serve_connection(app: _App, stream: trio.SocketStream) -> None:
    """HTTP/1.1 with keep-alive: one request at a time until either side closes."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            with trio.move_on_after(KEEP_ALIVE_TIMEOUT_S):
                event = await _next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return
            body = bytearray()
            while isinstance(part := await _next_event(conn, stream), h11.Data):
                body += part.data
                if len(body) > MAX_BODY_BYTES:
                    await _send(conn, stream, 413, {"error": "body too large"}, close=True)
                    return
            method, target = event.method.decode("ascii"), event.target.decode("ascii")
            status, payload = await app(method, target, bytes(body))
            await _send(conn, stream, status, payload)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(trio.BrokenResourceError, h11.LocalProtocolError):
                await _send(conn, stream, exc.error_status_hint, {"error": str(exc)}, close=True)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


async def serve_demo_upstreams(
    *,
    host: str = "127.0.0.1",
    users_port: int = 9001,
    orders_port: int = 9002,
    orders_failure_ratio: float = ORDERS_FAILURE_RATIO,
    task_status: trio.TaskStatus[list[tuple[str, str]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``users`` and ``orders`` until cancelled.

    A port of 0 picks a free one; ``task_status.started`` reports the bound
    ``(name, url)`` pairs once both services accept connections.
    ``orders_failure_ratio`` is the share of ``GET /orders`` answered 503.
    """
    services: list[tuple[str, int, _App]] = [
        ("users", users_port, _users),
        ("orders", orders_port, _Orders(orders_failure_ratio)),
    ]
    async with trio.open_nursery() as nursery:
        bound: list[tuple[str, str]] = []
        for name, port, app in services:
            listeners = await trio.open_tcp_listeners(port, host=host)
            actual_port = listeners[0].socket.getsockname()[1]
            url_host = f"[{host}]" if ":" in host else host
            bound.append((name, f"http://{url_host}:{actual_port}"))
            nursery.start_soon(trio.serve_listeners, _handler(app), listeners)
        task_status.started(bound)


def _handler(app: _App) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handle(stream: trio.SocketStream) -> None:
        await _serve_connection(app, stream)

    return handle
