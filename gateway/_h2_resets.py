"""HTTP/2 rapid reset: close a connection whose client resets most of what it opens.

A client that opens a stream and resets it at once (CVE-2023-44487) makes the gateway
start a request, route it and cancel it, for two small frames of its own; the
concurrent-stream limit does not bound it, since each stream is gone before the next
arrives. Hypercorn's own bound is ``keep_alive_max_requests`` (1,000 streams per
connection). This applies Envoy's rule on top: a reset from the client less than
:data:`PREMATURE_S` after the stream opened is *premature*, and once a connection has
had ``limit`` of them and they are at least half of the streams it opened, it is sent
GOAWAY (ENHANCE_YOUR_CALM) and closed. A browser or gRPC client that cancels some of
its streams stays well under half; an attacker is cut off after ``limit`` streams.
"""

from __future__ import annotations

#: A stream reset by the client within this many seconds of opening is premature.
PREMATURE_S = 1.0


class PrematureResets:
    """The streams one HTTP/2 connection opened, and how many the client reset early."""

    __slots__ = ("limit", "opened_at", "premature", "streams")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Open streams only: an entry is dropped when its stream closes.
        self.opened_at: dict[int, float] = {}
        self.streams = 0
        self.premature = 0

    def opened(self, stream_id: int, now: float) -> None:
        self.streams += 1
        self.opened_at[stream_id] = now

    def closed(self, stream_id: int) -> None:
        self.opened_at.pop(stream_id, None)

    def reset_by_client(self, stream_id: int, now: float) -> None:
        opened_at = self.opened_at.pop(stream_id, None)
        if opened_at is not None and now - opened_at < PREMATURE_S:
            self.premature += 1

    def exceeded(self) -> bool:
        """True once the client's premature resets reach the limit and half its streams."""
        return 0 < self.limit <= self.premature and 2 * self.premature >= self.streams
