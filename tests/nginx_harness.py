"""nginx as the reverse proxy in front of the gateway, from a private config and prefix.

``run_nginx(gateway_port, prefix)`` renders ``NGINX_CONF`` into ``prefix`` (pid file,
error and access logs and temp directories all stay inside it), starts nginx in the
foreground as one process (``daemon off; master_process off;``) listening on
127.0.0.1 on a free port, waits until it accepts connections, and stops it by pid
afterwards: SIGQUIT (graceful), then SIGTERM, then SIGKILL, each wait bounded.

The proxy settings are the deployment's: HTTP/1.1 to the gateway, ``Connection ""``,
the client's host passed on, ``X-Forwarded-For`` extended with the client's address,
and ``proxy_ignore_client_abort off`` (nginx's default, spelled out because the
gateway's cancellation depends on it): when the client leaves, nginx closes its
connection to the gateway, and the gateway cancels the request's upstream work.

``nginx_binary()`` skips the calling test when nginx is missing, unless ``CI`` is set:
CI installs it (``.ci/install-system-deps.sh``), so there a missing nginx fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

__all__ = ["NGINX_CONF", "RunningNginx", "nginx_binary", "run_nginx"]

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{gateway_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_ignore_client_abort off;
            proxy_connect_timeout 5s;
            proxy_send_timeout 30s;
            proxy_read_timeout 30s;
        }}
    }}
}}
"""

_STOP_STEPS: tuple[tuple[signal.Signals, float], ...] = (
    (signal.SIGQUIT, 3.0),
    (signal.SIGTERM, 2.0),
    (signal.SIGKILL, 2.0),
)


def nginx_binary() -> str:
    """The nginx executable; skips the test without one (fails under ``CI``)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    if found is None:
        reason = "nginx is not installed (Debian package nginx-light, .ci/install-system-deps.sh)"
        if os.environ.get("CI", "").lower() not in {"", "0", "false"}:
            pytest.fail(f"CI must provide nginx: {reason}", pytrace=False)
        pytest.skip(reason)
    return found


def _free_port() -> int:
    """A port free a moment ago; nginx may still lose it to a race (then we retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningNginx:
    process: trio.Process
    port: int
    prefix: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        return _read(self.prefix / "error.log")

    def access_log(self) -> str:
        return _read(self.prefix / "access.log")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


async def _stop(process: trio.Process) -> None:
    """Stop nginx by its pid, each step bounded; never raises for an exited process."""
    with trio.CancelScope(shield=True):
        for signum, wait_s in _STOP_STEPS:
            if process.returncode is not None:
                return
            with suppress(ProcessLookupError):
                os.kill(process.pid, signum)
            with trio.move_on_after(wait_s):
                await process.wait()


async def _start_once(binary: str, prefix: Path, gateway_port: int,
                      timeout_s: float) -> tuple[trio.Process, int] | None:
    """Start nginx on a fresh port; ``None`` when that port was taken meanwhile."""
    port = _free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, gateway_port=gateway_port))
    error_log = prefix / "error.log"
    error_log.write_text("")
    process = await trio.lowlevel.open_process(
        [binary, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        with trio.fail_after(timeout_s):
            while True:
                if process.poll() is not None:
                    log = _read(error_log)
                    if "Address already in use" in log:
                        return None
                    raise RuntimeError(f"nginx exited with {process.returncode}:\n{log}")
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.aclose()
                if process.poll() is None:
                    return process, port
    except BaseException:
        await _stop(process)
        raise


@asynccontextmanager
async def run_nginx(gateway_port: int, prefix: Path, *, start_timeout_s: float = 10.0,
                    attempts: int = 5) -> AsyncIterator[RunningNginx]:
    """nginx in front of ``127.0.0.1:gateway_port`` until the block ends."""
    binary = nginx_binary()
    for sub in ("tmp", "logs"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    started = None
    for _ in range(attempts):
        started = await _start_once(binary, prefix, gateway_port, start_timeout_s)
        if started is not None:
            break
    if started is None:
        raise RuntimeError(f"nginx found no free port in {attempts} attempts")
    process, port = started
    running = RunningNginx(process, port, prefix)
    try:
        yield running
    finally:
        await _stop(process)
