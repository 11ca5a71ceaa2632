"""Workarounds for Hypercorn 0.18 trio-worker races the gateway hits; each is small and
says which behaviour it fixes, so it can be dropped when Hypercorn fixes it.

* ``TCPServer._close`` calls ``send_eof`` without the connection's ``send_lock``. When
  the read side closes the connection (e.g. a client pipelines garbage after a request
  the gateway is refusing) while the app's response is being written, the response's
  ``send_all`` fails with ``BusyResourceError`` and the client gets nothing, not its
  400. Taking the lock (unless this task already holds it) serialises the two.
* ``TCPServer.run`` keeps a connection's task group (and so its socket, in CLOSE_WAIT)
  alive after the client has closed, until the keep-alive idle timer expires
  (``keep_alive_timeout``, 75 s here): under connection churn, tasks and file
  descriptors pile up (hypercorn#106). Stopping the idle timer once the read side
  ends lets the connection finish at once; a response still being written is waited
  for as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.trio.tcp_server import TCPServer

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    original: Callable[[Any], Awaitable[None]] = TCPServer._close

    async def _close(self: Any) -> None:
        lock: trio.Lock = self.send_lock
        if lock.statistics().owner is trio.lowlevel.current_task():
            await original(self)
            return
        async with lock:
            await original(self)

    TCPServer._close = _close  # type: ignore[method-assign]

    original_read: Callable[[Any], Awaitable[None]] = TCPServer._read_data

    async def _read_data(self: Any) -> None:
        try:
            await original_read(self)
        finally:
            with trio.CancelScope(shield=True):
                await self.idle_task.stop()

    TCPServer._read_data = _read_data  # type: ignore[method-assign]
    _applied = True
