"""Prometheus figures an operator reads at /metrics: do they match what happened?

The metrics are process-global (one registry per worker), so every test reads a
figure before and after and asserts on the difference, on labels of its own.
"""

from pathlib import Path

import trio

from tests.gateway_harness import run_gateway
from tests.metrics import metric_total
from tests.process_harness import free_port
from tests.upstream import start_upstream


async def _scrape(gw) -> str:
    async with gw.admin() as admin:
        response = await admin.get("/metrics")
        assert response.status_code == 200
        return response.text


RETRY_POLICY = """
version: 1
upstreams:
  m_retry_up:
    url: "{url}"
    call:
      retries: {{attempts: 3, on: [503], backoff: 1ms..2ms, budget: 100%, min_per_second: 100}}
  m_hedge_up:
    url: "{url}"
    call:
      hedge_after: 50ms
      max_hedges: 1
      retries: {{attempts: 1, budget: 100%, min_per_second: 100}}
routes:
  - path: /retry
    deadline: 2s
    proxy: {{upstream: m_retry_up, path: "/status/503"}}
  - path: /hedge
    deadline: 2s
    proxy: {{upstream: m_hedge_up, path: "/slow?ms=300"}}
"""


async def test_retries_and_hedges_are_counted_in_upstream_attempts_total():
    """/metrics declares gateway_upstream_attempts_total (kind first/retry/hedge) and
    gateway_hedges_total, but nothing ever increments them: an operator watching retry
    or hedge rates sees nothing at all while the gateway retries every request."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(RETRY_POLICY.format(url=upstream.url)) as gw, \
                gw.client() as client:
            response = await client.get("/retry")
            assert response.status_code == 503
            assert upstream.attempts("/status/503") == 3  # 1 first try + 2 retries

            response = await client.get("/hedge")
            assert response.status_code == 200
            assert upstream.attempts("/slow") == 2  # the first try and one hedge

            text = await _scrape(gw)
            assert metric_total(text, "gateway_upstream_attempts_total",
                                upstream="m_retry_up", kind="first") == 1, text
            assert metric_total(text, "gateway_upstream_attempts_total",
                                upstream="m_retry_up", kind="retry") == 2
            assert metric_total(text, "gateway_upstream_attempts_total",
                                upstream="m_hedge_up", kind="hedge") == 1
            assert metric_total(text, "gateway_hedges_total", upstream="m_hedge_up") == 1
        nursery.cancel_scope.cancel()


SHED_POLICY = """
version: 1
upstreams:
  m_shed_up: {{url: "{url}", limit: {{concurrency: 1, queue: 0}}}}
routes:
  - path: /both
    deadline: 2s
    fanout:
      on_failure: partial
      calls:
        a: {{upstream: m_shed_up, path: "/slow?ms=200"}}
        b: {{upstream: m_shed_up, path: "/slow?ms=200"}}
"""


async def test_a_call_shed_in_a_partial_fanout_is_counted_in_shed_total():
    """gateway_shed_total says it counts "requests or calls shed", but a call an
    upstream's limiter sheds inside a partial fan-out (the client gets 200 with the
    call under "errors", cause shed) is not counted: shedding is invisible in metrics
    exactly where partial answers hide it from clients too."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(SHED_POLICY.format(url=upstream.url)) as gw, \
                gw.client() as client:
            before = metric_total(await _scrape(gw), "gateway_shed_total")
            response = await client.get("/both")
            assert response.status_code == 200
            errors = response.json()["errors"]
            assert [entry["cause"] for entry in errors.values()] == ["shed"]
            after = metric_total(await _scrape(gw), "gateway_shed_total")
            assert after == before + 1
        nursery.cancel_scope.cancel()


TWO = """
version: 1
upstreams:
  m_keep: {{url: "{url}"}}
  m_leaving: {{url: "{url}"}}
routes:
  - path: /keep/{{rest*}}
    proxy: {{upstream: m_keep, path: "/{{rest}}"}}
  - path: /leaving/{{rest*}}
    deadline: 10s
    proxy: {{upstream: m_leaving, path: "/{{rest}}"}}
"""
ONE = """
version: 1
upstreams:
  m_keep: {{url: "{url}"}}
routes:
  - path: /keep/{{rest*}}
    proxy: {{upstream: m_keep, path: "/{{rest}}"}}
"""


async def test_an_upstream_removed_by_a_reload_shows_its_draining_requests_in_flight(
        tmp_path: Path):
    """An operator removes an upstream from the policy, reloads, and waits for
    gateway_upstream_in_flight{upstream=...} to reach 0 before shutting that service
    down. The gauge drops to 0 at the reload although requests of the old policy are
    still in flight to it (for up to their deadline): shutting the service down then
    cuts them. The figure should follow the old snapshot until it has drained."""
    path = tmp_path / "policy.yaml"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            upstream = await start_upstream(nursery)
            async with run_gateway(TWO.format(url=upstream.url), policy_path=path) as gw, \
                    gw.client() as client, gw.admin() as admin:
                statuses: list[int] = []

                async def slow() -> None:
                    statuses.append((await client.get("/leaving/slow?ms=1500")).status_code)

                nursery.start_soon(slow)
                await upstream.wait_requests(1)
                text = (await admin.get("/metrics")).text
                assert metric_total(text, "gateway_upstream_in_flight",
                                    upstream="m_leaving") == 1
                path.write_text(ONE.format(url=upstream.url))
                assert await gw.gateway.reload()
                text = (await admin.get("/metrics")).text
                assert upstream.in_flight == 1  # still being served under the old policy
                in_flight = metric_total(text, "gateway_upstream_in_flight",
                                         upstream="m_leaving")
                active = metric_total(text, "gateway_upstream_connections",
                                      upstream="m_leaving", state="active")
                with trio.fail_after(5):
                    while not statuses:
                        await trio.sleep(0.02)
                assert statuses == [200]
                assert (in_flight, active) == (1, 1)
            nursery.cancel_scope.cancel()


async def test_circuit_state_gauge_leaves_open_when_open_for_has_passed():
    """The circuit opens for 300 ms. A second later, with no request in between, the
    breaker is half-open (the next call is a probe), and /metrics must say so: the
    gauge changed only when a request happened to ask the breaker, so an idle
    upstream's "circuit open" alert fired for as long as nothing called it."""
    name = "breaker_idle"
    policy = f"""
version: 1
upstreams:
  {name}:
    url: "http://127.0.0.1:{free_port()}"
    pool: {{connect_timeout: 200ms}}
    circuit: {{consecutive_failures: 1, open_for: 300ms}}
routes:
  - path: /x
    proxy: {{upstream: {name}, path: /x}}
"""
    with trio.fail_after(20):
        async with run_gateway(policy) as gw, gw.client() as client, gw.admin() as admin:
            assert (await client.get("/x")).status_code == 502
            text = (await admin.get("/metrics")).text
            assert metric_total(text, "gateway_circuit_state", upstream=name) == 2
            await trio.sleep(1.0)
            text = (await admin.get("/metrics")).text
            assert metric_total(text, "gateway_circuit_state", upstream=name) == 1, (
                "the gauge still says the circuit is open")
