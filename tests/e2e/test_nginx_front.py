"""The deployment path: nginx as the reverse proxy in front of the gateway.

nginx runs from a private config (``tests/nginx_harness.py``); the gateway runs under
Hypercorn's trio worker in the test process, so its traces can be read directly.
"""

from pathlib import Path

import httpx
import pytest
import trio

from tests.gateway_harness import run_gateway, traces_with
from tests.nginx_harness import run_nginx
from tests.upstream import start_upstream

pytestmark = pytest.mark.nginx

POLICY = """
version: 1
server:
  trusted_proxies: {trusted}
upstreams:
  a: {{url: "{url}"}}
routes:
  - path: /long/{{rest*}}
    deadline: 10s
    proxy: {{upstream: a, path: "/{{rest}}"}}
"""


def policy(url: str, trusted: str = "[127.0.0.1/32]") -> str:
    return POLICY.format(url=url, trusted=trusted)


async def test_client_leaving_nginx_cancels_the_upstream_work(tmp_path: Path):
    async with trio.open_nursery() as nursery:
        a = await start_upstream(nursery)
        async with run_gateway(policy(a.url)) as gw, run_nginx(gw.port, tmp_path) as nginx:
            async with httpx.AsyncClient(base_url=nginx.url, timeout=10) as client:
                warm = await client.get("/long/users/1")
                assert warm.status_code == 200, warm.text
            assert warm.json() == {"id": "1", "name": "user-1"}

            stream = await trio.open_tcp_stream("127.0.0.1", nginx.port)
            await stream.send_all(b"GET /long/slow?ms=5000 HTTP/1.1\r\nhost: t\r\n\r\n")
            with trio.fail_after(5):
                await a.wait_for(lambda: any(r.target == "/slow?ms=5000" for r in a.requests))
            closed_at = trio.current_time()
            await stream.aclose()

            with trio.fail_after(5):
                await a.wait_cancelled()
            cancelled = a.cancelled[0]
            latency = cancelled.at - closed_at
            print(f"\nclient close -> upstream cancelled through nginx: {latency * 1000:.1f} ms")
            assert cancelled.target == "/slow?ms=5000"
            # nginx notices the close on the client connection's next read event and
            # drops its connection to the gateway; the gateway cancels the upstream call.
            assert 0 <= latency < 1.0
            # Far from the 5 s the upstream would have taken to answer.
            assert cancelled.elapsed < 2.0

            traces = await traces_with(gw, status=499)
            assert traces[0].cause == "client_disconnect"
            call = next(s for s in traces[0].root.walk() if s.kind == "call")
            assert call.cause == "client_disconnect"
            # nginx itself logged the request as closed by the client (499).
            with trio.fail_after(2):
                while '"GET /long/slow?ms=5000 HTTP/1.1" 499' not in nginx.access_log():
                    await trio.sleep(0.01)
            assert a.errors == []
        nursery.cancel_scope.cancel()


async def _forwarded_for(base_url: str, *, local_address: str = "127.0.0.1") -> list[str]:
    transport = httpx.AsyncHTTPTransport(local_address=local_address)
    async with httpx.AsyncClient(base_url=base_url, timeout=10, transport=transport) as client:
        response = await client.get("/long/headers", headers={
            "x-forwarded-for": "203.0.113.9", "host": "public.example"})
    assert response.status_code == 200, response.text
    pairs = response.json()["headers"]
    return [value for name, value in pairs if name == "x-forwarded-for"]


async def test_forwarded_for_chain_is_kept_only_from_a_trusted_proxy(tmp_path: Path):
    async with trio.open_nursery() as nursery:
        a = await start_upstream(nursery)
        # nginx is a trusted proxy. The client claims 203.0.113.9; nginx's
        # $proxy_add_x_forwarded_for appends the address the client connected from
        # (127.0.0.1), and the gateway, trusting its peer (nginx, 127.0.0.1), keeps
        # that chain and appends nginx's address: three entries, oldest first.
        async with run_gateway(policy(a.url)) as gw, run_nginx(gw.port, tmp_path) as nginx:
            assert await _forwarded_for(nginx.url) == ["203.0.113.9, 127.0.0.1, 127.0.0.1"]
            # The same from 127.0.0.2 shows who appended what: nginx appends the
            # client's address (127.0.0.2), the gateway appends nginx's (127.0.0.1).
            assert await _forwarded_for(nginx.url, local_address="127.0.0.2") == [
                "203.0.113.9, 127.0.0.2, 127.0.0.1"]
            seen = a.requests[-1]
            assert seen.header("x-forwarded-host") == "public.example"
            assert seen.header("x-forwarded-proto") == "http"

        # No trusted proxies: the gateway cannot tell a chain nginx built from one the
        # client forged, so it drops whatever arrived (the client's claim and nginx's
        # addition alike) and the upstream sees only the gateway's peer, nginx.
        untrusted = tmp_path / "untrusted"
        untrusted.mkdir()
        async with run_gateway(policy(a.url, trusted="[]")) as gw, \
                run_nginx(gw.port, untrusted) as nginx:
            assert await _forwarded_for(nginx.url) == ["127.0.0.1"]
            assert await _forwarded_for(nginx.url, local_address="127.0.0.2") == ["127.0.0.1"]
        assert a.errors == []
        nursery.cancel_scope.cancel()
