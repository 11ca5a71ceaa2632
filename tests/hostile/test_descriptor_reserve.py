"""Client connections are kept below ``soft RLIMIT_NOFILE - reserve``, where the
reserve is 64 plus the most sockets the pools may open, which they rarely all do. Three
upstreams with default pools reserve 364 descriptors: a worker with 300 descriptors
free closed every new client connection at once; with a hard limit of 4,096 and 40
upstreams it would accept no client at all. The reserve is at most half the limit.
"""

from __future__ import annotations

import trio

from gateway._connections import CONNECTIONS
from tests.gateway_harness import run_gateway
from tests.hostile.child_processes import open_fds, open_file_limit
from tests.hostile.rawclient import RawConnection, request_bytes
from tests.upstream import start_upstream

POLICY = """
version: 1
upstreams:
  a: {{url: "{url}"}}
  b: {{url: "{url}"}}
  c: {{url: "{url}"}}
routes:
  - path: /api/{{rest*}}
    deadline: 3s
    proxy: {{upstream: a, path: "/{{rest}}"}}
"""


async def test_a_client_is_served_while_hundreds_of_descriptors_are_free():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw:
            refused_before = CONNECTIONS.refused
            client = trio.socket.socket()
            with open_file_limit(open_fds() + 300):  # 300 descriptors free
                await client.connect(("127.0.0.1", gw.port))
                conn = RawConnection(trio.SocketStream(client))
                await conn.send(request_bytes("GET", "/api/ok"))
                response = await conn.read_response(timeout_s=5)
                client.close()
            assert response is not None and response.status == 200, (
                f"connection closed unanswered ({CONNECTIONS.refused - refused_before} "
                f"refused) with 300 descriptors free; reserve {CONNECTIONS.reserve}")
        nursery.cancel_scope.cancel()
