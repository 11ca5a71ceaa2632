"""Process-tree accounting from /proc: CPU seconds and resident memory.

A system under test is a process tree (a master and its workers); its cost is the sum
over the tree, read from ``/proc/<pid>/stat`` (utime + stime) and ``/proc/<pid>/status``
(VmRSS).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name, or None if the pid is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """``root`` and all its living descendants."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _stat_fields(pid) is None:
            continue
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_split(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the tree under ``root``."""
    user = system = 0
    for pid in tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # Fields 14 and 15 of stat (1-based); index 0 here is field 3 (state).
            user += int(fields[11])
            system += int(fields[12])
    return user / _CLOCK_TICKS, system / _CLOCK_TICKS


def cpu_seconds(root: int) -> float:
    """utime + stime of the tree under ``root``, in seconds."""
    return sum(cpu_split(root))


def wait_quiet(root: int, *, busy_share: float = 0.1, window_s: float = 0.5,
               limit_s: float = 15.0) -> float | None:
    """Wait until the tree under ``root`` uses less than ``busy_share`` of one core over
    ``window_s`` (it has finished the work a scenario left it); the seconds waited, or
    None if it was still busy after ``limit_s``."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        before = cpu_seconds(root)
        time.sleep(window_s)
        if cpu_seconds(root) - before < busy_share * window_s:
            return time.monotonic() - started
    return None


def tcp_accept_state(port: int) -> tuple[int, int]:
    """(established connections to local ``port``, connections waiting in its listen
    backlog) on IPv4, from ``/proc/net/tcp``. The kernel counts a connection as
    established once the handshake is done, before the server accepts it; the backlog
    (a listening socket's receive queue there) holds those not yet accepted. Raises if
    nothing listens on ``port`` over IPv4."""
    established = backlog = listening = 0
    for line in (_PROC / "net" / "tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) != port:
            continue
        if fields[3] == "01":
            established += 1
        elif fields[3] == "0A":
            listening += 1
            backlog += int(fields[4].split(":")[1], 16)
    if not listening:
        raise RuntimeError(f"nothing listens on port {port} over IPv4")
    return established, backlog


def rss_bytes(root: int) -> int:
    """Sum of VmRSS over the tree under ``root``, in bytes."""
    total = 0
    for pid in tree(root):
        try:
            status = (_PROC / str(pid) / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
    return total


class RssSampler:
    """Samples the tree's RSS every ``interval_s`` in a thread; ``peak`` is the maximum."""

    def __init__(self, root: int, interval_s: float = 0.2) -> None:
        self.root = root
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.root))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.root))
