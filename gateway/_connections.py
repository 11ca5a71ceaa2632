"""The worker's client connections, kept clear of its open-file limit.

A worker's descriptors are shared by its client connections and the sockets it opens
itself: upstream pools, PostgreSQL, files. Connections that send nothing (many idle
clients, a slowloris) could take them all: upstream connects then failed for clients
already admitted (a 502 from a healthy upstream), and new clients waited unanswered in
the backlog while the accept loop logged ``EMFILE`` ten times a second.

As nginx does when its connections run out, the worker keeps ``reserve`` descriptors
for its own sockets (the most its pools may open and a margin, at most half its
limit). A connection accepted above that line, or an accept that meets ``EMFILE``,
makes room by closing an idle connection: one that has not sent a request yet (or one
only reading the unread rest of an answered request's body before it closes) first,
oldest first, else the oldest idle keep-alive connection. One whose next request has
arrived (in the kernel, or read and not yet parsed) is not idle: closed, the request
was served with no way to answer it. A request read just as its connection is closed
is not served. An HTTP/2 one is sent
GOAWAY(NO_ERROR) first, as nginx does, so that a request its client sends meanwhile is
known unprocessed and retried elsewhere. With none idle, the new connection is closed
at once, so its client can go elsewhere instead of waiting.
"""

from __future__ import annotations

import errno
import logging
import resource
import select
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gateway.connections")

#: Descriptors kept besides what the pools may open (files, the event loop, logs).
BASE_RESERVE = 64
#: Accept errors that mean the worker is out of descriptors (or kernel memory).
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ClientConnections:
    """The live client connections of this worker (Hypercorn ``TCPServer`` objects),
    oldest first, and the room kept for the worker's own sockets."""

    def __init__(self) -> None:
        self._live: dict[Any, None] = {}
        self.reserve = BASE_RESERVE
        #: Local addresses of the admin listeners (ports on any host, or (host, port)):
        #: their connections are always taken, so that probes and scrapes get through.
        self.admin_ports: set[int] = set()
        self.admin_addresses: set[tuple[str, int]] = set()
        self.closed_for_room = 0
        self.refused = 0
        #: Says goodbye on a connection about to be closed to make room, without
        #: waiting (an HTTP/2 connection's GOAWAY; set by ``_hypercorn_fixes``).
        self.farewell: Callable[[Any], None] | None = None

    def __len__(self) -> int:
        return len(self._live)

    def opened(self, server: Any) -> None:
        self._live[server] = None

    def closed(self, server: Any) -> None:
        self._live.pop(server, None)

    def is_admin(self, address: tuple[str, int]) -> bool:
        return address[1] in self.admin_ports or tuple(address[:2]) in self.admin_addresses

    def has_room(self, descriptor: int) -> bool:
        """Is a new connection on ``descriptor`` below the reserve's line? Descriptors
        are handed out lowest first, so every one below it is taken."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Never more than half the limit: the pools rarely hold all they may, and a
        # reserve as large as the limit would leave no room for any client.
        return (soft == resource.RLIM_INFINITY
                or descriptor < soft - min(self.reserve, soft // 2))

    def make_room(self) -> bool:
        """Close one idle connection (silent ones first, oldest first); False when
        none is idle."""
        chosen = fallback = None
        for server in self._live:
            timer = getattr(server, "idle_task", None)
            protocol = getattr(getattr(server, "protocol", None), "protocol", None)
            if not getattr(timer, "idle", False):
                # Answered, its unread body being dropped (``_h1_unread``): one closing
                # anyway goes with the silent ones. One kept open is busy: its client
                # was not told of a close and may have sent its next request already.
                if getattr(getattr(protocol, "stream", None), "lingering", None):
                    chosen = server
                    break
                continue
            if _request_pending(server, protocol):
                continue
            if getattr(protocol, "keep_alive_requests", 1) == 0:
                chosen = server
                break
            if fallback is None:
                fallback = server
        chosen = chosen or fallback
        if chosen is None:
            return False
        self.closed(chosen)
        self.closed_for_room += 1
        if self.farewell is not None:
            self.farewell(chosen)
        # A request read from its socket at this moment (the reader had taken it, but
        # not yet parsed it) is not served: its client is told nothing but the close.
        reclaimed = getattr(getattr(chosen, "idle_task", None), "reclaimed", None)
        if reclaimed is not None:
            reclaimed()
        # Closed now, so that its descriptor is free at once; its reader sees the close
        # and the connection ends as one whose client left.
        chosen.stream.socket.close()
        return True

    def refuse(self) -> None:
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning("no descriptor to spare for a new client connection and none idle "
                        "to close (%d live; %d kept for upstream sockets): closed it at "
                        "once (%d so far)", len(self._live), self.reserve, self.refused)


CONNECTIONS = ClientConnections()


def _request_pending(server: Any, protocol: Any) -> bool:
    """Whether an idle connection has request bytes that are not handled yet: read
    into its HTTP/1.1 parser's buffer after the last answer (a pipelined request; a
    first request's partial head is not counted: a slowloris sends nothing else), or
    waiting in the kernel to be read. It is not idle then, only about to be busy."""
    receive_buffer = getattr(getattr(protocol, "connection", None), "_receive_buffer", None)
    if receive_buffer and getattr(protocol, "keep_alive_requests", 0):
        return True
    sock = getattr(getattr(getattr(server, "stream", None), "socket", None), "_sock", None)
    if sock is None or sock.fileno() < 0:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    ready = poller.poll(0)
    # Readable for a client that closed too: that one is gone, not sending a request.
    return bool(ready) and ready[0][1] & _GONE == 0


_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR


def out_of_resources(exc: BaseException) -> int | None:
    """The errno of a descriptor or memory shortage behind ``exc`` (trio's "all
    attempts to connect failed" and asyncpg's connect hold it in a cause), or None."""
    seen: list[BaseException] = [exc]
    while seen:
        error = seen.pop()
        if isinstance(error, OSError) and error.errno in OUT_OF_DESCRIPTORS:
            return error.errno
        if isinstance(error, BaseExceptionGroup):
            seen.extend(error.exceptions)
        if error.__cause__ is not None:
            seen.append(error.__cause__)
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            seen.append(cause)
    return None


def set_connection_reserve(upstream_sockets: int) -> None:
    """Keep ``upstream_sockets`` (the most the pools may open) plus a margin free of
    client connections (from now on)."""
    CONNECTIONS.reserve = BASE_RESERVE + upstream_sockets
