"""Start, probe and stop the processes a benchmark needs: every one is stopped by pid.

A :class:`Service` is a command started in its own session with its output in a log
file under ``bench/work/``; ``stop`` signals its pid, waits, and kills by pid whatever
of its process tree is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import _procs

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WORK = BENCH / "work"
PYTHON = ROOT / ".venv" / "bin" / "python"
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
STOP_GRACE_S = 8.0


class NotAvailable(RuntimeError):
    """A system's command did not come up; the message says why."""


def http_get_status(port: int, path: str, timeout_s: float = 2.0) -> int | None:
    """Status of one ``GET path`` on 127.0.0.1:port, or None on any socket error."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.sendall(request.encode())
            head = sock.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1])


@dataclass
class Service:
    """One process tree under our control."""

    name: str
    argv: list[str]
    port: int
    probe_path: str
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 30.0
    stop_signal: signal.Signals = signal.SIGTERM
    log_name: str = ""  # default: the service's name
    cwd: Path = ROOT
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return WORK / f"{self.log_name or self.name}.log"

    def healthy(self, attempts: int = 5) -> bool:
        """True if the probe answers 200 (a few tries, 1 s apart, for a busy server)."""
        for attempt in range(attempts):
            if http_get_status(self.port, self.probe_path, timeout_s=3.0) == 200:
                return True
            if attempt + 1 < attempts:
                time.sleep(1.0)
        return False

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self) -> None:
        """Start the command and wait until ``probe_path`` answers 200, else raise."""
        if http_get_status(self.port, self.probe_path, timeout_s=0.5) is not None:
            raise NotAvailable(f"port {self.port} is already in use")
        WORK.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NotAvailable(f"exited with {self.proc.returncode}: {self.log_tail()}")
            if http_get_status(self.port, self.probe_path) == 200:
                return
            time.sleep(0.2)
        self.stop()
        raise NotAvailable(f"no 200 from {self.probe_path} within {self.start_timeout_s:.0f} s")

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the service's output, on one line."""
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])[-400:]

    def stop(self) -> None:
        """Signal the pid, wait up to STOP_GRACE_S, then SIGKILL what is left by pid."""
        if self.proc is None:
            return
        pids = _procs.tree(self.proc.pid)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_GRACE_S)
        for pid in pids:
            # Workers the master left behind; a reused pid would be a different program,
            # so only kill it if it is still in our session.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getsid(pid) == self.proc.pid:
                    os.kill(pid, signal.SIGKILL)
        self.proc = None


def render_nginx(template: str, name: str, **values: str) -> tuple[Path, Path]:
    """Write ``bench/nginx/<template>`` with ``@KEY@`` replaced; return (prefix, conf)."""
    prefix = WORK / name
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    text = (BENCH / "nginx" / template).read_text()
    for key, value in {"PREFIX": str(prefix), "ECHO_MODULE": str(ECHO_MODULE), **values}.items():
        text = text.replace(f"@{key}@", value)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return prefix, conf


def nginx_service(name: str, prefix: Path, conf: Path, port: int, probe_path: str) -> Service:
    """nginx in the foreground (``daemon off``) so that its master is our child."""
    return Service(
        name=name,
        argv=["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        port=port,
        probe_path=probe_path,
        start_timeout_s=10.0,
        stop_signal=signal.SIGTERM,
    )
