"""The admin listener through a drain: open until the public drain has ended, saying so.

Hypercorn serves every bind through one ``serve_listeners`` and closes them all when a
worker is told to stop, the admin bind's with the public ones: for the whole drain (up
to ``graceful_timeout``) a load balancer's or an orchestrator's probe could not tell a
draining gateway from a dead one, and the drain's own metrics could not be scraped. As
Envoy's admin listener (whose ``/ready`` then answers 503 DRAINING) and Linkerd's do,
the admin listeners of a stopping worker now stay open until its last public connection
has ended, and meanwhile ``/healthz`` and ``/readyz`` answer 503 "draining"
(:data:`DRAIN`). Admin connections are told of the drain only then: Hypercorn closes
the connections of a stopping worker as soon as they are idle, a new one before its
first request, so they see a worker context of their own (:class:`_AdminContext`).

A worker retiring past ``max_requests`` closes its admin listener at once, as before:
the gateway is not draining, and the worker's replacement answers the probes.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.trio.worker_context import EventWrapper, WorkerContext

from ._connections import CONNECTIONS


class DrainState:
    """Whether this worker's public listeners have closed for a stop of the gateway."""

    def __init__(self) -> None:
        self.draining = False


DRAIN = DrainState()


class _AdminContext:
    """The worker context admin connections see: the worker's (its request count, its
    ``terminate``), but for ``terminated``, set only once the admin listener closes."""

    def __init__(self, context: WorkerContext) -> None:
        self._context = context
        self.terminated = EventWrapper()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _CountingNursery:
    """The nursery public connections run in, counting them as they are accepted (not
    once they start, which a connection accepted just before the stop has not yet)."""

    def __init__(self, nursery: trio.Nursery, on_empty: Callable[[], None]) -> None:
        self._nursery = nursery
        self._on_empty = on_empty
        self.live = 0

    def start_soon(self, function: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self.live += 1
        self._nursery.start_soon(self._run, function, args)

    async def _run(self, function: Callable[..., Awaitable[Any]], args: tuple[Any, ...]
                   ) -> None:
        try:
            await function(*args)
        finally:
            self.live -= 1
            if not self.live:
                self._on_empty()


def _worker_context(handler: Any) -> WorkerContext | None:
    """The worker context of Hypercorn's handler, ``partial(TCPServer, app, config,
    context, state)``, or None for another handler."""
    if isinstance(handler, functools.partial) and len(handler.args) == 4:
        context = handler.args[2]
        if isinstance(context, WorkerContext):
            return context
    return None


async def serve_listeners(handler: Any, listeners: list[Any], *,
                          handler_nursery: trio.Nursery | None = None,
                          task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
                          ) -> None:
    """``trio.serve_listeners`` as Hypercorn's worker calls it, whose cancellation (the
    stop) closes the public listeners only; the admin ones close once the public
    connections have all ended, or at the graceful deadline."""
    admin = [listener for listener in listeners
             if CONNECTIONS.is_admin(listener.socket.getsockname())]
    context = _worker_context(handler)
    if not admin or len(admin) == len(listeners) or context is None or handler_nursery is None:
        await trio.serve_listeners(handler, listeners, handler_nursery=handler_nursery,
                                   task_status=task_status)
        return
    public = [listener for listener in listeners if listener not in admin]
    DRAIN.draining = False
    admin_context = _AdminContext(context)
    admin_handler = functools.partial(handler.func, *handler.args[:2], admin_context,
                                      *handler.args[3:])
    public_closed = False
    drained = trio.Event()

    def on_empty() -> None:
        if public_closed:
            drained.set()

    connections = _CountingNursery(handler_nursery, on_empty)

    async def serve_admin() -> None:
        # In the handler nursery, which outlives the accept loops: it ends with the
        # public drain, or with everything at the graceful deadline.
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(
                    trio.serve_listeners, admin_handler, admin,
                    handler_nursery=handler_nursery))
                await drained.wait()
                nursery.cancel_scope.cancel(reason="the public drain has ended")
        finally:
            await admin_context.terminated.set()

    handler_nursery.start_soon(serve_admin)
    try:
        await trio.serve_listeners(handler, public, handler_nursery=connections,  # type: ignore[arg-type]
                                   task_status=task_status)
    finally:
        public_closed = True
        if context.terminate.is_set():  # retiring past max_requests: no drain to report
            drained.set()
        else:
            DRAIN.draining = True
            if not connections.live:
                drained.set()
