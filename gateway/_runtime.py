"""Per-worker runtime state: the active policy snapshot and the upstreams' live parts.

A request takes the current :class:`Snapshot` once, at its start, and keeps it to
the end: a reload swaps ``Runtime.snapshot`` atomically (one attribute assignment in
a single-threaded event loop) and in-flight requests finish on the policy they began
with. Pools, limiters and breakers of upstreams whose definition did not change are
carried over to the new snapshot; changed limits are resized in place; pools of
upstreams that are gone or changed are closed once the old snapshot drains.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from ._adaptive import GradientLimit
from ._breaker import CircuitBreaker
from ._connections import set_connection_reserve
from ._h1_unread import set_unread_body_limits
from ._hypercorn_fixes import (
    set_accept_batch,
    set_premature_reset_limit,
    set_request_id_header,
    set_send_timeout,
)
from ._limits import InflightGate, LoopLagMonitor, UpstreamLimiter
from ._metrics import METRICS
from ._policy import (
    CallSettings,
    Policy,
    UpstreamPolicy,
    routes_binding_path_values,
    statement_timeout,
    upstream_retry_policy,
    upstream_slots,
    upstream_sockets,
)
from ._retries import RetryBudget
from ._routing import RouteTable
from ._trace import TraceBuffer
from .upstreams._http import HttpUpstreamPool, PoolLimits
from .upstreams._tls import UpstreamTls, client_context

if TYPE_CHECKING:
    from ._policy_loader import LoadedPolicy

log = logging.getLogger("gateway.runtime")


@dataclass
class UpstreamState:
    """The live parts of one upstream, shared by every snapshot that uses it."""

    name: str
    policy: UpstreamPolicy
    limiter: UpstreamLimiter
    retry_budget: RetryBudget = field(default_factory=lambda: RetryBudget(0.2, 10.0))
    breaker: CircuitBreaker | None = None
    pool: HttpUpstreamPool | None = None
    postgres: Any = None  # PostgresUpstream, kept untyped so only its module imports asyncpg
    users: int = 0  # snapshots referring to this state
    identity: tuple[Any, ...] = ()  # what its connections were built from


def _pool_limits(policy: Policy, upstream: UpstreamPolicy) -> PoolLimits:
    return PoolLimits(
        max_connections=upstream.pool.max_connections,
        idle_timeout_s=upstream.pool.idle_timeout,
        connect_timeout_s=upstream.pool.connect_timeout,
        max_response_header_bytes=policy.server.limits.max_upstream_header_bytes,
    )


def _connection_identity(policy: Policy, name: str,
                         upstream: UpstreamPolicy) -> tuple[Any, ...]:
    """What, when changed, needs a new pool (limits alone are resized in place): for
    PostgreSQL also the session's statement_timeout, which follows the route deadlines."""
    header_limit = policy.server.limits.max_upstream_header_bytes if upstream.url else None
    session_timeout = (statement_timeout(policy, name) if upstream.postgres is not None
                       else None)
    return (upstream.url, upstream.pool, upstream.postgres, header_limit, session_timeout,
            _tls_identity(upstream))


def _tls_identity(upstream: UpstreamPolicy) -> tuple[Any, ...] | None:
    """The TLS settings and the files they name as they are now: a certificate or CA
    rotated in place (same path, new content) takes effect at the next reload."""
    tls = upstream.tls
    if tls is None:
        return None
    files = []
    for path in (tls.ca_file, tls.cert_file, tls.key_file):
        try:
            stat = os.stat(path) if path is not None else None
        except OSError:
            stat = None
        files.append(None if stat is None else file_identity(stat))
    return (tls, *files)


def file_identity(stat: os.stat_result) -> tuple[int, ...]:
    """What tells a file the gateway reads (the policy, a CA or certificate) changed.

    Its ctime, mode and owner are part of it: a file rewritten in place with its mtime
    kept (``cp -p``, ``rsync -t``) and the same size changes its ctime only, and one the
    gateway could not read is fixed with chmod or chown, which changes nothing else (the
    mode and owner too, as a ctime may not tick between a write and a chmod right after
    it)."""
    return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino,
            stat.st_mode, stat.st_uid, stat.st_gid)


