"""Workarounds for Hypercorn 0.18 trio-worker races the gateway hits; each is small and
says which behaviour it fixes, so it can be dropped when Hypercorn fixes it.

* ``TCPServer._close`` calls ``send_eof`` without the connection's ``send_lock``. When
  the read side closes the connection (e.g. a client pipelines garbage after a request
  the gateway is refusing) while the app's response is being written, the response's
  ``send_all`` fails with ``BusyResourceError`` and the client gets nothing, not its
  400. Taking the lock (unless this task already holds it) serialises the two.
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
    _applied = True
