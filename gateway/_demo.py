"""``python -m gateway demo``: demo upstreams and the gateway in one Trio process."""

from __future__ import annotations

import logging
import os
import signal
import socket
from typing import Any, cast

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ._app import Gateway
from ._binds import http_url
from ._demo_upstreams import serve_demo_upstreams
from ._policy_loader import LoadedPolicy, load_policy_file
from ._server import listen_socket
from ._throwaway_postgres import PostgresCluster, PostgresUnavailable, start_cluster

DEMO_DSN_ENV = "GATEWAY_DEMO_DSN"
_SEED_SQL = """
CREATE TABLE scores (user_id int PRIMARY KEY, score numeric(6, 2) NOT NULL,
                     updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO scores (user_id, score)
SELECT id, round((random() * 100)::numeric, 2) FROM generate_series(1, 1000) AS id;
"""


def _start_demo_postgres() -> PostgresCluster | None:
    """A throwaway cluster seeded with scores, or None (the SQL routes then answer 502)."""
    if os.environ.get(DEMO_DSN_ENV):
        return None  # the operator pointed the demo at a database of their own
    try:
        cluster = start_cluster()
    except PostgresUnavailable as error:
        print(f"demo: PostgreSQL unavailable ({error}); SQL routes will fail", flush=True)
        return None
    cluster.psql(_SEED_SQL)
    os.environ[DEMO_DSN_ENV] = cluster.dsn
    print(f"demo: throwaway PostgreSQL on port {cluster.port} ({cluster.root})", flush=True)
    return cluster


class DemoError(Exception):
    """The demo cannot start (a bad policy, a port taken): its message says why."""


def _listen(bind: str, what: str) -> socket.socket:
    try:
        return listen_socket(bind)
    except (OSError, ValueError) as error:  # a port taken, a bind that is no host:port
        reason = error.strerror if isinstance(error, OSError) else None
        raise DemoError(f"cannot serve the {what} on {bind}: {reason or error}") from None


async def run_demo(policy_file: str, bind: str, admin_bind: str | None) -> None:
    """Check the policy and bind the gateway's ports first, so that a mistake is told
    before anything starts; then the throwaway PostgreSQL, the upstreams, the gateway."""
    try:
        loaded = load_policy_file(policy_file)
    except OSError as error:
        raise DemoError(f"cannot read the policy {policy_file}: "
                        f"{error.strerror or error}") from None
    admin = admin_bind or os.environ.get("GATEWAY_ADMIN_BIND") or loaded.policy.server.admin_bind
    public_sock = _listen(bind, "gateway")
    try:
        admin_sock = _listen(admin, "admin endpoint")
    except DemoError:
        public_sock.close()
        raise
    cluster = await trio.to_thread.run_sync(_start_demo_postgres)
    try:
        async with trio.open_nursery() as nursery:

            async def stop_on_sigterm() -> None:
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel(reason="shutdown|server")
                        return

            nursery.start_soon(stop_on_sigterm)
            await _serve_demo(loaded, public_sock, admin_sock)
            nursery.cancel_scope.cancel(reason="shutdown|server")  # the gateway stopped
    finally:
        if cluster is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(cluster.destroy)


def url_of(sock: socket.socket) -> str:
    """The URL to try a bound socket at: its real port (a bind to port 0 picks one),
    and the loopback address for a wildcard bind."""
    host, port = sock.getsockname()[:2]
    return http_url({"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host),
                    port)


async def _serve_demo(loaded: LoadedPolicy, public_sock: socket.socket,
                      admin_sock: socket.socket) -> None:
    gateway = Gateway(loaded, admin_ports={admin_sock.getsockname()[1]})
    config = Config()
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 5
    async with trio.open_nursery() as nursery:

        async def serve_gateway(task_status: trio.TaskStatus[Any]) -> None:
            await worker_serve(
                wrap_app(cast(Any, gateway), config.wsgi_max_body_size, "asgi"), config,
                sockets=Sockets([], [public_sock, admin_sock], []), task_status=task_status)
            # Hypercorn ends quietly on a Ctrl+C that lands in one of its tasks (it
            # swallows the KeyboardInterrupt): the demo's upstreams end with it.
            nursery.cancel_scope.cancel(reason="shutdown|server")

        upstreams = await nursery.start(serve_demo_upstreams)
        await nursery.start(serve_gateway)
        public, admin = url_of(public_sock), url_of(admin_sock)
        print("demo upstreams: " + ", ".join(f"{name} {url}" for name, url in upstreams))
        print(f"gateway: {public} (policy {loaded.file}, version {loaded.version})")
        print(f"admin:   {admin}/healthz  /readyz  /metrics  /traces  /policy")
        print("try:")
        print(f"  curl -s {public}/api/users/42")
        print(f"  curl -s {public}/api/users/42/summary")
        print(f"  curl -s {public}/api/users/42/slow        # 504 after the 300ms deadline")
        print(f"  curl -s {public}/api/users/42/score       # answered from PostgreSQL")
        print(f"  curl -s {public}/api/slow-query           # pg_sleep(5) cancelled at 300ms")
        print(f"  curl -s -H 'x-request-timeout-ms: 50' {public}/api/users/42/summary")
        print(f"  curl -s {admin}/traces?cause=deadline")
        print("Ctrl+C stops everything.", flush=True)
