"""Traces across workers: each worker answers trace queries on a Unix socket of its own.

Workers share the admin port, so a request for ``/traces`` reaches one of them at
random, while each keeps its traces in its own ring buffer. The worker a query reaches
asks its siblings through their sockets (in the directory the master names in
``GATEWAY_PEER_DIR``) and merges the answers, so an SRE sees every worker's traces and
finds a request's trace by id whichever worker served it. Nothing is shared on the
request path: a trace is serialised only when an admin query asks for it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ._trace import TraceBuffer

log = logging.getLogger("gateway.admin")

PEER_DIR_ENV = "GATEWAY_PEER_DIR"
#: How long one sibling may take to answer before it is reported as unreachable.
PEER_TIMEOUT_S = 1.0
_MAX_QUESTION = 64 * 1024
_MAX_ANSWER = 64 * 1024 * 1024


def peer_dir() -> str | None:
    return os.environ.get(PEER_DIR_ENV) or None


def socket_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"worker-{pid}.sock")


def answer(traces: TraceBuffer, question: dict[str, Any]) -> list[dict[str, Any]]:
    """This worker's traces matching ``question`` (``{"get": id}`` or ``{"query": {…}}``)."""
    pid = os.getpid()
    if "get" in question:
        found = traces.get(str(question["get"]))
        matches = [] if found is None else [found]
    else:
        matches = traces.query(**question["query"])
    return [{**trace.to_json(), "worker_pid": pid} for trace in matches]


async def serve_peer_socket(traces: Callable[[], TraceBuffer], directory: str,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
    """Answer siblings' trace questions until cancelled (for the life of the worker)."""
    path = socket_path(directory, os.getpid())
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await trio.Path(path).unlink(missing_ok=True)  # left by an earlier process
        await sock.bind(path)
        sock.listen(16)
    except OSError as error:
        # Serving matters more: this worker's traces are then only its own to show.
        log.error("cannot listen for sibling workers' trace queries on %s: %s", path, error)
        sock.close()
        task_status.started()
        return
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await nursery.start(trio.serve_listeners,
                                lambda stream: _answer_one(stream, traces()),
                                [trio.SocketListener(sock)])
    finally:
        with trio.CancelScope(shield=True):
            await trio.Path(path).unlink(missing_ok=True)


async def _answer_one(stream: trio.SocketStream, traces: TraceBuffer) -> None:
    async with stream:
        with trio.move_on_after(PEER_TIMEOUT_S):
            raw = await _read_all(stream, _MAX_QUESTION)
            try:
                reply = answer(traces, json.loads(raw))
            except (ValueError, TypeError, KeyError) as error:
                log.warning("bad trace question from a sibling worker: %s", error)
                return
            await stream.send_all(json.dumps(reply).encode())


async def _read_all(stream: trio.SocketStream, limit: int) -> bytes:
    chunks = bytearray()
    while data := await stream.receive_some(65536):
        chunks += data
        if len(chunks) > limit:
            raise ValueError(f"more than {limit} bytes")
    return bytes(chunks)


@dataclass
class Gathered:
    """Traces from every worker that answered, and the pids of those that did not."""

    traces: list[dict[str, Any]] = field(default_factory=list)
    unreachable: list[int] = field(default_factory=list)


async def gather(traces: TraceBuffer, question: dict[str, Any]) -> Gathered:
    """``question`` answered by this worker and every sibling, newest-finished first."""
    gathered = Gathered(answer(traces, question))
    directory = peer_dir()
    if directory is not None:
        siblings = [path for path in await trio.Path(directory).glob("worker-*.sock")
                    if path.name != f"worker-{os.getpid()}.sock"]
        payload = json.dumps(question).encode()
        async with trio.open_nursery() as nursery:
            for path in siblings:
                nursery.start_soon(_ask, str(path), payload, gathered)
    gathered.traces.sort(key=lambda t: t["started_at"] + t["duration_ms"] / 1000,
                         reverse=True)
    return gathered


async def _ask(path: str, payload: bytes, gathered: Gathered) -> None:
    pid = int(os.path.basename(path).removeprefix("worker-").removesuffix(".sock"))
    try:
        with trio.fail_after(PEER_TIMEOUT_S):
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(payload)
                await stream.send_eof()
                raw = await _read_all(stream, _MAX_ANSWER)
        gathered.traces.extend(json.loads(raw))
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError) as error:
        # A worker that died leaves its socket until the master removes it.
        log.warning("worker %d did not answer a trace query: %s", pid, error or type(error))
        gathered.unreachable.append(pid)
