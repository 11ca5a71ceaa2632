"""At the open-file limit: connections that send nothing must not stop the gateway
serving the clients it has, nor keep new ones out, nor be blamed on the upstream.

Each test lowers this process's soft RLIMIT_NOFILE to a little above what it holds
(restored after). Silent connections come from a child process and the upstream runs
in one, so only the gateway's descriptors count against the limit.
"""

from __future__ import annotations

import json
import os

import h2.errors
import h2.events
import pytest
import trio

from gateway._connections import CONNECTIONS
from tests.gateway_harness import run_gateway
from tests.h2client import H2Client
from tests.hostile import stage
from tests.hostile.child_processes import (
    descriptors_used_up,
    idle_connections,
    open_fds,
    open_file_limit,
    upstream_process,
)
from tests.hostile.rawclient import RawConnection, connect, request_bytes

#: Descriptors left to the gateway above what the process holds at the start.
HEADROOM = 100
#: Silent connections opened: more than the headroom.
SILENT = 300


def policy(url: str, upstream_extra: str = "") -> str:
    # A pool of 10 connections: 74 descriptors kept for the worker's own sockets.
    return f"""
version: 1
upstreams:
  up: {{url: "{url}", pool: {{max_connections: 10}}, limit: {{concurrency: 10}}{upstream_extra}}}
routes:
  - path: /api/{{rest*}}
    deadline: 3s
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""


async def _made_room(before: int, count: int) -> None:
    """Wait until the gateway has closed ``count`` connections to keep its reserve."""
    with trio.fail_after(15):
        while CONNECTIONS.closed_for_room + CONNECTIONS.refused - before < count:
            await trio.sleep(0.02)


async def test_silent_connections_do_not_make_an_admitted_client_s_request_fail():
    """A client already connected (keep-alive) asks for a proxied route while 300 other
    connections sit silent. They took every descriptor, its upstream socket's among
    them: a 502 ``upstream_connect`` from a healthy upstream. The worker now keeps
    descriptors for its own sockets and closes silent connections to do so."""
    async with upstream_process() as url, run_gateway(policy(url)) as gw:
        async with connect(gw.port) as admitted:
            await admitted.send(request_bytes("GET", "/nothing-here"))
            warm = await admitted.read_response()
            assert warm is not None and warm.status == 404  # admitted, keep-alive
            before = CONNECTIONS.closed_for_room + CONNECTIONS.refused
            with open_file_limit(open_fds() + HEADROOM):
                async with idle_connections(gw.port, SILENT) as opened:
                    assert opened == SILENT
                    await _made_room(before, SILENT - HEADROOM)
                    await admitted.send(request_bytes("GET", "/api/ok"))
                    response = await admitted.read_response(timeout_s=5)
            assert response is not None, "no answer"
            assert response.status == 200, (response.status, response.body)


async def test_silent_connections_do_not_keep_a_new_client_out():
    """While 300 connections that never send a byte held every descriptor, a new client
    (completed by the kernel from the backlog) got no answer for as long as they stayed
    (up to keep_alive_timeout, 75 s), the accept loop logging EMFILE ten times a
    second. A silent connection is closed to make room for it."""
    async with upstream_process() as url, run_gateway(policy(url)) as gw:
        newcomer = trio.socket.socket()  # its descriptor, before the limit
        before = CONNECTIONS.closed_for_room + CONNECTIONS.refused
        with open_file_limit(open_fds() + HEADROOM):
            async with idle_connections(gw.port, SILENT) as opened:
                assert opened == SILENT
                await _made_room(before, SILENT - HEADROOM)
                await newcomer.connect(("127.0.0.1", gw.port))
                conn = RawConnection(trio.SocketStream(newcomer))
                await conn.send(request_bytes("GET", "/api/ok"))
                response = await conn.read_response(timeout_s=5)
                newcomer.close()
        assert response is not None and response.status == 200, response


async def test_an_idle_http2_connection_closed_to_make_room_is_told_with_goaway():
    """An idle HTTP/2 connection closed to make room for a new client was closed without
    a word: a client sending a request at that moment saw its connection reset, and
    could not tell whether the request had been processed (a POST is not retried then).
    It is now sent GOAWAY(NO_ERROR) naming the last stream processed, as nginx does
    when it reclaims idle connections: anything it opens later was not processed and
    can be retried on a new connection."""
    async with upstream_process() as url, run_gateway(policy(url)) as gw:
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
        await client.start()
        with trio.fail_after(5):
            assert await client.response_status(await client.get("/api/ok")) == 200
            await client.round_trip()  # answered: the connection is idle
        newcomer = trio.socket.socket()  # its descriptor, before the limit
        before = CONNECTIONS.closed_for_room
        with open_file_limit(open_fds() + 8):  # the next connection is past the reserve
            await newcomer.connect(("127.0.0.1", gw.port))
            with trio.fail_after(5):
                while CONNECTIONS.closed_for_room == before:
                    await trio.sleep(0.01)
        newcomer.close()
        closed = False
        with trio.fail_after(5):
            while not closed:
                try:
                    data = await client.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                closed = not data
                client.events.extend(client.conn.receive_data(data) if data else [])
        await client.stream.aclose()
        goaway = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway, "closed without GOAWAY"
        assert goaway[0].error_code == h2.errors.ErrorCodes.NO_ERROR
        assert goaway[0].last_stream_id == 1


async def test_running_out_of_descriptors_does_not_open_the_upstream_s_circuit():
    """The worker's own descriptor shortage was counted as the upstream failing: three
    requests during it opened the upstream's circuit (``consecutive_failures: 3``), and
    once descriptors were free again the healthy upstream was refused (503
    ``circuit_open``) for ``open_for``. It is a shed (503, Retry-After) that says
    nothing of the upstream."""
    extra = ", circuit: {consecutive_failures: 3, open_for: 30s}"
    async with upstream_process() as url, run_gateway(policy(url, extra)) as gw:
        async with connect(gw.port) as client:
            during = []
            with descriptors_used_up():
                for _ in range(3):
                    await client.send(request_bytes("GET", "/api/ok"))
                    response = await client.read_response(timeout_s=5)
                    assert response is not None
                    during.append((response.status, json.loads(response.body)["cause"],
                                   response.header("retry-after") is not None))
            assert during == [(503, "shed", True)] * 3, during
            await client.send(request_bytes("GET", "/api/ok"))
            after = await client.read_response(timeout_s=5)
        assert after is not None and after.status == 200, (after.status, after.body)


async def test_a_policy_change_that_cannot_be_read_yet_is_loaded_once_it_can(tmp_path):
    """The policy file changed while the worker had no descriptor to read it with
    ("Too many open files"): the reload was recorded as rejected and never tried again,
    so the old policy kept serving (the new route a 404) until the file was edited
    again. A file that could not be read is read again."""
    path = tmp_path / "policy.yaml"
    async with upstream_process() as url, run_gateway(
            policy(url), policy_path=path, watch_policy=True) as gw:
        runtime = gw.gateway.runtime
        old_version = runtime.snapshot.loaded.version
        new_text = policy(url) + """  - path: /new/{rest*}
    proxy: {upstream: up, path: "/{rest}"}
