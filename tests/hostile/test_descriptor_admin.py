"""The descriptor reserve (``gateway._connections``) treats the admin listener as one
more public one: when busy client connections fill the room, ``/healthz``, ``/readyz``
and ``/metrics`` connections are closed unanswered. Envoy exempts its admin listener
from the global connection limit (``ignore_global_conn_limit``) for exactly this case:
a probe that cannot connect during overload gets the instance restarted, and the
operator loses the metrics that would explain the overload."""

from __future__ import annotations

import trio

from gateway._connections import CONNECTIONS
from tests.gateway_harness import run_gateway
from tests.hostile.child_processes import (
    idle_connections,
    open_fds,
    open_file_limit,
    upstream_process,
)
from tests.hostile.rawclient import RawConnection, request_bytes


def policy(url: str) -> str:
    # 10 upstream sockets at most (74 descriptors reserved); the other requests wait
    # for a slot, their connections busy.
    return f"""
version: 1
upstreams:
  up:
    url: "{url}"
    pool: {{max_connections: 10}}
    limit: {{concurrency: 10, queue: 500, queue_timeout: 20s}}
routes:
  - path: /api/{{rest*}}
    deadline: 30s
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""


async def test_admin_health_check_is_answered_while_busy_clients_fill_the_room():
    async with upstream_process() as url, run_gateway(policy(url)) as gw:
        admin = trio.socket.socket()  # its descriptor, before the limit
        refused_before = CONNECTIONS.refused
        slow = b"GET /api/slow?ms=20000 HTTP/1.1\r\nHost: gw\r\n\r\n"
        with open_file_limit(open_fds() + 100):
            async with idle_connections(gw.port, 60, head=slow) as opened:
                assert opened > 0
                await trio.sleep(1.0)  # the admitted requests are in flight
                busy = sum(1 for s in CONNECTIONS._live if not s.idle_task.idle)
                await admin.connect(("127.0.0.1", gw.admin_port))
                conn = RawConnection(trio.SocketStream(admin))
                await conn.send(request_bytes("GET", "/healthz"))
                response = await conn.read_response(timeout_s=5)
                admin.close()
        assert response is not None and response.status == 200, (
            f"/healthz on the admin bind: {response}; {busy} busy client connections, "
            f"{CONNECTIONS.refused - refused_before} connections refused")
