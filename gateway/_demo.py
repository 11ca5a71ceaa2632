"""``python -m gateway demo``: demo upstreams and the gateway in one Trio process."""

from __future__ import annotations

import os
import socket

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ._app import Gateway
from ._demo_upstreams import serve_demo_upstreams
from ._policy_loader import load_policy_file


def _listen(bind: str) -> socket.socket:
    host, _, port = bind.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def run_demo(policy_file: str, bind: str, admin_bind: str | None) -> None:
    loaded = load_policy_file(policy_file)
    admin = admin_bind or os.environ.get("GATEWAY_ADMIN_BIND") or loaded.policy.server.admin_bind
    public_sock, admin_sock = _listen(bind), _listen(admin)
    gateway = Gateway(loaded, admin_ports={admin_sock.getsockname()[1]})
    config = Config()
    config.graceful_timeout = 5
    async with trio.open_nursery() as nursery:
        upstreams = await nursery.start(serve_demo_upstreams)
        await nursery.start(lambda task_status: worker_serve(
            wrap_app(gateway, config.wsgi_max_body_size, "asgi"), config,
            sockets=Sockets([], [public_sock, admin_sock], []), task_status=task_status))
        public = f"http://{bind}"
        print("demo upstreams: " + ", ".join(f"{name} {url}" for name, url in upstreams))
        print(f"gateway: {public} (policy {loaded.file}, version {loaded.version})")
        print(f"admin:   http://{admin}/healthz  /readyz  /metrics  /traces  /policy")
        print("try:")
        print(f"  curl -s {public}/api/users/42")
        print(f"  curl -s {public}/api/users/42/summary")
        print(f"  curl -s {public}/api/users/42/slow        # 504 after the 300ms deadline")
        print(f"  curl -s -H 'x-request-timeout-ms: 50' {public}/api/users/42/summary")
        print(f"  curl -s http://{admin}/traces?cause=deadline")
        print("Ctrl+C stops everything.", flush=True)
