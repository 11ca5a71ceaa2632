"""A worker's trace socket: siblings that misbehave do not stop it answering."""

import json
import os
from pathlib import Path

import pytest
import trio

from gateway._trace import Trace, TraceBuffer
from gateway._trace_peers import answer, serve_peer_socket, socket_path


def buffer_of(count: int) -> TraceBuffer:
    traces = TraceBuffer(count)
    for index in range(count):
        trace = Trace(f"request-{index}", "GET", "/api/" + "p" * 200, "/api/{rest*}")
        trace.status = 200
        traces.add(trace)
    return traces


async def ask(path: str, question: bytes) -> bytes:
    """The socket's answer to ``question`` (b"" when it hangs up without one)."""
    stream = await trio.open_unix_socket(path)
    answer = b""
    async with stream:
        try:
            await stream.send_all(question)
            await stream.send_eof()
            while data := await stream.receive_some(65536):
                answer += data
        except trio.BrokenResourceError:  # it stopped reading an oversized question
            pass
    return answer


async def test_a_sibling_that_hangs_up_or_asks_too_much_does_not_stop_the_answers(
        tmp_path: Path):
    traces = buffer_of(1000)
    path = socket_path(str(tmp_path), os.getpid())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_peer_socket, lambda: traces, str(tmp_path))
            # Hangs up before its (large) answer is written.
            early = await trio.open_unix_socket(path)
            await early.send_all(json.dumps({"query": {"limit": 1000}}).encode())
            await early.send_eof()
            await early.aclose()
            # A question far over the size a question may have.
            assert await ask(path, b"x" * 200_000) == b""
            # Not JSON of a question.
            assert await ask(path, b'{"query": {"colour": "red"}}') == b""
            answer = json.loads(await ask(path, json.dumps({"get": "request-7"}).encode()))
            assert [t["request_id"] for t in answer] == ["request-7"]
            assert answer[0]["worker_pid"] == os.getpid()
            nursery.cancel_scope.cancel()
    assert not await trio.Path(path).exists()


async def test_traces_are_turned_into_json_off_the_event_loop(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    # 1,000 traces are milliseconds of CPU; the loop serving requests must not spend them.
    on_the_loop: list[bool] = []
    to_json = Trace.to_json

    def recording(self: Trace) -> dict:
        on_the_loop.append(trio.lowlevel.in_trio_run())
        return to_json(self)

    monkeypatch.setattr(Trace, "to_json", recording)
    traces = buffer_of(1000)
    local = await answer(traces, {"query": {"limit": 1000}})
    assert [t["request_id"] for t in local[:2]] == ["request-999", "request-998"]
    path = socket_path(str(tmp_path), os.getpid())
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_peer_socket, lambda: traces, str(tmp_path))
            sibling = json.loads(await ask(path, json.dumps({"query": {"limit": 1000}})
                                           .encode()))
            nursery.cancel_scope.cancel()
    assert sibling == local
    assert len(on_the_loop) == 2000 and not any(on_the_loop)
