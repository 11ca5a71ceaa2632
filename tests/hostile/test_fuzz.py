"""Hypothesis-driven requests against one running gateway, over real sockets.

Each example is one request on a fresh connection: a random method, a path with
percent-escapes, random header names and values, a body framed by Content-Length or
chunked. Whatever arrives, the answer is an HTTP status line or a closed connection,
never a 500 (the gateway answers its own errors with a JSON ``cause``; a 500 means an
exception escaped it), and Hypercorn logs no "Error in ASGI Framework".

pytest-trio runs each example of an async test in a fresh Trio run, so the gateway
runs in a thread of its own for the whole test and the examples use blocking sockets.
"""

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Iterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile import Stage, stage

EXAMPLES = 150
SOCKET_TIMEOUT_S = 2.0

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
PATH_CHARS = st.sampled_from([*"abcXYZ019-._~!$&'()*+,;=:@/",
                              "%2e", "%2E", "%2f", "%2F", "%00", "%ff", "%c3%a9", "%25",
                              "%0d%0a", "%20", "..", "//", "\\", "%5c", "?", "#"])
methods = st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE",
                                     "OPTIONS", "TRACE", "CONNECT", "get"]),
                    st.text(TOKEN, min_size=1, max_size=12))
paths = st.builds(lambda prefix, rest: prefix + rest,
                  st.sampled_from(["/api/up/", "/api/item/", "/api/small/", "/api/capped/",
                                   "/api/", "/", "/healthz", ""]),
                  st.lists(PATH_CHARS, max_size=20).map("".join))
header_names = st.one_of(st.text(TOKEN, min_size=1, max_size=20),
                         st.sampled_from(["content-length", "transfer-encoding", "host",
                                          "x-forwarded-for", "x-request-timeout-ms",
                                          "x-request-id", "connection", "expect", "te",
                                          "upgrade", "forwarded"]),
                         st.binary(min_size=1, max_size=10).map(lambda b: b.decode("latin-1")))
header_values = st.one_of(st.text(max_size=40).map(lambda t: t.encode("utf-8")
                                                   .decode("latin-1")),
                          st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                          st.sampled_from(["chunked", "close", "100-continue", "0", "-1",
                                           "99999999999999999999", "h2c", "websocket"]))
headers = st.lists(st.tuples(header_names, header_values), max_size=8)
bodies = st.binary(max_size=3000)
framings = st.sampled_from(["length", "chunked", "none"])


def build(method: str, path: str, hdrs: list[tuple[str, str]], body: bytes,
          framing: str) -> bytes:
    lines = [f"{method} {path or '/'} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{name}: {value}" for name, value in hdrs]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        payload = b""
    lines.append("Connection: close")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + payload


def send_one(port: int, data: bytes) -> bytes | None:
    """Send, then read until the server closes (bounded in time and size).

    None when nothing came back within SOCKET_TIMEOUT_S: the server is (rightly)
    waiting for a body the request's own headers promised.
    """
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        with contextlib.suppress(OSError):  # the server may refuse and close early
            sock.sendall(data)
        try:
            while len(received) < 1_000_000:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            return bytes(received) if received else None
    return bytes(received)


def promises_more(hdrs: list[tuple[str, str]]) -> bool:
    """Whether the fuzzed headers themselves announce a body (or a 100-continue wait)."""
    names = {name.strip().lower() for name, _ in hdrs}
    return bool(names & {"content-length", "transfer-encoding", "expect"})


@pytest.fixture(scope="module")
def served() -> Iterator[Stage]:
    """One gateway and upstream, served from a thread for every example."""
    ready: queue.Queue[tuple[Stage, trio.lowlevel.TrioToken, trio.Event]] = queue.Queue()

    async def main() -> None:
        stop = trio.Event()
        async with stage() as s:
            ready.put((s, trio.lowlevel.current_trio_token(), stop))
            await stop.wait()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    s, token, stop = ready.get(timeout=20)
    try:
        yield s
    finally:
        token.run_sync_soon(stop.set)
        thread.join(timeout=20)


def test_fuzzed_requests_never_break_the_gateway(served: Stage, caplog):
    caplog.set_level(logging.ERROR, logger="hypercorn.error")
    seen_statuses: set[int] = set()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(method=methods, path=paths, hdrs=headers, body=bodies, framing=framings)
    def one(method, path, hdrs, body, framing):
        try:
            data = build(method, path, hdrs, body, framing)
        except UnicodeEncodeError:
            return
        answer = send_one(served.port, data)
        if answer is None:
            assert promises_more(hdrs), f"no answer within {SOCKET_TIMEOUT_S} s: {data[:300]!r}"
            return
        if not answer:
            return  # the server closed without answering: allowed
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 ") and status_line[9:12].isdigit(), answer[:200]
        status = int(status_line[9:12])
        seen_statuses.add(status)
        assert status != 500, answer[:400]

    one()
    errors = [r for r in caplog.records if r.name == "hypercorn.error"
              and "Error in ASGI Framework" in r.getMessage()]
    assert errors == [], [r.exc_text or r.getMessage() for r in errors][:3]
    # Still serving normally at the end.
    answer = send_one(served.port, build("GET", "/api/up/ok", [], b"", "none"))
    assert answer is not None and answer.startswith(b"HTTP/1.1 200 "), answer
    assert seen_statuses  # the run exercised the gateway at all
