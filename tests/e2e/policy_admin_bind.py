"""serve_process without --admin-bind: the policy's server.admin_bind is used."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.process_harness import ROOT, ServedGateway, stop_process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serve_policy_admin(policy: Path, *, workers: int = 1,
                       start_timeout_s: float = 20.0) -> Iterator[ServedGateway]:
    config = policy.parent / "hypercorn.toml"
    config.write_text('worker_class = "trio"\ngraceful_timeout = 5\n')
    command = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy),
               "--config", str(config), "--bind", "127.0.0.1:0", "--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_BIND"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env=env)
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
        yield ServedGateway(process, url, admin_url, output)
    except BaseException:
        sys.stderr.write("gateway output:\n" + "".join(output[-60:]))
        raise
    finally:
        stop_process(process)
