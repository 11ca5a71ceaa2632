"""/traces with two workers while a dashboard (or several operators) query at once.

Each query asks the sibling worker over its Unix socket, whose listen backlog is 16:
a burst of queries that arrives while the sibling's loop is busy for a moment (0.3 s,
well inside the 1 s a sibling is given to answer) overflows it, the connect fails at
once (EAGAIN), and the answer lists a perfectly healthy sibling under
``unreachable_workers`` and leaves out its traces."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import trio

from tests.process_harness import serve_process
from tests.upstream import proxy_policy, start_upstream


async def test_a_burst_of_trace_queries_finds_every_worker(tmp_path: Path):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        with serve_process(policy, workers=2) as served:
            with trio.fail_after(20):
                while len(served.worker_pids()) < 2:
                    await trio.sleep(0.05)
                await trio.sleep(1.0)  # both listen for their sibling's questions
            answers: list[dict] = []
            limits = httpx.Limits(max_connections=200)
            async with httpx.AsyncClient(timeout=20, limits=limits) as admin:
                for _ in range(10):  # each worker has sockets to answer on, as in use
                    answers.append((await admin.get(served.admin_url + "/traces")).json())
                assert all(a["unreachable_workers"] == [] for a in answers), answers
                answers.clear()

                async def query() -> None:
                    answers.append((await admin.get(served.admin_url + "/traces")).json())

                sibling = served.worker_pids()[1]
                os.kill(sibling, signal.SIGSTOP)  # its loop busy for a moment
                try:
                    async with trio.open_nursery() as queries:
                        for _ in range(40):
                            queries.start_soon(query)
                        await trio.sleep(0.3)
                        os.kill(sibling, signal.SIGCONT)
                finally:
                    os.kill(sibling, signal.SIGCONT)
            unreachable = [a["unreachable_workers"] for a in answers
                           if a["unreachable_workers"]]
            assert unreachable == [], (
                f"{len(unreachable)} of {len(answers)} answers named a running worker "
                f"unreachable: {unreachable[:3]}; log: "
                f"{[line for line in served.output if 'did not answer' in line][:3]}")
        nursery.cancel_scope.cancel()


async def test_a_worker_answers_every_sibling_question_of_a_burst(tmp_path: Path):
    """The same, deterministically: the questions of 40 admin queries a sibling
    worker makes at once (each through ``_ask``, as ``gather`` does) against this
    worker's real trace socket. Past its listen backlog of 16 the connects fail and
    the worker is reported unreachable."""
    from gateway._trace import Trace, TraceBuffer
    from gateway._trace_peers import Gathered, _ask, serve_peer_socket, socket_path

    traces = TraceBuffer(10)
    trace = Trace("request-1", "GET", "/api/x", "/api/{rest*}")
    trace.status = 200
    traces.add(trace)
    import json
    import os

    payload = json.dumps({"get": "request-1"}).encode()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_peer_socket, lambda: traces, str(tmp_path))
        path = socket_path(str(tmp_path), os.getpid())
        gathered = Gathered()
        async with trio.open_nursery() as asks:
            for _ in range(40):
                asks.start_soon(_ask, os.getpid(), path, payload, gathered)
        nursery.cancel_scope.cancel()
    assert gathered.unreachable == [], (
        f"{len(gathered.unreachable)} of 40 questions found the worker unreachable")
    assert len(gathered.traces) == 40
