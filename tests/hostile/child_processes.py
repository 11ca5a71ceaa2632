"""Helpers for the descriptor tests: an upstream and an idle-connection client that run in
their own processes, so that only the gateway's descriptors count against the test
process's open-file limit, and a way to lower that limit for a bounded test.

Every process started here is a child of the test, stopped by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]

_UPSTREAM = r"""
import sys, trio
sys.path.insert(0, sys.argv[1])
from tests.upstream import start_upstream

async def main():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        print(upstream.url, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes stdin
        nursery.cancel_scope.cancel()

trio.run(main)
"""

_IDLE_CLIENT = r"""
import resource, socket, sys, time
port, count, head = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(count):
    sock = socket.socket()
    sock.settimeout(2)
    try:
        sock.connect(("127.0.0.1", port))  # the kernel completes it from the backlog
    except OSError:
        sock.close()
        break
    if head:
        sock.sendall(head)
    held.append(sock)
print(len(held), flush=True)
sys.stdin.read()  # hold them until the test closes stdin
"""


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def open_file_limit(soft: int) -> Iterator[None]:
    """Lower this process's soft RLIMIT_NOFILE for the block, then restore it."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


async def _read_line(proc: trio.Process, timeout_s: float = 20) -> str:
    assert proc.stdout is not None
    data = b""
    with trio.fail_after(timeout_s):
        while not data.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, "the helper process ended early"
            data += chunk
    return data.decode().strip()


@contextlib.asynccontextmanager
async def _helper(script: str, *args: str) -> AsyncIterator[tuple[trio.Process, str]]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, cwd=str(ROOT))
    try:
        line = await _read_line(proc)
        yield proc, line
    finally:
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            await proc.stdin.aclose()
        with trio.move_on_after(5) as waited:
            await proc.wait()
        if waited.cancelled_caught:
            proc.kill()  # by its own pid
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


@contextlib.asynccontextmanager
async def upstream_process() -> AsyncIterator[str]:
    """The recording test upstream (``tests.upstream``) in a child process: its URL."""
    async with _helper(_UPSTREAM, str(ROOT)) as (_proc, url):
        yield url


@contextlib.asynccontextmanager
async def idle_connections(port: int, count: int, head: bytes = b"") -> AsyncIterator[int]:
    """``count`` connections to ``port`` from a child process that send ``head`` (nothing
    by default) and then nothing more, held until the block ends: how many it opened."""
    async with _helper(_IDLE_CLIENT, str(port), str(count), head.decode()) as (_proc, line):
        yield int(line)


@contextlib.contextmanager
def descriptors_used_up() -> Iterator[None]:
    """Every descriptor this process may open taken (by /dev/null), for the block."""
    with open_file_limit(open_fds() + 8):
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        try:
            yield
        finally:
            for fd in held:
                os.close(fd)
