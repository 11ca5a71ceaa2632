"""Run wrk with the JSON-printing ``done()`` script and parse its result."""

from __future__ import annotations

import json
import resource
import shlex
import signal
import subprocess
from dataclasses import dataclass

from bench._services import BENCH, ROOT

SCRIPT = BENCH / "wrk_report.lua"


@dataclass(frozen=True)
class WrkResult:
    """Counts and latency percentiles of one wrk run (latencies in milliseconds)."""

    requests: int
    duration_s: float
    errors_socket: int
    errors_status: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def errors(self) -> int:
        """Non-2xx/3xx answers plus connect, read, write and timeout errors."""
        return self.errors_socket + self.errors_status


def command(
    url: str,
    connections: int,
    duration_s: float,
    timeout_s: float,
    threads: int = 2,
    headers: tuple[str, ...] = (),
) -> str:
    """The shell command line: raise the fd limit to the hard limit, then exec wrk."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    wrk = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        f"--timeout={timeout_s:g}s",
        "--latency",
        "-s",
        str(SCRIPT.relative_to(ROOT)),
    ]
    for header in headers:
        wrk += ["-H", header]
    return f"ulimit -n {limit}; exec {shlex.join([*wrk, url])}"


def run(cmd: str, duration_s: float) -> WrkResult:
    """Run a command from :func:`command`, bounded to its duration plus a margin."""
    out = subprocess.run(
        ["bash", "-c", cmd],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=duration_s + 60,
        check=False,
    )
    return _parse(out.stdout, out.returncode, out.stderr)


def start(cmd: str) -> subprocess.Popen[str]:
    """Start a command from :func:`command` in the background (``bash`` execs wrk, so
    the process is wrk itself); :func:`stop` ends it and reads its result."""
    return subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str]) -> WrkResult:
    """Interrupt a wrk from :func:`start` (it then prints its summary, as at the end of
    its duration) and parse the result; killed if it does not exit within 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    return _parse(stdout, proc.returncode, stderr)


def _parse(stdout: str, returncode: int | None, stderr: str) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith("WRK_JSON "):
            data = json.loads(line.removeprefix("WRK_JSON "))
            break
    else:
        raise RuntimeError(f"wrk failed ({returncode}): {stderr.strip()[-300:]}")
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        errors_socket=data["connect"] + data["read"] + data["write"] + data["timeout"],
        errors_status=data["status"],
        p50_ms=data["p50_us"] / 1e3,
        p90_ms=data["p90_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        max_ms=data["max_us"] / 1e3,
    )
