"""The keep-alive timer of a client connection (``keep_alive_timeout``): it runs only
while the connection is idle, restarts after every response, and a worker shutting down
closes idle connections at once while a request in flight is still answered.
"""

import trio

from tests.hostile import stage
from tests.hostile.rawclient import connect, request_bytes

KEEP_ALIVE_S = 2


async def test_timer_runs_only_while_idle_and_restarts_after_each_response():
    async with stage(keep_alive_timeout=KEEP_ALIVE_S) as s:
        async with connect(s.port) as conn:
            # In flight longer than the keep-alive: not cut.
            await conn.send(request_bytes("GET", "/api/long/slow?ms=3000"))
            response = await conn.read_response(timeout_s=10)
            assert response is not None and response.status == 200, response
            # Idle gaps that add up to more than the keep-alive, none longer than it.
            for _ in range(3):
                await trio.sleep(KEEP_ALIVE_S * 0.5)
                await conn.send(request_bytes("GET", "/api/up/ok"))
                response = await conn.read_response(timeout_s=10)
                assert response is not None and response.status == 200, response
            idle_since = trio.current_time()
            closed = await conn.wait_closed(timeout_s=KEEP_ALIVE_S + 5)
            idle_for = trio.current_time() - idle_since
        assert closed == "eof", "an idle keep-alive connection was never closed"
        assert idle_for >= KEEP_ALIVE_S * 0.9
        assert len(s.upstream.requests) == 4


async def test_shutdown_closes_idle_connections_and_answers_requests_in_flight():
    async with stage(keep_alive_timeout=60, graceful_timeout=10) as s:
        async with connect(s.port) as idle, connect(s.port) as busy:
            await idle.send(request_bytes("GET", "/api/up/ok"))
            response = await idle.read_response()
            assert response is not None and response.status == 200
            await busy.send(request_bytes("GET", "/api/long/slow?ms=1000"))
            with trio.fail_after(5):
                while len(s.upstream.requests) < 2:
                    await trio.sleep(0.01)

            s.gw.shutdown.set()
            assert await idle.wait_closed(timeout_s=0.5) == "eof", (
                "an idle connection outlived the shutdown")
            response = await busy.read_response(timeout_s=10)
            assert response is not None and response.status == 200, response
            assert response.closes or await busy.wait_closed(timeout_s=2) == "eof"


async def test_a_request_cut_by_the_graceful_timeout_gets_no_half_answer():
    # The worker cancels what is still running when graceful_timeout expires; a cancelled
    # request writes nothing more, so its client sees the connection close, not a 500.
    async with stage(graceful_timeout=0.5) as s:
        async with connect(s.port) as busy:
            await busy.send(request_bytes("GET", "/api/long/slow?ms=5000"))
            with trio.fail_after(5):
                while len(s.upstream.requests) < 1:
                    await trio.sleep(0.01)
            s.gw.shutdown.set()
            response = await busy.read_response(timeout_s=5)
            assert response is None, response
            assert busy.eof or busy.reset
