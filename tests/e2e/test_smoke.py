import trio

from tests.gateway_harness import run_gateway
from tests.upstream import proxy_policy, start_upstream


async def test_proxies_a_route():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw, gw.client() as client:
            response = await client.get("/api/users/42")
            assert response.status_code == 200
            assert response.json() == {"id": "42", "name": "user-42"}
            assert response.headers["x-request-id"]
        nursery.cancel_scope.cancel()
