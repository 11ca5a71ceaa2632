"""Over TLS nothing is written without waiting, so every small request body (<= 64 KiB)
is written by a task beside the reader. That task was cancelled when the answer's head
arrived, and trio marks an SSLStream whose ``send_all`` was cancelled mid-write BROKEN:
the rest of an early answer could no longer be read from it."""

import socket
from functools import partial

import pytest
import trio

from tests.gateway_harness import run_gateway
from tests.hostile.rawclient import connect, request_bytes
from tests.tls import server_context

ERROR_BODY = b"request entity too large" * 40


async def _refuse_on_head_then_explain(stream: trio.abc.Stream) -> None:
    """Answers 413 on the head alone (never reads the body), the head and the body in
    two writes, as a server that flushes its head first does."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1024)
    await stream.send_all(b"HTTP/1.1 413 Payload Too Large\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(ERROR_BODY))
    await trio.sleep(0.1)
    await stream.send_all(ERROR_BODY)
    await trio.sleep_forever()


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_an_early_answer_of_a_tls_upstream_to_a_small_body_is_relayed_whole(
        ca, ca_file: str, scheme: str):
    """A TLS upstream refuses a 60,000-byte upload on its head (413, its explanation
    in a second write). The client gets the 413 head and then a connection cut before
    its body: the gateway broke its own TLS stream by cancelling the body's write.
    Over plain HTTP the answer waited unread behind the blocked write: a 504 after the
    whole deadline."""
    context = server_context(ca, "127.0.0.1")
    size = 60_000
    async with trio.open_nursery() as nursery:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        listener = trio.SocketListener(sock)
        if scheme == "https":
            listener = trio.SSLListener(listener, context, https_compatible=True)
        nursery.start_soon(partial(trio.serve_listeners, _refuse_on_head_then_explain,
                                   [listener]))
        tls = f"\n    tls: {{ca_file: {ca_file}}}" if scheme == "https" else ""
        policy = f"""
version: 1
upstreams:
  up:
    url: "{scheme}://127.0.0.1:{sock.getsockname()[1]}"{tls}
routes:
  - path: /api/{{rest*}}
    deadline: 3s
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""
        async with run_gateway(policy) as gw:
            async with connect(gw.port) as client:
                await client.send(request_bytes(
                    "POST", "/api/upload", [("Content-Length", str(size))], b"x" * size))
                response = await client.read_response(timeout_s=6)
            assert response is not None
            assert (response.status, response.body) == (413, ERROR_BODY), response
            pool = gw.gateway.runtime.snapshot.upstreams["up"].pool
            assert pool.statistics().idle == 0  # half its request unwritten: not reused
        nursery.cancel_scope.cancel()