def _upstream_tls(definition: UpstreamPolicy) -> UpstreamTls | None:
    """The TLS context of an https:// upstream (the policy's files read once, here)."""
    assert definition.url is not None
    if not definition.url.startswith("https://"):
        return None
    tls = definition.tls
    host = urlsplit(definition.url).hostname or ""
    if tls is None:
        return UpstreamTls(client_context(), host)
    return UpstreamTls(client_context(ca_file=tls.ca_file, cert_file=tls.cert_file,
                                      key_file=tls.key_file), tls.server_name or host,
                       client_certificate=tls.cert_file is not None)


def _same_service(old: UpstreamPolicy, new: UpstreamPolicy) -> bool:
    """The same server behind a new pool: its concurrency limit, circuit breaker and
    retry budget carry over, so that a pool setting changed does not let the drain
    exceed the limit or close an open circuit."""
    if old.url is not None or new.url is not None:
        return old.url == new.url
    return (old.postgres is not None and new.postgres is not None
            and old.postgres.dsn_env == new.postgres.dsn_env)


@dataclass
class Snapshot:
    loaded: LoadedPolicy
    routes: RouteTable
    upstreams: dict[str, UpstreamState]
    #: Kept upstreams and the settings they take when this snapshot is activated.
    pending: list[tuple[UpstreamState, UpstreamPolicy]] = field(default_factory=list)
    in_flight: int = 0
    drained: trio.Event = field(default_factory=trio.Event)
    _settings: dict[int, CallSettings] = field(default_factory=dict)
    #: Routes whose path values are SQL arguments: their traces show the template.
    private_paths: frozenset[str] = frozenset()

    @property
    def policy(self) -> Policy:
        return self.loaded.policy

    def call_settings(self, call: Any, resolve: Callable[[Policy, Any], CallSettings],
                      ) -> CallSettings:
        """Resolved settings of a call, computed once per snapshot (the policy is frozen)."""
        key = id(call)
        settings = self._settings.get(key)
        if settings is None:
            settings = self._settings[key] = resolve(self.policy, call)
        return settings