"""
        writer = os.open(path, os.O_WRONLY)  # its descriptor, before the limit
        try:
            with descriptors_used_up():
                os.ftruncate(writer, 0)
                os.pwrite(writer, new_text.encode(), 0)
                with trio.fail_after(5):
                    while runtime.last_reload_error is None:
                        await trio.sleep(0.02)
                assert "Too many open files" in runtime.last_reload_error
        finally:
            os.close(writer)
        with trio.fail_after(5):  # read again within a second and a poll
            while runtime.snapshot.loaded.version == old_version:
                await trio.sleep(0.02)
        async with connect(gw.port) as conn:
            await conn.send(request_bytes("GET", "/new/ok"))
            response = await conn.read_response(timeout_s=5)
        assert response is not None and response.status == 200, response


@pytest.mark.parametrize("seen", [True, False], ids=["kept", "closed-unserved"])
async def test_a_connection_holding_a_pipelined_request_is_not_closed_as_idle(
        monkeypatch, seen):
    """A client pipelines two requests; the worker reads both at once and answers the
    first. At that moment the connection counts as idle again, the second request still
    unparsed in the worker's buffer: an accept that needs a descriptor then closed it to
    make room, and the second request went on to the upstream while its client got a
    closed connection and no answer (it cannot tell that request was processed). Such a
    connection is now passed over; and one closed all the same (a request the reader
    had just taken from the socket, which nothing shows: ``seen`` off) serves nothing
    more."""
    import gateway._connections
    from gateway._hypercorn_fixes import IdleTimer

    if not seen:
        monkeypatch.setattr(gateway._connections, "_request_pending", lambda *_: False)

    made_room: list[bool] = []
    restart = IdleTimer.restart

    async def restart_then_make_room(self, task_group, action) -> None:
        await restart(self, task_group, action)
        protocol = getattr(self._server.protocol, "protocol", None)
        if getattr(protocol, "keep_alive_requests", 0) == 1 and not made_room:
            made_room.append(CONNECTIONS.make_room())  # an accept needing room, just then

    monkeypatch.setattr(IdleTimer, "restart", restart_then_make_room)
    async with stage() as s, connect(s.port) as conn:
        await conn.send(request_bytes("GET", "/api/up/slow?ms=50")
                        + request_bytes("GET", "/api/up/ok"))
        first = await conn.read_response()
        second = await conn.read_response()
        await s.settle()
    assert first is not None and first.status == 200
    assert made_room, "the connection never went idle"
    targets = [request.target for request in s.upstream.requests]
    assert second is not None or targets == ["/slow?ms=50"], (
        f"the upstream got {targets}, the client no answer to the second request")
    if seen:
        assert made_room == [False]  # the only connection, and not idle
        assert second is not None and second.status == 200
    else:
        assert made_room == [True] and second is None


async def test_a_connection_dropping_a_small_unread_body_is_not_closed_for_room():
    """A POST answered on its head (a 404) keeps its connection while the rest of its
    small body is read and dropped; its client was told of no close and may send its
    next request right behind the body. Such a connection was the fallback an accept
    needing a descriptor closed, and that next request was lost; it is busy, not idle."""
    async with stage() as s, connect(s.port) as conn:
        await conn.send(request_bytes("POST", "/nowhere", [("Content-Length", "10000")]))
        early = await conn.read_response()
        assert early is not None and early.status == 404
        assert early.header("connection") != b"close"
        assert CONNECTIONS.make_room() is False  # the only connection, and busy
        await conn.send(b"x" * 10000 + request_bytes("GET", "/api/up/ok"))
        after = await conn.read_response()
    assert after is not None and after.status == 200, after
