"""Traces across workers: each worker answers trace queries on a Unix socket of its own.

Workers share the admin port, so a request for ``/traces`` reaches one of them at
random, while each keeps its traces in its own ring buffer. The worker a query reaches
asks its siblings through their sockets (in the directory the master names in
``GATEWAY_PEER_DIR``, where it also lists the workers it runs) and merges the answers,
so an SRE sees every worker's traces and finds a request's trace by id whichever worker
served it; a worker that cannot answer is named. Nothing is shared on the
request path: a trace is serialised only when an admin query asks for it, and then in
a thread: 1,000 traces take the better part of 10 ms of CPU to turn into JSON, which
the event loop serving requests should not spend in one go.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ._trace import Trace, TraceBuffer

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


#: The file in the peer directory listing the workers the master is running.
WORKERS_FILE = "workers"
#: AF_UNIX socket paths are limited to 107 bytes on Linux.
MAX_SOCKET_PATH = 107


def socket_dir_fits(directory: str) -> bool:
    """Whether every worker's socket path in ``directory`` is short enough to bind."""
    return len(socket_path(directory, 2**22).encode()) <= MAX_SOCKET_PATH


def write_worker_list(directory: str, pids: list[int]) -> None:
    """Record the running workers (atomically), so a query can name those that have
    no socket to answer on."""
    temporary = os.path.join(directory, f".{WORKERS_FILE}.tmp")
    with open(temporary, "w") as handle:
        handle.write(" ".join(str(pid) for pid in pids))
    os.replace(temporary, os.path.join(directory, WORKERS_FILE))


def _select(traces: TraceBuffer, question: dict[str, Any]) -> list[Trace]:
    """The traces matching ``question`` (``{"get": id}`` or ``{"query": {…}}``); on the
    event loop, since the buffer changes under it."""
    if "get" in question:
        found = traces.get(str(question["get"]))
        return [] if found is None else [found]
    return traces.query(**question["query"])


def _to_json(matches: list[Trace], pid: int) -> list[dict[str, Any]]:
    # In a thread: a trace in the buffer is finished and no longer changes.
    return [{**trace.to_json(), "worker_pid": pid} for trace in matches]


def _encoded(matches: list[Trace], pid: int) -> bytes:
    return json.dumps(_to_json(matches, pid)).encode()


async def answer(traces: TraceBuffer, question: dict[str, Any]) -> list[dict[str, Any]]:
    """This worker's traces matching ``question``, as JSON-ready dicts."""
    matches = _select(traces, question)
    if not matches:
        return []
    return await trio.to_thread.run_sync(_to_json, matches, os.getpid())


async def dumps(value: Any) -> bytes:
    """``json.dumps`` of an admin answer, off the event loop."""
    return await trio.to_thread.run_sync(lambda: json.dumps(value).encode())


async def serve_peer_socket(traces: Callable[[], TraceBuffer], directory: str,
                            task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                            ) -> None:
    """Answer siblings' trace questions until cancelled (for the life of the worker)."""
    path = socket_path(directory, os.getpid())
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await trio.Path(path).unlink(missing_ok=True)  # left by an earlier process
        await sock.bind(path)
        sock.listen(socket.SOMAXCONN)  # a burst of admin queries asks every worker at once
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
    # Nothing a sibling does (a bad question, hanging up before the answer) may end the
    # nursery this runs in: the worker's reloads and gauges live there too.
    async with stream:
        with trio.move_on_after(PEER_TIMEOUT_S):
            try:
                raw = await _read_all(stream, _MAX_QUESTION)
                matches = _select(traces, json.loads(raw))
                reply = await trio.to_thread.run_sync(_encoded, matches, os.getpid())
                await stream.send_all(reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                log.debug("a sibling worker left before its trace answer")
            except Exception as error:  # a malformed question
                log.warning("bad trace question from a sibling worker: %r", error)


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
    gathered = Gathered(await answer(traces, question))
    directory = peer_dir()
    if directory is not None:
        try:
            listed = (await trio.Path(directory, WORKERS_FILE).read_text()).split()
        except OSError:
            listed = []
        payload = json.dumps(question).encode()
        async with trio.open_nursery() as nursery:
            for pid in {int(text) for text in listed if text.isdigit()} - {os.getpid()}:
                path = socket_path(directory, pid)
                if await trio.Path(path).exists():
                    nursery.start_soon(_ask, pid, path, payload, gathered)
                else:  # starting, or it could not listen
                    gathered.unreachable.append(pid)
        gathered.unreachable.sort()
    gathered.traces.sort(key=lambda t: t["started_at"] + t["duration_ms"] / 1000,
                         reverse=True)
    return gathered


async def _ask(pid: int, path: str, payload: bytes, gathered: Gathered) -> None:
    try:
        with trio.fail_after(PEER_TIMEOUT_S):
            stream = await trio.open_unix_socket(path)
            async with stream:
                await stream.send_all(payload)
                await stream.send_eof()
                raw = await _read_all(stream, _MAX_ANSWER)
        gathered.traces.extend(await trio.to_thread.run_sync(json.loads, raw))
    except (OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError) as error:
        log.warning("worker %d did not answer a trace query: %s", pid, error or type(error))
        gathered.unreachable.append(pid)
