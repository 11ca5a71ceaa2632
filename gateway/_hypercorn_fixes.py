"""Changes to Hypercorn 0.18's trio worker the gateway depends on: two races it hits and
two per-request costs it cannot afford. Each says which behaviour it changes, so it can
be dropped when Hypercorn changes it.

Races:

* ``TCPServer._close`` calls ``send_eof`` without the connection's ``send_lock``. When
  the read side closes the connection (e.g. a client pipelines garbage after a request
  the gateway is refusing) while the app's response is being written, the response's
  ``send_all`` fails with ``BusyResourceError`` and the client gets nothing, not its
  400. Taking the lock (unless this task already holds it) serialises the two.
* ``TCPServer.run`` keeps a connection's task group (and so its socket, in CLOSE_WAIT)
  alive after the client has closed, until the keep-alive idle timer expires
  (``keep_alive_timeout``, 75 s here): under connection churn, tasks and file
  descriptors pile up (hypercorn#106). Ending the idle timer once the read side ends
  lets the connection finish at once; a response still being written is waited for.

Costs (each was measured with ``bench.overhead``):

* The keep-alive timer was a task started (through ``nursery.start`` and a lock) every
  time a connection went idle and cancelled every time a request arrived: a task, two
  locks and several scheduler passes per request. :class:`IdleTimer` keeps one task per
  connection and only moves its cancel scope's deadline.
* Every socket write took the send lock and ran ``send_all`` in a shielded scope: two
  scheduler passes per write, two or three writes per response. When the lock is free,
  the write is first tried directly on the non-blocking socket; only what the kernel
  does not take at once goes the original way.
* Connections were accepted one per scheduler pass. With a thousand busy connections a
  pass takes tens of milliseconds, so new connections (and clients that reconnect)
  waited seconds in the listen backlog before their first byte was read: the tail of
  every high-concurrency run. :class:`BatchAcceptListener` takes what the backlog holds
  (up to :data:`ACCEPT_BATCH`) each time it wakes, as nginx's ``multi_accept`` and
  asyncio's accept loop do.
"""

from __future__ import annotations

import math
import types
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import hypercorn.trio.run
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer

#: Most connections taken from the listen backlog per wake-up of the accept loop.
ACCEPT_BATCH = 512

_applied = False


class BatchAcceptListener(trio.abc.Listener[trio.SocketStream]):
    """A ``trio.SocketListener`` that drains the listen backlog on each wake-up.

    The first connection is accepted the usual way (waiting, and handling the errors
    trio handles); the rest that are already queued are taken without blocking and
    handed out by the following ``accept()`` calls, which then return at once. A
    failure in the draining (``EMFILE`` and the like) just ends the batch: the next
    waiting accept meets it and reports it as before.
    """

    def __init__(self, socket: trio.socket.SocketType) -> None:
        self._listener = trio.SocketListener(socket)
        self.socket = socket
        self._accepted: deque[trio.SocketStream] = deque()

    async def accept(self) -> trio.SocketStream:
        if self._accepted:
            return self._accepted.popleft()
        stream = await self._listener.accept()
        raw = getattr(self.socket, "_sock", None)
        if raw is not None:
            for _ in range(ACCEPT_BATCH - 1):
                try:
                    conn, _address = raw.accept()
                except OSError:  # nothing queued, or an error the next accept reports
                    break
                self._accepted.append(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
        return stream

    async def aclose(self) -> None:
        while self._accepted:
            await trio.aclose_forcefully(self._accepted.popleft())
        await self._listener.aclose()


class _TrioWithBatchAccept(types.ModuleType):
    """What ``hypercorn.trio.run`` sees as ``trio``: trio itself, but for its listener."""

    SocketListener = BatchAcceptListener

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


class IdleTimer:
    """A connection's keep-alive timer: one task whose deadline moves with idleness.

    Same contract as Hypercorn's ``TrioSingleTask`` running ``TCPServer._idle_timeout``:
    while the connection is idle it is closed after ``keep_alive_timeout`` or as soon as
    the worker is told to terminate; while a request is in flight there is no deadline.
    """

    def __init__(self, server: Any) -> None:
        self._server = server
        self._scope: trio.CancelScope | None = None
        self._idle = False
        self._ended = False

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        """The connection went idle: arm the deadline (and start the task the first time)."""
        if self._ended:
            return
        self._idle = True
        deadline = trio.current_time() + self._server.config.keep_alive_timeout
        if self._scope is None:
            self._scope = trio.CancelScope(deadline=deadline)
            task_group._nursery.start_soon(self._watch, self._scope)
        else:
            self._scope.deadline = deadline
        if self._server.context.terminated.is_set():
            self._scope.cancel()

    async def stop(self) -> None:
        """A request is in flight: no deadline until the connection is idle again."""
        self._idle = False
        if self._scope is not None:
            self._scope.deadline = math.inf

    def end(self) -> None:
        """The read side ended: the task finishes without closing anything itself."""
        self._ended = True
        if self._scope is not None:
            self._scope.cancel()

    async def _watch(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await self._server.context.terminated.wait()
                if self._idle:
                    break
                # Terminating with a request in flight: restart() cancels when it ends.
                await trio.sleep_forever()
        if self._ended:
            return
        with trio.CancelScope(shield=True):
            await self._server._initiate_server_close()


def _direct_send(server: Any, data: bytes) -> int | None:
    """Bytes of ``data`` the kernel took at once, or None when the socket is gone."""
    sock = getattr(server.stream, "socket", None)
    raw = getattr(sock, "_sock", None)
    if raw is None:  # not a plain TCP stream (TLS): nothing is sent here
        return 0
    try:
        return int(raw.send(data))
    except BlockingIOError:
        return 0
    except OSError:
        return None


def apply() -> None:
    global _applied
    if _applied:
        return
    original_init: Callable[..., None] = TCPServer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.idle_task = IdleTimer(self)

    TCPServer.__init__ = __init__  # type: ignore[method-assign]

    original_send: Callable[[Any, Event], Awaitable[None]] = TCPServer.protocol_send

    async def protocol_send(self: Any, event: Event) -> None:
        if type(event) is RawData and not self.send_lock.locked():
            data = event.data
            if not data:
                return
            sent = _direct_send(self, data)
            if sent is None:
                await self.protocol.handle(Closed())
                return
            if sent == len(data):
                return
            event = RawData(data=data[sent:], address=event.address)
        await original_send(self, event)

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]

    original_close: Callable[[Any], Awaitable[None]] = TCPServer._close

    async def _close(self: Any) -> None:
        lock: trio.Lock = self.send_lock
        if lock.statistics().owner is trio.lowlevel.current_task():
            await original_close(self)
            return
        async with lock:
            await original_close(self)

    TCPServer._close = _close  # type: ignore[method-assign]

    original_read: Callable[[Any], Awaitable[None]] = TCPServer._read_data

    async def _read_data(self: Any) -> None:
        try:
            await original_read(self)
        finally:
            self.idle_task.end()

    TCPServer._read_data = _read_data  # type: ignore[method-assign]

    hypercorn.trio.run.trio = _TrioWithBatchAccept("trio")  # type: ignore[attr-defined]
    _applied = True