class Runtime:
    """Everything one worker needs to serve: snapshot, door gate, traces."""

    def __init__(self, loaded: LoadedPolicy) -> None:
        policy = loaded.policy
        self.gate = InflightGate(policy.server.max_inflight)
        set_accept_batch(policy.server.accept_batch)
        set_send_timeout(policy.server.send_timeout)
        set_premature_reset_limit(policy.server.limits.h2_premature_resets)
        set_unread_body_limits(policy.server.limits.discard_body,
                               policy.server.limits.lingering_bytes,
                               policy.server.limits.lingering_time)
        set_request_id_header(policy.server.request_id_header)
        set_connection_reserve(upstream_sockets(policy))
        #: The admin bind the policy named at start: its listener is bound once. None
        #: when the command line or the environment chose the bind (the policy's is
        #: then not used at all).
        self.started_admin_bind: str | None = policy.server.admin_bind
        self.loop_lag = LoopLagMonitor()
        self.traces = TraceBuffer(policy.server.trace_buffer if policy.server.tracing else 0)
        self.snapshot = self._build(loaded, {})
        #: Snapshots a reload replaced whose requests may still run (until retired).
        self.retiring: list[Snapshot] = []
        self._take_up(self.snapshot)
        self.reloads = 0
        self.last_reload_error: str | None = None

    def files_changed(self) -> bool:
        """Whether a file the active policy names (a TLS certificate, key or CA) has
        changed since its upstream was built: a reload of the same policy text must
        then still rebuild that upstream's pool."""
        policy = self.snapshot.policy
        return any(state.identity != _connection_identity(policy, state.name, state.policy)
                   for state in self.snapshot.upstreams.values())

    def _build(self, loaded: LoadedPolicy, previous: dict[str, UpstreamState]) -> Snapshot:
        """The snapshot of ``loaded``, reusing ``previous`` upstreams where it can.

        Upstreams kept from ``previous`` are changed in place only by :meth:`activate`,
        so a policy that cannot be built, or is built and never activated, leaves the
        active one exactly as it was.
        """
        policy = loaded.policy
        upstreams: dict[str, UpstreamState] = {}
        kept: list[tuple[UpstreamState, UpstreamPolicy]] = []
        for name, definition in policy.upstreams.items():
            old = previous.get(name)
            identity = _connection_identity(policy, name, definition)
            if old is not None and old.identity == identity:
                kept.append((old, definition))
                upstreams[name] = old
                continue
            if old is not None and _same_service(old.policy, definition):
                # New connections only: the rest is shared, and changed on activation.
                state = UpstreamState(name, definition, old.limiter,
                                      retry_budget=old.retry_budget, breaker=old.breaker,
                                      identity=identity)
                kept.append((state, definition))
            else:
                adaptive = definition.limit.adaptive
                limiter = UpstreamLimiter(
                    name, concurrency=upstream_slots(definition),
                    queue=definition.limit.queue,
                    queue_timeout_s=definition.limit.queue_timeout,
                    retry_after_s=policy.server.shed_retry_after,
                    on_shed=METRICS.upstream_shed,
                    adaptive=None if adaptive is None else GradientLimit(
                        maximum=upstream_slots(definition),
                        minimum=adaptive.min_concurrency, tolerance=adaptive.tolerance))
                retry = upstream_retry_policy(policy, definition)
                state = UpstreamState(
                    name, definition, limiter,
                    retry_budget=RetryBudget(retry.budget, retry.min_per_second),
                    identity=identity)
                if definition.circuit is not None:
                    state.breaker = CircuitBreaker(name, definition.circuit,
                                                   on_transition=METRICS.breaker_transition)
            if definition.url is not None:
                state.pool = HttpUpstreamPool(name, definition.url,
                                              _pool_limits(policy, definition),
                                              tls=_upstream_tls(definition))
            upstreams[name] = state
        routes = RouteTable(policy.routes)
        return Snapshot(loaded, routes, upstreams, pending=kept,
                        private_paths=routes_binding_path_values(policy))

    @staticmethod
    def _reconfigure(policy: Policy, old: UpstreamState, definition: UpstreamPolicy) -> None:
        """Apply new limits, budget and breaker settings to a kept upstream in place."""
        adaptive = definition.limit.adaptive
        old.limiter.resize(concurrency=upstream_slots(definition),
                           queue=definition.limit.queue,
                           queue_timeout_s=definition.limit.queue_timeout,
                           retry_after_s=policy.server.shed_retry_after,
                           adaptive=None if adaptive is None else (
                               adaptive.min_concurrency, adaptive.tolerance))
        old.policy = definition
        retry = upstream_retry_policy(policy, definition)
        old.retry_budget.reconfigure(retry.budget, retry.min_per_second)
        if definition.circuit is None:
            old.breaker = None
        elif old.breaker is None:
            old.breaker = CircuitBreaker(old.name, definition.circuit,
                                         on_transition=METRICS.breaker_transition)
        else:
            old.breaker.reconfigure(definition.circuit)

    def enter(self) -> Snapshot:
        snapshot = self.snapshot
        snapshot.in_flight += 1
        return snapshot

    def leave(self, snapshot: Snapshot) -> None:
        snapshot.in_flight -= 1
        if snapshot.in_flight == 0 and snapshot is not self.snapshot:
            snapshot.drained.set()

    def swap(self, loaded: LoadedPolicy) -> Snapshot:
        """Make ``loaded`` active; return the old snapshot (close it with :meth:`retire`)."""
        return self.activate(self.prepare(loaded))

    def prepare(self, loaded: LoadedPolicy) -> Snapshot:
        """The snapshot of ``loaded``, built but not yet serving (raises if it cannot be
        built, leaving the active one as it was)."""
        return self._build(loaded, self.snapshot.upstreams)

    def _take_up(self, new: Snapshot) -> None:
        for state, definition in new.pending:
            self._reconfigure(new.policy, state, definition)
        new.pending = []
        for state in new.upstreams.values():
            state.users += 1

    async def discard(self, new: Snapshot) -> None:
        """Close what a prepared snapshot built that the active one does not use."""
        for name, state in new.upstreams.items():
            if self.snapshot.upstreams.get(name) is not state:
                await close_upstream(state)

    def activate(self, new: Snapshot) -> Snapshot:
        """Serve ``new`` from now on; return the old snapshot."""
        old = self.snapshot
        policy = new.policy
        # The one step that allocates, first: should it fail, nothing has changed yet.
        self.traces.resize(policy.server.trace_buffer if policy.server.tracing else 0)
        self._take_up(new)
        self.gate.limit = policy.server.max_inflight
        set_accept_batch(policy.server.accept_batch)
        set_send_timeout(policy.server.send_timeout)
        set_premature_reset_limit(policy.server.limits.h2_premature_resets)
        set_unread_body_limits(policy.server.limits.discard_body,
                               policy.server.limits.lingering_bytes,
                               policy.server.limits.lingering_time)
        set_request_id_header(policy.server.request_id_header)
        set_connection_reserve(upstream_sockets(policy))
        self.snapshot = new
        self.retiring.append(old)
        self.reloads += 1
        self.last_reload_error = None
        if old.in_flight == 0:
            old.drained.set()
        return old

    async def retire(self, old: Snapshot, *, grace_s: float) -> None:
        """Wait for ``old`` to drain (bounded), then close the parts no snapshot uses."""
        with trio.move_on_after(grace_s):
            await old.drained.wait()
        if old in self.retiring:
            self.retiring.remove(old)
        for state in old.upstreams.values():
            state.users -= 1
            if state.users == 0:
                await close_upstream(state)

    def needs_restart(self) -> list[str]:
        """Settings of the active policy that take effect only at the next start."""
        started = self.started_admin_bind
        changed = started is not None and self.snapshot.policy.server.admin_bind != started
        return ["server.admin_bind"] if changed else []

    def live_upstreams(self) -> dict[str, list[UpstreamState]]:
        """Every upstream a request may still use, by name: the active snapshot's, and
        those of replaced snapshots still draining (one name may have two, its pool
        rebuilt by a reload)."""
        live: dict[str, list[UpstreamState]] = {}
        for snapshot in (self.snapshot, *self.retiring):
            for name, state in snapshot.upstreams.items():
                states = live.setdefault(name, [])
                if all(seen is not state for seen in states):
                    states.append(state)
        return live

    async def aclose(self) -> None:
        for state in self.snapshot.upstreams.values():
            await close_upstream(state)


#: Longest wait between two looks at the pools' idle connections.
IDLE_SWEEP_S = 1.0
#: Shortest wait between them, whatever an idle_timeout asks (each look polls every
#: idle socket once).
IDLE_SWEEP_MIN_S = 0.05


async def sweep_idle_connections(runtime: Runtime) -> None:
    """Close pooled upstream connections once idle past their ``idle_timeout`` (within
    half of it, or a second), and those their upstream closed, also while no request
    reaches that upstream: sockets are not held open, or left in CLOSE_WAIT, for as
    long as it gets no traffic."""
    while True:
        pools = [state.pool for state in runtime.snapshot.upstreams.values()
                 if state.pool is not None]
        await trio.sleep(max(IDLE_SWEEP_MIN_S, min([
            IDLE_SWEEP_S, *(pool.limits.idle_timeout_s / 2 for pool in pools)])))
        now = trio.current_time()
        for pool in pools:
            if not pool.closed:
                pool.close_idle(now)


async def close_upstream(state: UpstreamState) -> None:
    if state.pool is not None:
        await state.pool.aclose()
    if state.postgres is not None:
        await state.postgres.aclose()
