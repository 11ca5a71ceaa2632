"""HTTP/2 request bodies under the gateway's Hypercorn changes, seen by a plain ASGI app
served on a real socket: what an app that reads late, or reads while cancelled, gets."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import h2.errors
import h2.events
import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

import gateway._app  # noqa: F401  (applies the Hypercorn changes)
from gateway._server import listen_socket
from tests.e2e.test_http2 import H2Client

Receive = Callable[[], Awaitable[dict[str, Any]]]
Handler = Callable[[Receive], Awaitable[None]]


@asynccontextmanager
async def serve_asgi(handler: Handler) -> AsyncIterator[H2Client]:
    """Serve an app that hands each POST's ``receive`` to ``handler``, echoes one
    WebSocket message and answers everything else 200; an HTTP/2 client connected."""

    async def app(scope: dict[str, Any], receive: Receive,
                  send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "websocket":  # echo one message
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            message = await receive()
            await send({"type": "websocket.send", "text": message.get("text")})
            await send({"type": "websocket.close", "code": 1000})
            return
        if scope["method"] == "POST":
            await handler(receive)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = listen_socket()
    config = Config()
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 1
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[Any]) -> None:
            await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config,
                               sockets=Sockets([], [sock], []),
                               shutdown_trigger=shutdown.wait, task_status=task_status)

        await nursery.start(serve)
        client = H2Client(await trio.open_tcp_stream("127.0.0.1", sock.getsockname()[1]))
        await client.start()
        try:
            yield client
        finally:
            await client.stream.aclose()
            shutdown.set()


def _post(client: H2Client) -> int:
    stream_id = client.conn.get_next_available_stream_id()
    client.conn.send_headers(stream_id, [(":method", "POST"), (":path", "/"),
                                         (":scheme", "http"), (":authority", "t")])
    return stream_id


async def test_an_app_reading_the_body_of_a_stream_reset_meanwhile_gets_it_and_the_disconnect():
    may_read, done = trio.Event(), trio.Event()
    seen: list[Any] = []

    async def handler(receive: Receive) -> None:
        await may_read.wait()  # e.g. waiting for an upstream slot
        try:
            while (message := await receive())["type"] == "http.request":
                seen.append(len(message["body"]))
            seen.append(message["type"])
        except Exception as error:
            seen.append(error)
        finally:
            done.set()

    async with serve_asgi(handler) as client:
        upload = _post(client)
        for _ in range(3):  # enough that credit is due once the app takes it
            client.conn.send_data(upload, b"x" * 16384)
        client.conn.reset_stream(upload)
        await client.flush()
        # A request after it, so h2 has moved on and forgotten the reset stream.
        assert await client.response_status(await client.get("/")) == 200
        may_read.set()
        with trio.fail_after(5):
            await done.wait()
        assert seen == [3 * 16384, "http.disconnect"]
        assert await client.response_status(await client.get("/")) == 200


async def test_a_cancelled_read_of_the_body_loses_nothing_and_the_client_gets_its_credit():
    queued, done = trio.Event(), trio.Event()
    bodies: list[int] = []

    async def handler(receive: Receive) -> None:
        await queued.wait()
        with trio.CancelScope() as scope:
            scope.cancel()  # e.g. the request's deadline fires as it reads
            bodies.append(len((await receive())["body"]))
        done.set()
        while (message := await receive()).get("more_body"):
            bodies.append(len(message["body"]))

    async with serve_asgi(handler) as client:
        upload = _post(client)
        while window := min(client.conn.local_flow_control_window(upload), 16384):
            client.conn.send_data(upload, b"x" * window)
        await client.flush()
        await client.round_trip()  # the whole window is queued for the app
        queued.set()
        with trio.fail_after(5):
            await done.wait()
            await client.until(lambda e: isinstance(e, h2.events.WindowUpdated)
                               and e.stream_id == upload)
        assert bodies == [65535]


async def _no_posts(receive: Receive) -> None:
    raise AssertionError("no POST is sent")


async def test_an_http2_websocket_closed_by_the_client_gets_the_close_reply_then_ends():
    async with serve_asgi(_no_posts) as client:
        await client.round_trip()
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, [
            (":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
            (":path", "/"), (":authority", "t"), ("sec-websocket-version", "13")])
        await client.flush()
        assert await client.response_status(stream_id) == 200
        mask, code = b"\x01\x02\x03\x04", (1000).to_bytes(2, "big")
        client.conn.send_data(stream_id, bytes([0x88, 0x80 | len(code)]) + mask + bytes(
            byte ^ mask[index % 4] for index, byte in enumerate(code)))
        await client.flush()
        with trio.fail_after(5):
            await client.until(lambda e: isinstance(e, (h2.events.StreamEnded,
                                                        h2.events.StreamReset))
                               and e.stream_id == stream_id)
        on_stream = [e for e in client.events if getattr(e, "stream_id", None) == stream_id]
        sent = b"".join(e.data for e in on_stream if isinstance(e, h2.events.DataReceived))
        assert sent == bytes([0x88, 2]) + code, "the close reply was dropped"
        assert any(isinstance(e, h2.events.StreamEnded) for e in on_stream)
        assert all(e.error_code == h2.errors.ErrorCodes.NO_ERROR
                   for e in on_stream if isinstance(e, h2.events.StreamReset))


async def test_an_http2_websocket_gets_its_messages_not_a_request_body():
    async with serve_asgi(_no_posts) as client:
        await client.round_trip()  # the server's SETTINGS allow extended CONNECT
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, [
            (":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
            (":path", "/"), (":authority", "t"), ("sec-websocket-version", "13")])
        await client.flush()
        assert await client.response_status(stream_id) == 200
        mask, text = b"\x01\x02\x03\x04", b"hello"
        frame = bytes([0x81, 0x80 | len(text)]) + mask + bytes(
            byte ^ mask[index % 4] for index, byte in enumerate(text))
        client.conn.send_data(stream_id, frame)
        await client.flush()
        with trio.fail_after(5):
            echoed = await client.until(lambda e: isinstance(e, h2.events.DataReceived)
                                        and e.stream_id == stream_id)
        assert echoed.data[:2 + len(text)] == bytes([0x81, len(text)]) + text
        # The app closes (1000): its close frame arrives, then END_STREAM; the stream
        # was reset with INTERNAL_ERROR and the close frame dropped.
        with trio.fail_after(5):
            await client.until(lambda e: isinstance(e, h2.events.StreamEnded)
                               and e.stream_id == stream_id)
        on_stream = [e for e in client.events if getattr(e, "stream_id", None) == stream_id]
        sent = b"".join(e.data for e in on_stream if isinstance(e, h2.events.DataReceived))
        assert sent.endswith(bytes([0x88, 2]) + (1000).to_bytes(2, "big"))
        assert all(e.error_code == h2.errors.ErrorCodes.NO_ERROR
                   for e in on_stream if isinstance(e, h2.events.StreamReset))
