"""The master process: starts the workers, replaces one that dies, drains on SIGTERM.

Hypercorn's own runner stops the whole server when one worker exits with an error, and
then returns 0 without waiting for the others to drain. A gateway that loses a worker
(to the OOM killer, say) should keep serving on the rest while a new one starts, as
nginx's master does. A worker that keeps dying is a fault no restart will mend, so after
``restart_limit`` abnormal exits within ``RESTART_WINDOW_S`` the master stops every
worker and exits 1, naming how the last one ended.

Stop and reload signals are blocked while a worker is being started: the master gets
them once the start is done, and the worker begins with them blocked until it has set
its own handling (:func:`gateway._server.prepare_worker_process`), so a signal in that
window neither kills a half-started worker nor is lost.
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

#: Abnormal exits within RESTART_WINDOW_S that stop the master (at least twice the
#: worker count, so one event taking every worker down is survived).
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
#: Signals the master handles; blocked around each worker start.
MASTER_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
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
    """Keeps ``count`` worker processes running ``target(**kwargs, shutdown_event=…,
    retiring_event=…)``.

    A worker that sets its ``retiring_event`` (past Hypercorn's ``max_requests``) is
    draining and no longer counts: its replacement starts at once, while it finishes
    its requests, so new clients are never left waiting for a drain in the backlog.

    SIGTERM or SIGINT sets the shared shutdown event, after which each worker drains
    its in-flight requests and exits; a worker still running ``drain_timeout_s`` later
    (a number, or a function asked at the stop),
    or any worker once a second stop signal comes, is killed. SIGHUP is forwarded to
    the workers, which reload their policy themselves. ``on_stop`` is called once the
    workers have been told to stop (the master closes its listening sockets there).
    """

    def __init__(self, count: int, target: Callable[..., None], kwargs: Mapping[str, Any],
                 *, drain_timeout_s: float | Callable[[], float] = 60.0,
                 on_worker_exit: Callable[[int], None] | None = None,
                 on_workers_changed: Callable[[list[int]], None] | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:
        self._count = count
        self._target = target
        self._kwargs = dict(kwargs)
        self._drain_timeout_s = drain_timeout_s
        self._on_worker_exit = on_worker_exit
        self._on_workers_changed = on_workers_changed
        self._on_stop = on_stop
        self._context = multiprocessing.get_context("spawn")
        self._shutdown_event = self._context.Event()
        self._workers: list[BaseProcess] = []
        self._retiring: dict[BaseProcess, Any] = {}  # each worker's retiring event
        self._stop_signals = 0
        self._deaths: deque[float] = deque()
        self._restart_limit = max(RESTART_LIMIT, 2 * count)
        self._previous_handlers: dict[int, Any] | None = None

    def take_signals(self) -> None:
        """Handle the master's signals from now on (before announcing the server, so
        a stop asked for at once is a clean stop)."""
        if self._previous_handlers is None:
            self._previous_handlers = {signum: signal.getsignal(signum)
                                       for signum in MASTER_SIGNALS}
            signal.signal(signal.SIGINT, self._on_stop_signal)
            signal.signal(signal.SIGTERM, self._on_stop_signal)
            signal.signal(signal.SIGHUP, self._on_sighup)

    def run(self) -> int:
        """Serve until told to stop (0), or until workers keep dying or cannot be
        started, or have to be killed (1)."""
        self.take_signals()
        previous = self._previous_handlers or {}
        code = 1
        try:
            code = self._watch()
        finally:
            self._shutdown_event.set()
            if self._on_stop is not None:
                self._on_stop()
            if not self._join_all():
                code = 1
            if self._stop_signals > 1:
                log.warning("second stop signal: the workers were killed without draining")
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return code

    def _start_missing(self) -> bool:
        """Start workers up to the count; False when starts keep failing."""
        while self._serving_count() < self._count and not self._stop_signals:
            retiring = self._context.Event()
            process = self._context.Process(
                target=self._target,
                kwargs={**self._kwargs, "shutdown_event": self._shutdown_event,
                        "retiring_event": retiring})
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
            try:
                process.start()
            except OSError as error:  # no memory to fork, no file descriptors left
                log.error("cannot start a worker: %s", error)
                return not self._too_many_deaths()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self._workers.append(process)
            self._retiring[process] = retiring
            self._workers_changed()
        return True

    def _serving_count(self) -> int:
        """Workers not draining toward their exit."""
        return sum(1 for p in self._workers if not self._retiring[p].is_set())

    def _workers_changed(self) -> None:
        if self._on_workers_changed is not None:
            self._on_workers_changed([p.pid for p in self._workers if p.pid is not None])

    def _watch(self) -> int:
        while not self._stop_signals:
            if not self._start_missing():
                log.error("workers cannot be started: stopping the gateway")
                return 1
            wait([process.sentinel for process in self._workers], timeout=_POLL_S)
            for process in [p for p in self._workers if p.exitcode is not None]:
                self._reap(process)
                if process.exitcode == 0:
                    log.info("worker %s exited; starting another", process.pid)
                    continue
                log.error("worker %s ended with %s; starting another", process.pid,
                          describe_exit(process.exitcode))
                if self._too_many_deaths():
                    log.error("%d workers ended abnormally within %.0f s: stopping the "
                              "gateway (last: %s)", len(self._deaths), RESTART_WINDOW_S,
                              describe_exit(process.exitcode))
                    return 1
        return 0

    def _too_many_deaths(self) -> bool:
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > RESTART_WINDOW_S:
            self._deaths.popleft()
        return len(self._deaths) >= self._restart_limit

    def _reap(self, process: BaseProcess) -> None:
        process.join()
        self._workers.remove(process)
        self._retiring.pop(process, None)
        self._workers_changed()
        if self._on_worker_exit is not None and process.pid is not None:
            self._on_worker_exit(process.pid)

    def _join_all(self) -> bool:
        """Wait for every worker to end; kill those still running past the drain
        timeout. True when all drained on their own."""
        timeout_s = (self._drain_timeout_s() if callable(self._drain_timeout_s)
                     else self._drain_timeout_s)
        deadline = time.monotonic() + timeout_s
        drained = True
        while self._workers:
            if drained and time.monotonic() > deadline:
                pids = [p.pid for p in self._workers]
                log.error("workers %s still running %.0f s after the stop: killing them",
                          pids, timeout_s)
                self._signal_workers(signal.SIGKILL)
                drained = False
            wait([process.sentinel for process in self._workers], timeout=_POLL_S)
            for process in [p for p in self._workers if p.exitcode is not None]:
                self._reap(process)
        return drained and self._stop_signals < 2

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self._stop_signals += 1
        self._shutdown_event.set()
        if self._stop_signals > 1:
            self._signal_workers(signal.SIGKILL)

    def _on_sighup(self, signum: int, frame: object) -> None:
        self._signal_workers(signal.SIGHUP)

    def _signal_workers(self, signum: int) -> None:
        for process in self._workers:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)
