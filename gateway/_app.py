"""The ASGI application: public requests on the lean path, admin and lifespan on Quart.

Hypercorn serves one app on every bind; the app tells the admin listener from the
public one by the local port of the connection, so admin paths never answer on the
public bind. Public HTTP requests skip Quart entirely (it costs a large share of a
request's CPU) and go straight to ``_request.handle_request``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from functools import partial
from typing import Any, cast

import trio

from . import _hypercorn_fixes
from ._connections import CONNECTIONS
from ._errors import NotFound
from ._fanout import fanout
from ._gc import run_full_collections
from ._metrics import METRICS, refresh_gauges
from ._policy import Policy, resolve_call_settings, statement_timeout
from ._policy_loader import (
    LAST_GOOD_ENV,
    LoadedPolicy,
    PolicyError,
    PolicyReadError,
    load_policy_file,
    load_policy_text,
    record_last_good,
)
from ._proxy import proxy
from ._request import Receive, RequestContext, Scope, Send, handle_request
from ._runtime import Runtime, file_identity, sweep_idle_connections
from ._trace_peers import peer_dir, serve_peer_socket

log = logging.getLogger("gateway")
_hypercorn_fixes.apply()

#: How often the policy file is checked for changes (GATEWAY_POLICY_POLL_S overrides).
POLICY_POLL_INTERVAL_S = float(os.environ.get("GATEWAY_POLICY_POLL_S", "1.0"))
#: Set by ``serve``: the policy's admin bind its listener was bound to, or "" when
#: --admin-bind or GATEWAY_ADMIN_BIND chose it.
ADMIN_BIND_STARTED_ENV = "GATEWAY_ADMIN_BIND_STARTED"
#: Wait before reading again a policy file that could not be read at all.
UNREAD_RETRY_S = 1.0
#: How long a retired snapshot may take to drain before its pools close, at least.
RETIRE_GRACE_S = 30.0


def retire_grace(policy: Policy) -> float:
    """How long the requests of a replaced policy may still run: its longest request
    deadline (which bounds a request, its streamed answer included), and a second."""
    longest = max((route.deadline or policy.defaults.deadline for route in policy.routes),
                  default=policy.defaults.deadline)
    return max(RETIRE_GRACE_S, longest + 1.0)


async def _sql_route(ctx: RequestContext) -> None:
    from ._calls import sql_call

    action = ctx.match.route.sql
    assert action is not None and ctx.request_scope is not None
    state = ctx.snapshot.upstreams[action.upstream]
    settings = ctx.snapshot.call_settings(action, resolve_call_settings)
    result = await sql_call(ctx, ctx.request_scope, action.upstream, action, state, settings)
    await ctx.send_json(200, result)


async def dispatch(ctx: RequestContext) -> None:
    route = ctx.match.route
    if route.proxy is not None:
        await proxy(ctx)
    elif route.fanout is not None:
        await fanout(ctx)
    else:
        await _sql_route(ctx)


class Gateway:
    """One worker's gateway: runtime state, the admin app, and the ASGI entry point."""

    def __init__(self, loaded: LoadedPolicy, *, admin_ports: set[int] | None = None,
                 admin_addresses: set[tuple[str, int]] | None = None,
                 watch_policy: bool = True,
                 poll_interval_s: float = POLICY_POLL_INTERVAL_S) -> None:
        from ._admin import apply_admin_limits, create_admin_app

        self.runtime = Runtime(loaded)
        CONNECTIONS.admin_ports = admin_ports if admin_ports is not None else set()
        CONNECTIONS.admin_addresses = admin_addresses if admin_addresses is not None else set()
        #: Local addresses of the admin listeners: ports on any host, or (host, port)
        #: where a public bind may share the port number on another address.
        self.admin_ports = admin_ports if admin_ports is not None else set()
        self.admin_addresses = admin_addresses if admin_addresses is not None else set()
        self.watch_policy = watch_policy
        self.poll_interval_s = poll_interval_s
        self.admin = create_admin_app(self)
        self._admin_limits = self.runtime.snapshot.policy.server.limits
        self._apply_admin_limits = apply_admin_limits
        self._nursery: trio.Nursery | None = None
        self._policy_stat: tuple[int, ...] | None = None
        self._unread = False  # the last reload could not read the file at all
        #: The read failure (or failure to look at the file) last logged: the watcher
        #: logs one once, however often it meets it again, and says when it is over.
        self._read_error: str | None = None
        self._stat_error: str | None = None
        #: One reload at a time (the file watcher and SIGHUP may ask together).
        self._reload_lock = trio.Lock()

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            server = scope.get("server")
            if server is not None and (server[1] in self.admin_ports or
                                       (server[0], server[1]) in self.admin_addresses):
                limits = self.runtime.snapshot.policy.server.limits
                if limits is not self._admin_limits:  # a reload changed the policy
                    self._admin_limits = limits
                    self._apply_admin_limits(self.admin, limits)
                # No admin endpoint reads a body, so none asks for one: a client that
                # sent Expect: 100-continue gets the answer without sending it.
                await self.admin(cast(Any, scope), cast(Any, receive), cast(Any, send))
                return
            await handle_request(self.runtime, scope, receive, send, dispatch)
        elif kind == "lifespan":
            await self.admin(cast(Any, scope), cast(Any, receive), cast(Any, send))
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:  # pragma: no cover - ASGI servers send only the three kinds
            raise NotFound(f"unsupported scope type {kind!r}")

    # ------------------------------------------------------------------ lifecycle
    async def start(self, nursery: trio.Nursery) -> None:
        """Open what lives as long as the worker, inside the app nursery."""
        self._nursery = nursery
        await self._start_postgres(self.runtime.snapshot.policy,
                                   self.runtime.snapshot.upstreams.values())
        nursery.start_soon(self.runtime.loop_lag.run)
        nursery.start_soon(run_full_collections)
        nursery.start_soon(refresh_gauges, self.runtime)
        nursery.start_soon(sweep_idle_connections, self.runtime)
        if (directory := peer_dir()) is not None:
            await nursery.start(serve_peer_socket, lambda: self.runtime.traces, directory)
        if self.watch_policy:
            nursery.start_soon(self._watch_policy_file)
            nursery.start_soon(self._reload_on_sighup)

    async def stop(self) -> None:
        with trio.move_on_after(5) as bounded:
            bounded.shield = True
            await self.runtime.aclose()

    async def _start_postgres(self, policy: Policy, states: Any) -> None:
        for state in states:
            if state.policy.postgres is not None and state.postgres is None:
                from .upstreams._postgres import PostgresSettings, PostgresUpstream

                pg = state.policy.postgres
                dsn = os.environ.get(pg.dsn_env)
                if not dsn:
                    log.error("upstream %s: environment variable %s is not set",
                              state.name, pg.dsn_env)
                    continue
                upstream = PostgresUpstream(state.name, PostgresSettings(
                    dsn=dsn, min_size=pg.pool.min, max_size=pg.pool.max,
                    statement_cache_size=pg.statement_cache_size,
                    client_check_interval_s=pg.client_check_interval,
                    statement_timeout_s=statement_timeout(policy, state.name)))
                assert self._nursery is not None
                await self._nursery.start(upstream.run)
                state.postgres = upstream

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {"policy": self.runtime.snapshot.loaded.version}
        ready = True
        for name, state in self.runtime.snapshot.upstreams.items():
            if state.policy.postgres is not None:
                ok = state.postgres is not None and await state.postgres.ready()
                checks[name] = "ok" if ok else "unavailable"
                ready = ready and ok
        return ready, checks

    # ------------------------------------------------------------------ reload
    async def reload(self) -> bool:
        """Load the policy file again; swap it in when valid, keep the old one if not.

        Never raises (but for cancellation): the file watcher and the SIGHUP loop call
        it, and an error escaping would end them, so that no later fix of the file
        would ever be loaded.
        """
        async with self._reload_lock:
            try:
                return await self._reload()
            except Exception as error:
                self.runtime.last_reload_error = f"{type(error).__name__}: {error}"
                METRICS.reloads.labels("rejected").inc()
                log.exception("policy reload failed, the active policy keeps serving")
                return False

    async def _reload(self) -> bool:
        path = self.runtime.snapshot.loaded.file
        try:
            loaded = await trio.to_thread.run_sync(load_policy_file, path)
        except PolicyError as error:
            unreadable = isinstance(error, PolicyReadError)
            self._unread = isinstance(error, PolicyReadError) and error.transient
            self.runtime.last_reload_error = str(error)
            METRICS.reloads.labels("rejected").inc()
            if unreadable and str(error) == self._read_error:
                return False  # read again (out of descriptors, say): already said
            self._read_error = str(error) if unreadable else None
            log.error("policy reload rejected, the active policy keeps serving:\n%s", error)
            return False
        if self._read_error is not None:
            self._read_error = None
            log.info("policy file %s can be read again", path)
        if loaded.version == self.runtime.snapshot.loaded.version and not (
                await trio.to_thread.run_sync(self.runtime.files_changed)):
            self.runtime.last_reload_error = None  # the file is the active policy again
            return True
        try:
            # In a thread: building TLS contexts reads CA bundles and certificates (tens
            # of milliseconds each), which would hold every request of the worker up.
            # Nothing active changes until ``activate``, back in this thread.
            new = await trio.to_thread.run_sync(self.runtime.prepare, loaded)
        except Exception as error:  # valid on paper, but its parts cannot be built
            self.runtime.last_reload_error = f"{loaded.file}: {error}"
            METRICS.reloads.labels("rejected").inc()
            log.error("policy reload rejected, the active policy keeps serving: %s: %s",
                      loaded.file, error)
            return False
        # New PostgreSQL upstreams connect before the policy serves, so that its first
        # requests do not find them missing. Until then nothing active has changed: a
        # reload cut short (shutdown) closes what it built and leaves the policy as is.
        try:
            await self._start_postgres(new.policy, new.upstreams.values())
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.runtime.discard(new)
            raise
        try:
            old = self.runtime.activate(new)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.runtime.discard(new)
            raise
        METRICS.reloads.labels("applied").inc()
        if self.runtime.needs_restart():
            log.warning("policy %s: server.admin_bind changed to %s, which takes effect at "
                        "the next start; the admin endpoints stay on %s", loaded.version,
                        loaded.policy.server.admin_bind, self.runtime.started_admin_bind)
        await trio.to_thread.run_sync(record_last_good, loaded)
        log.info("policy %s active (was %s)", loaded.version, old.loaded.version)
        assert self._nursery is not None
        self._nursery.start_soon(partial(self.runtime.retire, old,
                                         grace_s=retire_grace(old.policy)))
        return True

    async def _policy_file_stat(self) -> tuple[int, ...] | None:
        """The file's identity, or None (logged once) while it cannot be looked at: it
        was removed, or its directory closed to the gateway (see ``file_identity``)."""
        path = self.runtime.snapshot.loaded.file
        try:
            stat = await trio.Path(path).stat()
        except OSError as error:
            reason = error.strerror or type(error).__name__
            if reason != self._stat_error:
                self._stat_error = reason
                log.error("cannot look at the policy file %s: %s; the active policy keeps "
                          "serving, and the file is read again once it is there", path, reason)
            return None
        if self._stat_error is not None:
            self._stat_error = None
            log.info("policy file %s can be seen again", path)
        return file_identity(stat)

    async def _watch_policy_file(self) -> None:
        # No baseline: the first poll reloads (a no-op when the content is unchanged), so
        # a file replaced between loading it and starting this watch is not missed.
        self._policy_stat = None
        while True:
            await trio.sleep(self.poll_interval_s)
            current = await self._policy_file_stat()
            if current is not None and current != self._policy_stat:
                self._policy_stat = current
                self._unread = False
                if not await self.reload() and self._unread:
                    # Not read at all (out of descriptors, say): try the same file
                    # again, a second from now, instead of keeping the old policy until
                    # the file changes once more.
                    self._policy_stat = None
                    await trio.sleep(UNREAD_RETRY_S)

    async def _reload_on_sighup(self) -> None:
        try:
            with trio.open_signal_receiver(signal.SIGHUP) as signals:
                async for _ in signals:
                    self._read_error = None  # asked for: said again, even if the same
                    await self.reload()
        except RuntimeError:
            return  # not the main thread (e.g. embedded in a test): file watching remains


