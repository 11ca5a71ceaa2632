"""Start the real gateway under Hypercorn's trio worker inside a test's nursery.

The sockets are bound here on 127.0.0.1 port 0 and handed to Hypercorn, so the
test knows the ports before the first request and never races for them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from gateway._app import Gateway
from gateway._policy_loader import load_policy_text
from gateway._server import listen_socket
from gateway._trace import Trace


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    admin_url: str
    port: int
    admin_port: int
    shutdown: trio.Event

    def client(self, **kwargs: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10.0, **kwargs)  # type: ignore[arg-type]

    def admin(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.admin_url, timeout=10.0)


@asynccontextmanager
async def run_gateway(policy_text: str, *, policy_path: Path | None = None,
                      graceful_timeout: float = 3.0,
                      watch_policy: bool = False,
                      poll_interval_s: float = 0.02,
                      keep_alive_timeout: float = 30.0) -> AsyncIterator[RunningGateway]:
    """Serve ``policy_text`` until the block ends; then shut down gracefully."""
    if policy_path is not None:
        await trio.Path(policy_path).write_text(policy_text)
        loaded = load_policy_text(policy_text, str(policy_path))
    else:
        loaded = load_policy_text(policy_text, "<test policy>")
    public, admin = listen_socket(), listen_socket()
    port, admin_port = public.getsockname()[1], admin.getsockname()[1]
    gateway = Gateway(loaded, admin_ports={admin_port}, watch_policy=watch_policy,
                      poll_interval_s=poll_interval_s)
    config = Config()
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = keep_alive_timeout
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[list[str]]) -> None:
            await worker_serve(wrap_app(gateway, config.wsgi_max_body_size, "asgi"), config,
                               sockets=Sockets([], [public, admin], []),
                               shutdown_trigger=shutdown.wait, task_status=task_status)

        await nursery.start(serve)
        try:
            yield RunningGateway(gateway, f"http://127.0.0.1:{port}",
                                 f"http://127.0.0.1:{admin_port}", port, admin_port, shutdown)
        finally:
            shutdown.set()


async def fire(client: httpx.AsyncClient, path: str, count: int, concurrency: int,
               latencies: list[float] | None = None) -> list[int]:
    """GET ``path`` (``{i}`` is the request's index) ``count`` times, ``concurrency`` at
    a time; the statuses, in the order the answers came."""
    statuses: list[int] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def one(index: int) -> None:
        async with limiter:
            started = trio.current_time()
            response = await client.get(path.format(i=index))
            statuses.append(response.status_code)
            if latencies is not None:
                latencies.append(trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(one, index)
    return statuses


def live_tasks() -> int:
    """Tasks alive in this Trio run, for leak checks against a baseline."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count = 0
    stack = [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


async def trace_of(running: RunningGateway, request_id: str, timeout_s: float = 2.0) -> Trace:
    """The finished trace of a request (recorded just after its response is sent)."""
    with trio.fail_after(timeout_s):
        while (trace := running.gateway.runtime.traces.get(request_id)) is None:
            await trio.sleep(0.005)
    return trace


async def traces_with(running: RunningGateway, timeout_s: float = 2.0,
                      **query: object) -> list[Trace]:
    with trio.fail_after(timeout_s):
        while not (found := running.gateway.runtime.traces.query(**query)):  # type: ignore[arg-type]
            await trio.sleep(0.005)
    return found
