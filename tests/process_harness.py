"""Run ``python -m gateway serve`` as a real process tree (master + Hypercorn workers)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServedGateway:
    process: subprocess.Popen[str]
    url: str
    admin_url: str
    output: list[str]

    def worker_pids(self) -> list[int]:
        """The master's children that serve (not multiprocessing's resource tracker)."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        workers = []
        try:
            for pid in children.read_text().split():
                if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    workers.append(int(pid))
        except OSError:  # the master or a child has just ended
            pass
        return workers

    def signal_master(self, signum: int) -> None:
        self.process.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)


def stop_process(process: subprocess.Popen[str]) -> None:
    """SIGINT to its process group, then SIGKILL past 15 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def serve_process(policy: Path, *, workers: int = 1, config: Path | None = None,
                  env: dict[str, str] | None = None, admin_bind: str | None = "127.0.0.1:0",
                  start_timeout_s: float = 20.0) -> Iterator[ServedGateway]:
    """Start the gateway; yield once its admin /healthz answers; stop it afterwards.
    ``admin_bind=None``: the policy's ``server.admin_bind`` is used."""
    if config is None:
        config = policy.parent / "hypercorn.toml"
        config.write_text('worker_class = "trio"\ngraceful_timeout = 5\n')
    command = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy),
               "--config", str(config), "--bind", "127.0.0.1:0", "--workers", str(workers)]
    environment = {**os.environ, **(env or {})}
    if admin_bind is not None:
        command += ["--admin-bind", admin_bind]
    else:
        environment.pop("GATEWAY_ADMIN_BIND", None)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env=environment)
    output: list[str] = []
    url = admin_url = ""
    deadline = time.monotonic() + start_timeout_s
    assert process.stdout is not None
    while not admin_url:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("gateway exited during start-up:\n" + "".join(output))
        output.append(line)
        if match := re.match(r"gateway: serving (http://\S+)", line):
            url = match[1].rstrip(",")
        if match := re.match(r"gateway: admin (http://\S+)", line):
            admin_url = match[1]
        if time.monotonic() > deadline:
            raise RuntimeError("gateway did not start:\n" + "".join(output))
    served = ServedGateway(process, url, admin_url, output)
    import threading

    def drain() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            output.append(line)

    threading.Thread(target=drain, daemon=True).start()
    while True:
        try:
            if httpx.get(admin_url + "/healthz", timeout=1.0).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("gateway did not become healthy:\n" + "".join(output))
        time.sleep(0.05)
    try:
        yield served
    except BaseException:
        sys.stderr.write("gateway output:\n" + "".join(output[-60:]))
        raise
    finally:
        stop_process(process)


def free_port() -> int:
    """A port free now on 127.0.0.1, for a bind a policy names."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