def create_gateway_from_env() -> Gateway:
    """Build the app a Hypercorn worker imports: policy and admin port from the env.

    A worker started to replace one that died, while the policy file on disk is one
    the running workers rejected, starts on the policy they serve (the last one that
    loaded): reading the bad file, every replacement died, and the master, seeing
    workers die in a row, stopped the gateway."""
    path = os.environ.get("GATEWAY_POLICY", "policies/demo.yaml")
    try:
        loaded = load_policy_file(path)
    except PolicyError as error:
        last_good = os.environ.get(LAST_GOOD_ENV)
        if not last_good or not os.path.exists(last_good):
            raise
        with open(last_good, "rb") as stream:
            loaded = load_policy_text(stream.read(), path)
        log.error("the policy file is invalid; this worker starts on the policy the "
                  "others serve (%s) and reloads when the file is fixed:\n%s",
                  loaded.version, error)
    admin_ports = {int(p) for p in os.environ.get("GATEWAY_ADMIN_PORTS", "").split(",") if p}
    admin_addresses = {(str(host), int(port)) for host, port in
                       json.loads(os.environ.get("GATEWAY_ADMIN_ADDRESSES", "[]"))}
    gateway = Gateway(loaded, admin_ports=admin_ports, admin_addresses=admin_addresses)
    started = os.environ.get(ADMIN_BIND_STARTED_ENV)
    if started is not None:  # the master's, not this worker's first policy's
        gateway.runtime.started_admin_bind = started or None
    return gateway

