"""Review reproductions for the HTTP proxy path and the upstream pool."""

from __future__ import annotations

from functools import partial

import trio

from tests.hostile import POLICY, closed_port, stage
from tests.hostile.rawclient import connect, request_bytes

LIMIT_S = 15.0


class RawUpstream:
    """A raw TCP upstream: ``script(stream, head, body, index)`` writes what it likes."""

    def __init__(self, script) -> None:
        self.script = script
        self.heads: list[bytes] = []
        self.connections = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn_index = self.connections
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                chunked = False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                    if name.strip().lower() == b"transfer-encoding":
                        chunked = True
                body = b""
                if chunked:
                    while not buf.endswith(b"0\r\n\r\n"):
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buf += data
                    body, buf = buf, b""
                else:
                    while len(buf) < length:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buf += data
                    body, buf = buf[:length], buf[length:]
                self.heads.append(head)
                keep = await self.script(stream, head, body, conn_index)
                if not keep:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)


async def start_raw(nursery: trio.Nursery, script) -> RawUpstream:
    upstream = RawUpstream(script)
    listeners = await nursery.start(partial(trio.serve_tcp, upstream.serve, 0, host="127.0.0.1"))
    upstream.port = listeners[0].socket.getsockname()[1]
    return upstream


def policy(url: str, extra: str = "") -> str:
    return POLICY.format(url=url, dead_port=closed_port(), extra=extra)


async def _explore(raw_response: bytes, request: bytes, method: str = "GET"):
    async def script(stream, head, body, index):
        await stream.send_all(raw_response)
        return True

    async with trio.open_nursery() as nursery:
        up = await start_raw(nursery, script)
        async with stage(policy(up.url)) as s, connect(s.port) as conn:
            await conn.send(request)
            response = await conn.read_response(method=method, timeout_s=3)
            print(up.heads)
            print(response.raw_head if response else None, response)
        nursery.cancel_scope.cancel()
    return response


async def test_explore_204():
    with trio.fail_after(LIMIT_S):
        await _explore(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                       request_bytes("GET", "/api/up/x"))


async def test_explore_head():
    with trio.fail_after(LIMIT_S):
        await _explore(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: \"x\"\r\n\r\n",
                       request_bytes("HEAD", "/api/up/x"), "HEAD")


async def test_explore_query():
    with trio.fail_after(LIMIT_S):
        await _explore(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
                       request_bytes("GET", "/api/up/a%2Fb/c+d/%3F/e%20f/%25?x=a%2Fb+c&y=%26&&z"))


async def test_explore_204_h2():
    from tests.h2client import H2Client

    async def script(stream, head, body, index):
        await stream.send_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
        return True

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            up = await start_raw(nursery, script)
            async with stage(policy(up.url)) as s:
                client = H2Client(await trio.open_tcp_stream("127.0.0.1", s.port))
                await client.start()
                sid = await client.get("/api/up/x")
                try:
                    print(await client.response(sid))
                except Exception as exc:
                    print("H2 error", repr(exc))
                await client.stream.aclose()
            nursery.cancel_scope.cancel()
