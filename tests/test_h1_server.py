"""The client leg's HTTP/1.1 connection (``gateway._h1_server``) against h11's own.

``ServerConnection`` replaces ``h11.Connection`` inside Hypercorn's HTTP/1.1 protocol,
so it must be indistinguishable from it: each conversation here (requests received in
pieces, answers sent, cycles started, errors on both sides) runs through both, and every
event, every byte written, every state and every error (type, message, status hint)
must be the same. The reference is h11 with the gateway's two leniencies and its
early-answer rule, as served before the replacement.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import h11
import pytest

from gateway._h1_server import ServerConnection, response_event
from gateway._h1_unread import rest_discarded


class Reference(h11.Connection):
    """h11's server side with the leniencies the gateway served with (RFC 9112 2.2:
    empty lines before a request line; 9.6: nothing after a closing request) and its
    early-answer rule (``rest_discarded``)."""

    def send(self, event: Any) -> Any:
        if type(event) is h11.Response and not rest_discarded(self):
            self._cstate.process_keep_alive_disabled()
        return super().send(event)

    def next_event(self) -> Any:
        state = self.their_state
        if state is h11.IDLE or state is h11.MUST_CLOSE:
            data = self._receive_buffer._data
            if state is h11.MUST_CLOSE:
                del data[:]
            elif data and data[0] in (13, 10):
                stripped = data.lstrip(b"\r\n")
                del data[:len(data) - len(stripped)]
        return super().next_event()


Op = tuple[Any, ...]


def _outcome(action: Callable[[], Any]) -> Any:
    try:
        result = action()
    except (h11.ProtocolError, RuntimeError) as error:
        return ("error", type(error).__name__, str(error),
                getattr(error, "error_status_hint", None))
    if isinstance(result, h11.Request | h11.Response | h11.InformationalResponse):
        return (type(result).__name__, result, list(result.headers._full_items))
    if isinstance(result, h11.EndOfMessage):
        return ("EndOfMessage", list(result.headers._full_items))
    return result


def converse(factory: Callable[[], Any], ops: list[Op]) -> list[Any]:
    """Run ``ops`` on a fresh connection; what each step gave, and the states after."""
    connection = factory()
    seen = []
    for op in ops:
        kind = op[0]
        if kind == "recv":
            outcome = _outcome(lambda op=op: connection.receive_data(op[1]))
        elif kind == "next":
            outcome = _outcome(connection.next_event)
        elif kind == "send":
            outcome = _outcome(lambda op=op: connection.send(op[1]()))
        elif kind == "cycle":
            outcome = _outcome(connection.start_next_cycle)
        elif kind == "failed":
            outcome = _outcome(connection.send_failed)
        elif kind == "answer":  # a whole answer, if one is due
            if connection.our_state is not h11.SEND_RESPONSE:
                outcome = "not due"
            else:
                outcome = [_outcome(lambda make=make: connection.send(make()))
                           for make in op[1:]]
                outcome.append(_outcome(connection.start_next_cycle))
        else:
            raise AssertionError(kind)
        seen.append((op[0], outcome, connection.our_state, connection.their_state,
                     connection.they_are_waiting_for_100_continue,
                     connection.trailing_data, connection.their_http_version))
    return seen


def both(ops: list[Op]) -> list[Any]:
    def reference() -> Any:
        return Reference(h11.SERVER, max_incomplete_event_size=4096)

    def ours() -> Any:
        return ServerConnection(h11.SERVER, max_incomplete_event_size=4096)

    expected = converse(reference, ops)
    got = converse(ours, ops)
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have == want, f"step {index} {ops[index]!r}"
    return got


def response(status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
             ) -> Callable[[], h11.Response]:
    return lambda: h11.Response(status_code=status, headers=headers or [])


def data(payload: bytes) -> Callable[[], h11.Data]:
    return lambda: h11.Data(data=payload)


def end() -> h11.EndOfMessage:
    return h11.EndOfMessage()


def drain(count: int = 4) -> list[Op]:
    return [("next",)] * count


GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
CL5 = [(b"content-length", b"5")]

CONVERSATIONS: dict[str, list[Op]] = {
    "get, answer with a length, twice": [
        ("recv", GET), *drain(3), ("send", response(200, CL5)), ("send", data(b"hello")),
        ("send", end), ("cycle",), ("recv", GET), *drain(3), ("send", response(200, CL5)),
        ("send", data(b"hello")), ("send", end), ("cycle",)],
    "answer without a length is chunked": [
        ("recv", GET), *drain(2), ("send", response(200, [(b"x-a", b"1")])),
        ("send", data(b"abc")), ("send", data(b"")), ("send", end), ("cycle",)],
    "answer with both framings": [
        ("recv", GET), *drain(2),
        ("send", response(200, [(b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")])),
        ("send", data(b"abc")), ("send", end)],
    "http/1.0 answer is framed by the close": [
        ("recv", b"GET / HTTP/1.0\r\n\r\n"), *drain(3), ("send", response()),
        ("send", data(b"abc")), ("send", end), ("cycle",), ("recv", GET), *drain(2)],
    "http/1.0 keep-alive still closes": [
        ("recv", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"), *drain(2),
        ("send", response(200, [(b"Connection", b"keep-alive"), *CL5])),
        ("send", data(b"hello")), ("send", end), ("cycle",)],
    "head, with and without a length": [
        ("recv", b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"), *drain(2),
        ("send", response(200, CL5)), ("send", data(b"x")), ("send", end), ("cycle",),
        ("recv", b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"), *drain(2), ("send", response()),
        ("send", end), ("cycle",),
        ("recv", b"HEAD / HTTP/1.0\r\n\r\n"), *drain(2), ("send", response()),
        ("send", end)],
    "204 and 304": [
        ("recv", GET), *drain(2), ("send", response(204)), ("send", data(b"x")),
        ("send", end), ("cycle",), ("recv", GET), *drain(2),
        ("send", response(304, [(b"transfer-encoding", b"chunked")])), ("send", end),
        ("cycle",)],
    "post with a length, in pieces": [
        ("recv", b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab"), *drain(2),
        ("recv", b"cdefg"), *drain(2), ("recv", b"hijXX"), *drain(3),
        ("send", response(200, CL5)), ("send", data(b"hello")), ("send", end),
        ("cycle",), *drain(2)],
    "chunked upload with trailers": [
        ("recv", b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nab"),
        *drain(3), ("recv", b"c\r\n0\r\nT: v\r\n\r\n"), *drain(3),
        ("send", response(200, CL5)), ("send", data(b"hello")), ("send", end), ("cycle",)],
    "100-continue, then the body": [
        ("recv", (b"PUT /u HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
             b"Content-Length: 3\r\n\r\n")),
        *drain(2), ("send", lambda: h11.InformationalResponse(status_code=100, headers=[])),
        ("recv", b"abc"), *drain(2), ("send", response(200, CL5)),
        ("send", data(b"hello")), ("send", end), ("cycle",)],
    "100-continue answered first": [
        ("recv", (b"PUT /u HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
             b"Content-Length: 3\r\n\r\n")),
        *drain(2), ("send", response(413, CL5)), ("send", data(b"hello")), ("send", end),
        ("cycle",)],
    "early answer, small rest kept": [
        ("recv", b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"), *drain(2),
        ("send", response(404, CL5)), ("send", data(b"hello")), ("send", end),
        ("recv", b"x" * 97), *drain(2), ("cycle",)],
    "early answer, large rest closes": [
        ("recv", b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc"),
        *drain(2), ("send", response(503, CL5)), ("send", data(b"hello")), ("send", end),
        ("cycle",)],
    "early answer to a chunked body closes": [
        ("recv", b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"),
        *drain(3), ("send", response(404, CL5)), ("send", data(b"hello")), ("send", end)],
    "connection close asked by the client, then garbage": [
        ("recv", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n\r\nGARBAGE"),
        *drain(3), ("send", response(200, CL5)), ("send", data(b"hello")), ("send", end),
        *drain(2), ("recv", b""), *drain(2)],
    "connection close said by the answer": [
        ("recv", GET), *drain(2),
        ("send", response(200, [(b"connection", b"close, keep-alive"), *CL5])),
        ("send", data(b"hello")), ("send", end), ("cycle",)],
    "leading empty lines": [
        ("recv", b"\r\n\r\n\n" + GET), *drain(2), ("send", response(200, CL5)),
        ("send", data(b"hello")), ("send", end), ("cycle",), ("recv", b"\r\n"),
        *drain(1), ("recv", GET), *drain(2)],
    "pipelined": [
        ("recv", GET + GET + b"GET /c HTTP/1.1\r\n"), *drain(3), ("send", response(200, CL5)),
        ("send", data(b"hello")), ("send", end), *drain(1), ("cycle",), *drain(3),
        ("send", response(200, CL5)), ("send", data(b"hello")), ("send", end), ("cycle",),
        *drain(2), ("recv", b"Host: x\r\n\r\n"), *drain(2)],
    "websocket upgrade accepted": [
        ("recv", (b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                  b"Upgrade: websocket\r\n\r\nFRAME")),
        *drain(3),
        ("send", lambda: h11.InformationalResponse(
            status_code=101, headers=[(b"upgrade", b"websocket")])),
        *drain(1)],
    "upgrade refused, then the next request": [
        ("recv", b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n" + GET), *drain(3),
        ("send", response(404, CL5)), ("send", data(b"hello")), ("send", end), ("cycle",),
        *drain(2)],
    "101 without an upgrade asked": [
        ("recv", GET), *drain(2),
        ("send", lambda: h11.InformationalResponse(status_code=101, headers=[])),
        ("send", response(200, CL5))],
    "connect accepted and refused": [
        ("recv", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nxx"), *drain(3),
        ("send", response(405, CL5)), ("send", data(b"hello")), ("send", end), ("cycle",),
        *drain(2)],
    "connect switched": [
        ("recv", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nxx"), *drain(2),
        ("send", response(200)), *drain(1), ("send", data(b"x"))],
    "too much and too little body": [
        ("recv", GET), *drain(2), ("send", response(200, CL5)), ("send", data(b"hello!")),
        ("send", end), ("cycle",)],
    "too little body": [
        ("recv", GET), *drain(2), ("send", response(200, CL5)), ("send", data(b"hel")),
        ("send", end)],
    "data before the head": [("recv", GET), *drain(2), ("send", data(b"x")), ("send", end)],
    "answer before any request, then one": [
        ("send", response(408, [(b"connection", b"close"), *CL5])), ("send", data(b"hello")),
        ("send", end), ("recv", b""), *drain(2)],
    "closed at idle": [("recv", b""), *drain(2), ("recv", b"more")],
    "closed mid-head": [("recv", b"GET / HT"), *drain(1), ("recv", b""), *drain(2)],
    "closed mid-body": [
        ("recv", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab"), *drain(3),
        ("recv", b""), *drain(2), ("send", response(400, CL5))],
    "closed after the answer": [
        ("recv", GET), *drain(2), ("send", response(200, CL5)), ("send", data(b"hello")),
        ("send", end), ("recv", b""), *drain(2), ("cycle",)],
    "send failed": [("recv", GET), *drain(2), ("failed",), ("send", response(200, CL5))],
    "trailers on a chunked answer": [
        ("recv", GET), *drain(2), ("send", response()), ("send", data(b"x")),
        ("send", lambda: h11.EndOfMessage(headers=[(b"x-t", b"1")])), ("cycle",)],
    "trailers on a length": [
        ("recv", GET), *drain(2), ("send", response(200, CL5)), ("send", data(b"hello")),
        ("send", lambda: h11.EndOfMessage(headers=[(b"x-t", b"1")]))],
}

MALFORMED = {
    "bad request line": b"GET /a\r\nHost: x\r\n\r\n",
    "space in target": b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
    "no host": b"GET / HTTP/1.1\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "http/1.0 without host": b"GET / HTTP/1.0\r\n\r\n",
    "http/2.0 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "header without colon": b"GET / HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  b\r\n\r\n",
    "obs-fold first": b"GET / HTTP/1.1\r\n  b\r\nHost: x\r\n\r\n",
    "bare lf": b"GET / HTTP/1.1\nHost: x\n\n",
    "mixed endings": b"GET / HTTP/1.1\r\nHost: x\n\r\n",
    "control in value": b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\x7f\r\n\r\n",
    "nul in value": b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    "obs-text in value": b"GET / HTTP/1.1\r\nHost: x\r\nX: caf\xc3\xa9\r\n\r\n",
    "whitespace around value": b"GET / HTTP/1.1\r\nHost: x\r\nX:  \t a b \t \r\n\r\n",
    "empty value": b"GET / HTTP/1.1\r\nHost: x\r\nX:\r\n\r\n",
    "bad length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
    "conflicting lengths": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
         b"Content-Length: 6\r\n\r\n"),
    "repeated length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
         b"content-length: 3\r\n\r\nabc"),
    "comma length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\nabc",
    "huge length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 123456789012345678901\r\n\r\n",
    "gzip encoding": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    "chunked twice": (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n"),
    "CHUNKED": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n0\r\n\r\n",
    "length and chunked": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "odd method": b"!FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
    "lower-case method": b"get / HTTP/1.1\r\nHost: x\r\n\r\n",
    "leading space": b" GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "control first": b"\x01GET / HTTP/1.1\r\n",
    "absolute target": b"GET http://x/a?b HTTP/1.1\r\nHost: x\r\n\r\n",
    "head over the limit": b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 5000,
    "expect on http/1.0": b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
    "expect list": (b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: foo, 100-Continue\r\n"
         b"Content-Length: 1\r\n\r\nx"),
    "raw names kept": b"GET / HTTP/1.1\r\nHOST: x\r\nX-Mixed-Case: 1\r\n\r\n",
    "upgrade empty": b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: ,\r\n\r\n",
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_a_conversation_goes_as_with_h11(name: str) -> None:
    both(CONVERSATIONS[name])


@pytest.mark.parametrize("name", list(MALFORMED))
def test_an_unusual_request_is_read_or_refused_as_by_h11(name: str) -> None:
    ops: list[Op] = [("recv", MALFORMED[name]), *drain(4), ("send", response(400, CL5)),
                     ("send", data(b"hello")), ("send", end), ("cycle",)]
    both(ops)


@pytest.mark.parametrize("seed", range(40))
def test_any_split_of_a_conversation_goes_as_with_h11(seed: int) -> None:
    """Requests arriving in random pieces, answered in random ways."""
    rng = random.Random(seed)
    stream = b"".join(rng.choice([
        GET, b"\r\n", b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n1234567",
        b"PUT /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n", b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"PUT /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    ]) for _ in range(6))
    ops: list[Op] = []
    position = 0
    while position < len(stream):
        step = rng.randint(1, 40)
        ops.append(("recv", stream[position:position + step]))
        position += step
        ops.extend(drain(rng.randint(1, 3)))
        if rng.random() < 0.3:
            framing = rng.choice([CL5, [], [(b"connection", b"close"), *CL5]])
            ops.append(("answer", response(rng.choice([200, 204, 404]), framing),
                        data(b"hello"), end))
    ops.extend([("recv", b""), *drain(3)])
    both(ops)


RESPONSE_HEADERS = {
    "plain": [(b"content-type", b"text/plain"), (b"X-Raw-Case", b"v")],
    "length": [(b"Content-Length", b"12")],
    "repeated length": [(b"content-length", b"3"), (b"content-length", b"3")],
    "conflicting lengths": [(b"content-length", b"3"), (b"content-length", b"4")],
    "comma length": [(b"content-length", b"3, 3")],
    "bad length": [(b"content-length", b"-1")],
    "chunked": [(b"Transfer-Encoding", b"Chunked")],
    "gzip": [(b"transfer-encoding", b"gzip")],
    "chunked twice": [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
    "bad name": [(b"x y", b"1")],
    "colon in name": [(b"x:y", b"1")],
    "empty name": [(b"", b"1")],
    "newline in value": [(b"x", b"a\nb")],
    "cr in value": [(b"x", b"a\rb")],
    "nul in value": [(b"x", b"a\x00b")],
    "edge whitespace": [(b"x", b" a")],
    "inner whitespace": [(b"x", b"a \t b")],
    "empty value": [(b"x", b"")],
    "obs-text": [(b"x", b"\xff\x80")],
}


@pytest.mark.parametrize("name", list(RESPONSE_HEADERS))
@pytest.mark.parametrize("status", [200, 404, 199, 1000])
def test_an_answer_head_is_validated_as_by_h11(name: str, status: int) -> None:
    headers = RESPONSE_HEADERS[name]
    assert _outcome(lambda: response_event(status, headers)) == _outcome(
        lambda: h11.Response(status_code=status, headers=headers))
