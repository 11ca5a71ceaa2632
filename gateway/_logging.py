"""Logging that never blocks the event loop.

A log record is put on a bounded in-memory queue and written by a thread; when the
queue is full (stderr slower than the traffic, e.g. a stalled pipe) records are
dropped and counted instead of stalling every request of the worker.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
import sys

#: Records waiting to be written before new ones are dropped.
LOG_QUEUE_SIZE = 10_000
_FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that drops (and counts) records instead of blocking or raising."""

    def __init__(self, log_queue: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(log_queue)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


_listener: logging.handlers.QueueListener | None = None


def configure_logging(level: int = logging.INFO) -> DroppingQueueHandler:
    """Send every record through a bounded queue to stderr (idempotent)."""
    global _listener
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, DroppingQueueHandler):
            return handler
    log_queue: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE_SIZE)
    handler = DroppingQueueHandler(log_queue)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter(_FORMAT))
    _listener = logging.handlers.QueueListener(log_queue, stream, respect_handler_level=False)
    _listener.start()
    atexit.register(_listener.stop)
    root.handlers = [handler]
    root.setLevel(level)
    # Hypercorn's loggers write to stderr themselves; route them through the queue too.
    for name in ("hypercorn.error", "hypercorn.access"):
        hypercorn_logger = logging.getLogger(name)
        hypercorn_logger.handlers = []
        hypercorn_logger.propagate = True
    return handler
