"""The master process: starts the workers, replaces one that dies, drains on SIGTERM.

Hypercorn's own runner stops the whole server when one worker exits with an error, and
then returns 0 without waiting for the others to drain. A gateway that loses a worker
(to the OOM killer, say) should keep serving on the rest while a new one starts, as
nginx's master does. A worker that keeps dying is a fault no restart will mend, so after
``RESTART_LIMIT`` abnormal exits within ``RESTART_WINDOW_S`` the master stops every
worker and exits 1, naming how the last one ended.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("gateway.server")

RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
#: How often the master looks at its flags while waiting for a worker to end.
_POLL_S = 0.2


def describe_exit(exitcode: int | None) -> str:
    """'exit code 3' or 'signal SIGKILL': how a worker process ended."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class Supervisor:
    """Keeps ``count`` worker processes running ``target(**kwargs, shutdown_event=…)``.

    SIGTERM or SIGINT sets the shared shutdown event, after which each worker drains
    its in-flight requests and exits; a second one kills the workers at once. SIGHUP is
    forwarded to the workers, which reload their policy themselves.
    """

    def __init__(self, count: int, target: Callable[..., None], kwargs: Mapping[str, Any],
                 *, on_worker_exit: Callable[[int], None] | None = None) -> None:
        self._count = count
        self._target = target
        self._kwargs = dict(kwargs)
        self._on_worker_exit = on_worker_exit
        self._context = multiprocessing.get_context("spawn")
        self._shutdown_event = self._context.Event()
        self._workers: list[BaseProcess] = []
        self._stop_signals = 0
        self._deaths: deque[float] = deque()

    def run(self) -> int:
        """Serve until told to stop (returns 0) or until workers keep dying (returns 1)."""
        previous = {signum: signal.getsignal(signum)
                    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        # Workers inherit SIG_IGN for SIGINT: a terminal's Ctrl-C reaches the master only.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._start_missing()
            signal.signal(signal.SIGINT, self._on_stop_signal)
            signal.signal(signal.SIGTERM, self._on_stop_signal)
            signal.signal(signal.SIGHUP, self._on_sighup)
            code = self._watch()
            self._shutdown_event.set()
            self._join_all()
            return code
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _start_missing(self) -> None:
        while len(self._workers) < self._count:
            process = self._context.Process(
                target=self._target,
                kwargs={**self._kwargs, "shutdown_event": self._shutdown_event})
            process.start()
            self._workers.append(process)

    def _watch(self) -> int:
        while not self._stop_signals:
            wait([process.sentinel for process in self._workers], timeout=_POLL_S)
            for process in [p for p in self._workers if p.exitcode is not None]:
                self._reap(process)
                if self._stop_signals:
                    break
                if process.exitcode != 0:
                    log.error("worker %s ended with %s; starting another", process.pid,
                              describe_exit(process.exitcode))
                    if self._too_many_deaths():
                        log.error("%d workers ended abnormally within %.0f s: stopping the "
                                  "gateway (last: %s)", RESTART_LIMIT, RESTART_WINDOW_S,
                                  describe_exit(process.exitcode))
                        return 1
            if not self._stop_signals:
                self._start_missing()
        return 0

    def _too_many_deaths(self) -> bool:
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > RESTART_WINDOW_S:
            self._deaths.popleft()
        return len(self._deaths) >= RESTART_LIMIT

    def _reap(self, process: BaseProcess) -> None:
        process.join()
        self._workers.remove(process)
        if self._on_worker_exit is not None and process.pid is not None:
            self._on_worker_exit(process.pid)

    def _join_all(self) -> None:
        while self._workers:
            wait([process.sentinel for process in self._workers], timeout=_POLL_S)
            for process in [p for p in self._workers if p.exitcode is not None]:
                self._reap(process)

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self._stop_signals += 1
        self._shutdown_event.set()
        if self._stop_signals > 1:
            log.warning("second stop signal: killing the workers without draining")
            self._signal_workers(signal.SIGKILL)

    def _on_sighup(self, signum: int, frame: object) -> None:
        self._signal_workers(signal.SIGHUP)

    def _signal_workers(self, signum: int) -> None:
        for process in self._workers:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)
