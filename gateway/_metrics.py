"""Prometheus metrics of one worker (summed across workers by the multiprocess mode).

With several Hypercorn workers, ``PROMETHEUS_MULTIPROC_DIR`` is set by ``serve`` before
the workers start, so one scrape of any worker's admin endpoint shows their sum.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

if TYPE_CHECKING:
    from ._runtime import Runtime
    from ._trace import Span, Trace

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.requests = Counter("gateway_requests_total", "Requests answered, by route and status",
                                ["route", "status"])
        self.duration = Histogram("gateway_request_duration_seconds",
                                  "Request duration, by route", ["route"], buckets=_BUCKETS)
        self.cancellations = Counter(
            "gateway_cancellations_total",
            "Cancellations, by route, cause and the scope that fired: one per request "
            "and scope that fired, whatever number of spans it ended",
            ["route", "cause", "scope"])
        self.in_flight = Gauge("gateway_upstream_in_flight", "Calls holding a slot, by upstream",
                               ["upstream"], multiprocess_mode="livesum")
        self.queued = Gauge("gateway_upstream_queued", "Calls waiting for a slot, by upstream",
                            ["upstream"], multiprocess_mode="livesum")
        self.concurrency_limit = Gauge(
            "gateway_upstream_concurrency_limit",
            "Slots an upstream has (they follow its latency when limit.adaptive is set)",
            ["upstream"], multiprocess_mode="livesum")
        self.shed = Counter("gateway_shed_total", "Requests or calls shed, by where",
                            ["where"])
        self.breaker_state = Gauge(
            "gateway_circuit_state", "Circuit breaker state (0 closed, 1 half-open, 2 open)",
            ["upstream"], multiprocess_mode="livemax")
        self.breaker_transitions = Counter(
            "gateway_circuit_transitions_total", "Circuit breaker transitions, by new state",
            ["upstream", "state"])
        self.attempts = Counter(
            "gateway_upstream_attempts_total",
            "Upstream attempts, by upstream and kind (first, retry, hedge)",
            ["upstream", "kind"])
        self.hedges = Counter(
            "gateway_hedges_total",
            "Calls that sent hedges, by upstream and result (hedge_won, hedge_lost, failed)",
            ["upstream", "result"])
        self.loop_lag = Gauge("gateway_event_loop_lag_seconds",
                              "How late the worker's event loop wakes tasks (smoothed)",
                              multiprocess_mode="livemax")
        self.pool_connections = Gauge(
            "gateway_upstream_connections",
            "Upstream pool connections, by upstream and state (active, idle, waiting)",
            ["upstream", "state"], multiprocess_mode="livesum")
        self.reloads = Counter("gateway_policy_reloads_total", "Policy reloads, by result",
                               ["result"])
        self.connections_closed = Counter(
            "gateway_client_connections_closed_total",
            "Client connections the gateway closed for abuse, by reason", ["reason"])
        #: Upstreams whose live gauges hold figures, and those with a breaker state
        #: written: a reload that removes one (or its breaker) zeroes them.
        self._upstreams_shown: set[str] = set()
        self._breakers_shown: set[str] = set()
        #: Labelled children of the per-request series, looked up once (``labels()``
        #: costs a microsecond, a lock and a tuple, on every request otherwise).
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, trace: Trace, status: int, cancelled: list[Span]) -> None:
        route = trace.route or "(none)"
        self._child(self.requests, route, str(status)).inc()
        self._child(self.duration, route).observe(trace.duration_ms / 1000)
        fired = {(span.cause or "unknown", (span.fired_scope or span.label).split("#")[0])
                 for span in cancelled}
        if trace.root is None and trace.cause == "shed":
            # Refused at the door, before any span; upstream sheds are counted where
            # the limiter sheds (``upstream_shed``), partial fan-outs' calls included.
            fired.add(("shed", "request"))
            self.shed.labels("door").inc()
        for cause, scope in fired:
            self.cancellations.labels(route, cause, scope).inc()

    def upstream_shed(self) -> None:
        """An upstream's limiter shed a call (a full queue, a wait past its bound)."""
        self.shed.labels("upstream").inc()

    def attempt_sent(self, upstream: str, number: int, hedge: bool) -> None:
        """An attempt was let through to the upstream: its first try, a retry, a hedge."""
        kind = "hedge" if hedge else "first" if number == 1 else "retry"
        self._child(self.attempts, upstream, kind).inc()

    def hedge_race(self, upstream: str, result: str) -> None:
        """A call that sent hedges ended: a hedge's answer was taken (``hedge_won``),
        another attempt's (``hedge_lost``), or none (``failed``)."""
        self.hedges.labels(upstream, result).inc()

    def breaker_transition(self, upstream: str, old: Any, new: Any) -> None:
        value = {"closed": 0, "half_open": 1, "open": 2}.get(new.value, 0)
        self.breaker_state.labels(upstream).set(value)
        self._breakers_shown.add(upstream)
        self.breaker_transitions.labels(upstream, new.value).inc()

    def refresh(self, runtime: Runtime) -> None:
        """Copy point-in-time figures (limiter state) into gauges before a scrape."""
        self.loop_lag.set(runtime.loop_lag.lag_s)
        live = runtime.live_upstreams()
        self._forget_removed(live, runtime.snapshot.upstreams)
        self._upstreams_shown.update(live)
        for name, states in live.items():
            # A removed upstream (or a rebuilt pool) still serving the requests of a
            # replaced policy is shown until they end: an operator waiting for it to
            # reach 0 must not be told so early. Shared parts are counted once.
            limiters = {id(state.limiter): state.limiter for state in states}.values()
            figures = [limiter.statistics() for limiter in limiters]
            self.in_flight.labels(name).set(sum(f.in_flight for f in figures))
            self.queued.labels(name).set(sum(f.queued for f in figures))
            self.concurrency_limit.labels(name).set(states[0].limiter.statistics().concurrency)
            active = idle = waiting = 0
            for state in states:
                if state.pool is not None:
                    pool = state.pool.statistics()
                    active, idle = active + pool.active, idle + pool.idle
                    waiting += pool.waiting
                if state.postgres is not None:
                    pg = state.postgres.statistics()
                    active, idle, waiting = active + pg.in_use, idle + pg.idle, waiting + pg.waiting
            serving = runtime.snapshot.upstreams.get(name)
            if serving is not None and serving.breaker is not None:
                # An open circuit turns half-open when read after ``open_for``: read it
                # now, or an idle upstream's gauge stays "open" (and its alert firing).
                _ = serving.breaker.state
            if any(state.pool is not None or state.postgres is not None for state in states):
                self.pool_connections.labels(name, "active").set(active)
                self.pool_connections.labels(name, "idle").set(idle)
                self.pool_connections.labels(name, "waiting").set(waiting)

    def _forget_removed(self, live: dict[str, Any], upstreams: dict[str, Any]) -> None:
        """Zero the gauges of upstreams a reload removed, and the circuit state of those
        whose breaker it removed: left as they were, they would read as live for ever
        (an open circuit alerting on an upstream with no breaker). Zeroed rather than
        removed, since with several workers each one's figures live in its own file."""
        for name in self._upstreams_shown - live.keys():
            self.in_flight.labels(name).set(0)
            self.queued.labels(name).set(0)
            self.concurrency_limit.labels(name).set(0)
            for kind in ("active", "idle", "waiting"):
                self.pool_connections.labels(name, kind).set(0)
            self._upstreams_shown.discard(name)
        for name in list(self._breakers_shown):
            state = upstreams.get(name)
            if state is None or state.breaker is None:
                self.breaker_state.labels(name).set(0)
                self._breakers_shown.discard(name)


METRICS = Metrics()

#: Seconds between copies of a worker's point-in-time figures into its gauges.
GAUGE_REFRESH_S = 1.0


async def refresh_gauges(runtime: Runtime, interval_s: float = GAUGE_REFRESH_S) -> None:
    """Keep this worker's gauges current. With several workers a scrape reaches one of
    them but sums every worker's stored gauges: refreshing only the scraped worker
    would leave the others' figures as they were at their last scrape."""
    while True:
        METRICS.refresh(runtime)
        await trio.sleep(interval_s)


def render_metrics(runtime: Runtime) -> bytes:
    METRICS.refresh(runtime)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            registry, path=directory)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)
