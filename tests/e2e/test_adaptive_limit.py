"""The adaptive concurrency limit end to end, against a real upstream (real time)."""

import httpx
import pytest
import trio

from tests.gateway_harness import run_gateway
from tests.upstream import Upstream, start_upstream

POLICY = """
version: 1
upstreams:
  u:
    url: "{url}"
    limit: {{concurrency: 40, queue: 100, queue_timeout: 20ms,
             adaptive: {{min_concurrency: 4, tolerance: 25%}}}}
routes:
  - path: /api/{{rest*}}
    deadline: 2s
    proxy: {{upstream: u, path: "/{{rest}}"}}
"""


async def _fire(client: httpx.AsyncClient, count: int, concurrency: int,
                headers: dict[str, str] | None = None) -> list[int]:
    statuses: list[int] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def one() -> None:
        async with limiter:
            response = await client.get("/api/slow?ms=50", headers=headers or {})
            statuses.append(response.status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return statuses


async def test_impatient_clients_do_not_collapse_the_adaptive_limit_of_a_healthy_upstream():
    """An upstream answering in a constant 50 ms, whatever its load, keeps its slots.

    What a user sees: a handful of clients sending ``x-request-timeout-ms: 20`` while
    the gateway measures the upstream's minimum latency (at start, then every 60 s) make
    it take their 20 ms cut-offs for the upstream's latency; every ordinary 50 ms answer
    then looks 2.5x too slow, the slots fall to ``min_concurrency`` and stay there
    until the next measurement, and ordinary traffic is shed with 503s although the
    upstream was never loaded or slow.
    """
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            limiter = gw.gateway.runtime.snapshot.upstreams["u"].limiter
            # Impatient clients during the minimum-latency measurement (504s, expected).
            impatient = await _fire(client, 24, 4, {"x-request-timeout-ms": "20"})
            assert set(impatient) == {504}, impatient
            await _fire(client, 24, 4)  # the measurement, at its minimum concurrency
            # Ordinary traffic, 8 at a time, at the upstream's constant latency.
            ordinary = await _fire(client, 200, 8)
            slots = limiter.statistics().concurrency
            burst = await _fire(client, 16, 16)
            assert slots >= 16, (f"slots fell to {slots}; 8 at a time got "
                                 f"{ordinary.count(503)} 503s of 200, a burst of 16 got "
                                 f"{burst.count(503)} 503s")
            assert ordinary.count(200) >= 190, ordinary
            assert burst.count(200) == 16, burst
        nursery.cancel_scope.cancel()


async def test_connections_refused_before_anything_is_sent_do_not_collapse_the_adaptive_limit():
    """Calls refused before anything is sent must teach the limit nothing.

    What a user sees: the gateway starts (or the 60 s re-measurement begins) while the
    upstream is restarting; its connections are refused within a millisecond, and those
    refusals become the upstream's "minimum latency". Once the upstream is back and
    answers in its usual, constant 50 ms, every answer looks far too slow: the slots
    fall to ``min_concurrency`` and ordinary bursts are shed with 503s for the next
    60 s although the upstream is idle. (The gateway already ignores an open circuit's
    refusals for the same reason; a refused TCP connect is the same case.)
    """
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    upstream = Upstream()
    upstream.port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            limiter = gw.gateway.runtime.snapshot.upstreams["u"].limiter
            refused = await _fire(client, 24, 4)
            assert set(refused) == {502}, refused
            sock.listen(128)  # the upstream is back
            nursery.start_soon(trio.serve_listeners, upstream._handle,
                               [trio.SocketListener(sock)])
            await _fire(client, 24, 4)  # the measurement, at its minimum concurrency
            ordinary = await _fire(client, 200, 8)
            slots = limiter.statistics().concurrency
            burst = await _fire(client, 16, 16)
            assert slots >= 16, (f"slots fell to {slots}; 8 at a time got "
                                 f"{ordinary.count(503)} 503s of 200, a burst of 16 got "
                                 f"{burst.count(503)} 503s")
            assert ordinary.count(200) >= 190, ordinary
            assert burst.count(200) == 16, burst
        nursery.cancel_scope.cancel()


#: The policy above with retries or a circuit breaker on the upstream.
RESILIENT_POLICY = POLICY.replace(
    "             adaptive: {{min_concurrency: 4, tolerance: 25%}}}}\n",
    "             adaptive: {{min_concurrency: 4, tolerance: 25%}}}}\n    {extra}\n")

EXTRAS = {
    "retries": "call: {retries: {attempts: 2, on: [503]}}",
    "circuit": "circuit: {failure_ratio: 50%}",
}


@pytest.mark.parametrize("extra", sorted(EXTRAS))
async def test_client_deadline_cuts_are_no_latency_sample_with_retries_or_a_circuit(extra):
    """As for the impatient clients above, with retries (or a circuit breaker) on the
    upstream, as most production upstreams have: their attempts run in a nursery, and a
    cancellation leaves the call as a group of ``Cancelled``.

    What a user sees: clients sending ``x-request-timeout-ms: 20`` while the minimum
    latency is measured make the gateway take their 20 ms cut-offs as the upstream's
    minimum latency (README: "cut ... by the client's own shorter deadline" is no
    sample); every ordinary 50 ms answer then looks 2.5x too slow and the slots fall to
    ``min_concurrency`` (503s for a healthy upstream) until the next measurement."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = RESILIENT_POLICY.format(url=upstream.url, extra=EXTRAS[extra])
        async with run_gateway(policy) as gw, gw.client() as client:
            adaptive = gw.gateway.runtime.snapshot.upstreams["u"].limiter.adaptive
            assert adaptive is not None
            impatient = await _fire(client, 24, 4, {"x-request-timeout-ms": "20"})
            assert set(impatient) == {504}, impatient
            await _fire(client, 24, 4)  # the measurement, at its minimum concurrency
            assert adaptive.min_latency_s is not None
            assert adaptive.min_latency_s >= 0.045, (
                f"minimum latency measured {adaptive.min_latency_s * 1000:.1f} ms for an "
                "upstream answering in 50 ms")
        nursery.cancel_scope.cancel()


async def test_client_leaving_is_no_latency_sample_with_retries():
    """A client that leaves mid-call (its connection closed) says nothing of the
    upstream's latency (README, limit.adaptive). With retries configured the call's
    slot still records the time until the client left as a latency sample."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = RESILIENT_POLICY.format(url=upstream.url, extra=EXTRAS["retries"])
        async with run_gateway(policy) as gw:
            adaptive = gw.gateway.runtime.snapshot.upstreams["u"].limiter.adaptive
            assert adaptive is not None
            limiter = gw.gateway.runtime.snapshot.upstreams["u"].limiter
            for _ in range(3):
                async with httpx.AsyncClient(base_url=gw.url) as client:
                    with trio.move_on_after(0.05):
                        await client.get("/api/slow?ms=2000")
                with trio.fail_after(5):
                    while limiter.statistics().in_flight:
                        await trio.sleep(0.01)
            assert adaptive._measured == [], (
                f"{len(adaptive._measured)} samples recorded from clients that left: "
                f"{adaptive._measured}")
        nursery.cancel_scope.cancel()
