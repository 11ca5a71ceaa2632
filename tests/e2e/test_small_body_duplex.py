"""A small request body (<= 64 KiB) that the kernel does not take at once is written
by a task beside the reader. That task was cancelled as soon as the response head
arrived: an upstream that answers while it still reads (a streaming echo, a
transcoder: legal HTTP/1.1, and what the >64 KiB upload path supports) never got the
rest of the body. It now writes until the exchange ends."""

import socket
from functools import partial

import pytest
import trio

from tests.gateway_harness import run_gateway
from tests.hostile.rawclient import connect, request_bytes


async def _duplex_echo(stream: trio.SocketStream) -> None:
    """Answers on the head, then echoes the Content-Length body as it arrives."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(4096)
    head, _, got = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    received = 0
    while True:
        if got:
            received += len(got)
            await stream.send_all(b"%x\r\n%s\r\n" % (len(got), got))
        if received >= length:
            break
        await trio.sleep(0.01)  # a slow reader
        got = await stream.receive_some(4096)
        if not got:
            return
    await stream.send_all(b"0\r\n\r\n")
    await trio.sleep_forever()


async def _listener(nursery: trio.Nursery, handler) -> int:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    nursery.start_soon(partial(trio.serve_listeners, handler, [trio.SocketListener(sock)]))
    return sock.getsockname()[1]


def _policy(port: int) -> str:
    return f"""
version: 1
upstreams:
  up: {{url: "http://127.0.0.1:{port}"}}
routes:
  - path: /api/{{rest*}}
    deadline: 3s
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""


@pytest.mark.parametrize("size", [60_000, 70_000], ids=["small-inline", "large-upload"])
async def test_a_small_body_is_written_whole_to_an_upstream_that_answers_while_reading(size):
    """The client POSTs 60,000 bytes to an upstream that starts its answer on the head
    and echoes the body as it reads it. The gateway stops writing the body once the
    head came: the upstream waits for the rest, the client gets a 200 whose body
    stops after a few KiB and hangs until the deadline cuts it."""
    # 70,000 bytes (the upload path) passes: the small path alone is wrong.
    body = bytes(i % 251 for i in range(size))
    async with trio.open_nursery() as nursery:
        port = await _listener(nursery, _duplex_echo)
        async with run_gateway(_policy(port)) as gw:
            async with connect(gw.port) as client:
                await client.send(request_bytes(
                    "POST", "/api/echo", [("Content-Length", str(size))], body))
                response = await client.read_response(timeout_s=6)
            assert response is not None
            assert response.status == 200
            assert len(response.body) == size and response.body == body
        nursery.cancel_scope.cancel()
