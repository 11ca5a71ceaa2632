"""Upstream for S4 that knows when its caller left.

nginx's ``echo_sleep`` does not watch the connection: a request whose caller closed the
connection still runs its full second and is logged 200 with ``$request_time`` 1.0, so
nginx cannot say how much work outlived the caller. This server does the same work
(a timer) while reading the connection; when the caller closes it, the work stops and
the time is recorded.

``/fast``, ``/slow`` (50 ms) and ``/slow1s…`` (1 s) answer the same ~200-byte JSON as
the nginx upstream. Each ``/slow1s…`` request leaves a record: path, start and end
(``time.monotonic()``), and ``outcome``: ``completed`` (ran the whole second) or
``caller_left`` (the connection closed first). ``GET /__records`` returns
``{"inflight": n, "records": [...]}``.

Run: ``.venv/bin/python -m bench.s4_upstream --port 18081``
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import h11
import trio

BODY = (
    b'{"id": 12345, "name": "benchmark", "status": "ok", "items": [1, 2, 3, 4, 5], '
    b'"tags": ["alpha", "beta", "gamma"], "padding": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'
    b'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}\n'
)
WORK_S = {"/fast": 0.0, "/slow": 0.05}
SLOW1S_PREFIX = "/slow1s"
SLOW1S_S = 1.0
RECEIVE_BYTES = 65536


class Records:
    """What the ``/slow1s…`` requests did, and how many are running."""

    def __init__(self) -> None:
        self.inflight = 0
        self.items: list[dict[str, object]] = []

    def as_json(self) -> bytes:
        return json.dumps({"inflight": self.inflight, "records": self.items}).encode()


async def work_until_caller_leaves(
    stream: trio.SocketStream, conn: h11.Connection, seconds: float
) -> bool:
    """Sleep ``seconds`` while reading the connection; True if the caller closed it."""
    caller_left = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal caller_left
            while True:
                try:
                    data = await stream.receive_some(RECEIVE_BYTES)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    caller_left = True
                    nursery.cancel_scope.cancel(reason="caller closed the connection")
                    return
                conn.receive_data(data)  # a pipelined request: keep it for later

        nursery.start_soon(watch)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel(reason="work done")
    return caller_left


async def send(stream: trio.SocketStream, conn: h11.Connection, status: int, body: bytes) -> None:
    """One complete response with Content-Length."""
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data = (data or b"") + (conn.send(h11.Data(data=body)) or b"")
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def serve_connection(records: Records, stream: trio.SocketStream) -> None:
    """HTTP/1.1 keep-alive loop for one connection."""
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    continue
                return
            if not isinstance(event, h11.Request):
                continue
            while not isinstance(conn.next_event(), h11.EndOfMessage):
                conn.receive_data(await stream.receive_some(RECEIVE_BYTES))
            path = event.target.decode()
            if path == "/__records":
                await send(stream, conn, 200, records.as_json())
            elif path.startswith(SLOW1S_PREFIX):
                record: dict[str, object] = {"path": path, "start": time.monotonic()}
                records.items.append(record)
                records.inflight += 1
                try:
                    left = await work_until_caller_leaves(stream, conn, SLOW1S_S)
                finally:
                    records.inflight -= 1
                    record["end"] = time.monotonic()
                record["outcome"] = "caller_left" if left else "completed"
                if left:
                    return
                await send(stream, conn, 200, BODY)
            elif path in WORK_S:
                if await work_until_caller_leaves(stream, conn, WORK_S[path]):
                    return
                await send(stream, conn, 200, BODY)
            else:
                await send(stream, conn, 404, b'{"error": "not found"}\n')
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, h11.RemoteProtocolError, h11.LocalProtocolError):
        return
    finally:
        await stream.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=18081)
    args = parser.parse_args()
    records = Records()
    handler = partial(serve_connection, records)
    trio.run(partial(trio.serve_tcp, handler, args.port, host="127.0.0.1", backlog=4096))


if __name__ == "__main__":
    main()
